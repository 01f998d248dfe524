"""What a Triton cast does to a number on the machine at hand: the compiled kernel on a GPU, or Triton's CPU
interpreter (``TRITON_INTERPRET=1``), which runs the same kernel in numpy and need not round the same way.

- ``triton_cast(x, dtype)``: fp32 ``x`` through a one-line Triton kernel (``tl.load(...).to(dtype)``, stored).
- ``compare_with_torch(x, dtype)``: that cast against torch's ``x.to(dtype)`` (round to nearest, ties to even):
  how many values differ, how many of those are the truncation of ``x`` (rounding toward zero), and the largest
  difference in units of the last place of ``dtype``.
- ``dot_matches_torch(dtype)``: a 16 x 16 ``tl.dot`` of small integers held in ``dtype`` (every product and sum exact)
  against torch. Triton 3.9's interpreter multiplies the raw 16-bit patterns of bf16 operands (an fp16 dot is
  right), so a kernel whose ``tl.dot`` takes bf16 can be checked on a CPU only with fp16 data.
"""
from __future__ import annotations

import torch

from labkit import env
from labkit.kernels import flash_attn

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the lab installs triton; the functions below say so when it is missing
    triton = None

if triton is not None:

    @triton.jit
    def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        a = tl.load(a_ptr + i[:, None] * N + i[None, :])
        b = tl.load(b_ptr + i[:, None] * N + i[None, :])
        tl.store(c_ptr + i[:, None] * N + i[None, :], tl.dot(a, b))


def triton_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``x`` (any shape) cast to ``dtype`` (bf16 or fp16) inside a Triton kernel, on x's device."""
    if triton is None:
        raise env.LabkitError("triton is not installed: pip install triton (on a CPU it runs with TRITON_INTERPRET=1)")
    if x.dtype != torch.float32 or dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"triton_cast takes fp32 values to bf16 or fp16, got {x.dtype} -> {dtype}")
    if x.device.type != "cuda" and not flash_attn.interpreted():
        raise env.LabkitError(f"x is on {x.device}: Triton compiles for a CUDA GPU; set TRITON_INTERPRET=1 before "
                              "importing triton to run the kernel on the CPU")
    xc = x.contiguous().view(-1)
    y = torch.empty(xc.shape, dtype=dtype, device=x.device)
    _cast_kernel[(triton.cdiv(xc.numel(), 1024),)](xc, y, xc.numel(), BLOCK=1024)
    return y.view(x.shape)


def compare_with_torch(x: torch.Tensor, dtype: torch.dtype) -> dict:
    """``triton_cast(x, dtype)`` against ``x.to(dtype)``: {"n", "differ", "toward_zero" (differing values equal to
    x truncated toward zero), "max_ulps" (largest difference in units of the last place of dtype), "interpreted"}."""
    ours, nearest = triton_cast(x, dtype), x.to(dtype)
    away = nearest.abs().float() > x.abs()  # torch rounded away from zero here: truncation is the next value in
    trunc = torch.where(away, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)
    ulp = (torch.nextafter(nearest, torch.full_like(nearest, float("inf"))).float() - nearest.float()).abs()
    differ = ours != nearest
    return {"n": x.numel(), "differ": int(differ.sum()), "toward_zero": int((differ & (ours == trunc)).sum()),
            "max_ulps": float(((ours.float() - nearest.float()).abs() / ulp).max()),
            "interpreted": flash_attn.interpreted()}


def dot_matches_torch(dtype: torch.dtype, device=None, seed: int = 0) -> dict:
    """A (16, 16) x (16, 16) ``tl.dot`` of integers in [-4, 4] stored as ``dtype`` (bf16 or fp16: exact, and so is
    every product and sum in the fp32 accumulator) against torch's fp32 product: {"exact", "max_abs_error",
    "bit_patterns" (the result equals the product of the operands' raw unsigned 16-bit patterns), "interpreted"}."""
    if triton is None:
        raise env.LabkitError("triton is not installed: pip install triton (on a CPU it runs with TRITON_INTERPRET=1)")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dot_matches_torch takes bf16 or fp16, got {dtype}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() and not flash_attn.interpreted() else "cpu"))
    if device.type != "cuda" and not flash_attn.interpreted():
        raise env.LabkitError(f"{device} is not a CUDA GPU: Triton compiles for one; set TRITON_INTERPRET=1 before "
                              "importing triton to run the kernel on the CPU")
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randint(-4, 5, (16, 16), generator=g).to(dtype) for _ in range(2))
    c = torch.empty(16, 16, device=device)
    _dot_kernel[(1,)](a.to(device), b.to(device), c, N=16)
    c = c.cpu()
    ref = a.float() @ b.float()
    raw = (a.view(torch.int16).long() & 0xFFFF).double() @ (b.view(torch.int16).long() & 0xFFFF).double()
    return {"exact": bool(torch.equal(c, ref)), "max_abs_error": float((c - ref).abs().max()),
            "bit_patterns": bool(torch.allclose(c.double(), raw, rtol=1e-6)), "interpreted": flash_attn.interpreted()}
