"""scripts/gpu_issue14.py's format checks, run on a tiny Llama here (the Triton kernels under the interpreter on a
CPU): the code the GPU run uses to tell a kernel fault from rounding at a near-tie."""
import importlib.util

import torch

from labkit import env
from labkit import kernels  # noqa: F401  (TRITON_INTERPRET=1 without a GPU, before triton loads)


def _script():
    spec = importlib.util.spec_from_file_location("gpu_issue14", env.repo_root() / "scripts" / "gpu_issue14.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_format_checks_compare_triton_and_torch_against_the_exact_codes():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(device=env.device(), dtype=torch.float16).eval()
    ids = torch.randint(3, 256, (10,), generator=torch.Generator().manual_seed(1))
    checks, agreement = _script().format_checks(model, ids[None, :4].to(model.device), ids, n_new=4)
    assert set(checks) == {f"{fmt}_{pair}" for fmt in ("int8", "int4") for pair in
                           ("triton_vs_torch_dequant", "triton_vs_fp32_dequant", "torch_dequant_vs_fp32_dequant")}
    assert all(0 <= n <= 4 for n in checks.values()), checks
    for fmt in ("int8", "int4"):
        tri, tor = agreement[fmt]["triton_vs_fp32_dequant"], agreement[fmt]["torch_vs_fp32_dequant"]
        assert tri["positions"] == tor["positions"] == ids.numel() - 1
        # the Triton step holds the exact value of the codes at least as closely as the torch step (fp16 both)
        assert 0 < tri["rms"] <= 2 * tor["rms"], (fmt, tri["rms"], tor["rms"])
        assert agreement[fmt]["layouts"]["wqkv"] == "WordWeight"  # batch 1: both formats in the word layout
