"""labkit.kernels.rounding: a Triton cast against torch's, on a GPU or in Triton's CPU interpreter."""
import pytest
import torch

from labkit import env
from labkit.kernels import rounding


def test_cast_rounds_to_nearest_or_toward_zero():
    """fp16 rounds like torch on both; bf16 rounds like torch on a GPU, and the interpreter's differences (Triton 3.9
    truncates fp32 to bf16) are each a truncation, one unit in the last place away."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3
    x[:4] = torch.tensor([1.0 + 2 ** -8, -(1.0 + 3 * 2 ** -9), 65504.0, 1e-6])  # a tie, a round-up, fp16's max, tiny
    x = x.to(env.device())
    half = rounding.compare_with_torch(x, torch.float16)
    bf16 = rounding.compare_with_torch(x, torch.bfloat16)
    assert half["differ"] == 0, half
    if bf16["interpreted"]:
        assert bf16["differ"] == bf16["toward_zero"] and bf16["max_ulps"] <= 1.0, bf16
    else:
        assert bf16["differ"] == 0, bf16


def test_dot_of_exact_values():
    """tl.dot of small integers (exact in bf16 and fp16, and so is every product and sum): fp16 equals torch on both;
    bf16 equals torch on a GPU, while the interpreter (Triton 3.9) multiplies the operands' raw 16-bit patterns."""
    half = rounding.dot_matches_torch(torch.float16)
    bf16 = rounding.dot_matches_torch(torch.bfloat16)
    assert half["exact"], half
    if bf16["interpreted"]:
        assert bf16["exact"] or bf16["bit_patterns"], bf16
    else:
        assert bf16["exact"], bf16
    with pytest.raises(ValueError, match="bf16 or fp16"):
        rounding.dot_matches_torch(torch.float32)


def test_bad_input():
    with pytest.raises(ValueError, match="fp32 values to bf16 or fp16"):
        rounding.triton_cast(torch.randn(4, dtype=torch.float64), torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 values to bf16 or fp16"):
        rounding.triton_cast(torch.randn(4), torch.float32)
