"""A FlashAttention-2 forward kernel in Triton, beside the PyTorch reference it is tested against.

What it computes: ``O = softmax(Q K^T * scale [+ causal mask]) V`` and the log-sum-exp of every score row,
without ever writing the (seqlen_q, seqlen_kv) score matrix to memory (Dao et al. 2022, "FlashAttention";
Dao 2023, "FlashAttention-2": https://arxiv.org/abs/2307.08691).

**Layout** (one layout for the whole workbook, the one ``torch.nn.functional.scaled_dot_product_attention``
uses): ``q: (batch, n_heads, seqlen_q, head_dim)``, ``k, v: (batch, n_kv_heads, seqlen_kv, head_dim)``,
output ``(batch, n_heads, seqlen_q, head_dim)`` and ``lse: (batch, n_heads, seqlen_q)`` in fp32 (natural log).
Any strides are accepted as long as ``head_dim`` is the contiguous (last, stride 1) dimension, so the
``(batch, seqlen, heads, head_dim)`` tensors of a Hugging Face model can be passed through a transposed view.

- Grouped-query attention: ``n_heads`` must be a multiple of ``n_kv_heads``; query head ``h`` reads key/value
  head ``h // (n_heads // n_kv_heads)`` inside the kernel (no copy of K and V).
- Causal masking is aligned bottom-right, as in FlashAttention-2 and a KV cache: query ``i`` sees keys
  ``j <= i + (seqlen_kv - seqlen_q)``. So a decode step (seqlen_q = 1) sees the whole cache.
- Sequence lengths are arbitrary (1, 97, 1025, ...): the last blocks are masked, the others are not.
- Supported: fp16 and bf16 inputs, head dim 64 and 128. Anything else raises a ``ValueError`` saying what to do.

How the kernel is organised (the FlashAttention-2 techniques, each visible in the code below):

1. One program per (query block of ``BLOCK_M`` rows, batch x head): the outer loop of FA2 is the grid; each
   program keeps its ``Q`` block, the running max ``m_i``, running sum ``l_i`` and the unnormalised output
   ``acc`` on chip and streams ``K``/``V`` blocks of ``BLOCK_N`` rows.
2. Scores are scaled by ``scale * log2(e)`` once, so the exponentials are ``exp2`` (one instruction).
3. The key range splits in two stages: key blocks every row of the query block may see (no mask at all), then
   the few blocks on the causal diagonal or past the end of the sequence (masked).
4. Normalisation is deferred: ``acc`` is divided by ``l_i`` once, after the last key block.
5. For causal attention the query blocks of a head run heaviest first (the last rows see the most keys), so
   the short blocks fill the tail of the launch instead of the long ones.

``flash_attention_reference`` is the same computation in plain PyTorch (fp32 math) with the same signature.
"""
from __future__ import annotations

import math
import os

import torch

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


# ---------------------------------------------------------------------------------------------- kernel
try:
    import triton
    import triton.language as tl
except ImportError:  # the wrapper raises a LabkitError naming the install command
    triton = None

if triton is not None:

    @triton.jit
    def _online_softmax_update(acc, l_i, m_i, s, v, cols, offs_m, seqlen_kv, causal_shift, qk_scale,
                               MASKED: tl.constexpr, CAUSAL: tl.constexpr):
        """Fold one key block into the running statistics: ``s`` = Q K^T of the block (fp32, unscaled), ``v`` its
        values, ``cols`` its key positions. MASKED: bounds and causal masks (only the blocks that need them)."""
        if MASKED:
            keep = cols[None, :] < seqlen_kv
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + causal_shift)
            s = tl.where(keep, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            s = s - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            s = s * qk_scale - m_new[:, None]                                 # one FMA per score
        p = tl.math.exp2(s)                                                   # (BLOCK_M, BLOCK_N) = P~ of FA2
        alpha = tl.math.exp2(m_i - m_new)                                     # rescales the old statistics
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        return acc, l_i, m_new

    @triton.jit
    def _key_loop(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, lo, hi,
                  seqlen_kv, causal_shift, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
        """Stream key/value blocks [lo, hi) through the online softmax. MASKED: bounds and causal masks."""
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            cols = start_n + offs_n                                           # (BLOCK_N,) key positions
            if MASKED:
                k = tl.load(k_ptrs + start_n * stride_kn, mask=cols[None, :] < seqlen_kv, other=0.0)
                v = tl.load(v_ptrs + start_n * stride_vn, mask=cols[:, None] < seqlen_kv, other=0.0)
            else:
                k = tl.load(k_ptrs + start_n * stride_kn)                     # (HEAD_DIM, BLOCK_N) = K^T block
                v = tl.load(v_ptrs + start_n * stride_vn)                     # (BLOCK_N, HEAD_DIM)
            s = tl.dot(q, k)                                                  # (BLOCK_M, BLOCK_N) fp32 scores
            acc, l_i, m_i = _online_softmax_update(acc, l_i, m_i, s, v, cols, offs_m, seqlen_kv, causal_shift,
                                                   qk_scale, MASKED, CAUSAL)
        return acc, l_i, m_i

    @triton.jit
    def _program_ids(n_heads, group, HEAVY_FIRST: tl.constexpr):
        """This program's query block (heaviest first when asked), its batch x head, and the KV head it reads."""
        pid_m = tl.program_id(0)
        if HEAVY_FIRST:
            pid_m = tl.num_programs(0) - 1 - pid_m
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        return pid_m, pid_bh, b, h, h // group                                # grouped-query attention

    @triton.jit
    def _key_range(m0, seqlen_q, seqlen_kv, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        """The key blocks of the query block at row m0: [0, hi_full) need no mask, [hi_full, hi) do."""
        causal_shift = seqlen_kv - seqlen_q
        if CAUSAL:
            # keys [0, m0 + shift] are visible to every row of this block; past that, the diagonal
            end_visible = tl.minimum(m0 + causal_shift + 1, seqlen_kv)
            hi_full = (end_visible // BLOCK_N) * BLOCK_N
            hi = tl.minimum(m0 + BLOCK_M + causal_shift, seqlen_kv)
        else:
            hi_full = (seqlen_kv // BLOCK_N) * BLOCK_N
            hi = seqlen_kv
        return hi_full, hi, causal_shift

    @triton.jit
    def _flash_fwd(Q, K, V, O, LSE,
                   # strides in elements; head_dim has stride 1 everywhere
                   stride_qb, stride_qh, stride_qm,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_ob, stride_oh, stride_om,
                   # sizes
                   n_heads, group, seqlen_q, seqlen_kv, qk_scale,
                   # compile-time choices
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HEAVY_FIRST: tl.constexpr):
        pid_m, pid_bh, b, h, h_kv = _program_ids(n_heads, group, HEAVY_FIRST)
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
        o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)                                   # (BLOCK_M,) query rows
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=offs_m[:, None] < seqlen_q, other=0.0)               # (BLOCK_M, HEAD_DIM)
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]       # (HEAD_DIM, BLOCK_N)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]       # (BLOCK_N, HEAD_DIM)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)            # running max (log2 units)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                           # running sum of exp2
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)                 # unnormalised output

        hi_full, hi, causal_shift = _key_range(m0, seqlen_q, seqlen_kv, BLOCK_M, BLOCK_N, CAUSAL)
        # stage 1: full blocks, no mask
        acc, l_i, m_i = _key_loop(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                                  0, hi_full, seqlen_kv, causal_shift, qk_scale,
                                  MASKED=False, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N)
        # stage 2: the causal diagonal and the ragged end of the sequence, masked
        acc, l_i, m_i = _key_loop(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                                  hi_full, hi, seqlen_kv, causal_shift, qk_scale,
                                  MASKED=True, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N)

        # deferred normalisation: one division per output row
        out = acc / l_i[:, None]
        row_ok = offs_m < seqlen_q
        tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453                   # back to natural log
        tl.store(LSE + pid_bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=row_ok)


def _kernel():
    from labkit import env

    if triton is None:
        env.require_package("triton", "the Triton FlashAttention kernel")  # raises with the install command
    if interpreted() and not _triton_was_loaded_interpreted():
        raise env.LabkitError("Triton was imported before TRITON_INTERPRET=1 was set, so its interpreter is only "
                              "half active. Import labkit.kernels (or labkit.attention) before anything that "
                              "imports triton (e.g. before loading a model), or export TRITON_INTERPRET=1.")
    return _flash_fwd


def _triton_was_loaded_interpreted() -> bool:
    """Triton picks jit or interpreter per function when the function is defined (at its import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


# ---------------------------------------------------------------------------------------------- configs
def interpreted() -> bool:
    """True when Triton runs through its CPU interpreter (no GPU, or TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_config(head_dim: int, causal: bool) -> dict:
    """Block sizes, warps and pipeline stages per head dim.

    Head dim 128: the best of six configs timed on an NVIDIA H200 (bf16, 32 heads, 4k and 16k, causal or not;
    ``scripts/gpu_attention.py tune``, kept in ``results/nvidia-h200/attention_checks.json``). Head dim 64:
    the same blocks with 4 warps, checked for correctness but not tuned.

    Under the interpreter, small blocks: every masked-out row and column is real work for numpy.
    """
    if interpreted():
        return dict(block_m=32, block_n=32, num_warps=4, num_stages=1)
    if head_dim == 128:
        return dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return dict(block_m=128, block_n=64, num_warps=4, num_stages=3)


# ---------------------------------------------------------------------------------------------- wrapper
def _check_inputs(q, k, v, causal):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seqlen, head_dim); "
                             f"got {getattr(t, 'shape', type(t))}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the kernel computes in fp16 or bf16 only "
                            f"(fp32 accumulation inside). Cast first: {name}.to(torch.bfloat16), "
                            f"or use labkit.attention.naive_attention for fp32.")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not interpreted():
        raise ValueError(f"tensors are on {q.device} but Triton compiles for CUDA here; move them to the GPU, or "
                         f"set TRITON_INTERPRET=1 before importing triton to run the kernel on the CPU (slow).")
    b, h, n_q, d = q.shape
    bk, h_kv, n_kv, dk = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if bk != b or dk != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={d} is not supported by this kernel (supported: {SUPPORTED_HEAD_DIMS}); "
                         f"use torch.nn.functional.scaled_dot_product_attention for other head sizes.")
    if h % h_kv != 0:
        raise ValueError(f"n_heads={h} must be a multiple of n_kv_heads={h_kv} (grouped-query attention)")
    if causal and n_kv < n_q:
        raise ValueError(f"causal attention with seqlen_kv={n_kv} < seqlen_q={n_q} leaves the first queries with "
                         f"no key; pass at least as many keys as queries.")
    if n_q == 0 or n_kv == 0:
        raise ValueError("empty sequence: seqlen_q and seqlen_kv must be at least 1")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}.stride(-1) is {t.stride(-1)}; head_dim must be contiguous "
                             f"(call {name}.contiguous() first)")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None, *, out: torch.Tensor | None = None, block_m: int | None = None,
                    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                    heavy_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward in Triton. Returns ``(o, lse)``.

    q: (batch, n_heads, seqlen_q, head_dim); k, v: (batch, n_kv_heads, seqlen_kv, head_dim); fp16 or bf16;
    head_dim 64 or 128; n_heads a multiple of n_kv_heads. ``scale`` defaults to ``1/sqrt(head_dim)``.
    o: (batch, n_heads, seqlen_q, head_dim) in q's dtype (written into ``out`` when given: any strides with a
    contiguous last dim); lse: (batch, n_heads, seqlen_q) fp32, ``log(sum_j exp(scale * q_i . k_j))`` over the
    visible keys. The block/warp/stage arguments override ``default_config`` (for tuning).
    """
    _check_inputs(q, k, v, causal)
    b, h, n_q, d = q.shape
    h_kv, n_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cfg = default_config(d, causal)
    cfg.update({key: val for key, val in dict(block_m=block_m, block_n=block_n, num_warps=num_warps,
                                               num_stages=num_stages).items() if val is not None})
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must have q's shape {tuple(q.shape)} and dtype {q.dtype} with a contiguous last dim")
    lse = torch.empty((b, h, n_q), device=q.device, dtype=torch.float32)
    grid = (triton_cdiv(n_q, cfg["block_m"]), b * h)
    _kernel()[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, h // h_kv, n_q, n_kv, scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], CAUSAL=bool(causal),
        HEAVY_FIRST=bool(causal and heavy_first),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------- reference
def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                              scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``flash_attention`` computes, in plain PyTorch with fp32 math: returns ``(o, lse)``.

    Same layout and semantics (GQA, bottom-right causal alignment); o in q's dtype, lse fp32
    (batch, n_heads, seqlen_q). Materialises the (seqlen_q, seqlen_kv) scores: small sizes only.
    """
    b, h, n_q, d = q.shape
    h_kv, n_kv = k.shape[1], k.shape[2]
    if h % h_kv:
        raise ValueError(f"n_heads={h} must be a multiple of n_kv_heads={h_kv}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kf = k.float().repeat_interleave(h // h_kv, dim=1)                        # (b, h, n_kv, d)
    vf = v.float().repeat_interleave(h // h_kv, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q.float(), kf) * scale                # (b, h, n_q, n_kv)
    if causal:
        i = torch.arange(n_q, device=q.device)[:, None]
        j = torch.arange(n_kv, device=q.device)[None, :]
        s = s.masked_fill(j > i + (n_kv - n_q), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                          # (b, h, n_q)
    o = torch.einsum("bhij,bhjd->bhid", torch.exp(s - lse[..., None]), vf)
    return o.to(q.dtype), lse
