"""The FlashAttention-2 forward of ``flash_attn`` rebuilt for Hopper: tensor-memory-accelerator (TMA) loads,
larger tiles, optional warp specialization, and a tuner that times its configurations on the device.

``flash_attn.py`` is the teaching kernel: pointer arithmetic, one config, every step visible. This one computes the
same thing with the same signature and layout, and is checked against the same references
(``flash_attn.flash_attention_reference``). What changes, and why it can be faster on an H100/H200:

1. **TMA descriptors.** Each program builds one descriptor per (batch, head) for Q, K, V and O, shaped exactly
   ``(seqlen, head_dim)``, with ``tl.make_tensor_descriptor``. A descriptor load is one instruction that moves a
   whole tile from HBM to shared memory, with no address arithmetic in the registers of the math warps; rows past
   the end of the sequence come back as zeros and are dropped on store, so ragged lengths need no load masks.
   K is loaded as ``(BLOCK_N, head_dim)`` rows and transposed on chip for ``Q K^T``.
2. **Tiles of 128 x 128** (and 64/128 key positions): fewer loop iterations, larger tensor-core instructions.
3. **Warp specialization** (``ws=True``): Triton splits the key loop into producer warps (loads) and consumer warps
   (math), so loads of the next tile overlap the softmax of this one. Triton's support for it on Hopper depends
   on the version: ``tune`` records a configuration that fails to compile with its error instead of hiding it.
4. Kept from the teaching kernel: the key range in two stages (unmasked blocks, then the causal diagonal and the
   ragged end), causal tiles above the diagonal skipped, heaviest query blocks first, exp2 with the scale folded.

Device-side descriptors need scratch memory for the descriptors themselves: ``flash_attention_fast`` installs a
Triton allocator on first use (``triton.set_allocator``) when none is set. Under the interpreter (no GPU) the kernel
runs on the CPU at small tiles, which is how CI tests it.
"""
from __future__ import annotations

import math

import torch

from labkit.kernels import flash_attn as _fa

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# configurations the tuner tries; the first is the default until a tune() in this process picks one per
# (head_dim, causal). On an NVIDIA H200 (bf16, head dim 128, 32 heads, 8k and 16k, causal or not; triton 3.6, commit
# 9b577cf) 128x128 tiles with 8 warps and 3 stages won every case: 448-494 TFLOP/s against 343-474 for the others,
# among them the warp-specialized loop (404-473) and 64-row tiles with 4 warps (342-424), which were dropped from this
# list after that run (results/nvidia-h200/attention.json keeps the tuner's runs). On an H100 (4k and 16k, commit
# 379c75e, results/nvidia-h100-80gb-hbm3/peers_gpu_log.txt) the warp-specialized and the software-pipelined
# (``pipe``, see _tma_key_loop) loops came within 2% of it either way, never further ahead: neither closes the gap
# to cuDNN.


def _cfg(block_m, block_n, num_warps, num_stages, ws=False, pipe=False) -> dict:
    return dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages, ws=ws, pipe=pipe)


CONFIGS = (
    _cfg(128, 128, 8, 3), _cfg(128, 128, 8, 2), _cfg(128, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3, ws=True),
    _cfg(128, 128, 8, 2, pipe=True), _cfg(128, 64, 8, 3, pipe=True), _cfg(128, 64, 8, 2, pipe=True),
)
_TUNED: dict[tuple[int, bool], dict] = {}

if triton is not None:

    @triton.jit
    def _tma_update(acc, l_i, m_i, s, v_desc, start_n, offs_m, offs_n, seqlen_kv, causal_shift, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr):
        """Fold the scores ``s`` of the key tile at ``start_n`` into the online softmax (the teaching kernel's
        update), its V tile loaded through the descriptor."""
        v = v_desc.load([start_n, 0])                                         # (BLOCK_N, HEAD_DIM)
        return _fa._online_softmax_update(acc, l_i, m_i, s, v, start_n + offs_n, offs_m, seqlen_kv, causal_shift,
                                          qk_scale, MASKED, CAUSAL)

    @triton.jit
    def _head_desc(base, b, h, stride_b, stride_h, stride_row, rows, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        """A TMA descriptor over one (batch, head) of a (batch, heads, rows, HEAD_DIM) tensor: tiles of BLOCK rows,
        bounded by this head's ``rows`` (nothing past them is read or written)."""
        return tl.make_tensor_descriptor(base + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h,
                                         shape=[rows, HEAD_DIM], strides=[stride_row, 1], block_shape=[BLOCK, HEAD_DIM])

    @triton.jit
    def _tma_key_loop(acc, l_i, m_i, q, k_desc, v_desc, offs_m, offs_n, lo, hi, seqlen_kv, causal_shift, qk_scale,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr,
                      PIPE: tl.constexpr):
        """Key tiles [lo, hi) through the online softmax (the same update as flash_attn._key_loop).

        PIPE: the scores of the next tile are issued before the softmax of this one (FlashAttention-3's overlap of
        the exponentials with the next Q K^T on the tensor cores), at the cost of a second score tile in registers.
        """
        if PIPE:
            if lo < hi:
                s = tl.dot(q, k_desc.load([lo, 0]).T)
                for start_n in range(lo + BLOCK_N, hi, BLOCK_N):
                    s_next = tl.dot(q, k_desc.load([start_n, 0]).T)
                    acc, l_i, m_i = _tma_update(acc, l_i, m_i, s, v_desc, start_n - BLOCK_N, offs_m, offs_n,
                                                seqlen_kv, causal_shift, qk_scale, MASKED, CAUSAL)
                    s = s_next
                acc, l_i, m_i = _tma_update(acc, l_i, m_i, s, v_desc, hi - BLOCK_N, offs_m, offs_n, seqlen_kv,
                                            causal_shift, qk_scale, MASKED, CAUSAL)
        elif WS:
            for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
                s = tl.dot(q, k_desc.load([start_n, 0]).T)                    # (BLOCK_M, BLOCK_N) fp32
                acc, l_i, m_i = _tma_update(acc, l_i, m_i, s, v_desc, start_n, offs_m, offs_n, seqlen_kv,
                                            causal_shift, qk_scale, MASKED, CAUSAL)
        else:
            for start_n in range(lo, hi, BLOCK_N):
                s = tl.dot(q, k_desc.load([start_n, 0]).T)                    # K tile (BLOCK_N, HEAD_DIM), transposed
                acc, l_i, m_i = _tma_update(acc, l_i, m_i, s, v_desc, start_n, offs_m, offs_n, seqlen_kv,
                                            causal_shift, qk_scale, MASKED, CAUSAL)
        return acc, l_i, m_i

    @triton.jit
    def _flash_fwd_tma(Q, K, V, O, LSE,
                       stride_qb, stride_qh, stride_qm,
                       stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn,
                       stride_ob, stride_oh, stride_om,
                       n_heads, group, seqlen_q, seqlen_kv, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, HEAVY_FIRST: tl.constexpr, WS: tl.constexpr, PIPE: tl.constexpr):
        pid_m, pid_bh, b, h, h_kv = _fa._program_ids(n_heads, group, HEAVY_FIRST)
        # one descriptor per tensor for this (batch, head): its bounds are this head's sequence, nothing past it
        q_desc = _head_desc(Q, b, h, stride_qb, stride_qh, stride_qm, seqlen_q, HEAD_DIM, BLOCK_M)
        k_desc = _head_desc(K, b, h_kv, stride_kb, stride_kh, stride_kn, seqlen_kv, HEAD_DIM, BLOCK_N)
        v_desc = _head_desc(V, b, h_kv, stride_vb, stride_vh, stride_vn, seqlen_kv, HEAD_DIM, BLOCK_N)
        o_desc = _head_desc(O, b, h, stride_ob, stride_oh, stride_om, seqlen_q, HEAD_DIM, BLOCK_M)
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        q = q_desc.load([m0, 0])                                              # (BLOCK_M, HEAD_DIM), zeros past the end
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        hi_full, hi, causal_shift = _fa._key_range(m0, seqlen_q, seqlen_kv, BLOCK_M, BLOCK_N, CAUSAL)
        acc, l_i, m_i = _tma_key_loop(acc, l_i, m_i, q, k_desc, v_desc, offs_m, offs_n, 0, hi_full, seqlen_kv,
                                      causal_shift, qk_scale, MASKED=False, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N, WS=WS,
                                      PIPE=PIPE)
        acc, l_i, m_i = _tma_key_loop(acc, l_i, m_i, q, k_desc, v_desc, offs_m, offs_n, hi_full, hi, seqlen_kv,
                                      causal_shift, qk_scale, MASKED=True, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N, WS=False,
                                      PIPE=False)
        o_desc.store([m0, 0], (acc / l_i[:, None]).to(O.dtype.element_ty))   # rows past the end are dropped
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + pid_bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)


def _ensure_allocator():
    """Device-side descriptors live in scratch memory Triton asks its allocator for; install a torch one once."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))


def default_config(head_dim: int, causal: bool) -> dict:
    """The configuration ``tune`` picked in this process for (head_dim, causal), else the first of CONFIGS;
    under the interpreter, small tiles."""
    if _fa.interpreted():
        return _cfg(32, 32, 4, 1)
    if (head_dim, bool(causal)) in _TUNED:
        return dict(_TUNED[(head_dim, bool(causal))])
    return dict(CONFIGS[0])


def _check_descriptor_strides(q, k, v, out, dims=(), why: str = "", fix: str = ""):
    """TMA descriptors need the row stride (dim 2) and the base address to be multiples of 16 bytes, and so do the
    strides of ``dims`` where a descriptor spans them too (``why`` says which, ``fix`` what else the caller can do)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if (t.stride(2) * t.element_size()) % 16 or t.data_ptr() % 16:
            raise ValueError(f"{name} has a row stride of {t.stride(2)} elements or a base address that is not a "
                             f"multiple of 16 bytes, which TMA descriptors need; call {name}.contiguous() first "
                             f"(or use labkit.kernels.flash_attn.flash_attention, which takes any strides)")
        bad = [i for i in dims if (t.stride(i) * t.element_size()) % 16]
        if bad:
            raise ValueError(f"{name} has strides {tuple(t.stride())}: dims {bad} are not multiples of 16 bytes, which "
                             f"{why} needs; call {name}.contiguous() first {fix}".rstrip())


def flash_attention_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                         scale: float | None = None, *, out: torch.Tensor | None = None, block_m: int | None = None,
                         block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                         ws: bool | None = None, pipe: bool | None = None,
                         heavy_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``flash_attn.flash_attention`` with TMA loads and tuned tiles: same arguments, layout and result ``(o, lse)``.

    Also needs every row stride (dim 2) and base address to be a multiple of 16 bytes (true of contiguous tensors
    and of a Hugging Face model's transposed views); ``ws`` turns on warp specialization of the key loop, ``pipe``
    its software pipelining (the next tile's scores issued before this tile's softmax).
    """
    _fa._check_inputs(q, k, v, causal)
    b, h, n_q, d = q.shape
    h_kv, n_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cfg = default_config(d, causal)
    cfg.update({key: val for key, val in dict(block_m=block_m, block_n=block_n, num_warps=num_warps,
                                               num_stages=num_stages, ws=ws, pipe=pipe).items()
                if val is not None})
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must have q's shape {tuple(q.shape)} and dtype {q.dtype} with a contiguous last dim")
    _check_descriptor_strides(q, k, v, out)
    _fa._kernel()  # the same environment checks as the teaching kernel (triton present, interpreter state)
    if not _fa.interpreted():
        _ensure_allocator()
    lse = torch.empty((b, h, n_q), device=q.device, dtype=torch.float32)
    grid = (_fa.triton_cdiv(n_q, cfg["block_m"]), b * h)
    _flash_fwd_tma[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, h // h_kv, n_q, n_kv, scale * _fa.LOG2E,
        HEAD_DIM=d, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], CAUSAL=bool(causal),
        HEAVY_FIRST=bool(causal and heavy_first), WS=bool(cfg["ws"]), PIPE=bool(cfg["pipe"]),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def tune(seqlens=(4096, 16384), causal_modes=(True, False), *, head_dim: int = 128, n_heads: int = 32,
         tokens: int = 16384, dtype=torch.bfloat16, configs=CONFIGS, log=print, progress: bool = True) -> list[dict]:
    """Time every configuration at every size on the GPU; keep the fastest per causal mode (total time over the
    sizes) for this process's ``default_config``. Returns one record per (config, causal, seqlen), a failure
    carrying the error it raised (a configuration the compiler or device refuses is a finding, not noise).
    Each config's output is checked against SDPA before it is timed; a wrong one is recorded and never picked."""
    from tqdm.auto import tqdm

    from labkit import bench, env

    env.require_cuda("flash_attn_fast.tune")
    records = []
    bar = tqdm(total=len(causal_modes) * len(seqlens) * len(configs), desc="tune TMA attention", unit="config",
               disable=not progress, leave=False)
    for causal in causal_modes:
        totals = {}
        for n in seqlens:
            batch = max(1, tokens // n)
            gen = torch.Generator(device="cuda").manual_seed(n)
            q, k, v = (torch.randn(batch, n_heads, n, head_dim, device="cuda", dtype=dtype, generator=gen)
                       for _ in range(3))
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            flops = 4.0 * batch * n_heads * n * n * head_dim / (2 if causal else 1)
            for cfg in configs:
                rec = dict(config=cfg, causal=causal, seqlen=n, batch=batch)
                records.append(rec)
                key = tuple(sorted(cfg.items()))
                try:
                    o, _ = flash_attention_fast(q, k, v, causal, **cfg)
                    err = (o.float() - ref.float()).abs().max().item()
                    rec["max_abs_diff_vs_sdpa"] = err
                    if not err <= 0.05:
                        raise AssertionError(f"output differs from SDPA by {err:.3g}")
                    m = bench.measure(lambda: flash_attention_fast(q, k, v, causal, **cfg), warmup=3, iters=20)
                    rec.update(status="ok", median_ms=m.median_ms, tflops=bench.tflops(flops, m))
                    if totals.get(key, 0.0) is not None:                     # None: failed at some size
                        totals[key] = totals.get(key, 0.0) + m.median_ms
                except Exception as exc:
                    first = str(exc).splitlines()[0][:200] if str(exc) else ""
                    rec["status"] = f"failed: {type(exc).__name__}: {first}"
                    totals[key] = None
                bar.update(1)
                log(f"tune {'causal' if causal else 'full  '} N={n:6d} {cfg}: {rec['status']}"
                    + (f" {rec['median_ms']:.3f} ms {rec['tflops']:.1f} TFLOP/s" if rec.get("status") == "ok" else ""))
            del q, k, v, ref
        ok = {key: t for key, t in totals.items() if t is not None}
        if ok:
            _TUNED[(head_dim, bool(causal))] = dict(min(ok, key=ok.get))
            log(f"tune {'causal' if causal else 'full'}: picked {_TUNED[(head_dim, bool(causal))]}")
    bar.close()
    return records
