"""Attention from the N x N matrix to FlashAttention: references, models of memory and IO, and the benchmark.

**Layout** (everywhere in this module and in ``labkit.kernels.flash_attn``): ``q: (batch, n_heads, seqlen_q,
head_dim)``, ``k, v: (batch, n_kv_heads, seqlen_kv, head_dim)``, output ``(batch, n_heads, seqlen_q, head_dim)``,
log-sum-exp ``(batch, n_heads, seqlen_q)``. ``n_heads`` is a multiple of ``n_kv_heads`` (grouped-query
attention). Causal masks are aligned bottom-right: query ``i`` sees keys ``j <= i + seqlen_kv - seqlen_q``.

What is here, reference first:

- ``naive_attention``: ``softmax(Q K^T * scale) V`` with the (seqlen_q, seqlen_kv) matrices ``S`` and ``P``
  materialised, in the inputs' dtype; ``attention_reference``: the same upcast to fp64/fp32 (the ground truth).
- ``softmax_naive`` / ``softmax_safe`` / ``online_softmax``: the numerics of softmax, and the one-pass online
  softmax with a running max and running sum (Milakov & Gimelshein 2018, "Online normalizer calculation for
  softmax", https://arxiv.org/abs/1805.02867).
- ``tiled_attention``: FlashAttention-2's algorithm in plain PyTorch, in its loop order (outer loop over query
  blocks, inner over key blocks; Dao 2023, https://arxiv.org/abs/2307.08691), returning ``(o, lse)``.
- ``sdpa_attention``: ``torch.nn.functional.scaled_dot_product_attention`` pinned to one backend
  (math / efficient / flash / cudnn).
- ``attention_flops``, ``naive_intermediate_bytes``, ``io_model``: FLOPs, the memory of the N x N
  intermediates, and HBM bytes read + written by the naive and the tiled algorithm.
- ``TensorMemoryTracker`` / ``peak_memory``: peak memory of a call (CUDA allocator on a GPU; live tensors
  created by PyTorch ops on a CPU).
- ``register_hf_attention`` / ``use_triton_attention``: plug the Triton kernel into a Hugging Face Llama
  (SmolLM2) through transformers' ``AttentionInterface``.
- ``run_benchmark``, ``plot_benchmark``, ``cli_main``: TFLOP/s and peak memory of every variant against the
  sequence length (``labkit bench attention``), written to ``results/<device>/attention.json`` and a PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import weakref
from pathlib import Path

import torch

from labkit import env, results
from labkit import kernels as _kernels  # noqa: F401  sets TRITON_INTERPRET=1 without a GPU, before triton loads

LOG2E = 1.0 / math.log(2.0)


# ---------------------------------------------------------------------------------------------- helpers
def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Repeat K/V heads for grouped-query attention (references only; the kernel indexes instead of copying)."""
    h, h_kv = q.shape[1], k.shape[1]
    if h % h_kv:
        raise ValueError(f"n_heads={h} must be a multiple of n_kv_heads={h_kv}")
    if h == h_kv:
        return k, v
    return k.repeat_interleave(h // h_kv, dim=1), v.repeat_interleave(h // h_kv, dim=1)  # (b, h, n_kv, d)


def causal_mask(n_q: int, n_kv: int, device=None) -> torch.Tensor:
    """(n_q, n_kv) bool, True where query i may see key j (j <= i + n_kv - n_q, bottom-right aligned)."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_kv, device=device)[None, :]
    return j <= i + (n_kv - n_q)


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ---------------------------------------------------------------------------------------------- references
def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(Q K^T * scale) V in the inputs' dtype, materialising S and P of shape (b, h, n_q, n_kv).

    This is "PyTorch's own attention in the same dtype" that the kernel's error is compared against.
    Returns o: (batch, n_heads, seqlen_q, head_dim).
    """
    k, v = _expand_kv(q, k, v)
    s = torch.matmul(q, k.transpose(-2, -1)) * _scale(q, scale)              # S: (b, h, n_q, n_kv)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)                                              # P: (b, h, n_q, n_kv)
    return torch.matmul(p, v)                                                 # O: (b, h, n_q, d)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        scale: float | None = None, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth: naive attention on inputs upcast to ``dtype`` (fp64 on CPU; pass fp32 on a GPU).

    Returns ``(o, lse)`` in ``dtype``: o (b, h, n_q, d), lse (b, h, n_q) = log sum_j exp(scale * q_i . k_j).
    """
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    kf, vf = _expand_kv(qf, kf, vf)
    s = torch.matmul(qf, kf.transpose(-2, -1)) * _scale(q, scale)            # (b, h, n_q, n_kv)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                          # (b, h, n_q)
    return torch.matmul(torch.exp(s - lse[..., None]), vf), lse


def compare_to_reference(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                         ref_dtype=None) -> dict:
    """FlashAttention's test criterion: ``fn``'s error against an upcast reference, next to PyTorch's own.

    ``fn(q, k, v, causal)`` returns o or (o, lse) in q's dtype. Reference: ``attention_reference`` in
    ``ref_dtype`` (fp64 on a CPU, fp32 on a GPU by default). PyTorch's own error: ``naive_attention`` run in
    q's dtype. Passes when err(fn) <= 2 * err(torch) + eps with eps = 1e-5: a slack far below one fp16/bf16
    unit in the last place, for sizes where PyTorch's error is exactly 0 (seqlen 1: the output is a row of V)
    and fp32 round-off inside ``fn`` would otherwise count as a failure.
    Returns dict(err, err_torch, eps, ok, lse_err).
    """
    ref_dtype = ref_dtype or (torch.float32 if q.device.type == "cuda" else torch.float64)
    ref_o, ref_lse = attention_reference(q, k, v, causal, dtype=ref_dtype)
    got = fn(q, k, v, causal)
    o, lse = got if isinstance(got, tuple) else (got, None)
    err = (o.to(ref_dtype) - ref_o).abs().max().item()
    err_torch = (naive_attention(q, k, v, causal).to(ref_dtype) - ref_o).abs().max().item()
    eps = 1e-5
    out = dict(err=err, err_torch=err_torch, eps=eps, ok=err <= 2 * err_torch + eps)
    if lse is not None:
        out["lse_err"] = (lse.to(ref_dtype) - ref_lse).abs().max().item()
    return out


# ---------------------------------------------------------------------------------------------- softmax
def softmax_naive(x: torch.Tensor) -> torch.Tensor:
    """exp(x) / sum exp(x) along the last dim, as written in textbooks: overflows for large x."""
    e = torch.exp(x)
    return e / e.sum(dim=-1, keepdim=True)


def softmax_safe(x: torch.Tensor) -> torch.Tensor:
    """exp(x - max x) / sum exp(x - max x): the same function, with every exponent <= 0 (three passes over x)."""
    m = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - m)
    return e / e.sum(dim=-1, keepdim=True)


def online_softmax_stats(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over x in blocks of ``block`` columns: the running max m and running sum l = sum exp(x - m).

    When a block raises the max from m to m', the sum so far is rescaled by exp(m - m') before adding the block.
    x: (..., n) -> m, l: (...). Afterwards softmax(x) = exp(x - m) / l.
    """
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    l = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for j0 in range(0, x.shape[-1], block):
        xb = x[..., j0:j0 + block]                                            # (..., block)
        m_new = torch.maximum(m, xb.amax(dim=-1))
        l = l * torch.exp(m - m_new) + torch.exp(xb - m_new[..., None]).sum(dim=-1)
        m = m_new
    return m, l


def online_softmax(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """softmax along the last dim from the online statistics (one pass for m and l, one to normalise)."""
    m, l = online_softmax_stats(x, block)
    return torch.exp(x - m[..., None]) / l[..., None]


# ---------------------------------------------------------------------------------------------- tiled
def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None, block_m: int = 64, block_n: int = 64
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2's forward in plain PyTorch, in its loop order; fp32 statistics and accumulator.

    For each query block Q_i (block_m rows) it streams key/value blocks K_j, V_j (block_n rows), keeping the
    running max m_i, running sum l_i and the unnormalised output O_i; O_i is divided by l_i once at the end.
    Only (block_m, block_n) score tiles exist at any time. Returns ``(o, lse)``: o (b, h, n_q, d) in q's dtype,
    lse (b, h, n_q) fp32. Same signature as ``labkit.kernels.flash_attn.flash_attention``.
    """
    b, h, n_q, d = q.shape
    n_kv = k.shape[2]
    k, v = _expand_kv(q, k, v)
    sc = _scale(q, scale)
    shift = n_kv - n_q                                                        # bottom-right causal alignment
    o = torch.empty_like(q)
    lse = torch.empty((b, h, n_q), dtype=torch.float32, device=q.device)
    for i0 in range(0, n_q, block_m):                                         # outer loop: query blocks
        i1 = min(i0 + block_m, n_q)
        q_i = q[:, :, i0:i1].float()                                          # Q_i: (b, h, bm, d)
        m_i = torch.full((b, h, i1 - i0), float("-inf"), device=q.device)    # running max
        l_i = torch.zeros((b, h, i1 - i0), device=q.device)                   # running sum
        o_i = torch.zeros((b, h, i1 - i0, d), device=q.device)                # unnormalised output
        j_end = min(n_kv, i1 + shift) if causal else n_kv                     # later keys are all masked
        for j0 in range(0, j_end, block_n):                                   # inner loop: key blocks
            j1 = min(j0 + block_n, n_kv)
            s_ij = q_i @ k[:, :, j0:j1].float().transpose(-2, -1) * sc        # S_ij: (b, h, bm, bn)
            if causal:
                rows = torch.arange(i0, i1, device=q.device)[:, None]
                cols = torch.arange(j0, j1, device=q.device)[None, :]
                s_ij = s_ij.masked_fill(cols > rows + shift, float("-inf"))
            m_new = torch.maximum(m_i, s_ij.amax(dim=-1))
            p_ij = torch.exp(s_ij - m_new[..., None])                         # P~_ij: (b, h, bm, bn)
            alpha = torch.exp(m_i - m_new)                                    # rescale old statistics
            l_i = alpha * l_i + p_ij.sum(dim=-1)
            o_i = alpha[..., None] * o_i + p_ij @ v[:, :, j0:j1].float()
            m_i = m_new
        o[:, :, i0:i1] = (o_i / l_i[..., None]).to(q.dtype)                   # deferred normalisation
        lse[:, :, i0:i1] = m_i + torch.log(l_i)
    return o, lse


# ---------------------------------------------------------------------------------------------- SDPA
SDPA_BACKENDS = ("math", "efficient", "flash", "cudnn")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    names = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION",
             "cudnn": "CUDNN_ATTENTION"}
    if name not in names:
        raise ValueError(f"unknown SDPA backend {name!r}; choose one of {SDPA_BACKENDS}")
    return getattr(SDPBackend, names[name])


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` in this module's layout, pinned to ``backend`` (None: PyTorch chooses).

    A backend that cannot run these inputs raises RuntimeError (PyTorch says why). Causal with
    seqlen_q != seqlen_kv uses a bottom-right mask, as the rest of this module.
    """
    import torch.nn.functional as F

    kwargs = dict(scale=scale)
    if q.shape[1] != k.shape[1]:
        kwargs["enable_gqa"] = True
    if causal and q.shape[2] != k.shape[2]:
        from torch.nn.attention.bias import causal_lower_right

        kwargs["attn_mask"] = causal_lower_right(q.shape[2], k.shape[2])
    else:
        kwargs["is_causal"] = causal
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_backend(backend)):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


# ---------------------------------------------------------------------------------------------- FLOPs, memory, IO
def attention_flops(batch: int, n_heads: int, seqlen_q: int, seqlen_kv: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs: two matmuls of 2*n_q*n_kv*d each per head (QK^T and PV), halved when causal.

    The causal count uses the convention of FlashAttention's benchmarks (exactly half), so TFLOP/s figures
    compare with theirs; softmax's exponentials are not counted.
    """
    flops = 4.0 * batch * n_heads * seqlen_q * seqlen_kv * head_dim
    return flops * 0.5 if causal else flops


def naive_intermediate_bytes(batch: int, n_heads: int, seqlen_q: int, seqlen_kv: int, elem_bytes: int) -> int:
    """Bytes of the N x N tensors naive attention holds at its peak: two of them at once (S and P; or, causal,
    S and its masked copy, then the masked copy and P). The causal mask itself adds N x N bools."""
    return 2 * batch * n_heads * seqlen_q * seqlen_kv * elem_bytes


def io_model(seqlen: int, head_dim: int, *, batch: int = 1, n_heads: int = 1, elem_bytes: int = 2,
             block_m: int = 128, causal: bool = False, bandwidth: float | None = None,
             matmul_rate: float | None = None) -> dict:
    """HBM bytes read + written by naive attention and by the tiled (FlashAttention-2) forward.

    Naive, one kernel per step (as PyTorch runs it): S = QK^T reads Q, K and writes S; [causal: the mask reads
    and writes S]; softmax reads S, writes P; O = PV reads P, V and writes O. Every N x N matrix goes through
    HBM. Tiled: Q is read once, K and V once per query block (ceil(N / block_m) times, about half of that when
    causal), O written once (plus the fp32 LSE). With ``bandwidth`` (bytes/s) and ``matmul_rate`` (FLOP/s) it
    adds a roofline prediction of the time: per kernel max(bytes / bandwidth, flops / rate), summed.
    """
    bh = batch * n_heads
    n, d, e = seqlen, head_dim, elem_bytes
    nn_, nd = n * n * e, n * d * e
    qk_flops = 2.0 * n * n * d * bh
    naive_steps = [  # (name, bytes, flops)
        ("S = Q K^T", (2 * nd + nn_) * bh, qk_flops),
        *([("mask S", 2 * nn_ * bh, 0.0)] if causal else []),
        ("P = softmax(S)", 2 * nn_ * bh, 0.0),
        ("O = P V", (nn_ + 2 * nd) * bh, qk_flops),
    ]
    blocks = math.ceil(n / block_m)
    kv_reads = blocks * 2 * nd * ((blocks + 1) / (2 * blocks) if causal else 1.0)
    tiled_bytes = (2 * nd + kv_reads + 4 * n) * bh                            # Q, O, K/V per block, LSE
    flops = attention_flops(batch, n_heads, n, n, d, causal)
    out = {
        "seqlen": n, "head_dim": d, "batch": batch, "n_heads": n_heads, "elem_bytes": e, "causal": causal,
        "block_m": block_m, "flops": flops,
        "naive_bytes": sum(b for _, b, _ in naive_steps), "naive_steps": {k: b for k, b, _ in naive_steps},
        "tiled_bytes": tiled_bytes,
    }
    out["bytes_ratio"] = out["naive_bytes"] / tiled_bytes
    out["naive_intensity"] = flops / out["naive_bytes"]                       # FLOP per byte
    out["tiled_intensity"] = flops / tiled_bytes
    if bandwidth and matmul_rate:
        causal_f = 0.5 if causal else 1.0  # a causal-aware kernel skips masked tiles; naive computes them all
        out["naive_time_s"] = sum(max(b / bandwidth, f / matmul_rate) for _, b, f in naive_steps)
        out["tiled_time_s"] = max(tiled_bytes / bandwidth, 2 * qk_flops * causal_f / matmul_rate)
    return out


class TensorMemoryTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensors created by PyTorch ops inside the block that are alive at the same time.

    Works on any device (used on a CPU, where PyTorch keeps no allocator statistics): every op's outputs are
    recorded by storage; a storage stops counting when no tensor created in the block points at it any more.
    Temporary buffers inside one op are not seen, inputs created before the block are not counted.
    """

    def __init__(self):
        super().__init__()
        self.peak_bytes = 0
        self._live: dict[int, tuple[int, list]] = {}   # storage pointer -> (nbytes, weakrefs to its tensors)

    def _live_bytes(self) -> int:
        total = 0
        for ptr in list(self._live):
            nbytes, refs = self._live[ptr]
            refs[:] = [r for r in refs if r() is not None]
            if refs:
                total += nbytes
            else:
                del self._live[ptr]
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                entry = self._live.setdefault(st.data_ptr(), (st.nbytes(), []))
                entry[1].append(weakref.ref(t))
        self.peak_bytes = max(self.peak_bytes, self._live_bytes())
        return out


def peak_memory(fn, device=None) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated before it (its result included).

    On CUDA: the caching allocator's peak statistics. On a CPU: ``TensorMemoryTracker``.
    """
    dev = torch.device(device) if device is not None else env.device()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del result
        return peak
    with TensorMemoryTracker() as tracker:
        result = fn()
    del result
    return tracker.peak_bytes



class MemoryBudget(TensorMemoryTracker):
    """Run a block as if the device had only ``budget_bytes`` for tensors created inside it.

    Before each op runs, its outputs' sizes are worked out on the meta device (no memory is touched); when
    those bytes plus the live bytes would pass the budget, it raises ``torch.OutOfMemoryError`` — the error a GPU
    raises — instead of allocating. So an out-of-memory can be shown, and its fixes checked, on a CPU with a
    small budget. Tensors created before the block, and views of them, are not counted.
    """

    def __init__(self, budget_bytes: int):
        super().__init__()
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        new = 0
        try:
            meta_args, meta_kwargs = torch.utils._pytree.tree_map_only(
                torch.Tensor, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta"),
                (args, kwargs))
            meta_out = func(*meta_args, **meta_kwargs)
            inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((meta_args, meta_kwargs))
                      if isinstance(t, torch.Tensor)}
            new = sum(t.untyped_storage().nbytes() for t in torch.utils._pytree.tree_leaves(meta_out)
                      if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs)  # not a view
        except (NotImplementedError, RuntimeError):   # an op without a meta kernel: judged after it ran
            pass
        live = self._live_bytes()
        if live + new > self.budget_bytes:
            raise torch.OutOfMemoryError(
                f"Out of memory (budget {self.budget_bytes / 2**20:.2f} MiB): {func.__name__} tried to allocate "
                f"{new / 2**20:.2f} MiB with {live / 2**20:.2f} MiB already in use.")
        out = func(*args, **kwargs)
        # record new storages only: a view of a tensor made before the block costs nothing here
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st.data_ptr() in seen and st.data_ptr() not in self._live:
                    continue
                entry = self._live.setdefault(st.data_ptr(), (st.nbytes(), []))
                entry[1].append(weakref.ref(t))
        self.peak_bytes = max(self.peak_bytes, self._live_bytes())
        return out


# ---------------------------------------------------------------------------------------------- long prompts
def windowed_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
                                 scale: float | None = None) -> torch.Tensor:
    """Causal attention where query i sees only the last ``window`` keys (j in (i' - window, i'], i' = i + n_kv -
    n_q); ``window=None``: plain causal. Materialises the (n_q, n_kv) matrix: the reference.

    q: (b, h, n_q, d), k, v: (b, h_kv, n_kv, d) -> o: (b, h, n_q, d).
    """
    k, v = _expand_kv(q, k, v)
    n_q, n_kv = q.shape[2], k.shape[2]
    s = torch.matmul(q, k.transpose(-2, -1)) * _scale(q, scale)              # (b, h, n_q, n_kv)
    allowed = causal_mask(n_q, n_kv, q.device)
    if window is not None:
        i = torch.arange(n_q, device=q.device)[:, None] + (n_kv - n_q)
        allowed &= torch.arange(n_kv, device=q.device)[None, :] > i - window
    return torch.matmul(torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1), v)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, window: int | None = None,
                      scale: float | None = None) -> torch.Tensor:
    """Causal attention computed ``chunk`` queries at a time (chunked prefill); with ``window``, each chunk reads
    only the keys its queries can see, so the score matrix is (chunk, chunk + window) instead of (n_q, n_kv).

    Same result as ``windowed_attention_reference``. q: (b, h, n_q, d), k, v: (b, h_kv, n_kv, d), n_kv >= n_q.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    n_q, n_kv = q.shape[2], k.shape[2]
    off = n_kv - n_q
    o = torch.empty_like(q)
    for i0 in range(0, n_q, chunk):
        i1 = min(i0 + chunk, n_q)
        j1 = i1 + off                                                          # keys up to the chunk's last query
        j0 = 0 if window is None else max(0, i0 + off - window + 1)
        o[:, :, i0:i1] = windowed_attention_reference(q[:, :, i0:i1], k[:, :, j0:j1], v[:, :, j0:j1], window, scale)
    return o


def prefill_attention_bytes(n_q: int, n_kv: int, n_heads: int, n_kv_heads: int, head_dim: int, elem_bytes: int = 4,
                            chunk: int | None = None, window: int | None = None) -> int:
    """Peak bytes that ``chunked_attention`` (or the unchunked reference: ``chunk=None``) creates: the output, the
    K/V heads repeated for GQA, and three score-sized matrices of one chunk (S, S masked, P are alive together in
    the reference). A model, checked against ``MemoryBudget``'s count in the tests."""
    rows = n_q if chunk is None else min(chunk, n_q)
    cols = n_kv if window is None else min(n_kv, rows + window - 1)
    out = n_heads * n_q * head_dim
    kv = 2 * n_heads * cols * head_dim if n_heads != n_kv_heads else 0
    return elem_bytes * (out + kv + 3 * n_heads * rows * cols)

# ---------------------------------------------------------------------------------------------- Hugging Face
HF_ATTENTION_NAME = "labkit_triton"


def hf_triton_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """An attention function for transformers' ``AttentionInterface`` that runs the Triton kernel.

    transformers passes query (batch, n_heads, q_len, head_dim) and key/value (batch, n_kv_heads, kv_len,
    head_dim) -- this module's layout -- and expects (batch, q_len, n_heads, head_dim) back. The kernel writes
    into a transposed view of a (batch, q_len, n_heads, head_dim) buffer, so no copy is needed. Decode steps
    (q_len 1, kv_len > 1) are causal with bottom-right alignment. Padding masks, dropout, sliding windows and
    soft-capping are not supported and raise.
    """
    from labkit.kernels.flash_attn import flash_attention

    if attention_mask is not None:
        raise env.LabkitError("the Triton attention does not support padding masks; generate one sequence at a "
                              "time (or left-pad free batches of equal length), or use attn='sdpa'.")
    if dropout:
        raise env.LabkitError("the Triton attention is inference-only (dropout=0); call model.eval().")
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise env.LabkitError("sliding-window and soft-capped attention are not supported by the Triton kernel.")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    b, h, n, d = query.shape
    out = torch.empty((b, n, h, d), dtype=query.dtype, device=query.device)  # (b, n, h, d) as HF wants it
    flash_attention(query, key, value, causal=bool(causal), scale=scaling, out=out.transpose(1, 2))
    return out, None


def register_hf_attention(name: str = HF_ATTENTION_NAME) -> str:
    """Register the Triton kernel with transformers under ``name`` (and a mask function that yields None
    unless there is padding, so that padding is refused rather than ignored). Returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, hf_triton_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

        AttentionMaskInterface.register(name, flash_attention_mask)
    except ImportError:  # older transformers: no mask is built for unknown implementations
        pass
    return name


@contextlib.contextmanager
def use_triton_attention(model, name: str = HF_ATTENTION_NAME):
    """Within the block, ``model`` (a transformers model) runs its attention through the Triton kernel."""
    register_hf_attention(name)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


# ---------------------------------------------------------------------------------------------- benchmark
VARIANTS = ("naive", "tiled_torch", "triton", "triton_fast", "triton_hopper", "sdpa_math", "sdpa_efficient",
            "sdpa_flash", "sdpa_cudnn", "flash_attn", "flash_attn_4")
FULL_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (128, 256, 512)
# the slow variants stop here: the Python loops of the tiled reference and the math backend's fp32 N x N
# tensors would take minutes at 16k without teaching anything new
MAX_SEQLEN = {"tiled_torch": 4096, "sdpa_math": 8192}


def _variant_fn(name: str, q, k, v, causal: bool, triton_kwargs: dict | None = None):
    """A zero-argument callable computing attention with variant ``name``, or a status string if unavailable."""
    if name == "naive":
        return lambda: naive_attention(q, k, v, causal)
    if name == "tiled_torch":
        return lambda: tiled_attention(q, k, v, causal, block_m=128, block_n=128)
    if name == "triton":
        from labkit.kernels import flash_attn as fa

        if fa.interpreted():
            return "interpreter (not timed)"
        return lambda: fa.flash_attention(q, k, v, causal, **(triton_kwargs or {}))
    if name == "triton_fast":  # the TMA kernel, at the config labkit.kernels.flash_attn_fast.tune picked (if run)
        from labkit.kernels import flash_attn as fa
        from labkit.kernels import flash_attn_fast as fast

        if fa.interpreted():
            return "interpreter (not timed)"
        return lambda: fast.flash_attention_fast(q, k, v, causal)
    if name == "triton_hopper":  # the Gluon kernel, FlashAttention-3's structure, at its default config
        from labkit.kernels import flash_attn as fa
        from labkit.kernels import flash_attn_hopper as hop

        if fa.interpreted():
            return "interpreter (not timed)"
        if not hop.available():
            return "unsupported: this Triton has no Gluon Hopper module"
        if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
            return "needs a Hopper GPU (compute capability 9.0)"
        return lambda: hop.flash_attention_hopper(q, k, v, causal)
    if name.startswith("sdpa_"):
        backend = name[len("sdpa_"):]
        return lambda: sdpa_attention(q, k, v, causal, backend=backend)
    if name in ("flash_attn", "flash_attn_4"):
        status = flash_package_status(name, q)
        if status:
            return status
        try:
            if name == "flash_attn":
                from flash_attn import flash_attn_func  # FlashAttention-2, (batch, seqlen, heads, head_dim) layout
            else:
                from flash_attn.cute import flash_attn_func  # FlashAttention-4 (CuTe DSL), the same layout
        except ImportError as exc:  # installed but not importable here (a missing CUDA library, say): the row says so
            return f"unsupported: import failed: {str(exc).splitlines()[0][:160]}"
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # copied once, outside the timed call

        def call():  # back to this module's (batch, heads, seqlen, head_dim): a view, no copy
            return _first_tensor(flash_attn_func(qt, kt, vt, causal=causal)).transpose(1, 2)

        return call
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


def flash_package_status(name: str, q) -> str | None:
    """Why the flash-attn variant ``name`` ("flash_attn": FlashAttention-2, "flash_attn_4": the CuTe-DSL
    FlashAttention-4) cannot run on q, or None when it can: the package by its distribution name (both install the
    module ``flash_attn``), a CUDA GPU of the compute capability it needs (8.0 / 9.0), fp16/bf16."""
    from labkit import models

    attn = {"flash_attn": "flash_attention_2", "flash_attn_4": "flash_attention_4"}[name]
    try:
        models.check_flash_attn(attn, q.device, q.dtype)
    except env.LabkitError as exc:
        msg = str(exc)
        return ("not installed" if "not installed" in msg else "needs a GPU" if "CUDA GPU" in msg
                else f"unsupported: {msg.split(';')[0]}")
    return None


def _first_tensor(x):
    return x[0] if isinstance(x, tuple) else x


def run_benchmark(seqlens=FULL_SEQLENS, *, causal_modes=(True, False), head_dim: int = 128, n_heads: int = 32,
                  dtype=torch.bfloat16, tokens: int = 16384, variants=VARIANTS, device=None,
                  max_seqlen: dict | None = None, triton_kwargs: dict | None = None, time_budget_s: float = 0.3,
                  log=print) -> list[dict]:
    """Time every variant at every sequence length; one record per (variant, causal, seqlen).

    Batch = max(1, tokens // seqlen), so every size has the same number of tokens (as FlashAttention's own
    benchmarks). Each record: status ('ok', 'oom', 'skipped ...', 'not installed', 'unsupported: ...'),
    median/p10/p90 ms, TFLOP/s (``attention_flops``), peak memory above the inputs, and for the fast variants
    the largest difference from the SDPA flash (GPU) or math (CPU) output. Random inputs, never zeros.
    """
    from labkit import bench

    dev = torch.device(device) if device is not None else env.device()
    limits = dict(MAX_SEQLEN, **(max_seqlen or {}))
    records = []
    for causal in causal_modes:
        oom_at = {}
        for n in seqlens:
            batch = max(1, tokens // n)
            gen = torch.Generator(device=dev).manual_seed(n)
            q, k, v = (torch.randn(batch, n_heads, n, head_dim, device=dev, dtype=dtype, generator=gen)
                       for _ in range(3))
            flops = attention_flops(batch, n_heads, n, n, head_dim, causal)
            for name in variants:
                rec = dict(variant=name, causal=causal, seqlen=n, batch=batch, n_heads=n_heads, head_dim=head_dim,
                           dtype=str(dtype).replace("torch.", ""), flops=flops)
                records.append(rec)
                if name in oom_at:
                    rec["status"] = f"oom (at seqlen {oom_at[name]} already)"
                    continue
                if n > limits.get(name, 1 << 30):
                    rec["status"] = f"skipped (too slow above seqlen {limits[name]})"
                    continue
                fn = _variant_fn(name, q, k, v, causal, triton_kwargs)
                if isinstance(fn, str):
                    rec["status"] = fn
                    continue
                try:
                    first = _first_tensor(fn())                                # compile / warm, and the output
                    rec["peak_mem_bytes"] = peak_memory(fn, dev)
                    t0 = bench.measure(fn, warmup=1, iters=1, device=dev).median_s
                    iters = int(min(30, max(3, time_budget_s / max(t0, 1e-6))))
                    m = bench.measure(fn, warmup=1, iters=iters, device=dev)
                    rec.update(status="ok", median_ms=m.median_ms, p10_ms=m.p10_s * 1e3, p90_ms=m.p90_s * 1e3,
                               iters=m.n, tflops=bench.tflops(flops, m))
                    rec["_out"] = first
                except torch.OutOfMemoryError:
                    rec["status"] = "oom"
                    oom_at[name] = n
                except Exception as exc:  # a peer library refusing this size or layout: the row carries why
                    msg = str(exc).splitlines()[0][:160] if str(exc) else ""
                    rec["status"] = f"unsupported: {type(exc).__name__}: {msg}"
                finally:
                    fn = first = None
                    gc.collect()
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                msg = f"{'causal' if causal else 'full  '} N={n:6d} {name:15s} {rec['status']}"
                if rec.get("status") == "ok":
                    msg += f"  {rec['median_ms']:9.3f} ms  {rec['tflops']:7.1f} TFLOP/s  peak +{rec['peak_mem_bytes'] / 2**20:9.1f} MiB"
                log(msg)
            # accuracy of every variant against the library's output at this size
            ref = next((r["_out"] for r in records if r.get("_out") is not None and r["seqlen"] == n
                        and r["causal"] == causal and r["variant"] in ("sdpa_flash", "sdpa_math")), None)
            for r in records:
                out = r.pop("_out", None)
                if out is not None and ref is not None and r["seqlen"] == n and r["causal"] == causal:
                    r["max_abs_diff_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
            del q, k, v, ref
            gc.collect()
    return records


def tune_fast_kernel(seqlens, *, head_dim: int = 128, n_heads: int = 32, tokens: int = 16384, dtype=torch.bfloat16,
                     log=print) -> dict:
    """Before a GPU benchmark with ``triton_fast``: time the TMA kernel's configurations at the headline sizes
    (4096 and 16384, those of them in ``seqlens``; else the largest), so the benchmark runs the one this device
    picked. Returns ``{"seqlens", "picked": {"causal": cfg, "noncausal": cfg}, "runs": [...]}`` for the summary."""
    from labkit.kernels import flash_attn_fast as fast

    at = [n for n in (4096, 16384) if n in seqlens] or sorted(seqlens)[-1:]
    runs = fast.tune(at, (True, False), head_dim=head_dim, n_heads=n_heads, tokens=tokens, dtype=dtype, log=log)
    picked = {("causal" if c else "noncausal"): fast.default_config(head_dim, c) for c in (True, False)}
    return {"seqlens": at, "picked": picked, "runs": runs}


def summarize(records: list[dict], seqlens=(4096, 16384), dtype: str = "bfloat16", head_dim: int = 128) -> dict:
    """The headline: our kernel's TFLOP/s over SDPA's flash backend (FlashAttention-2), SDPA's cuDNN backend and
    the flash-attn-4 package (FlashAttention-4), each measured in the same run (None where a peer did not run).

    "Our kernel" is the fastest form that ran: the Gluon kernel for Hopper (``triton_hopper``), else the TMA kernel
    (``triton_fast``), else the teaching kernel (``triton``); ``ours`` names it, ``teaching_kernel`` holds the
    teaching kernel's own ratios beside it and ``tma_kernel`` the TMA kernel's when the Gluon one is ours."""
    def tf(variant, causal, n):
        for r in records:
            if (r["variant"], r["causal"], r["seqlen"], r["dtype"], r["head_dim"]) == (variant, causal, n, dtype,
                                                                                       head_dim):
                return r.get("tflops")
        return None

    def ratios(ours_variant):
        out = {k: {} for k in peers}
        for causal in (True, False):
            for n in seqlens:
                key = f"{'causal' if causal else 'noncausal'}_{n}"
                ours = tf(ours_variant, causal, n)
                for rk, peer in peers.items():
                    p = tf(peer, causal, n)
                    out[rk][key] = ours / p if ours and p else None
        return out

    peers = {"ratio_vs_sdpa_flash": "sdpa_flash", "ratio_vs_sdpa_cudnn": "sdpa_cudnn",
             "ratio_vs_flash_attn_4": "flash_attn_4"}
    def ran(variant):
        return any(r["variant"] == variant and r.get("status") == "ok" for r in records)

    ours = next((v for v in ("triton_hopper", "triton_fast") if ran(v)), "triton")
    table = {f"{'causal' if c else 'noncausal'}_{n}": {v: tf(v, c, n) for v in ("triton", "triton_fast",
                                                                                 "triton_hopper", "sdpa_flash",
                                                                                 "sdpa_cudnn", "flash_attn",
                                                                                 "flash_attn_4")}
             for c in (True, False) for n in seqlens}
    out = {**ratios(ours), "ours": ours, "tflops": table, "dtype": dtype, "head_dim": head_dim}
    if ours != "triton":
        out["teaching_kernel"] = ratios("triton")
    if ours == "triton_hopper" and ran("triton_fast"):
        out["tma_kernel"] = ratios("triton_fast")
    return out


def summarize_hopper_runs(rows: list[dict], configs: dict[int, dict], defaults: dict[bool, dict],
                          checks: dict) -> dict:
    """The summary of ``scripts/gpu_attention.py hopper``: per case (causal or not, seqlen), the fastest of the
    Gluon kernel's configurations and the default one, each against SDPA's cuDNN backend, flash-attn-4 (where it
    ran) and the TMA kernel timed in the same run. ``rows``: one dict per case with TFLOP/s under ``hopper_c<i>``
    (i a key of ``configs``: the index in ``flash_attn_hopper.CONFIGS``), ``sdpa_cudnn``, ``sdpa_flash``,
    ``flash_attn_4``, ``triton_fast``; ``defaults``: the default config for causal (True) and non-causal (False)
    attention; ``checks``: the output checks' count and failures."""
    from labkit.kernels import flash_attn_hopper as hop

    names = {f"hopper_c{i}": c for i, c in configs.items()}
    default_names = {causal: next((n for n, c in names.items() if c == cfg), None) for causal, cfg in defaults.items()}
    peers = ("sdpa_cudnn", "sdpa_flash", "flash_attn_4", "triton_fast")
    cases = {}
    for r in rows:
        ours = {n: r[n] for n in names if r.get(n)}
        best = max(ours, key=ours.get) if ours else None
        default_name = default_names.get(bool(r["causal"]))
        case = dict(best=best, best_tflops=ours.get(best), default=default_name, default_tflops=r.get(default_name),
                    **{p: r.get(p) for p in peers})
        for ref in ("sdpa_cudnn", "flash_attn_4", "triton_fast"):
            for which in ("best", "default"):
                t = case[f"{which}_tflops"]
                case[f"{which}_vs_{ref}"] = t / r[ref] if t and r.get(ref) else None
        cases[f"{'causal' if r['causal'] else 'noncausal'}_{r['n']}"] = case
    return dict(what="labkit.kernels.flash_attn_hopper (Gluon) beside SDPA's cuDNN and flash backends, flash-attn-4 "
                     "(where installed) and the TMA kernel (flash_attn_fast at its first config) in one run; bf16, "
                     "head dim 128, 32 heads, batch = 16384 // seqlen; every output checked against SDPA flash "
                     "before it was timed",
                configs={n: hop.config_label(c) for n, c in names.items()},
                default={("causal" if k else "noncausal"): n for k, n in default_names.items()}, cases=cases,
                checks=checks)


def summarize_spread(records: list[dict], default: str, peers=("sdpa_cudnn", "flash_attn_4")) -> dict:
    """The per-case summary of ``scripts/gpu_attention.py spread``. ``records``: one dict per (case, round) with
    ``causal``, ``n``, ``round`` and TFLOP/s under each variant's name. Per case: every variant's min, median and max
    over the rounds and ``spread`` (max / min - 1); and ``default_vs``, the ratio of ``default`` to each peer, round
    by round (both timed in the same round), for the peers present in every round."""
    import statistics

    per_case: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["round"]):
        per_case.setdefault(f"{'causal' if r['causal'] else 'noncausal'}_{r['n']}", []).append(r)
    skip = {"causal", "n", "batch", "round", "order"}
    cases = {}
    for key, rows in per_case.items():
        names = [k for k in rows[0] if k not in skip]
        tflops = {}
        for name in names:
            t = [r[name] for r in rows if r.get(name)]
            if t:
                tflops[name] = dict(median=statistics.median(t), min=min(t), max=max(t), spread=max(t) / min(t) - 1)
        vs = {peer: [r[default] / r[peer] for r in rows] for peer in peers
              if all(r.get(peer) and r.get(default) for r in rows)}
        cases[key] = dict(tflops=tflops, default_vs=vs)
    return cases


def plot_benchmark(doc: dict, path=None, title: str | None = None):
    """TFLOP/s (causal, non-causal) and peak memory against sequence length; saved to ``path`` if given."""
    import matplotlib.pyplot as plt

    records = doc["records"]
    variants = [v for v in VARIANTS if any(r["variant"] == v and r.get("status") == "ok" for r in records)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, causal in zip(axes[:2], (True, False)):
        for name in variants:
            pts = sorted((r["seqlen"], r["tflops"]) for r in records
                         if r["variant"] == name and r["causal"] == causal and r.get("status") == "ok")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, lw=2.5 if name.startswith("triton") else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_title("causal" if causal else "non-causal")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[2]
    for name in variants:
        pts = sorted((r["seqlen"], r["peak_mem_bytes"] / 2**20) for r in records
                     if r["variant"] == name and r["causal"] and r.get("status") == "ok")
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ooms = sorted({r["seqlen"] for r in records if r["variant"] == "naive" and str(r.get("status")).startswith("oom")})
    if ooms:
        ax.axvline(ooms[0], color="red", ls="--", lw=1, label=f"naive out of memory from {ooms[0]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("peak memory above inputs (MiB)")
    ax.set_title("memory (causal)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    meta = doc.get("meta", {})
    r0 = records[0] if records else {}
    fig.suptitle(title or f"attention forward, {r0.get('dtype')}, head dim {r0.get('head_dim')}, "
                          f"{r0.get('n_heads')} heads, {meta.get('device', '')}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def cli_main(argv: list[str] | None = None) -> int:
    """``labkit bench attention [--out PATH] [--seqlens 512,1024] [--dtype bf16] [--head-dim 128] ...``"""
    from labkit import bench
    from labkit.cli import choice_list, int_list, positive_int

    p = argparse.ArgumentParser(prog="labkit bench attention",
                                description="TFLOP/s and peak memory of attention variants against sequence length")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default results/local/<device>/attention.json, not tracked by git)")
    p.add_argument("--reference", action="store_true",
                   help="write to results/<device>/ (a committed reference run) instead of results/local/<device>/")
    p.add_argument("--seqlens", type=int_list, default=None, help="comma-separated; default by profile "
                                                   f"(full {FULL_SEQLENS}, quick {QUICK_SEQLENS})")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--head-dim", type=positive_int, default=128)
    p.add_argument("--heads", type=positive_int, default=None, help="default 32 on GPU, 4 on CPU")
    p.add_argument("--tokens", type=positive_int, default=None, help="batch * seqlen (default 16384 on GPU, 512 on CPU)")
    p.add_argument("--variants", type=choice_list(VARIANTS), default=list(VARIANTS),
                   help=f"comma list of {','.join(VARIANTS)}")
    args = p.parse_args(argv)
    if args.out is not None:
        env.writable_dir(args.out.parent)
    dev = env.device()
    gpu = dev.type == "cuda"
    seqlens = args.seqlens if args.seqlens else list(
        FULL_SEQLENS if env.profile() == "full" else QUICK_SEQLENS)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("bf16" if gpu else "fp32")]
    n_heads, tokens = args.heads or (32 if gpu else 4), args.tokens or (16384 if gpu else 512)
    tuning = None
    if gpu and "triton_fast" in args.variants and dtype != torch.float32:
        tuning = tune_fast_kernel(seqlens, head_dim=args.head_dim, n_heads=n_heads, tokens=tokens, dtype=dtype)
    records = run_benchmark(seqlens, head_dim=args.head_dim, n_heads=n_heads, dtype=dtype, tokens=tokens,
                            variants=args.variants, device=dev)
    out = args.out or results.output_dir(args.reference) / "attention.json"
    summary = summarize(records, dtype=str(dtype).replace("torch.", ""), head_dim=args.head_dim)
    if tuning is not None:
        summary["triton_fast_tuning"] = tuning
    path = bench.write_results(out, records, summary)
    doc = bench.read_results(path)
    plot_benchmark(doc, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    for rk, label in (("ratio_vs_sdpa_flash", "SDPA flash"), ("ratio_vs_sdpa_cudnn", "SDPA cuDNN"),
                      ("ratio_vs_flash_attn_4", "flash-attn-4")):
        for key, ratio in summary[rk].items():
            if ratio is not None:
                print(f"  ours / {label}, {key}: {ratio:.2f}x")
    return 0
