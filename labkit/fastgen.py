"""A fast decode loop for Llama-family weights: static KV cache, fused decode kernels, one CUDA graph per step.

Hugging Face ``generate`` spends most of a batch-1 step outside the GPU's memory system: hundreds of small
kernel launches, Python, cache bookkeeping. At batch 1 the *floor* of a decode step is the time to read
every weight once (plus the KV cache) at the memory bandwidth. This module closes that gap in three moves,
each beside a reference:

1. **Our own forward** (``FastLlama``) over weights taken from a ``transformers`` ``LlamaForCausalLM``: RMSNorm,
   RoPE exactly as HF computes it (fp32 angles, cos/sin rounded to the model dtype, ``rotate_half``), grouped-
   query attention, SiLU MLP; Q/K/V fused into one weight and gate/up into another, so a layer is four
   matrix-vector products.
2. **A static KV cache** ``(layers, batch, kv_heads, max_seq_len, head_dim)`` allocated once, and a position
   held in a device tensor, so every decode step has the same shapes and addresses.
3. **One CUDA graph per step** (explicit ``torch.cuda.CUDAGraph`` capture): the step's kernels (seven or eight per
   layer) are replayed with a single launch; the step also writes its argmax token back into its input buffer and
   advances the position, so N steps are N replays with no host synchronisation.

Two kernel sets compute the step with the same signatures: ``kernels="torch"`` (PyTorch ops: the
reference, and the only path on a CPU) and ``kernels="triton"`` (fused Triton kernels: add+RMSNorm, which also sums
the split-K partials of the GEMV before it; RoPE + cache write + single-pass decode attention as one kernel, which
sums the qkv GEMV's partials the same way; the weight-only GEMV of ``labkit.kernels.wo_matmul`` for bf16, int8 and
int4 weights; and in the graph, one kernel for the argmax and the token bookkeeping). Greedy tokens equal HF
``generate(do_sample=False)``; see tests/test_fastgen.py. ``scripts/profile_decode_step.py`` shows the step kernel by
kernel on a GPU.

Prefill (the prompt) runs through the torch path (cuBLAS GEMMs, SDPA causal attention); quantized weights are
dequantized per layer for it. Layout of activations: ``(batch, tokens, heads, head_dim)`` before the
transpose to ``(batch, heads, tokens, head_dim)`` for attention.

References: gpt-fast (PyTorch Labs, 2023) for the static-cache + graph recipe; Flash-Decoding (Dao et al.,
2023) for single-query attention over a cache; RoFormer (Su et al., 2021) for RoPE.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labkit import env, results, roofline
from labkit.env import LabkitError
from labkit.kernels import wo_matmul as wo

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

WEIGHT_FORMATS = ("bf16", "int8", "int4")  # "bf16" means the model dtype, unquantized


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class FastConfig:
    """The Llama shape the decode loop needs (read from a transformers LlamaConfig)."""

    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    rope_theta: float

    @classmethod
    def from_hf(cls, config) -> "FastConfig":
        rope = getattr(config, "rope_parameters", None) or {}
        rtype = rope.get("rope_type", "default")
        if rtype != "default":
            raise LabkitError(f"rope_type={rtype!r} is not supported by fastgen (only the default RoPE); "
                              "use HF generate for this model.")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise LabkitError("fastgen supports Llama layers without biases; this config has attention/MLP biases.")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise LabkitError(f"fastgen implements the SiLU MLP; hidden_act={config.hidden_act!r}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, head_dim, config.vocab_size,
                   config.rms_norm_eps, float(theta))


def rope_tables(cfg: FastConfig, max_seq_len: int, dtype, device):
    """cos, sin: (max_seq_len, head_dim) exactly as HF's LlamaRotaryEmbedding: fp32 angles, rounded to dtype."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    inv_freq = inv_freq.to(device)
    pos = torch.arange(max_seq_len, device=device).float()
    freqs = pos[:, None] * inv_freq[None, :]  # (S, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---------------------------------------------------------------------------------------------- torch ops (reference)
def add_rmsnorm_ref(x: torch.Tensor, delta, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (B, H) residual stream, updated in place to x + delta (delta may be None); returns RMSNorm(x) * weight.

    Rounded like HF's LlamaRMSNorm: normalise in fp32, round to the dtype, then multiply by the weight.
    """
    if delta is not None:
        x.add_(delta)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cache_ref(qkv: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """One decode position: split qkv (B, (nq + 2 nkv) * hd), rotate q and k, write k and v at ``pos``.

    pos: (1,) long tensor on the device; k_cache, v_cache: (B_max, nkv, S, hd). Returns q: (B, nq, hd).
    """
    B = qkv.shape[0]
    hd = cos.shape[-1]
    q, k, v = qkv.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)
    q = q.view(B, n_heads, hd)
    k = k.view(B, n_kv_heads, hd)
    c = cos.index_select(0, pos)  # (1, hd)
    s = sin.index_select(0, pos)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    k_cache[:B].index_copy_(2, pos, k.unsqueeze(2))  # (B, nkv, 1, hd) at sequence index pos
    v_cache[:B].index_copy_(2, pos, v.view(B, n_kv_heads, 1, hd))
    return q


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                         length: int | None = None) -> torch.Tensor:
    """Single-query attention of q (B, nq, hd) over cache positions 0..pos; returns (B, nq * hd).

    ``length=pos+1`` slices the cache (eager); ``length=None`` attends over the whole cache with a mask built
    from the device tensor ``pos`` (static shapes: what a CUDA graph can capture). Computed like HF's eager
    attention: scores in the dtype, softmax in fp32, rounded back, then times V.
    """
    B, nq, hd = q.shape
    nkv = k_cache.shape[1]
    S = k_cache.shape[2] if length is None else length
    k = k_cache[:B, :, :S]  # (B, nkv, S, hd)
    v = v_cache[:B, :, :S]
    qg = q.view(B, nkv, nq // nkv, hd)  # (B, nkv, rep, hd): the rep query heads that share one KV head
    scores = (qg @ k.transpose(-1, -2)) * hd**-0.5  # (B, nkv, rep, S)
    if length is None:
        live = torch.arange(S, device=q.device) <= pos  # (S,)
        scores = scores.masked_fill(~live, float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (p @ v).reshape(B, nq * hd)  # (B, nkv, rep, hd) -> (B, nq*hd)


# ---------------------------------------------------------------------------------------------- triton ops (fast)
if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, H, eps, stride_x, stride_d, stride_ds, stride_o,
                            pf_ptr, pf_bytes, ROWS,
                            HAS_DELTA: tl.constexpr, SPLIT: tl.constexpr, BLOCK_H: tl.constexpr,
                            PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, PF_THREADS: tl.constexpr = 128):
        """Programs 0..ROWS-1: one row each. With PREFETCH (1 bulk, 2 per line: ``wo._l2_prefetch``) the programs
        past them only ask L2 for their share of the next GEMV's first ``pf_bytes`` weight bytes, and end."""
        row = tl.program_id(0)
        if PREFETCH:
            if row >= ROWS:
                wo._l2_prefetch(pf_ptr, pf_bytes, row - ROWS, tl.num_programs(0) - ROWS, PF_THREADS, PREFETCH)
            else:
                _add_rmsnorm_row(x_ptr, d_ptr, w_ptr, out_ptr, H, eps, stride_x, stride_d, stride_ds, stride_o, row,
                                 HAS_DELTA, SPLIT, BLOCK_H, PDL)
        else:
            _add_rmsnorm_row(x_ptr, d_ptr, w_ptr, out_ptr, H, eps, stride_x, stride_d, stride_ds, stride_o, row,
                             HAS_DELTA, SPLIT, BLOCK_H, PDL)

    @triton.jit
    def _add_rmsnorm_row(x_ptr, d_ptr, w_ptr, out_ptr, H, eps, stride_x, stride_d, stride_ds, stride_o, row,
                         HAS_DELTA: tl.constexpr, SPLIT: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
        offs = tl.arange(0, BLOCK_H)
        mask = offs < H
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # no kernel writes the norm's weight
        wo._pdl_enter(PDL)
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            # SPLIT > 1: delta arrives as the fp32 partial sums of a split-K GEMV, summed here in split order and
            # rounded to the dtype, exactly what the GEMV's own reduction kernel would have stored
            d = _load_act(d_ptr + row * stride_d, offs, stride_ds, SPLIT, x_ptr.dtype.element_ty, mask)
            xr = (x + d).to(x_ptr.dtype.element_ty)  # the residual stream is kept in the model dtype
            tl.store(x_ptr + row * stride_x + offs, xr, mask=mask)
            x = xr.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _argmax_next_kernel(logits_ptr, tok_ptr, pos_ptr, out_ptr, V, stride_l, stride_o, BLOCK_V: tl.constexpr,
                            PDL: tl.constexpr = False):
        """Greedy decoding's bookkeeping for row b in one kernel: the argmax of its logits (the first index of the
        maximum, as torch.argmax) becomes the next input token tok[b] and is recorded at out[b, pos + 1]."""
        wo._pdl_enter(PDL)
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK_V)
        best_v = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), axis=0)
        best_i = tl.argmax(tl.zeros((BLOCK_V,), tl.int32), axis=0)  # 0
        for start in range(0, V, BLOCK_V):
            v = tl.load(logits_ptr + b * stride_l + start + offs, mask=start + offs < V,
                        other=float("-inf")).to(tl.float32)
            m = tl.max(v, axis=0)
            i = tl.argmax(v, axis=0, tie_break_left=True)
            best_i = tl.where(m > best_v, start + i, best_i)  # strictly greater: the earlier chunk keeps a tie
            best_v = tl.maximum(best_v, m)
        pos = tl.load(pos_ptr)
        tl.store(tok_ptr + b, best_i.to(tl.int64))
        tl.store(out_ptr + b * stride_o + pos + 1, best_i.to(tl.int64))

    @triton.jit
    def _load_act(ptr, offs, stride_s, SPLIT: tl.constexpr, dt: tl.constexpr, mask=None):
        """Activations as fp32: SPLIT = 1, ``ptr`` holds them in the model dtype; SPLIT > 1, fp32 split-K partial
        sums at stride ``stride_s``, summed in split order and rounded to ``dt`` (what the GEMV's own reduction
        kernel would have stored)."""
        if SPLIT == 1:
            v = wo._load_masked(ptr + offs, mask).to(tl.float32)
        else:
            v = tl.zeros(offs.shape, tl.float32)
            for sp in tl.static_range(SPLIT):
                v += wo._load_masked(ptr + sp * stride_s + offs, mask)
            v = v.to(dt).to(tl.float32)
        return v

    @triton.jit
    def _kv_block(kbase, vbase, offs_l, mask_l, offs_d, stride_cs):
        """Keys and values of cache positions offs_l (zeros where mask_l is False): two (BLOCK_L, HD) tiles."""
        ptrs = offs_l[:, None] * stride_cs + offs_d[None, :]
        k = tl.load(kbase + ptrs, mask=mask_l[:, None], other=0.0)
        v = tl.load(vbase + ptrs, mask=mask_l[:, None], other=0.0)
        return k, v

    @triton.jit
    def _rope_attn_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, o_ptr, scale, REP, NQ, NKV,
                          stride_qkv, stride_qs, stride_cb, stride_ch, stride_cs, stride_ob, pf_ptr, pf_bytes,
                          HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, SPLIT: tl.constexpr = 1,
                          PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, PF_THREADS: tl.constexpr = 128):
        """One (batch row b, KV head j): rotate K_j and write K_j, V_j into the cache at pos, rotate the REP query
        heads that share KV head j, and attend over cache positions 0..pos (single-pass online softmax).

        RoPE and attention in one kernel: the rotated queries never leave registers, and a step has one kernel
        per layer for this instead of two. Every RoPE product is rounded to the dtype as torch rounds it.
        The new position's key and value also stay in registers: the loop reads the cache at positions 0..pos-1
        only (written by earlier steps), so its loads wait on nothing this kernel computes, and position pos is
        folded into the softmax last. Scores and the weighted sum of V use ``tl.dot`` on a (BLOCK_R >= 16, HD) tile
        of query heads, the rows past REP masked (an element-wise form for one query head was slower on an H200).
        SPLIT > 1: qkv arrives as the fp32 split-K partials of the GEMV before (see ``_load_act``).
        PREFETCH (1 bulk, 2 per line): every program first asks L2 for its share of ``pf_bytes`` at ``pf_ptr`` (the
        output projection's weights, which the next kernel reads; ``wo._l2_prefetch``).
        """
        b = tl.program_id(0)
        j = tl.program_id(1)
        if PREFETCH:
            wo._l2_prefetch(pf_ptr, pf_bytes, b * tl.num_programs(1) + j, tl.num_programs(0) * tl.num_programs(1),
                            PF_THREADS, PREFETCH)
        HALF: tl.constexpr = HD // 2
        offs_d = tl.arange(0, HD)
        kbase = kc_ptr + b * stride_cb + j * stride_ch
        vbase = vc_ptr + b * stride_cb + j * stride_ch
        # Before the wait for the kernel before (PDL): what no kernel of this step writes. The position and the
        # cache below it were written by earlier steps, and a step starts with launches that wait for everything
        # before them (the embedding lookup), so the first block of keys and values is in flight while the
        # qkv GEMV finishes.
        pos = tl.load(pos_ptr)
        c = tl.load(cos_ptr + pos * HD + offs_d).to(tl.float32)
        s = tl.load(sin_ptr + pos * HD + offs_d).to(tl.float32)
        offs_l = tl.arange(0, BLOCK_L)
        k, v = _kv_block(kbase, vbase, offs_l, offs_l < pos, offs_d, stride_cs)
        wo._pdl_enter(PDL)
        rot = (offs_d + HALF) % HD  # rotate_half(x)[d] = -x[d + HALF] for d < HALF, x[d - HALF] after
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        dt = o_ptr.dtype.element_ty
        row = qkv_ptr + b * stride_qkv
        kx = _load_act(row, (NQ + j) * HD + offs_d, stride_qs, SPLIT, dt)
        kr = _load_act(row, (NQ + j) * HD + rot, stride_qs, SPLIT, dt)
        k_new = ((kx * c).to(dt).to(tl.float32) + (sign * kr * s).to(dt).to(tl.float32)).to(dt)
        v_new = _load_act(row, (NQ + NKV + j) * HD + offs_d, stride_qs, SPLIT, dt).to(dt)
        tl.store(kbase + pos * stride_cs + offs_d, k_new)
        tl.store(vbase + pos * stride_cs + offs_d, v_new)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < REP
        qoff = (j * REP + offs_r)[:, None] * HD
        qx = _load_act(row, qoff + offs_d[None, :], stride_qs, SPLIT, dt, mask_r[:, None])
        qr = _load_act(row, qoff + rot[None, :], stride_qs, SPLIT, dt, mask_r[:, None])
        q = ((qx * c[None, :]).to(dt).to(tl.float32)
             + (sign[None, :] * qr * s[None, :]).to(dt).to(tl.float32)).to(dt)  # (BLOCK_R, HD)
        m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_R,), tl.float32)
        acc = tl.zeros((BLOCK_R, HD), tl.float32)
        for start in range(0, pos, BLOCK_L):  # the cached positions 0..pos-1, k and v hold this block's
            nxt = start + BLOCK_L + offs_l  # the next block is loaded before this one is used: two in flight
            k_next, v_next = _kv_block(kbase, vbase, nxt, nxt < pos, offs_d, stride_cs)
            mask_l = start + offs_l < pos
            sc = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_R, BLOCK_L), fp32
            sc = tl.where(mask_l[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dt), v)
            m_i = m_new
            k, v = k_next, v_next
        # position pos, from registers
        sc = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale  # (BLOCK_R,)
        m_new = tl.maximum(m_i, sc)
        p = tl.exp(sc - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p.to(dt).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * stride_ob + (j * REP + offs_r)[:, None] * HD + offs_d[None, :],
                 out.to(dt), mask=mask_r[:, None])


def add_rmsnorm_triton(x: torch.Tensor, delta, weight: torch.Tensor, eps: float, pdl: bool = False,
                       prefetch=None, prefetch_bytes: int = 0, prefetch_mode: str = "lines",
                       prefetch_programs: int = 32) -> torch.Tensor:
    """Same contract as add_rmsnorm_ref, one kernel: x (B, H) += delta in place; returns RMSNorm(x) * weight.

    ``delta`` may also be the (S, B, H) fp32 partial sums of a split-K GEMV (``wo.linear(..., partials=True)``):
    the split reduction then happens here instead of in a kernel of its own. ``prefetch``: a weight (the next
    GEMV's) whose first ``prefetch_bytes`` ``prefetch_programs`` extra programs ask L2 to fetch meanwhile
    (``wo.prefetch_args``; ``prefetch_mode`` "lines" or "bulk", see ``wo._l2_prefetch``; a hint that changes no
    result).
    """
    B, H = x.shape
    out = torch.empty_like(x)
    d = delta if delta is not None else x
    split = d.shape[0] if d.dim() == 3 else 1
    if d.shape[-2:] != x.shape:
        raise ValueError(f"delta {tuple(d.shape)} does not match x {tuple(x.shape)}")
    pf, pf_bytes = _prefetch(prefetch, prefetch_bytes, x.device)
    extra = prefetch_programs if pf is not None else 0
    warps = 4 if H <= 2048 else 8
    _add_rmsnorm_kernel[(B + extra,)](x, d, weight, out, H, eps, x.stride(0), d.stride(-2),
                                      d.stride(0) if split > 1 else 0, out.stride(0), x if pf is None else pf,
                                      pf_bytes, B, PREFETCH=_prefetch_mode(prefetch_mode) if extra else 0,
                                      PF_THREADS=32 * warps, HAS_DELTA=delta is not None, SPLIT=split,
                                      BLOCK_H=triton.next_power_of_2(H), num_warps=warps,
                                      **wo.pdl_kwargs(pdl, x.device))
    return out


def argmax_next_triton(logits: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor, out_tokens: torch.Tensor,
                       pdl: bool = False) -> None:
    """One kernel for the end of a greedy graph step: tok[b] = argmax(logits[b]) and out_tokens[b, pos + 1] = the
    same token (pos: the (1,) device position, not advanced here). As ``tok.copy_(logits.argmax(-1))`` and
    ``out_tokens[:, pos + 1] = tok``: three kernels, the argmax a single-block reduction."""
    B, V = logits.shape
    if tok.shape != (B,) or tok.dtype != torch.long or out_tokens.dtype != torch.long or logits.stride(1) != 1:
        raise ValueError("argmax_next_triton takes logits (B, V) contiguous rows, tok (B,) and out_tokens (B, S) long")
    _argmax_next_kernel[(B,)](logits, tok, pos, out_tokens, V, logits.stride(0), out_tokens.stride(0),
                              BLOCK_V=min(16384, triton.next_power_of_2(V)), num_warps=16,
                              **wo.pdl_kwargs(pdl, logits.device))


def _prefetch(w, nbytes: int, device) -> tuple:
    pf = wo.prefetch_args(w, nbytes)
    if pf[0] is not None and not wo.l2_prefetch_supported(device):
        raise LabkitError("the L2 prefetch runs PTX for compute capability 9.0+ (Hopper): on this device pass "
                          "prefetch_bytes=0")
    return pf


def _prefetch_mode(mode: str) -> int:
    if mode not in PREFETCH_MODES:
        raise LabkitError(f"prefetch mode {mode!r} is not one of {tuple(PREFETCH_MODES)}")
    return PREFETCH_MODES[mode]


def rope_attention_ref(qkv, pos, cos, sin, k_cache, v_cache, n_heads: int, n_kv_heads: int,
                       length: int | None = None) -> torch.Tensor:
    """RoPE + cache write (``rope_cache_ref``), then attention over positions 0..pos: (B, nq * hd)."""
    q = rope_cache_ref(qkv, pos, cos, sin, k_cache, v_cache, n_heads, n_kv_heads)
    return decode_attention_ref(q, k_cache, v_cache, pos, length)


def rope_attention_triton(qkv, pos, cos, sin, k_cache, v_cache, n_heads: int, n_kv_heads: int,
                          length: int | None = None, pdl: bool = False, prefetch=None,
                          prefetch_bytes: int = 0, prefetch_mode: str = "lines") -> torch.Tensor:
    """Same contract as rope_attention_ref in one kernel (``length`` is ignored: the kernel reads pos on the device).

    ``qkv`` may also be the (S, B, W) fp32 partial sums of a split-K GEMV (``wo.linear(..., partials=True)``): the
    kernel sums them as it loads them, so the split needs no reduction kernel of its own. ``prefetch``,
    ``prefetch_bytes``: as in ``add_rmsnorm_triton`` (the programs share the requests).
    """
    split = qkv.shape[0] if qkv.dim() == 3 else 1
    B = qkv.shape[-2]
    hd = cos.shape[-1]
    rep = n_heads // n_kv_heads
    if qkv.shape[-1] != (n_heads + 2 * n_kv_heads) * hd or qkv.stride(-1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} is not (B, (n_heads + 2 n_kv_heads) * head_dim), contiguous")
    out = torch.empty(B, n_heads * hd, device=qkv.device, dtype=k_cache.dtype)
    block_r = max(16, triton.next_power_of_2(rep))
    pf, pf_bytes = _prefetch(prefetch, prefetch_bytes, qkv.device)
    _rope_attn_kernel[(B, n_kv_heads)](qkv, pos, cos, sin, k_cache, v_cache, out, hd**-0.5, rep, n_heads, n_kv_heads,
                                       qkv.stride(-2), qkv.stride(0) if split > 1 else 0, k_cache.stride(0),
                                       k_cache.stride(1), k_cache.stride(2), out.stride(0), out if pf is None else pf,
                                       pf_bytes, PREFETCH=_prefetch_mode(prefetch_mode) if pf is not None else 0,
                                       PF_THREADS=32 * ATTN_WARPS, HD=hd, BLOCK_R=block_r,
                                       BLOCK_L=ATTN_BLOCK_L, SPLIT=split, num_warps=ATTN_WARPS,
                                       enable_fp_fusion=False,  # round every RoPE product, as torch does
                                       **wo.pdl_kwargs(pdl, qkv.device))
    return out


# Cache positions per step of the decode-attention loop, and its warps. On an H200 (7B shape, batch 1, contexts 33-160)
# 128 x 8 gave a 1-2% faster step than 64 x 4 in bf16 and int4 in two runs, int8 within 1% either way
# (results/nvidia-h200/decode_attn_knobs*.json).
ATTN_BLOCK_L = 128
ATTN_WARPS = 8

# Bytes of the next GEMV's weights that the small kernels of a Triton decode step ask L2 to prefetch (Hopper's bulk
# prefetch, wo._l2_prefetch) while they run and HBM would otherwise idle: "norm", each add+RMSNorm (before the qkv
# and gate+up GEMVs and the LM head); "attention", the RoPE+attention kernel (before the output projection). A
# hint: no result changes. "mode": "lines" (a prefetch instruction per 128-byte line from every thread) or "bulk"
# (one bulk TMA request per thread); "norm_programs": the extra programs of the add+RMSNorm kernel that issue its
# requests (the norm itself is one program per row). FastLlama.prefetch_l2 starts as a copy of this; 0 bytes turn a
# site off. Off by default: on an H200 (7B shape, batch 1, the same pinned GEMV configs; scripts/gpu_decode.py
# prefetch -> results/nvidia-h200/decode_prefetch.json, 686d0b6) every setting made the step slower, the more so the
# more it fetched: 3.39 / 2.40 / 1.97 ms (bf16 / int8 / int4) without, 3.42 / 2.41 / 2.05 with 4 MB per norm and 8 MB
# per attention kernel, 3.70 / 2.73 / 2.27 with 16 and 32 MB; bulk requests no better than lines.
PREFETCH_L2 = {"norm": 0, "attention": 0, "mode": "lines", "norm_programs": 32}
PREFETCH_MODES = {"bulk": 1, "lines": 2}


# ---------------------------------------------------------------------------------------------- weights
@dataclass
class LayerWeights:
    wqkv: object  # (nq*hd + 2*nkv*hd, hidden): q, k and v projections stacked
    wo: object  # (hidden, nq*hd)
    w13: object  # (2*intermediate, hidden): gate and up stacked
    w2: object  # (hidden, intermediate)
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor


def _from_quantlinear(mods: list, fmt: str, for_kernel: bool, device, max_batch: int = 1):
    """The stored codes of ``quant.QuantLinear`` layers (GPTQ, RTN or QAT of ``labkit.gptq``/``labkit.qat``) that read
    the same input, stacked along the output rows, as our weight format, without re-quantizing.

    int4: ``Int4Weight`` with the layers' own codes, fp32 scales and zero points (a ragged last group padded with
    its zero point), interleaved for the kernels when the group is 128. GPTQ's act-order uses static groups, so its
    codes are stored in column order with contiguous groups and need no permutation. int8: only per-row *symmetric*
    8-bit codes map onto ``Int8Weight`` (``q - 128`` with zero point 128); other 8-bit layouts are an error.
    Either way the weights dequantize to exactly ``QuantLinear.dequantized_weight()``.
    """
    from labkit import quant

    bad = [type(m).__name__ for m in mods if not isinstance(m, quant.QuantLinear)]
    if bad:
        raise LabkitError(f"a layer mixes quantized and unquantized projections ({bad}); quantize all of a decoder "
                          "layer's linear layers (labkit.gptq.gptq_quantize_model does)")
    if len({(m.bits, m.group_size, m.in_features) for m in mods}) != 1:
        raise LabkitError("projections that read the same input must share bits and group size to be stacked")
    bits, g = mods[0].bits, mods[0].group_size
    q = torch.cat([m.q for m in mods]).to(device)  # (rows, K) uint8 codes
    scale = torch.cat([m.scale for m in mods]).to(device)  # (rows, G) fp32
    zero = torch.cat([m.zero for m in mods]).to(device)
    if fmt == "int4":
        if bits != 4:
            raise LabkitError(f"weights='int4' takes 4-bit QuantLinear layers; these hold {bits}-bit codes")
        w = wo.int4_from_codes(q, scale, zero, g)
        return wo.interleave(w) if for_kernel and g == 128 else w
    if fmt == "int8":
        if bits != 8 or scale.shape[1] != 1 or not bool((zero == 128).all()):
            raise LabkitError("weights='int8' takes 8-bit per-channel symmetric QuantLinear layers (zero point 128, "
                              "e.g. gptq_quantize_model(..., bits=8, groupsize=None, sym=True)); these are "
                              f"{bits}-bit, {scale.shape[1]} group(s) per row, asymmetric={not bool((zero == 128).all())}")
        return _int8_layout(wo.Int8Weight((q.to(torch.int16) - 128).to(torch.int8), scale[:, 0].contiguous()),
                            for_kernel, max_batch)
    raise LabkitError(f"the model's linear layers are quantized ({bits}-bit QuantLinear): pass weights='int4' "
                      f"or 'int8' to serve their codes, not weights={fmt!r}")


# The int8 layout the Triton kernels read: "rows" (wo.Int8Weight as quantized, the row-major GEMVs), "words"
# (wo.WordWeight: the word kernels, and at one row the packed-fp16 "h2" GEMV among the tuner's candidates) or
# "auto": words for a model built for batch 1 (max_batch=1), rows otherwise. On an H200 (7B shape,
# results/nvidia-h200/decode_int8_layout.json, gemv_int8_m4.json) the batch-1 step took 2.39-2.40 ms with words
# against 2.47-2.53 ms with rows, while at 4 rows every word-layout GEMV was 1.2-2x slower than the row-major one.
INT8_LAYOUTS = ("auto", "rows", "words")
INT8_LAYOUT = "auto"


def _int8_layout(w, for_kernel: bool, max_batch: int):
    """An Int8Weight as the kernels of a model built for ``max_batch`` rows read it (INT8_LAYOUT): interleaved into
    words, or as it is (also for the torch path, and for rows not a multiple of 64 columns)."""
    if INT8_LAYOUT not in INT8_LAYOUTS:
        raise LabkitError(f"fastgen.INT8_LAYOUT must be one of {INT8_LAYOUTS}, got {INT8_LAYOUT!r}")
    words = INT8_LAYOUT == "words" or (INT8_LAYOUT == "auto" and max_batch == 1)
    return wo.interleave(w) if for_kernel and words and w.q.shape[1] % 64 == 0 else w


def _quantize(w: torch.Tensor, fmt: str, group: int, for_kernel: bool = False, max_batch: int = 1):
    if fmt == "bf16":
        return w.contiguous()
    if fmt == "int8":
        return _int8_layout(wo.quantize_int8(w), for_kernel, max_batch)
    if fmt == "int4":
        q = wo.quantize_int4(w, group)
        # the Triton GEMVs read int4 in the interleaved word layout (same codes, wo.WordWeight): the CUDA-core
        # kernel for one row, the tensor-core kernel for a batch (whichever wo.tune finds faster)
        return wo.interleave(q) if for_kernel and group == 128 else q
    raise LabkitError(f"weights={fmt!r} is not one of {WEIGHT_FORMATS}")


class FastLlama:
    """Our Llama forward + static KV cache + CUDA-graph decode over weights copied from an HF LlamaForCausalLM.

    ``weights``: "bf16" (the model's dtype as is), "int8" (per-channel; for the Triton kernels stored in the word
    layout when ``max_batch`` is 1, row-major otherwise: ``INT8_LAYOUT``) or "int4" (group-wise, ``group``);
    every linear layer including the LM head is converted, the embedding table stays as it is (a step
    reads one row of it). A model whose linear layers are ``quant.QuantLinear`` (from ``labkit.gptq``: GPTQ or RTN)
    is served from its own codes instead (``weights`` must name their format, see ``_from_quantlinear``); its
    LM head, which GPTQ leaves unquantized, stays in the model dtype. ``kernels``: "triton" (default on CUDA) or "torch" (default and only choice on CPU
    unless TRITON_INTERPRET=1 is set for tests). ``pdl``: launch the step's Triton kernels with programmatic
    dependent launch, so each is scheduled while the one before it finishes (default: on for Triton kernels on
    a GPU of compute capability 9.0+). With the same GEMV configs (``pin_gemv_configs``) the logits are bit for bit
    those without PDL; ``tune`` times PDL launches separately and may pick other configs, which sum in another order.
    """

    def __init__(self, hf_model, *, weights: str = "bf16", kernels: str | None = None, max_seq_len: int = 1024,
                 max_batch: int = 1, group: int = 128, device=None, pdl: bool | None = None):
        if weights not in WEIGHT_FORMATS:
            raise LabkitError(f"weights={weights!r} is not one of {WEIGHT_FORMATS}")
        if getattr(hf_model.config, "model_type", "") != "llama" or any(
                type(m).__name__.startswith(("Linear8bit", "Linear4bit")) for m in hf_model.modules()):
            raise LabkitError("FastLlama takes an unquantized transformers LlamaForCausalLM (bf16/fp16/fp32); "
                              "pass weights='int8'/'int4' to quantize it here instead of loading with bitsandbytes.")
        from labkit import quant

        self.cfg = cfg = FastConfig.from_hf(hf_model.config)
        self.prequantized = any(isinstance(m, quant.QuantLinear) for m in hf_model.modules())
        if self.prequantized and weights == "bf16":
            raise LabkitError("the model's linear layers are already quantized (QuantLinear): pass weights='int4' "
                              "(4-bit codes) or weights='int8' (8-bit symmetric per channel) to serve their codes")
        emb = hf_model.get_input_embeddings().weight
        self.device = torch.device(device) if device is not None else emb.device
        self.dtype = emb.dtype
        kernels = kernels or ("triton" if self.device.type == "cuda" else "torch")
        if kernels not in ("torch", "triton"):
            raise LabkitError(f"kernels={kernels!r}: use 'torch' or 'triton'")
        if kernels == "triton" and self.device.type != "cuda" and not _interpreting():
            raise LabkitError("kernels='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for tiny tests); "
                              "use kernels='torch' on a CPU.")
        if weights != "bf16" and self.dtype == torch.float32 and kernels == "triton" and self.device.type == "cuda":
            raise LabkitError("quantized Triton GEMV expects bf16/fp16 activations: load the model in bf16.")
        self.weights, self.kernels, self.group = weights, kernels, group
        can_pdl = kernels == "triton" and wo.pdl_supported(self.device)
        self.pdl = can_pdl if pdl is None else bool(pdl)
        if self.pdl and not can_pdl:
            raise LabkitError("pdl=True needs kernels='triton' on a GPU of compute capability 9.0+ (Hopper); "
                              "pass pdl=False")
        self.max_seq_len, self.max_batch = max_seq_len, max_batch
        dev = self.device

        def t(p):
            return p.detach().to(dev)

        def qz(w):
            return _quantize(w, weights, group, for_kernel=kernels == "triton", max_batch=max_batch)

        def stack(*mods):
            if self.prequantized:
                return _from_quantlinear(list(mods), weights, kernels == "triton", dev, max_batch)
            return qz(torch.cat([t(m.weight) for m in mods], dim=0))

        self.layers: list[LayerWeights] = []
        for layer in hf_model.model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(LayerWeights(stack(a.q_proj, a.k_proj, a.v_proj), stack(a.o_proj),
                                            stack(m.gate_proj, m.up_proj), stack(m.down_proj),
                                            t(layer.input_layernorm.weight), t(layer.post_attention_layernorm.weight)))
        self.embed = t(emb)
        self.norm = t(hf_model.model.norm.weight)
        head = hf_model.get_output_embeddings()
        if isinstance(head, quant.QuantLinear):
            self.lm_head = _from_quantlinear([head], weights, kernels == "triton", dev, max_batch)
        elif self.prequantized:
            self.lm_head = t(head.weight).contiguous()  # left unquantized by the quantizer: served as it is
        else:
            self.lm_head = qz(t(head.weight))
        self.cos, self.sin = rope_tables(cfg, max_seq_len, self.dtype, dev)
        shape = (cfg.n_layers, max_batch, cfg.n_kv_heads, max_seq_len, cfg.head_dim)
        self.k_cache = torch.zeros(shape, device=dev, dtype=self.dtype)  # (L, B, nkv, S, hd)
        self.v_cache = torch.zeros(shape, device=dev, dtype=self.dtype)
        self._graphs: dict = {}
        self._static: dict = {}
        self._pinned: set = set()  # batch sizes whose GEMV configs were pinned: capture() does not re-tune them
        self.prefetch_l2 = dict(PREFETCH_L2)  # read when a step is traced: set it before capture()

    def dequantized(self, dtype=torch.float32) -> "FastLlama":
        """A copy whose linear layers are dense ``wo.dequantize(w, dtype)`` of this build's codes and whose
        activations, norms, RoPE tables and cache are ``dtype``; torch kernels, no graphs.

        In fp32 this is the precise reference of a quantized build: the codes are the same, only the arithmetic is
        wider. The bf16 reference path (``kernels="torch"``) rounds every dequantized weight ``code * scale`` to
        bf16's 8 significant bits before the matmul (an int8 code alone has up to 7), while the Triton GEMVs
        multiply the exact codes with the activations in fp32 and apply the scale to the fp32 sum."""
        import copy

        ref = copy.copy(self)
        ref.dtype, ref.kernels, ref.pdl = dtype, "torch", False
        ref.layers = [LayerWeights(*(wo.dequantize(w, dtype) for w in (lw.wqkv, lw.wo, lw.w13, lw.w2)),
                                   lw.attn_norm.to(dtype), lw.mlp_norm.to(dtype)) for lw in self.layers]
        ref.lm_head = wo.dequantize(self.lm_head, dtype)
        ref.embed, ref.norm = self.embed.to(dtype), self.norm.to(dtype)
        ref.cos, ref.sin = rope_tables(self.cfg, self.max_seq_len, dtype, self.device)
        ref.k_cache, ref.v_cache = torch.zeros_like(self.k_cache, dtype=dtype), torch.zeros_like(self.v_cache, dtype=dtype)
        ref._graphs, ref._static, ref._pinned = {}, {}, set()
        return ref

    # ------------------------------------------------------------------ sizes
    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one decode step reads: every linear layer as stored (LM head included) and the norms;
        the embedding rows it looks up count as zero (``labkit.roofline``'s rule)."""
        n = sum(wo.weight_nbytes(w) for lw in self.layers for w in (lw.wqkv, lw.wo, lw.w13, lw.w2))
        n += sum(lw.attn_norm.numel() + lw.mlp_norm.numel() for lw in self.layers) * self.dtype.itemsize
        return n + wo.weight_nbytes(self.lm_head) + self.norm.numel() * self.dtype.itemsize

    def kv_bytes_per_step(self, context_len: int, batch: int = 1) -> int:
        """Bytes of KV cache a decode step reads at ``context_len`` cached positions (K and V, all layers)."""
        c = self.cfg
        return int(roofline.kv_bytes(c.n_layers, c.n_kv_heads, c.head_dim, context_len, batch, self.dtype.itemsize))

    def bytes_per_step(self, context_len: int, batch: int = 1) -> int:
        return self.weight_bytes_per_step() + self.kv_bytes_per_step(context_len, batch)

    # ------------------------------------------------------------------ ops
    def l2_prefetch(self) -> dict:
        """The bytes each small kernel of the Triton step asks L2 to prefetch of the next GEMV's weights
        ({"norm": ..., "attention": ...}, ``prefetch_l2`` where the device can: all zero on the torch path, under the
        interpreter and before Hopper)."""
        on = self.kernels == "triton" and wo.l2_prefetch_supported(self.device)
        pf = {**PREFETCH_L2, **self.prefetch_l2}
        _prefetch_mode(pf["mode"])
        return {**pf, "norm": int(pf["norm"]) if on else 0, "attention": int(pf["attention"]) if on else 0}

    def _ops(self):
        if self.kernels == "triton":
            pdl, pf = self.pdl, self.l2_prefetch()
            nb, ab, mode, progs = pf["norm"], pf["attention"], pf["mode"], pf["norm_programs"]
            return ((lambda *a, nxt=None: add_rmsnorm_triton(*a, pdl=pdl, prefetch=nxt, prefetch_bytes=nb,
                                                             prefetch_mode=mode, prefetch_programs=progs)),
                    (lambda *a, nxt=None: rope_attention_triton(*a, pdl=pdl, prefetch=nxt, prefetch_bytes=ab,
                                                                prefetch_mode=mode)), True)
        return (lambda *a, nxt=None: add_rmsnorm_ref(*a)), (lambda *a, nxt=None: rope_attention_ref(*a)), False

    def _lin(self, x, w, silu=False, use_kernel=False, partials=False):
        return wo.linear(x, w, silu_gate_up=silu, use_kernel=use_kernel, partials=partials,
                         pdl=use_kernel and self.pdl)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ids (B, T) from position 0, fill the cache; return the last position's logits (B, V)."""
        cfg = self.cfg
        B, T = ids.shape
        if B > self.max_batch or T > self.max_seq_len:
            raise LabkitError(f"prompt {tuple(ids.shape)} exceeds max_batch={self.max_batch} / "
                              f"max_seq_len={self.max_seq_len}; build FastLlama with larger limits.")
        x = F.embedding(ids.to(self.device), self.embed)  # (B, T, H)
        cos, sin = self.cos[:T], self.sin[:T]  # (T, hd)
        delta = None
        for li, lw in enumerate(self.layers):
            h = add_rmsnorm_ref(x, delta, lw.attn_norm, cfg.rms_eps)
            qkv = self._lin(h, lw.wqkv)
            q, k, v = qkv.split([cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim,
                                 cfg.n_kv_heads * cfg.head_dim], dim=-1)
            q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, nq, T, hd)
            k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
            v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k_cache[li, :B, :, :T] = k
            self.v_cache[li, :B, :, :T] = v
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.n_kv_heads != cfg.n_heads)
            o = o.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim)  # (B, T, nq*hd)
            delta = self._lin(o, lw.wo)
            h = add_rmsnorm_ref(x, delta, lw.mlp_norm, cfg.rms_eps)
            delta = self._lin(self._lin(h, lw.w13), lw.w2, silu=True)
        h = add_rmsnorm_ref(x, delta, self.norm, cfg.rms_eps)
        return self._lin(h[:, -1], self.lm_head)  # (B, V)

    def _step(self, tok: torch.Tensor, pos: torch.Tensor, length: int | None) -> torch.Tensor:
        """One decode position for tokens tok (B,) at device position pos (1,); returns logits (B, V)."""
        cfg = self.cfg
        norm, rope_attn, kern = self._ops()
        B = tok.shape[0]
        x = self.embed.index_select(0, tok)  # (B, H), a fresh buffer that carries the residual stream;
        # it must stay an ordinary launch (no PDL): it waits for everything before it, which lets the attention kernel
        # read the cache of earlier steps before its own PDL wait
        delta = None
        for li, lw in enumerate(self.layers):
            # each small kernel asks L2 for the first bytes of the weights the GEMV after it reads (l2_prefetch)
            h = norm(x, delta, lw.attn_norm, cfg.rms_eps, nxt=lw.wqkv)
            # (B, (nq + 2 nkv) * hd), or its split-K partials: the attention kernel sums them
            qkv = self._lin(h, lw.wqkv, use_kernel=kern, partials=True)
            o = rope_attn(qkv, pos, self.cos, self.sin, self.k_cache[li], self.v_cache[li], cfg.n_heads,
                          cfg.n_kv_heads, length, nxt=lw.wo)  # (B, nq*hd)
            # the GEMVs whose output goes straight into add+RMSNorm hand over split-K partials: the norm sums them
            delta = self._lin(o, lw.wo, use_kernel=kern, partials=True)
            h = norm(x, delta, lw.mlp_norm, cfg.rms_eps, nxt=lw.w13)
            gu = self._lin(h, lw.w13, use_kernel=kern)  # (B, 2 * intermediate) = [gate | up]
            delta = self._lin(gu, lw.w2, silu=True, use_kernel=kern, partials=True)
        h = norm(x, delta, self.norm, cfg.rms_eps, nxt=self.lm_head)
        return self._lin(h, self.lm_head, use_kernel=kern)  # (B, V)

    @torch.no_grad()
    def decode_step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        """Eager decode step (no graph): tok (B,) at position pos -> logits (B, V)."""
        if pos >= self.max_seq_len:
            raise LabkitError(f"position {pos} is past max_seq_len={self.max_seq_len}")
        p = torch.tensor([pos], device=self.device)
        return self._step(tok.to(self.device), p, pos + 1 if self.kernels == "torch" else None)

    # ------------------------------------------------------------------ CUDA graph
    def gemv_calls(self) -> tuple:
        """The step's distinct GEMVs as ``_step`` calls them: (name, weight, silu_gate_up, partials); every layer
        has the shapes of the first, so these five calls are all a launch config is chosen for."""
        lw = self.layers[0]
        return (("wqkv", lw.wqkv, False, True), ("wo", lw.wo, False, True), ("w13", lw.w13, False, False),
                ("w2", lw.w2, True, True), ("lm_head", self.lm_head, False, False))

    def tune(self, batch: int = 1) -> None:
        """Pick the fastest GEMV launch config for every distinct weight shape at this batch (GPU, triton only).

        ``capture`` calls it unless configs were pinned (``pin_gemv_configs``). The choice is by timing, so two
        builds of the same model (or one with and one without PDL, which are timed separately) can pick different
        configs, hence sum in a different order: their logits may then differ in the last bits."""
        if self.kernels != "triton" or self.device.type != "cuda":
            return
        for _, w, silu, part in self.gemv_calls():
            wo.tune(w, M=batch, dtype=self.dtype, silu_gate_up=silu, partials=part, pdl=self.pdl)

    def gemv_configs(self, batch: int = 1) -> dict:
        """{name: GemvConfig} the step's Triton GEMVs launch with at this batch (tuned, pinned or the default)."""
        return {name: wo.config_for(w, batch, self.dtype, silu, part, self.pdl)
                for name, w, silu, part in self.gemv_calls()}

    def gemv_tuning(self, batch: int = 1) -> dict:
        """{name: what ``tune`` found} for the step's GEMVs at this batch: the chosen config and kernel, and the best
        time of each kernel it timed (``wo_matmul.tuning_report``); empty where nothing was tuned."""
        out = {name: wo.tuning_report(w, batch, self.dtype, silu, part, self.pdl)
               for name, w, silu, part in self.gemv_calls()}
        return {k: v for k, v in out.items() if v is not None}

    def pin_gemv_configs(self, configs: dict, batch: int = 1) -> None:
        """Launch the step's GEMVs with ``configs`` ({name: GemvConfig}, e.g. another build's ``gemv_configs()``)
        and stop ``capture`` from re-tuning them: two builds then sum in the same order."""
        calls = self.gemv_calls()
        missing = sorted({name for name, *_ in calls} - set(configs))
        if missing:
            raise LabkitError(f"pin_gemv_configs needs a config for every GEMV of the step; missing {missing}")
        for name, w, silu, part in calls:
            wo.pin_config(w, configs[name], M=batch, dtype=self.dtype, silu_gate_up=silu, partials=part, pdl=self.pdl)
        self._pinned.add(batch)

    def capture(self, batch: int = 1) -> None:
        """Capture one decode step for ``batch`` rows as a CUDA graph (static token, position and output buffers).

        The graph computes logits, takes the argmax, writes it into the token buffer and into ``out_tokens`` at
        the next position, and advances the position: replaying it N times decodes N tokens.
        """
        env.require_cuda("CUDA-graph capture")
        if self.device.type != "cuda":
            raise LabkitError("capture() needs the model on a CUDA device")
        dev = self.device
        if batch not in self._pinned:
            self.tune(batch)  # launch configs must be fixed before they are baked into the graph
        st = {
            "tok": torch.zeros(batch, dtype=torch.long, device=dev),
            "pos": torch.zeros(1, dtype=torch.long, device=dev),
            "out_tokens": torch.zeros(batch, self.max_seq_len + 1, dtype=torch.long, device=dev),
        }

        def body():
            logits = self._step(st["tok"], st["pos"], None)
            if self.kernels == "triton":  # one kernel: argmax -> tok and out_tokens[:, pos + 1]
                argmax_next_triton(logits, st["tok"], st["pos"], st["out_tokens"], pdl=self.pdl)
                st["pos"].add_(1)
            else:
                nxt = logits.argmax(dim=-1)  # (B,)
                st["tok"].copy_(nxt)
                st["pos"].add_(1)
                st["out_tokens"].index_copy_(1, st["pos"], nxt[:, None])
            return logits

        # warm up on a side stream (compiles Triton kernels, initialises cuBLAS) at a scratch position
        st["pos"].fill_(self.max_seq_len - 2)
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(2):
                st["pos"].fill_(self.max_seq_len - 2)
                body()
        torch.cuda.current_stream(dev).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        st["pos"].fill_(self.max_seq_len - 2)
        with torch.cuda.graph(graph), torch.no_grad():
            st["logits"] = body()
        self._graphs[batch] = graph
        self._static[batch] = st

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, use_graph: bool | None = None,
                 return_logits: bool = False):
        """Greedy decoding: ids (B, T) -> new tokens (B, max_new_tokens) [, logits list of (B, V) per new token].

        The first new token comes from the prefill; each further one from a decode step (graph replay on CUDA
        when ``use_graph``, default True there). No early stop at EOS: compare with ``truncate_at_eos``.
        """
        B, T = ids.shape
        if T + max_new_tokens > self.max_seq_len:
            raise LabkitError(f"prompt {T} + {max_new_tokens} new tokens exceeds max_seq_len={self.max_seq_len}")
        use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        logits = self.prefill(ids)
        tok = logits.argmax(dim=-1)  # (B,)
        all_logits = [logits.float()] if return_logits else None
        out = [tok]
        if use_graph:
            if B not in self._graphs:
                self.capture(B)
            g, st = self._graphs[B], self._static[B]
            st["tok"].copy_(tok)
            st["pos"].fill_(T)
            for _ in range(max_new_tokens - 1):
                g.replay()
                if return_logits:
                    all_logits.append(st["logits"].float())
            new = torch.cat([tok[:, None], st["out_tokens"][:, T + 1:T + max_new_tokens]], dim=1)
        else:
            for i in range(max_new_tokens - 1):
                logits = self.decode_step(tok, T + i)
                tok = logits.argmax(dim=-1)
                out.append(tok)
                if return_logits:
                    all_logits.append(logits.float())
            new = torch.stack(out, dim=1)
        return (new, all_logits) if return_logits else new

    def decode_n(self, batch: int, start: int, n: int) -> None:
        """Replay the captured step n times from position ``start`` (the timing loop of the benchmarks)."""
        g, st = self._graphs[batch], self._static[batch]
        st["pos"].fill_(start)
        for _ in range(n):
            g.replay()


@torch.no_grad()
def decode_logits(fast: FastLlama, ids: torch.Tensor, progress: str | None = None) -> torch.Tensor:
    """Logits (B, T, V) fp32 for every position of ids (B, T), one position at a time through the decode step from
    position 0 (teacher forcing, no graph): the kernels ``generate`` uses after the prompt (with kernels="triton" the
    Triton GEMVs, add+RMSNorm and RoPE + decode attention), over a whole text instead of a few greedy tokens.
    ``progress``: a label for a progress bar over the positions (None: no bar)."""
    B, T = ids.shape
    if B > fast.max_batch or T > fast.max_seq_len:
        raise LabkitError(f"ids {tuple(ids.shape)} exceed max_batch={fast.max_batch} / max_seq_len={fast.max_seq_len}")
    ids = ids.to(fast.device)
    positions = range(T)
    if progress is not None:
        from tqdm.auto import tqdm

        positions = tqdm(positions, desc=progress, unit="position")
    return torch.stack([fast.decode_step(ids[:, t], t).float() for t in positions], dim=1)


def decode_perplexity(fast: FastLlama, ids: torch.Tensor, progress: str | None = None) -> float:
    """exp(mean next-token NLL) of a 1-D token stream ids (T,) scored through the decode step (``decode_logits``,
    which ``progress`` is passed to): the T - 1 predictions of one window from position 0, the same tokens
    ``evaluate.perplexity(model, ids, ctx_len=T, stride=T - 1)`` scores with the model's own forward."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"expected a 1-D token stream of at least 2 tokens, got shape {tuple(ids.shape)}")
    logits = decode_logits(fast, ids[None, :-1], progress)[0]  # (T-1, V)
    return math.exp(F.cross_entropy(logits, ids[1:].to(logits.device)).item())


def logit_agreement(ref: torch.Tensor, logits: torch.Tensor) -> dict:
    """How close ``logits`` (T, V) are to reference logits ``ref`` (T, V) at the same T positions (teacher forcing).

    Returns the RMS and max absolute difference, the positions where the argmax differs (``flips``) with the
    reference's top-2 gap there (``flip_gaps``: a flip at a small gap is a near-tie that any rounding can turn),
    the number of positions whose argmax agrees, and the reference's smallest and median top-2 gap."""
    if ref.shape != logits.shape or ref.dim() != 2:
        raise ValueError(f"expected two (T, V) logit tensors of one shape, got {tuple(ref.shape)}, {tuple(logits.shape)}")
    ref, logits = ref.float(), logits.float()
    top2 = ref.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]  # (T,)
    d = logits - ref
    flips = (logits.argmax(-1) != ref.argmax(-1)).nonzero().flatten().tolist()
    return {"rms": d.pow(2).mean().sqrt().item(), "max_abs": d.abs().amax().item(), "positions": ref.shape[0],
            "top1_agree": ref.shape[0] - len(flips), "flips": flips, "flip_gaps": [gap[i].item() for i in flips],
            "min_gap": gap.min().item(), "median_gap": gap.median().item()}


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def truncate_at_eos(tokens: list[int], eos_token_id) -> list[int]:
    """Tokens up to and including the first EOS (HF generate stops there)."""
    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) if eos_token_id is not None else set()
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return tokens


def hf_greedy(model, ids: torch.Tensor, max_new_tokens: int, **kw) -> torch.Tensor:
    """HF generate, greedy, new tokens only: (B, <= max_new_tokens)."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


def compare_with_hf(model, fast: FastLlama, ids: torch.Tensor, max_new_tokens: int, use_graph=None) -> dict:
    """Greedy tokens of FastLlama vs HF generate, and their logits along our sequence vs HF's forward on it.

    Returns the matching prefix length, whether all tokens match (up to HF's EOS stop), and the max abs logit
    difference relative to the logits' scale (max |logit|). The yardstick for that difference is HF's own:
    ``hf_self_rel_logit_diff`` compares HF generate's incremental logits (KV cache, one token at a time)
    with HF's single forward pass over the same sequence; both are HF, so what separates them is rounding
    alone (bf16: 2^-8 relative per operation, accumulated over the layers).
    """
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    hf = gen.sequences[:, ids.shape[1]:]
    hf_incr = torch.stack([x.float() for x in gen.logits], dim=1)  # (B, n_hf, V)
    ours, logits = fast.generate(ids, max_new_tokens, use_graph=use_graph, return_logits=True)
    eos = getattr(model.generation_config, "eos_token_id", None)
    res = {"n_new": max_new_tokens, "rows": []}
    full = torch.cat([ids.to(fast.device), ours], dim=1)
    T = ids.shape[1]
    with torch.no_grad():
        ref_logits = model(full).logits.float()  # (B, T + n, V)
        hf_full = model(gen.sequences).logits.float()[:, T - 1:T - 1 + hf.shape[1]]  # (B, n_hf, V)
    ours_l = torch.stack(logits, dim=1)  # (B, n, V)
    ref_l = ref_logits[:, T - 1:T - 1 + max_new_tokens]
    scale = ref_l.abs().amax().item()
    diff = (ours_l - ref_l).abs().amax().item()
    res["hf_self_rel_logit_diff"] = (hf_incr - hf_full).abs().amax().item() / scale if scale else float("nan")
    for b in range(ids.shape[0]):
        h = truncate_at_eos(hf[b].tolist(), eos)
        o = truncate_at_eos(ours[b].tolist(), eos)
        n = 0
        while n < min(len(h), len(o)) and h[n] == o[n]:
            n += 1
        res["rows"].append({"match_prefix": n, "hf_len": len(h), "equal": h == o})
    res["all_equal"] = all(r["equal"] for r in res["rows"])
    res["min_match_prefix"] = min(r["match_prefix"] for r in res["rows"])
    res["max_abs_logit_diff"] = diff
    res["logit_scale"] = scale
    res["rel_logit_diff"] = diff / scale if scale else float("nan")
    return res


# ---------------------------------------------------------------------------------------------- torchao, the peer
TORCHAO_FORMATS = ("int8", "int4")


def torchao_weight(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, str]:
    """A dense (N, K) bf16 CUDA weight quantized by torchao's weight-only configs -> (its tensor subclass, the config).

    int8: ``Int8WeightOnlyConfig()`` (symmetric per channel, like ours). int4: ``Int4WeightOnlyConfig(group_size=128,
    int4_packing_format="tile_packed_to_4d")``, the tinygemm layout gpt-fast uses (``aten._weight_int4pack_mm``; CUDA,
    bf16 only), falling back to the version-1 config (tensor-core tiled layout: the same kernel) on an older torchao.
    ``F.linear(x, w_ao)`` then runs torchao's kernel.
    """
    if fmt not in TORCHAO_FORMATS:
        raise LabkitError(f"torchao comparison formats are {TORCHAO_FORMATS}, not {fmt!r}")
    ao = env.require_package("torchao", "the torchao comparison of the decode benchmark")
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if w.device.type != "cuda" or w.dtype != torch.bfloat16:
        raise LabkitError("torchao's weight-only kernels are compared on a CUDA GPU in bf16 (tinygemm is bf16-only)")
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    lin.weight.data.copy_(w)
    if fmt == "int8":
        cfg = Int8WeightOnlyConfig()
        quantize_(lin, cfg)
    elif fmt == "int4":
        try:
            cfg = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
            quantize_(lin, cfg)
        except (TypeError, ValueError, ImportError, RuntimeError):
            lin.weight.data.copy_(w)
            cfg = Int4WeightOnlyConfig(group_size=128, version=1)
            quantize_(lin, cfg)
    else:
        raise LabkitError(f"torchao comparison formats are {TORCHAO_FORMATS}, not {fmt!r}")
    return lin.weight, f"torchao {ao.__version__} {type(cfg).__name__} -> {type(lin.weight).__name__}"


_AO_LINEAR = None


def torchao_linear(x: torch.Tensor, w) -> torch.Tensor:
    """``F.linear(x, w)`` for a torchao weight, compiled once with torch.compile as gpt-fast runs it (inductor fuses
    the int8 dequantization into the matmul; tinygemm is one kernel either way)."""
    global _AO_LINEAR
    if _AO_LINEAR is None:
        import torch._dynamo

        # one compiled graph per weight shape and format (10 for the 7B shape): above dynamo's default limit of 8
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        _AO_LINEAR = torch.compile(lambda a, b: F.linear(a, b), dynamic=False)
    return _AO_LINEAR(x, w)


class TorchaoLlama(FastLlama):
    """FastLlama with every linear layer (LM head included) a torchao weight-only tensor: the same static cache, the
    same fused Triton add+RMSNorm and RoPE + attention kernels, the same CUDA graph; only the GEMVs are torchao's.
    What a step costs beside ours therefore measures the GEMV kernels, in a whole step."""

    def __init__(self, hf_model, fmt: str, **kw):
        super().__init__(hf_model, weights="bf16", kernels="triton", **kw)
        self.ao_format = fmt
        self.ao_config = None
        for lw in self.layers:
            for name in ("wqkv", "wo", "w13", "w2"):
                aw, self.ao_config = torchao_weight(getattr(lw, name), fmt)
                setattr(lw, name, aw)
        self.lm_head, _ = torchao_weight(self.lm_head, fmt)
        torch.cuda.empty_cache()

    def _lin(self, x, w, silu=False, use_kernel=False, partials=False):
        if silu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        lead = x.shape[:-1]
        return torchao_linear(x.reshape(-1, x.shape[-1]), w).reshape(*lead, -1)

    def tune(self, batch: int = 1) -> None:  # no Triton GEMV to tune
        return None


def compare_torchao_gemvs(fast: FastLlama, model, fmt: str, log=print) -> list[dict]:
    """Each distinct GEMV of the step (the 7B shape: qkv, o, gate+up, down, LM head), ours (the weights ``fast`` holds)
    and torchao's on the same dense weights, timed alike (``wo.time_gemv``'s method: a CUDA graph cycling over
    copies beyond L2). One record per GEMV; ``ratio_vs_torchao`` = torchao's time / ours (> 1: ours is faster)."""
    from labkit import bench

    hf = model.model.layers[0]
    a, m = hf.self_attn, hf.mlp
    dense = {"qkv": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), "o": a.o_proj.weight,
             "gate_up": torch.cat([m.gate_proj.weight, m.up_proj.weight]), "down": m.down_proj.weight,
             "lm_head": model.get_output_embeddings().weight}
    # each GEMV with the flags the step calls it with (gemv_calls), hence the config tune() chose for the step
    step = {"wqkv": "qkv", "wo": "o", "w13": "gate_up", "w2": "down", "lm_head": "lm_head"}
    ours = {step[name]: (w, silu, part) for name, w, silu, part in fast.gemv_calls()}
    out = []
    for name, w in dense.items():
        qw, silu, part = ours[name]
        N, K = w.shape
        x = torch.randn(1, K * (2 if silu else 1), device=w.device, dtype=w.dtype)
        t_ours = wo.time_gemv(x, qw, silu, partials=part, pdl=fast.pdl)
        aw, cfg = torchao_weight(w.detach(), fmt)
        nb = wo.weight_nbytes(qw)
        copies = [aw] + [torchao_weight(w.detach(), fmt)[0] for _ in range(max(0, min(31, (256 << 20) // nb) - 1))]

        def call(c, silu=silu, x=x):
            if silu:
                g, u = x.chunk(2, dim=-1)
                return torchao_linear(F.silu(g) * u, c)
            return torchao_linear(x, c)

        t_ao = bench.graph_time_ms([lambda c=c: call(c) for c in copies])
        out.append({"gemv": name, "weights": fmt, "N": N, "K": K, "ours_ms": t_ours, "torchao_ms": t_ao,
                    "ratio_vs_torchao": t_ao / t_ours, "torchao_config": cfg, "weight_bytes": nb})
        log(f"  {fmt} {name:8s} ({N}x{K}): ours {t_ours * 1e3:7.1f} us, torchao {t_ao * 1e3:7.1f} us -> "
            f"{t_ao / t_ours:.2f}x")
        del copies, aw
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------- benchmarks
# The GEMV sizes ``gemv_cost_points`` times by default: on a GPU the 7B shape's output widths (o, 2 x o, qkv,
# gate_up, lm_head) at its K; on a CPU a smaller K, every weight beyond what its caches hold.
GEMV_COST_SHAPES = {"cuda": (4096, (4096, 8192, 12288, 22016, 32000)), "cpu": (2048, (1024, 2048, 4096, 8192))}


def gemv_cost_points(fmt: str, device=None, K: int | None = None, Ns=None, cold_bytes: int = 256 << 20,
                     config=None, cpu_seconds: float = 2.0) -> list[dict]:
    """One-row GEMVs of one format over several output widths N (one K): bytes read and seconds per call, the runs
    ``roofline.fixed_plus_stream`` fits. Every call reads a weight not in any cache (the calls cycle over copies,
    ``cold_bytes`` in all).

    On a GPU, ``fmt`` "bf16", "int8" or "int4": the Triton GEMV of the decode step in the layout the step reads, with
    one config for every size (one kernel, so that only the size changes): ``config``, or the one ``wo.tune`` picks
    for the middle size (its candidates checked against the fp32 product); timed as ``wo.time_gemv`` does (a CUDA
    graph of back-to-back calls). On a CPU, "fp32": the dense GEMV the CPU decode path runs
    (``torch.nn.functional.linear``) on one thread, timed call by call over ``cpu_seconds``, the fastest call of each
    size kept.
    Random weights (0.02 x normal) and activations."""
    dev = torch.device(device) if device is not None else env.device()
    kinds = {"cuda": ("bf16", "int8", "int4"), "cpu": ("fp32",)}.get(dev.type)
    if kinds is None:
        raise LabkitError(f"gemv_cost_points times GEMVs on a CUDA GPU or a CPU, not on {dev.type}")
    if fmt not in kinds:
        where = "a CUDA GPU: the Triton GEMVs" if dev.type == "cuda" else "a CPU: the dense fp32 GEMV its decode path runs"
        raise LabkitError(f"fmt={fmt!r}: on {where} time one of {kinds}")
    k_def, n_def = GEMV_COST_SHAPES[dev.type]
    K, Ns = K or k_def, list(Ns or n_def)
    gen = torch.Generator(dev).manual_seed(0)
    if dev.type == "cuda" and config is None:  # one kernel for every size: the tuner's choice at the middle one
        w = torch.randn(Ns[len(Ns) // 2], K, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
        config = wo.tune(_quantize(w, fmt, 128, for_kernel=True), 1, torch.bfloat16)
        del w
    points = []
    if dev.type == "cuda":
        for N in Ns:
            w = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
            qw = _quantize(w, fmt, 128, for_kernel=True)
            del w
            x = torch.randn(1, K, device=dev, dtype=torch.bfloat16, generator=gen)
            seconds = wo.time_gemv(x, qw, config=config, cold_bytes=cold_bytes) / 1e3
            points.append({"fmt": fmt, "N": N, "K": K, "bytes": wo.weight_nbytes(qw), "seconds": seconds,
                           "config": str(config)})
        return points
    # CPU: one thread (a GEMV split over threads waits for the slowest, and a shared machine slows some of them at
    # random); the sizes take turns, a few calls each, for ``cpu_seconds`` in all, and each keeps its fastest call:
    # what the GEMV costs when nothing else competes for its core and memory; taking turns spreads every size over
    # the same stretch of time, so that whatever else runs weighs on all sizes alike
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _cpu_gemv_points(fmt, K, Ns, cold_bytes, cpu_seconds, gen)
    finally:
        torch.set_num_threads(threads)


def _cpu_gemv_points(fmt, K, Ns, cold_bytes, cpu_seconds, gen) -> list[dict]:
    import time

    x = torch.randn(1, K, generator=gen)
    weights = {N: [torch.randn(N, K, generator=gen) * 0.02 for _ in range(max(1, -(-cold_bytes // (N * K * 4))))]
               for N in Ns}
    best = {N: float("inf") for N in Ns}
    t_end = time.perf_counter() + cpu_seconds
    turn = 0
    while turn < 3 or time.perf_counter() < t_end:
        for N, ws in weights.items():
            for w in ws[:4] if turn else ws:  # the first turn reads every copy once (warm-up)
                t0 = time.perf_counter()
                F.linear(x, w)
                if turn:
                    best[N] = min(best[N], time.perf_counter() - t0)
            weights[N] = ws[4:] + ws[:4]  # the next turn reads the next copies: never one still in a cache
        turn += 1
    return [{"fmt": fmt, "N": N, "K": K, "bytes": N * K * 4, "seconds": best[N],
             "config": "torch.nn.functional.linear, fp32"} for N in Ns]


def reference_gemv_fits(ref, K: int = 4096) -> dict:
    """Per weight format of a committed GEMV reference run (``results.reference("gemv")``: each 7B-shape GEMV timed
    with its best config): ``roofline.fixed_plus_stream`` over the GEMVs of that K, and their names."""
    fits = {}
    for fmt in dict.fromkeys(r["weights"] for r in ref.records):
        rs = [r for r in ref.records if r["weights"] == fmt and r["K"] == K and r.get("M", 1) == 1]
        if len(rs) >= 3:
            fits[fmt] = (roofline.fixed_plus_stream([r["weight_bytes"] for r in rs], [r["ms"] / 1e3 for r in rs]),
                         [r["shape"] for r in rs])
    return fits


def time_decode(fast: FastLlama, batch: int, prompt_len: int, new_tokens: int, iters: int = 5) -> dict:
    """Per-token decode latency of the captured step (median of ``iters`` runs of new_tokens replays)."""
    from labkit import bench

    if batch not in fast._graphs:
        fast.capture(batch)
    m = bench.measure(lambda: fast.decode_n(batch, prompt_len, new_tokens), warmup=1, iters=iters, device=fast.device)
    per = m.median_s / new_tokens
    ctx = prompt_len + new_tokens / 2  # mean cached length during the run
    return {"decode_ms_per_token": per * 1e3, "tokens_per_s": batch / per, "spread": m.spread,
            "bytes_per_step": fast.bytes_per_step(int(ctx), batch),
            "weight_bytes": fast.weight_bytes_per_step(), "kv_bytes": fast.kv_bytes_per_step(int(ctx), batch),
            "peak_mem_bytes": m.peak_mem_bytes}


def time_prefill(fast: FastLlama, batch: int, prompt_len: int, iters: int = 5) -> dict:
    """Prefill time and FLOP rate (2 * params * tokens for the linear layers + causal attention)."""
    from labkit import bench

    c = fast.cfg
    ids = torch.randint(0, c.vocab, (batch, prompt_len), device=fast.device)
    m = bench.measure(lambda: fast.prefill(ids), warmup=2, iters=iters, device=fast.device)
    lin_params = sum(w.shape[0] * w.shape[1] for lw in fast.layers for w in (lw.wqkv, lw.wo, lw.w13, lw.w2))
    flops = 2 * batch * prompt_len * lin_params + 2 * batch * c.vocab * c.hidden  # head on the last token only
    flops += c.n_layers * batch * 2 * 2 * c.n_heads * c.head_dim * prompt_len * prompt_len * 0.5  # causal QK^T, PV
    return {"prefill_ms": m.median_ms, "flops": flops, "tflops": bench.tflops(flops, m),
            "tokens_per_s": batch * prompt_len / m.median_s}


measure_read_bandwidth = env.measure_read_bandwidth  # the decode ceiling lives with the others in labkit.env


def run_decode_benchmark(model_name: str = "llama2-7b-shape", formats=WEIGHT_FORMATS, batches=(1,),
                         prompt_len: int = 32, new_tokens: int = 128, hf_generate: bool = True,
                         prefill_len: int = 512, out_dir=None, check_tokens: int = 16, log=print,
                         torchao: bool = False) -> dict:
    """The 06 benchmark: HF generate vs our loop (torch eager, bf16/int8/int4 + Triton + graph), % of floor.

    ``torchao=True``: for int8 and int4 also time torchao's weight-only kernels in the same run, each GEMV and the whole
    step (``TorchaoLlama``: our step with torchao's GEMVs); the summary gains ``ratio_vs_torchao`` per format
    (torchao's ms per token / ours: > 1 means ours is faster) and ``torchao_gemv_ratios``.

    Returns ``{"records": [...], "summary": {...}, "ceilings": {...}}`` and writes decode.json + a plot when
    ``out_dir`` is given.
    """
    from labkit import bench, models

    dev = env.device()
    env.require_cuda("the decode benchmark (CUDA graphs)")
    copy_bw = env.measure_copy_bandwidth(dev)
    read_bw = measure_read_bandwidth(dev)
    matmul_rate = env.measure_matmul_rate(dev, torch.bfloat16)
    ceilings = {"copy_bandwidth_Bps": copy_bw, "read_bandwidth_Bps": read_bw, "bf16_matmul_flops": matmul_rate,
                "floor_uses": "read_bandwidth (a decode step reads weights; a sum() is the read-only ceiling)"}
    log(f"bandwidth: copy {copy_bw / 1e12:.2f} TB/s, read {read_bw / 1e12:.2f} TB/s; bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s")
    model, _ = models.load(model_name, device=dev)
    info = model.labkit_info
    records = []
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=dev, generator=torch.Generator(dev).manual_seed(0))
    max_seq = max(prompt_len + new_tokens + 8, prefill_len + 8)
    hf_tps = None
    if hf_generate:
        r = bench.time_generate(model, ids, new_tokens=min(new_tokens, 64), warmup=1, iters=3)
        fl = FastLlama(model, weights="bf16", kernels="torch", max_seq_len=max_seq)
        nbytes = fl.bytes_per_step(prompt_len + 32)
        del fl
        floor_ms = roofline.decode_floor_ms(nbytes, 0, read_bw)
        hf_tps = r["tokens_per_s"]
        records.append({"model": info.label, "variant": "HF generate (bf16, sdpa)", "weights": "bf16", "batch": 1,
                        "decode_ms_per_token": r["decode_ms_per_token"], "tokens_per_s": r["tokens_per_s"],
                        "floor_ms": floor_ms, "fraction_of_floor": floor_ms / r["decode_ms_per_token"],
                        "bytes_per_step": nbytes, "ttft_ms": r["ttft_ms"]})
        log(f"HF generate bf16: {r['decode_ms_per_token']:.2f} ms/token ({floor_ms / r['decode_ms_per_token']:.0%} of floor)")
    checks = {}
    fractions = {}
    bf16_tps = None
    ratio_ao, gemv_ao = {}, {}
    if torchao:
        env.require_package("torchao", "the torchao comparison (--torchao)")
    for fmt in formats:
        fast = FastLlama(model, weights=fmt, kernels="triton", max_seq_len=max_seq, max_batch=max(batches))
        if fmt == "bf16":
            cmp = compare_with_hf(model, fast, ids, check_tokens)
            checks["bf16_vs_hf_generate"] = cmp
            log(f"bf16 tokens vs HF: prefix {cmp['min_match_prefix']}/{check_tokens}, rel logit diff "
                f"{cmp['rel_logit_diff']:.4f} (HF vs itself: {cmp['hf_self_rel_logit_diff']:.4f})")
            pf = time_prefill(fast, 1, prefill_len)
            records.append({"model": info.label, "variant": f"prefill {prefill_len} tokens (bf16, cuBLAS)",
                            "weights": "bf16", "batch": 1, **pf, "matmul_ceiling_tflops": matmul_rate / 1e12,
                            "fraction_of_matmul_ceiling": pf["tflops"] * 1e12 / matmul_rate})
            log(f"prefill {prefill_len}: {pf['prefill_ms']:.1f} ms, {pf['tflops']:.0f} TFLOP/s")
            # the same loop without graphs or fused kernels: what the graph buys
            eager = FastLlama(model, weights="bf16", kernels="torch", max_seq_len=max_seq)
            eager.prefill(ids)
            tok = ids[:, -1]
            m = bench.measure(lambda: [eager.decode_step(tok, prompt_len + i) for i in range(16)], warmup=1, iters=3,
                              device=dev)
            per = m.median_s / 16
            nb = eager.bytes_per_step(prompt_len + 8)
            records.append({"model": info.label, "variant": "our loop, torch ops, no graph (bf16)", "weights": "bf16",
                            "batch": 1, "decode_ms_per_token": per * 1e3, "tokens_per_s": 1 / per,
                            "floor_ms": roofline.decode_floor_ms(nb, 0, read_bw), "fraction_of_floor": nb / read_bw / per, "bytes_per_step": nb})
            del eager
        else:
            ref = FastLlama(model, weights=fmt, kernels="torch", max_seq_len=max_seq)
            a = ref.generate(ids, check_tokens, use_graph=False)
            b = fast.generate(ids, check_tokens)
            n = int((a == b).long().cumprod(dim=1).sum(dim=1).min())
            checks[f"{fmt}_triton_vs_torch_dequant"] = {"match_prefix": n, "n": check_tokens}
            log(f"{fmt} triton+graph vs torch dequantize-then-matmul: prefix {n}/{check_tokens}")
            del ref
        for batch in batches:
            r = time_decode(fast, batch, prompt_len, new_tokens)
            floor_ms = roofline.decode_floor_ms(r["bytes_per_step"], 0, read_bw)
            frac = floor_ms / r["decode_ms_per_token"]
            rec = {"model": info.label, "variant": f"our loop, Triton GEMV + CUDA graph ({fmt})", "weights": fmt,
                   "batch": batch, "pdl": fast.pdl, **r, "floor_ms": floor_ms, "fraction_of_floor": frac,
                   "achieved_read_Bps": r["bytes_per_step"] / (r["decode_ms_per_token"] / 1e3)}
            tuning = fast.gemv_tuning(batch)
            if tuning:
                rec["gemv_tuning"] = tuning
                for name, t in tuning.items():
                    log(f"  {fmt} batch {batch} {name}: {t['chosen_kernel']}; best us by kernel "
                        + ", ".join(f"{k} {v:.1f}" for k, v in t["best_us_by_kernel"].items()))
            records.append(rec)
            if batch == 1:
                fractions[fmt] = frac
                if fmt == "bf16":
                    bf16_tps = r["tokens_per_s"]
            log(f"{fmt} batch {batch}: {r['decode_ms_per_token']:.3f} ms/token, {r['tokens_per_s']:.0f} tok/s, "
                f"{frac:.0%} of floor ({floor_ms:.3f} ms)")
        if torchao and fmt in TORCHAO_FORMATS:
            try:
                grecs = compare_torchao_gemvs(fast, model, fmt, log=log)
                records += [{"model": info.label, "variant": f"GEMV {g['gemv']} ours vs torchao ({fmt})", **g}
                            for g in grecs]
                gemv_ao[fmt] = {g["gemv"]: g["ratio_vs_torchao"] for g in grecs}
                ours = next(r for r in records if r.get("weights") == fmt
                            and r.get("batch") == 1 and r["variant"].startswith("our loop, Triton"))
                ours_ms, floor1_ms = ours["decode_ms_per_token"], ours["floor_ms"]
                tao = TorchaoLlama(model, fmt, max_seq_len=max_seq)
                r = time_decode(tao, 1, prompt_len, new_tokens)
                records.append({"model": info.label, "variant": f"our step, torchao GEMVs + CUDA graph ({fmt})",
                                "weights": fmt, "batch": 1, "decode_ms_per_token": r["decode_ms_per_token"],
                                "tokens_per_s": r["tokens_per_s"], "torchao_config": tao.ao_config,
                                "floor_ms": floor1_ms, "fraction_of_floor": floor1_ms / r["decode_ms_per_token"]})
                ratio_ao[fmt] = r["decode_ms_per_token"] / ours_ms
                log(f"{fmt} step with torchao GEMVs: {r['decode_ms_per_token']:.3f} ms/token; ours "
                    f"{ours_ms:.3f} -> ratio vs torchao {ratio_ao[fmt]:.2f}x")
                del tao
            except Exception as exc:  # record why the peer did not run, keep our own figures
                ratio_ao[fmt] = None
                records.append({"model": info.label, "variant": f"torchao ({fmt})", "weights": fmt,
                                "status": f"torchao failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                log(f"torchao {fmt}: {type(exc).__name__}: {exc}")
            torch.cuda.empty_cache()
        if fast.pdl:  # what programmatic dependent launch buys: the same step with serialized launches
            del fast
            fast = FastLlama(model, weights=fmt, kernels="triton", max_seq_len=max_seq, pdl=False)
            r = time_decode(fast, 1, prompt_len, new_tokens)
            floor_ms = roofline.decode_floor_ms(r["bytes_per_step"], 0, read_bw)
            records.append({"model": info.label, "variant": f"our loop, no PDL ({fmt})", "weights": fmt, "batch": 1,
                            "pdl": False, **r, "floor_ms": floor_ms, "fraction_of_floor": floor_ms / r["decode_ms_per_token"]})
            log(f"{fmt} batch 1 without PDL: {r['decode_ms_per_token']:.3f} ms/token, "
                f"{floor_ms / r['decode_ms_per_token']:.0%} of floor")
        del fast
        torch.cuda.empty_cache()
    summary = {"fraction_of_floor": fractions,
               "speedup_vs_hf_generate_bf16": (bf16_tps / hf_tps) if (bf16_tps and hf_tps) else None,
               "model": info.label, "prompt_len": prompt_len, "new_tokens": new_tokens, "checks": checks,
               "ceilings": ceilings,
               "tune_failures": [{**f, "config": str(f["config"])} for f in wo.TUNE_FAILURES]}
    if torchao:
        summary["ratio_vs_torchao"] = ratio_ao
        summary["torchao_gemv_ratios"] = gemv_ao
        summary["ratio_vs_torchao_means"] = "torchao ms per token / ours, same run (> 1: ours is faster)"
    doc = {"records": records, "summary": summary}
    if out_dir is not None:
        from pathlib import Path

        out = Path(out_dir)
        bench.write_results(out / "decode.json", records, summary)
        plot_decode(records, out / "decode.png")
    return doc


DECODE_TARGETS = {"bf16": 0.80, "int8": 0.60, "int4": 0.50}  # fraction of the floor, batch 1
SPEEDUP_TARGET = 5.0  # bf16 loop over HF generate (bf16, sdpa), batch 1


def check_targets(summary: dict) -> list[dict]:
    """The workbook's decode targets against a benchmark summary (``run_decode_benchmark(...)["summary"]``).

    Returns one row per target: ``{"target", "goal", "measured", "met"}``; a format the run did not measure
    is a row with ``measured`` None and ``met`` False.
    """
    rows = []
    frac = summary.get("fraction_of_floor", {})
    for fmt, goal in DECODE_TARGETS.items():
        v = frac.get(fmt)
        rows.append({"target": f"{fmt} fraction of the floor", "goal": goal, "measured": v,
                     "met": v is not None and v >= goal})
    sp = summary.get("speedup_vs_hf_generate_bf16")
    rows.append({"target": "bf16 speed-up over HF generate", "goal": SPEEDUP_TARGET, "measured": sp,
                 "met": sp is not None and sp >= SPEEDUP_TARGET})
    return rows


def plot_decode(records: list[dict], path) -> None:
    """Bar chart: ms/token of each batch-1 variant against its floor."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    rows = [r for r in records if r.get("batch") == 1 and "decode_ms_per_token" in r and r.get("floor_ms")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 2))
    names = [r["variant"] for r in rows]
    ax.barh(names, [r["decode_ms_per_token"] for r in rows], color="tab:blue", label="measured")
    ax.scatter([r["floor_ms"] for r in rows], names, color="tab:red", zorder=3, label="floor (bytes / read bandwidth)")
    for i, r in enumerate(rows):
        ax.text(r["decode_ms_per_token"], i, f" {r['fraction_of_floor']:.0%}", va="center")
    ax.set_xscale("log")
    ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200) if
             min(r["floor_ms"] for r in rows) / 2 <= t <= 2 * max(r["decode_ms_per_token"] for r in rows)]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("ms per token (batch 1, log scale)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8, frameon=False)
    ax.set_title(rows[0]["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI
def cli_main(argv: list[str]) -> int:
    """``labkit bench decode``: the 06 table from the command line (needs a CUDA GPU)."""
    from labkit.cli import choice_list, int_list, positive_int

    p = argparse.ArgumentParser(prog="labkit bench decode", description="Decode speed vs the memory-bandwidth floor")
    p.add_argument("--model", default="llama2-7b-shape", help="a labkit model name (default: the 7B shape, random weights)")
    p.add_argument("--weights", type=choice_list(WEIGHT_FORMATS), default=list(WEIGHT_FORMATS),
                   help="comma list of bf16,int8,int4")
    p.add_argument("--batch", type=int_list, default=[1], help="comma list of batch sizes")
    p.add_argument("--prompt-len", type=positive_int, default=32)
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    p.add_argument("--torchao", action="store_true",
                   help="also time torchao's weight-only int8/int4 (tinygemm) GEMVs and a step with them (needs torchao)")
    p.add_argument("--out", default=None, help="directory for decode.json and decode.png "
                   "(default results/local/<device>/, not tracked by git)")
    p.add_argument("--reference", action="store_true",
                   help="write to results/<device>/ (a committed reference run) instead of results/local/<device>/")
    args = p.parse_args(argv)
    from labkit import bench

    formats = args.weights
    if args.out is not None:
        env.writable_dir(args.out)
    doc = run_decode_benchmark(args.model, formats, tuple(args.batch), args.prompt_len,
                               args.new_tokens, hf_generate=not args.no_hf,
                               out_dir=args.out or results.output_dir(args.reference), torchao=args.torchao)
    print(json.dumps(doc["summary"]["fraction_of_floor"]), "speedup vs HF generate:",
          doc["summary"]["speedup_vs_hf_generate_bf16"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    raise SystemExit(cli_main(sys.argv[1:]))
