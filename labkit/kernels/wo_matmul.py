"""Weight-only quantized matmul for batch-1 decode: int8 per-channel and int4 group-wise GEMV in Triton.

At batch 1 a decoder step is a chain of matrix-vector products (GEMV): every weight is read once and used
for two FLOPs, so the step time is ``bytes of weights / memory bandwidth``. Storing weights in 8 or 4 bits
and dequantizing them *in registers*, right after the load, cuts the bytes read by 2x or ~4x; the activations
stay in bf16/fp16 and every product is accumulated in fp32.

What you will find here (pure tensor-in/tensor-out functions first, then the kernel and its wrapper):

- ``quantize_int8`` / ``dequantize_int8``: symmetric per-output-channel int8, ``W[n, :] ~ q[n, :] * s[n]``.
- ``pack_int4`` / ``unpack_int4``, ``quantize_int4`` / ``dequantize_int4``: asymmetric group-wise int4 along
  the input dimension (group 128), ``W[n, k] ~ (q[n, k] - z[n, g]) * s[n, g]`` with ``g = k // group``;
  two 4-bit codes per byte, the even ``k`` in the low nibble.
- ``matmul_reference(x, w)``: dequantize-then-matmul in the activations' dtype, the reference every kernel
  is checked against.
- ``wo_matmul(x, w)``: the Triton GEMV, for ``x: (M, K)`` with small M (1..16), weight in bf16/fp16
  (a plain tensor), ``Int8Weight`` or ``Int4Weight``. Many output rows per program, wide loads along K, the
  M rows of ``x`` reuse each weight tile from registers. ``silu_gate_up=True`` takes ``x: (M, 2K)`` holding
  ``[gate | up]`` and multiplies by ``silu(gate) * up`` on the fly (the Llama MLP's input to ``down_proj``).
- ``tune(...)``: pick the fastest launch configuration per shape on this GPU (cached).

The int4 kernel factors the zero point out of the group sum, as in the GPTQ/AWQ GEMV kernels:
``sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k)`` for the ``k`` of one group.

Layout: weights are ``(N, K)`` = (out_features, in_features), row-major, like ``nn.Linear.weight``.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

import labkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 when there is no GPU, before triton is imported)
from labkit import bench
from labkit.kernels import flash_attn
from labkit.env import LabkitError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    triton = None
    tl = None

MAX_M = 16  # beyond this many rows the product is a GEMM: dequantize once and use cuBLAS (see linear())


# ---------------------------------------------------------------------------------------------- formats
@dataclass
class Int8Weight:
    """Per-output-channel symmetric int8: ``W ~ q * scale[:, None]``. q: (N, K) int8, scale: (N,) float."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self):
        return tuple(self.q.shape)

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def to(self, device):
        return Int8Weight(self.q.to(device), self.scale.to(device))


@dataclass
class Int4Weight:
    """Group-wise asymmetric int4, two codes per byte: ``W[n, k] ~ (q[n, k] - zero[n, g]) * scale[n, g]``.

    packed: (N, Kp // 2) uint8 (even k in the low nibble); scale, zero: (N, Kp // group) float (zero holds the
    integer zero point 0..15 as a float). ``in_features``: K when it is not a multiple of the group (SmolLM2's 576 =
    4 x 128 + 64): the rows are stored padded to Kp, the next multiple, the padding holding the zero point (weight
    exactly 0); the kernels read activations only at k < K. None: K = Kp.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group: int = 128
    in_features: int | None = None

    @property
    def shape(self):
        return (self.packed.shape[0], self.in_features or self.packed.shape[1] * 2)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    def to(self, device):
        return Int4Weight(self.packed.to(device), self.scale.to(device), self.zero.to(device), self.group,
                          self.in_features)


@dataclass
class WordWeight:
    """int8 or int4 codes re-laid out in 32-bit words for the batch-1 kernel (``interleave``), same values.

    Codes are stored in chunks of 16 words. int4 (one chunk = one group of 128 columns): nibble i of word j
    holds column ``128 g + 16 i + j``; int8 (one chunk = 64 columns): byte b of word j holds ``64 c + 16 b + j``.
    So the columns that share a bit position in neighbouring words are *consecutive*, and the kernel loads
    the matching activations as one contiguous vector instead of a strided gather. words: (N, K // 8) int32
    for int4, (N, K // 4) for int8; scale/zero as in Int4Weight / Int8Weight (zero is None for int8).
    """

    words: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group: int = 128
    in_features: int | None = None  # int4: K when the rows are stored padded (as Int4Weight.in_features)

    @property
    def shape(self):
        return (self.words.shape[0], self.in_features or self.words.shape[1] * (32 // self.bits))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.scale, self.zero) if t is not None)

    def to(self, device):
        return WordWeight(self.words.to(device), self.scale.to(device),
                          None if self.zero is None else self.zero.to(device), self.bits, self.group,
                          self.in_features)


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def interleave(w) -> WordWeight:
    """Int8Weight / Int4Weight -> WordWeight (the layout of the word kernel); ``deinterleave`` inverts it."""
    if isinstance(w, Int4Weight):
        q = unpack_int4(w.packed).long()  # (N, K)
        N, K = q.shape
        if w.group != 128:
            raise ValueError(f"the word layout takes int4 groups of 128 columns, got {w.group}")
        q = q.view(N, K // 128, 8, 16)  # (N, group, nibble i, word j)
        words = sum(q[:, :, i] << (4 * i) for i in range(8))  # (N, G, 16)
        return WordWeight(_to_int32(words).reshape(N, K // 8), w.scale, w.zero, 4, 128, w.in_features)
    if isinstance(w, Int8Weight):
        N, K = w.q.shape
        if K % 64:
            raise ValueError(f"the word layout takes int8 rows in chunks of 64 columns, got K={K}")
        u = w.q.view(torch.uint8).long().view(N, K // 64, 4, 16)  # (N, chunk, byte b, word j)
        words = sum(u[:, :, b] << (8 * b) for b in range(4))
        return WordWeight(_to_int32(words).reshape(N, K // 4), w.scale, None, 8)
    raise TypeError(f"interleave takes an Int8Weight or Int4Weight, got {type(w).__name__}")


def deinterleave(w: WordWeight):
    """WordWeight -> the Int8Weight / Int4Weight it was made from."""
    N = w.words.shape[0]
    v = w.words.long() & 0xFFFFFFFF  # (N, K // (32 / bits))
    if w.bits == 4:
        v = v.view(N, -1, 16)
        q = torch.stack([(v >> (4 * i)) & 0xF for i in range(8)], dim=2)  # (N, G, 8, 16)
        return Int4Weight(pack_int4(q.reshape(N, -1)), w.scale, w.zero, w.group, w.in_features)
    v = v.view(N, -1, 16)
    u = torch.stack([(v >> (8 * b)) & 0xFF for b in range(4)], dim=2)  # (N, C, 4, 16)
    return Int8Weight(u.reshape(N, -1).to(torch.uint8).view(torch.int8), w.scale)


def weight_nbytes(w) -> int:
    """Bytes a GEMV reads for weight ``w`` as stored (codes + scales + zeros)."""
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes()


def weight_buffer(w) -> torch.Tensor:
    """The largest buffer of a weight as stored (what a GEMV streams: the values, codes or words)."""
    if isinstance(w, Int8Weight):
        return w.q
    if isinstance(w, Int4Weight):
        return w.packed
    return w.words if isinstance(w, WordWeight) else w


def l2_prefetch_supported(device) -> bool:
    """The L2 prefetch (``_l2_prefetch``) needs compute capability 9.0+ and a compiled kernel (not the interpreter)."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
            and not flash_attn.interpreted())


def prefetch_args(w, max_bytes: int) -> tuple:
    """(buffer, bytes) for a kernel's L2 prefetch of weight ``w``: up to ``max_bytes`` of its main buffer from the
    start, whole 16-byte units (what the bulk request takes); (None, 0) for no prefetch."""
    if w is None or max_bytes <= 0:
        return None, 0
    buf = weight_buffer(w)
    if not buf.is_contiguous() or buf.data_ptr() % 16:
        raise LabkitError("an L2 prefetch reads a contiguous buffer aligned to 16 bytes; this weight's is not "
                          "(call .contiguous() on it, or pass 0 bytes to prefetch nothing)")
    n = min(int(max_bytes), buf.numel() * buf.element_size()) // 16 * 16
    return (buf, n) if n > 0 else (None, 0)


def _check_2d(w: torch.Tensor):
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got {getattr(w, 'shape', type(w))}")


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """w: (N, K) float -> Int8Weight; scale = absmax(row) / 127 (in w's dtype), codes in [-127, 127]."""
    _check_2d(w)
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (N,)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return Int8Weight(q, scale.to(w.dtype))


def dequantize_int8(w: Int8Weight, dtype=None) -> torch.Tensor:
    """Int8Weight -> (N, K) in ``dtype`` (default: the scale's dtype); computed in fp32, rounded once."""
    return (w.q.float() * w.scale.float()[:, None]).to(dtype or w.scale.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: (N, K) integer codes in [0, 15] -> (N, K // 2) uint8, code of even k in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got K={q.shape[-1]}")
    if q.min() < 0 or q.max() > 15:
        raise ValueError("int4 codes must lie in [0, 15]")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 codes in [0, 15] (inverse of pack_int4)."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)  # (N, K//2, 2) -> (N, K)


def quantize_int4(w: torch.Tensor, group: int = 128) -> Int4Weight:
    """w: (N, K) float -> Int4Weight, asymmetric min/max per group of ``group`` input columns.

    A K that is not a multiple of ``group`` leaves a shorter last group: the row is padded with zeros to the next
    multiple (zeros change no min/max range, which always contains 0) and ``in_features`` records K.
    """
    _check_2d(w)
    N, K = w.shape
    Kp = -(-K // group) * group
    if Kp % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got group={group}")
    wg = torch.nn.functional.pad(w.float(), (0, Kp - K)).reshape(N, Kp // group, group)  # (N, G, group)
    lo = wg.amin(dim=2).clamp(max=0.0)
    hi = wg.amax(dim=2).clamp(min=0.0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)  # (N, G)
    zero = torch.round(-lo / scale).clamp(0, 15)  # (N, G), an integer zero point
    q = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, 15)  # (N, G, group)
    return Int4Weight(pack_int4(q.reshape(N, Kp)), scale.to(w.dtype), zero.to(w.dtype), group,
                      K if Kp != K else None)


def int4_from_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> Int4Weight:
    """Integer codes ``q (N, K)`` in [0, 15] with per-group ``scale, zero (N, ceil(K / group))`` (the layout of
    ``labkit.gptq`` and ``quant.QuantLinear``: groups ``[0, g), [g, 2g), ...``, the last one possibly shorter)
    -> the Int4Weight that dequantizes to exactly ``(q - zero) * scale`` in fp32.

    The codes are stored as given (no re-quantization) and scale/zero keep their dtype; a ragged last group is
    padded with its zero point, so the padding is exactly 0 and ``in_features`` keeps K.
    """
    _check_2d(q)
    N, K = q.shape
    G = -(-K // group)
    if scale.shape != (N, G) or zero.shape != (N, G):
        raise ValueError(f"scale and zero must be (N, ceil(K / group)) = {(N, G)}, got {tuple(scale.shape)}, "
                         f"{tuple(zero.shape)}")
    if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() > 15:
        raise ValueError("int4 zero points must be integers in [0, 15]")
    Kp = G * group
    if Kp % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got group={group}")
    codes = q.to(torch.int64)
    if Kp != K:
        pad = zero[:, -1:].to(torch.int64).expand(N, Kp - K)  # the last group's zero point: value (z - z) s = 0
        codes = torch.cat([codes, pad], dim=1)
    return Int4Weight(pack_int4(codes), scale, zero, group, K if Kp != K else None)


def dequantize_int4(w: Int4Weight, dtype=None) -> torch.Tensor:
    """Int4Weight -> (N, K) in ``dtype`` (default: the scale's dtype); computed in fp32, rounded once."""
    q = unpack_int4(w.packed).float()  # (N, Kp)
    N, Kp = q.shape
    qg = q.reshape(N, Kp // w.group, w.group)
    deq = (qg - w.zero.float()[..., None]) * w.scale.float()[..., None]
    return deq.reshape(N, Kp)[:, :w.shape[1]].to(dtype or w.scale.dtype)


def dequantize(w, dtype=None) -> torch.Tensor:
    """Any supported weight -> dense (N, K)."""
    if isinstance(w, torch.Tensor):
        return w if dtype is None else w.to(dtype)
    if isinstance(w, Int8Weight):
        return dequantize_int8(w, dtype)
    if isinstance(w, Int4Weight):
        return dequantize_int4(w, dtype)
    if isinstance(w, WordWeight):
        return dequantize(deinterleave(w), dtype)
    raise TypeError(f"unsupported weight type {type(w).__name__}; use a tensor, Int8Weight or Int4Weight")


def matmul_reference(x: torch.Tensor, w, silu_gate_up: bool = False) -> torch.Tensor:
    """Dequantize-then-matmul in x's dtype. x: (M, K) (or (M, 2K) = [gate | up] with silu_gate_up) -> (M, N)."""
    if silu_gate_up:
        gate, up = x.chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate) * up
    return x @ dequantize(w, x.dtype).t()


def matmul_h2_reference(x: torch.Tensor, w, silu_gate_up: bool = False) -> torch.Tensor:
    """What the packed-fp16 GEMV (variant "h2") computes, written out slowly: x (M, K) (or (M, 2K) = [gate | up]
    with silu_gate_up: silu(gate) * up in x's dtype, as the kernels round it), w an Int4Weight with groups of 128,
    an Int8Weight, or either as a WordWeight -> (M, N) float64.

    Activations become fp16, each 128-column chunk first scaled by the power of two 2^k that puts its largest
    magnitude in [512, 1024) for int4, [32, 64) for int8 (int4: x 2^k where a code meets them, x 2^k / 16 where
    16 x code does). For each word position j < 16 of a chunk starting at column c, each of two halves sums four
    products one by one, rounded to fp16 after each step as mul/fma.rn.f16x2 round (the products are exact in
    float64, so that is one rounding per step; numpy rounds float64 to fp16 directly, torch through fp32): int4,
    columns c + j + 16 i for i = 0..3 and then 64 further; int8, columns c + j + (0, 16, 64, 80) and
    c + j + (32, 48, 96, 112). The rest is exact: int4, the group's scale times 2^-k times the two halves, minus
    scale x zero point x the chunk's activation sum; int8, the row's scale times the sum over chunks of 2^-k times
    the halves. Columns past a ragged K meet zero activations (int4: their codes are the zero point; int8: zero),
    as in the kernel."""
    import numpy as np

    if isinstance(w, WordWeight):
        w = deinterleave(w)
    if not (isinstance(w, Int8Weight) or (isinstance(w, Int4Weight) and w.group == 128)):
        raise TypeError(f"the h2 reference takes int4 weights with groups of 128 or int8 weights, got "
                        f"{type(w).__name__}" + (f" with groups of {w.group}" if isinstance(w, Int4Weight) else ""))
    if x.dim() != 2:
        raise ValueError(f"the h2 reference takes x of shape (M, K), got {tuple(x.shape)}: flatten the leading dims")
    if silu_gate_up:
        gate, up = x.chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate) * up
    int8 = isinstance(w, Int8Weight)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight {w.shape[1]}")
    if int8:
        N, K = w.q.shape
        Kp = -(-K // 128) * 128
        q = np.zeros((N, Kp))
        q[:, :K] = w.q.double().cpu().numpy()
        halves = ((0, 16, 64, 80), (32, 48, 96, 112))  # column offsets of the four products of each half
        code_mul, top = (1, 1, 1, 1), 5  # largest |x| to [2^5, 2^6)
    else:
        q = unpack_int4(w.packed).double().cpu().numpy()  # (N, Kp)
        N, Kp = q.shape
        halves = ((0, 16, 32, 48), (64, 80, 96, 112))
        code_mul, top = (1, 16, 1, 16), 9  # 16 q meets x 2^k / 16; largest |x| to [2^9, 2^10)
        scale, sz = w.scale.double().cpu().numpy(), (w.scale.double() * w.zero.double()).cpu().numpy()  # (N, G)
    xs = np.zeros((x.shape[0], Kp))
    xs[:, :x.shape[-1]] = x.double().cpu().numpy()
    chunk = np.arange(Kp // 128)[:, None] * 128 + np.arange(16)[None, :]  # (chunks, 16): word position j of each
    out = np.empty((x.shape[0], N))
    for m, row in enumerate(xs):
        # each chunk's power of two 2^k (exponent from frexp: m = f 2^e, f in [0.5, 1))
        big = np.abs(row).reshape(Kp // 128, 128).max(axis=1)
        k = top - np.maximum(np.where(big > 0, np.frexp(big)[1] - 1, -127), -20)
        up = np.repeat(np.ldexp(1.0, k), 128)  # (Kp,)
        xh = {c: (row * up / c).astype(np.float16).astype(np.float64) for c in set(code_mul)}
        d = np.zeros((N, Kp // 128, 16))
        for offsets in halves:
            acc = None
            for off, c in zip(offsets, code_mul):
                cols = chunk + off
                t = (c * q[:, cols]) * xh[c][cols]
                acc = (t if acc is None else t + acc).astype(np.float16).astype(np.float64)
            d += acc
        if int8:
            out[m] = (np.ldexp(1.0, -k)[None, :, None] * d).sum(axis=(1, 2)) * w.scale.double().cpu().numpy()
        else:
            xsum = row.reshape(Kp // 128, 128).sum(axis=1)
            out[m] = ((scale * np.ldexp(1.0, -k))[:, :, None] * d).sum(axis=(1, 2)) - sz @ xsum
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------- kernel
if triton is not None:

    @triton.jit
    def _pdl_enter(PDL: tl.constexpr):
        """Programmatic dependent launch (Hopper and later; the launch passes launch_pdl=True): let the next
        kernel in the stream start launching now, then wait until the previous one has finished and its writes
        are visible. Everything before this call may only read memory no earlier kernel writes."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _l2_prefetch(base_ptr, nbytes, part, nparts, NT: tl.constexpr, MODE: tl.constexpr):
        """Ask the L2 cache to fetch this program's share (``part`` of ``nparts``) of the first ``nbytes`` bytes at
        ``base_ptr``. A hint: nothing is returned and no result depends on it. NT: the program's threads (each
        issues its own requests; a tensor of more elements than threads would repeat them). MODE 1: one bulk request
        per thread (Hopper's ``cp.async.bulk.prefetch.L2``, served by the SM's tensor memory accelerator, TMA);
        MODE 2: one ``prefetch.global.L2`` per 128-byte line, the threads stepping through the share together.
        ``base_ptr`` must be 16-byte aligned and ``nbytes`` a multiple of 16 (``prefetch_args`` sees to both).

        For the small kernels between a decode step's GEMVs: while they run, HBM would idle; with this, the next
        GEMV's weights are on their way into L2 meanwhile (weights are written by no kernel of the step, so the
        requests may go out before the PDL wait)."""
        share = tl.cdiv(tl.cdiv(nbytes, nparts), 128 * NT) * (128 * NT)  # bytes per program, whole lines per thread
        lo = part.to(tl.int64) * share
        hi = tl.minimum(lo + share, nbytes)
        base = base_ptr.to(tl.pointer_type(tl.int8))
        if MODE == 1:
            chunk = share // NT  # a multiple of 128
            offs = lo + tl.arange(0, NT).to(tl.int64) * chunk
            size = tl.minimum(tl.maximum(hi - offs, 0), chunk).to(tl.int32)  # 0 past the end: no request
            tl.inline_asm_elementwise(
                """{
                .reg .pred p;
                setp.gt.s32 p, $2, 0;
                @p cp.async.bulk.prefetch.L2.global [$1], $2;
                mov.u32 $0, 0;
                }""",
                "=r,l,r", [base + offs, size], dtype=tl.int32, is_pure=False, pack=1)
        else:
            for i in range(0, share // (128 * NT)):
                offs = lo + (i * NT + tl.arange(0, NT)).to(tl.int64) * 128
                _prefetch_line(base + offs, offs < hi)

    @triton.jit
    def _prefetch_line(ptrs, live):
        """``prefetch.global.L2`` of the 128-byte line at each pointer where ``live`` is True (a hint)."""
        tl.inline_asm_elementwise(
            """{
            .reg .pred p;
            setp.ne.s32 p, $2, 0;
            @p prefetch.global.L2 [$1];
            mov.u32 $0, 0;
            }""",
            "=r,l,r", [ptrs, live.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _prefetch_rows(w_ptr, offs_n, mask_n, stride_wn, w_lo, w_hi, LINES: tl.constexpr):
        """``prefetch.global.L2`` for words [w_lo, w_hi) of the rows offs_n of a 32-bit word weight: one request per
        128-byte line (32 words), LINES lines of every row per loop step. A hint; no result depends on it."""
        offs = tl.arange(0, LINES) * 32
        for base in range(w_lo, w_hi, LINES * 32):
            wofs = base + offs
            _prefetch_line(w_ptr + offs_n[:, None] * stride_wn + wofs[None, :],
                           mask_n[:, None] & (wofs < w_hi)[None, :])

    @triton.jit
    def _program_tile(N, K, K_CHUNK, BLOCK_N: tl.constexpr):
        """This program's split (axis 1), its K range [k_lo, k_hi), and its BLOCK_N output rows (axis 0)."""
        pid_k = tl.program_id(1)
        k_lo = pid_k * K_CHUNK
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        return pid_k, k_lo, tl.minimum(K, k_lo + K_CHUNK), offs_n, offs_n < N

    @triton.jit
    def _load_x(x_row, offs_k, mask_k, K, PRO_SILU: tl.constexpr):
        """A chunk of one activation row in fp32; with PRO_SILU the row is [gate | up] -> silu(gate) * up.
        ``mask_k=None``: every column is inside the row (no mask)."""
        if PRO_SILU:
            g = _load_masked(x_row + offs_k, mask_k).to(tl.float32)
            u = _load_masked(x_row + K + offs_k, mask_k).to(tl.float32)
            s = (g / (1.0 + tl.exp(-g))).to(x_row.dtype.element_ty).to(tl.float32)  # rounded like torch's silu
            return (s * u).to(x_row.dtype.element_ty).to(tl.float32)
        return _load_masked(x_row + offs_k, mask_k).to(tl.float32)

    @triton.jit
    def _load_masked(ptrs, mask):
        """tl.load with zeros where ``mask`` is False; ``mask=None`` loads every element."""
        if mask is None:
            v = tl.load(ptrs)
        else:
            v = tl.load(ptrs, mask=mask, other=0)
        return v

    @triton.jit
    def _row_tile(w_ptr, offs_n, mask_n, stride_wn, kk, mask_k):
        """Rows offs_n, columns kk of a float or int8 weight, as fp32 (BLOCK_N, BLOCK_K).

        int8 codes become floats without an int-to-float conversion: the Hopper SM converts 16 values per clock
        against 128 FMAs, so at one conversion per weight an int8 GEMV needs almost all of that rate just to keep
        up with HBM (4.2 T conversions/s on an H200 at 1.98 GHz for 4.1 T weights/s). Instead the sign-extended
        code is added to the bits of 1.5 * 2^23, where the float spacing is exactly 1: the float then holds
        1.5 * 2^23 + q, and one subtraction leaves q (integer and float arithmetic, at full rate)."""
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)
        if w.dtype == tl.int8:
            return (w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        return w.to(tl.float32)

    @triton.jit
    def _tile_rows(acc, w, x_ptr, kk, mask_k, M, K, stride_xm, PRO_SILU: tl.constexpr, BLOCK_M: tl.constexpr):
        """acc (BLOCK_M, BLOCK_N) += every row of x at columns kk times the (BLOCK_N, BLOCK_K) fp32 tile w."""
        offs_m = tl.arange(0, BLOCK_M)
        for m in tl.static_range(BLOCK_M):
            xk = _load_x(x_ptr + tl.minimum(m, M - 1) * stride_xm, kk, mask_k, K, PRO_SILU)  # (BLOCK_K,)
            part = tl.sum(w * xk[None, :], axis=1)  # (BLOCK_N,)
            acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)
        return acc

    @triton.jit
    def _wo_gemv_kernel(
        # tensors
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        # sizes
        M, N, K,
        # strides (elements); split-K: program axis 1 covers K_CHUNK columns, y holds fp32 partials at stride_ys
        stride_xm, stride_wn, stride_sn, stride_ym, stride_ys, K_CHUNK,
        # what the weight is: 0 = float (bf16/fp16), 1 = int8 per channel, 2 = int4 group-wise
        KIND: tl.constexpr, GROUP: tl.constexpr, PRO_SILU: tl.constexpr,
        # tiling
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
        STAGES: tl.constexpr = None,
    ):
        """y[m, n] = sum_k x[m, k] * W[n, k] for BLOCK_N rows n, all M <= BLOCK_M rows of x, fp32 accumulator.

        Each weight tile is loaded once and dequantized in registers, then used by every row of x.
        """
        pid_k, k_lo, k_hi, offs_n, mask_n = _program_tile(N, K, K_CHUNK, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if KIND == 2:
            _pdl_enter(PDL)
            # int4: a tile is (BLOCK_N, NG groups, GROUP // 2 bytes); byte j of a group holds k = 2j (low), 2j+1 (high)
            NG: tl.constexpr = BLOCK_K // GROUP
            HALF: tl.constexpr = GROUP // 2
            offs_g = tl.arange(0, NG)
            offs_j = tl.arange(0, HALF)
            for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
                g_idx = k0 // GROUP + offs_g  # (NG,)
                mask_g = g_idx < (K + GROUP - 1) // GROUP  # a ragged last group is read, its columns masked
                wptr = (w_ptr + offs_n[:, None, None] * stride_wn + g_idx[None, :, None] * HALF
                        + offs_j[None, None, :])
                wmask = mask_n[:, None, None] & mask_g[None, :, None]
                packed = tl.load(wptr, mask=wmask, other=0)  # (BLOCK_N, NG, HALF) uint8
                q_lo = (packed & 0xF).to(tl.float32)
                q_hi = (packed >> 4).to(tl.float32)
                sz_off = offs_n[:, None] * stride_sn + g_idx[None, :]
                sz_mask = mask_n[:, None] & mask_g[None, :]
                s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)  # (BLOCK_N, NG)
                z = tl.load(z_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
                k_even = g_idx[:, None] * GROUP + 2 * offs_j[None, :]  # (NG, HALF)
                mask_k = mask_g[:, None] & (k_even < K)
                for m in tl.static_range(BLOCK_M):
                    # rows past M re-read row M-1 (always valid); their results are never stored
                    x_row = x_ptr + tl.minimum(m, M - 1) * stride_xm
                    x_e = _load_x(x_row, k_even, mask_k, K, PRO_SILU)  # (NG, HALF)
                    x_o = _load_x(x_row, k_even + 1, mask_k, K, PRO_SILU)
                    dot = tl.sum(q_lo * x_e[None, :, :] + q_hi * x_o[None, :, :], axis=2)  # (BLOCK_N, NG)
                    xsum = tl.sum(x_e + x_o, axis=1)  # (NG,)
                    part = tl.sum(s * (dot - z * xsum[None, :]), axis=1)  # (BLOCK_N,)
                    acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)
        else:
            offs_k = tl.arange(0, BLOCK_K)
            k_first = k_lo
            if PDL:  # the first tile depends on no earlier kernel: load it before waiting for it
                kk = k_lo + offs_k
                w = _row_tile(w_ptr, offs_n, mask_n, stride_wn, kk, kk < K)
                _pdl_enter(PDL)
                acc = _tile_rows(acc, w, x_ptr, kk, kk < K, M, K, stride_xm, PRO_SILU, BLOCK_M)
                k_first = k_lo + BLOCK_K
            for k0 in tl.range(k_first, k_hi, BLOCK_K, num_stages=STAGES):
                kk = k0 + offs_k
                mask_k = kk < K
                w = _row_tile(w_ptr, offs_n, mask_n, stride_wn, kk, mask_k)  # (BLOCK_N, BLOCK_K)
                acc = _tile_rows(acc, w, x_ptr, kk, mask_k, M, K, stride_xm, PRO_SILU, BLOCK_M)
            if KIND == 1:
                scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                acc = acc * scale[None, :]
        y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & mask_n[None, :])


if triton is not None:

    @triton.jit
    def _wo_gemv1_kernel(
        # tensors
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        # sizes and strides (elements)
        N, K, stride_wn, stride_sn, stride_ys, K_CHUNK,
        # weight format, as in _wo_gemv_kernel
        KIND: tl.constexpr, GROUP: tl.constexpr, PRO_SILU: tl.constexpr,
        # tiling
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False, STAGES: tl.constexpr = None,
    ):
        """M = 1: products accumulate element-wise in a (BLOCK_N, BLOCK_K) fp32 tile, reduced once at the end.

        No cross-thread reduction inside the K loop, so the loop is loads and FMAs only; for int4 each
        iteration covers BLOCK_K // GROUP groups, one scale and zero per row and group.
        """
        pid_k, k_lo, k_hi, offs_n, mask_n = _program_tile(N, K, K_CHUNK, BLOCK_N)
        if KIND == 2:
            _pdl_enter(PDL)
            HALF: tl.constexpr = GROUP // 2
            offs_j = tl.arange(0, HALF)
            acc = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
            for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
                for g in tl.static_range(BLOCK_K // GROUP):
                    kg = k0 + g * GROUP  # first k of this group
                    k_even = kg + 2 * offs_j  # (HALF,)
                    mask_j = k_even < K
                    packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + kg // 2 + offs_j[None, :],
                                     mask=mask_n[:, None] & mask_j[None, :], other=0)  # (BLOCK_N, HALF) uint8
                    mask_s = mask_n & ((tl.zeros_like(offs_n) + kg) < K)
                    sc = tl.load(s_ptr + offs_n * stride_sn + kg // GROUP, mask=mask_s, other=0.0).to(tl.float32)
                    zp = tl.load(z_ptr + offs_n * stride_sn + kg // GROUP, mask=mask_s, other=0.0).to(tl.float32)
                    x_e = _load_x(x_ptr, k_even, mask_j, K, PRO_SILU)  # (HALF,)
                    x_o = _load_x(x_ptr, k_even + 1, mask_j, K, PRO_SILU)
                    w_lo = ((packed & 0xF).to(tl.float32) - zp[:, None]) * sc[:, None]
                    w_hi = ((packed >> 4).to(tl.float32) - zp[:, None]) * sc[:, None]
                    acc += w_lo * x_e[None, :] + w_hi * x_o[None, :]
            y = tl.sum(acc, axis=1)
        else:
            offs_k = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            k_first = k_lo
            if PDL:  # the first tile depends on no earlier kernel: load it before waiting for it
                kk = k_lo + offs_k
                w = _row_tile(w_ptr, offs_n, mask_n, stride_wn, kk, kk < K)
                _pdl_enter(PDL)
                acc += w * _load_x(x_ptr, kk, kk < K, K, PRO_SILU)[None, :]
                k_first = k_lo + BLOCK_K
            for k0 in tl.range(k_first, k_hi, BLOCK_K, num_stages=STAGES):
                kk = k0 + offs_k
                mask_k = kk < K
                w = _row_tile(w_ptr, offs_n, mask_n, stride_wn, kk, mask_k)
                acc += w * _load_x(x_ptr, kk, mask_k, K, PRO_SILU)[None, :]
            y = tl.sum(acc, axis=1)
            if KIND == 1:
                y = y * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + pid_k * stride_ys + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _nib_lo(v, one):
        """The nibble at bits 15..18 of v as the float 1 + q / 256 (bits 15..22 are the top of the mantissa);
        ``one`` = 0x3F800000, the bits of 1.0."""
        return ((v & 0x78000) | one).to(tl.float32, bitcast=True)

    @triton.jit
    def _nib_hi(v, one):
        """The nibble at bits 19..22 of v as the float 1 + q / 16."""
        return ((v & 0x780000) | one).to(tl.float32, bitcast=True)

    @triton.jit
    def _nibble_words(wd):
        """A word of eight int4 codes shifted four ways: nibbles (0, 1), (2, 3), (4, 5), (6, 7) at bits 15..18
        and 19..22, where _nib_lo and _nib_hi read them."""
        return wd << 15, wd << 7, wd >> 1, wd >> 9

    @triton.jit
    def _prescale8(x0, x1, x2, x3, x4, x5, x6, x7):
        """The activations that meet the even nibbles times 256, the odd ones times 16 (matching 1 + q / 256 and
        1 + q / 16)."""
        return x0 * 256.0, x1 * 16.0, x2 * 256.0, x3 * 16.0, x4 * 256.0, x5 * 16.0, x6 * 256.0, x7 * 16.0

    @triton.jit
    def _nibble_dot(va, vb, vc, vd, x0, x1, x2, x3, x4, x5, x6, x7, ONE):
        """sum over a word's eight nibbles of (1 + q / 2^e) x' (x' prescaled, broadcast against the words)."""
        return (_nib_lo(va, ONE) * x0 + _nib_hi(va, ONE) * x1 + _nib_lo(vb, ONE) * x2 + _nib_hi(vb, ONE) * x3
                + _nib_lo(vc, ONE) * x4 + _nib_hi(vc, ONE) * x5 + _nib_lo(vd, ONE) * x6 + _nib_hi(vd, ONE) * x7)

    @triton.jit
    def _byte_floats(wd, ONE):
        """A word's four int8 codes as floats: each byte moved to bits 15..22, then XOR with ``ONE`` (the bits of
        1.5) puts the exponent of 1.0 above it and flips its sign bit: f = 1 + u / 256 with u = q + 128, so
        q = 256 f - 384."""
        return ((((wd << 15) & 0x7F8000) ^ ONE).to(tl.float32, bitcast=True),
                (((wd << 7) & 0x7F8000) ^ ONE).to(tl.float32, bitcast=True),
                (((wd >> 1) & 0x7F8000) ^ ONE).to(tl.float32, bitcast=True),
                (((wd >> 9) & 0x7F8000) ^ ONE).to(tl.float32, bitcast=True))

    @triton.jit
    def _load_x4(xr, kb, mask_w, K, PRO_SILU: tl.constexpr, RAGGED: tl.constexpr = False):
        """The four activation vectors that meet bit positions 0..3 of a tile's words (columns kb + 16 i).

        RAGGED: K is not a multiple of the 128-column chunk, and the columns of the last chunk past K are masked
        (their codes are padding; with PRO_SILU the memory past K holds the ``up`` half)."""
        if RAGGED:
            return (_load_x(xr, kb, mask_w & (kb < K), K, PRO_SILU),
                    _load_x(xr, kb + 16, mask_w & (kb + 16 < K), K, PRO_SILU),
                    _load_x(xr, kb + 32, mask_w & (kb + 32 < K), K, PRO_SILU),
                    _load_x(xr, kb + 48, mask_w & (kb + 48 < K), K, PRO_SILU))
        return (_load_x(xr, kb, mask_w, K, PRO_SILU), _load_x(xr, kb + 16, mask_w, K, PRO_SILU),
                _load_x(xr, kb + 32, mask_w, K, PRO_SILU), _load_x(xr, kb + 48, mask_w, K, PRO_SILU))

    @triton.jit
    def _il_words(w_ptr, offs_n, mask_n, stride_wn, k0, K, CH: tl.constexpr, W: tl.constexpr):
        """The (BLOCK_N, W) words of one K step of the word kernel and the mask of the words inside the row."""
        offs_w = tl.arange(0, W)
        w0 = (k0 // CH) * 16  # first word of this step
        mask_w = (w0 + offs_w) < ((K + CH - 1) // CH) * 16
        wd = tl.load(w_ptr + offs_n[:, None] * stride_wn + (w0 + offs_w)[None, :],
                     mask=mask_n[:, None] & mask_w[None, :], other=0)  # (BLOCK_N, W) int32
        return wd, mask_w

    @triton.jit
    def _il_step(acc, wd, mask_w, k0, x_ptr, s_ptr, z_ptr, offs_n, mask_n, M, K, stride_xm, stride_sn, ONE,
                 BITS: tl.constexpr, PRO_SILU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CH: tl.constexpr, NC: tl.constexpr, W: tl.constexpr, RAGGED: tl.constexpr = False):
        """One K step of the word kernel: acc (BLOCK_M, BLOCK_N) += x[:, step] . dequantized words."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_w = tl.arange(0, W)
        # the tile's words are contiguous along a row: the threads of a warp spread along the row and each thread
        # keeps several rows, so one load of x serves all of them
        xcol = (offs_w // 16) * CH + offs_w % 16  # (W,) column held at bit position 0 of each word
        kb = k0 + xcol
        if BITS == 4:
            va, vb, vc, vd = _nibble_words(wd)
            c_idx = k0 // CH + tl.arange(0, NC)
            sz_off = offs_n[:, None] * stride_sn + c_idx[None, :]
            sz_mask = mask_n[:, None] & (c_idx < (K + CH - 1) // CH)[None, :]
            s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)  # (BLOCK_N, NC)
            z = tl.load(z_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                xr = x_ptr + tl.minimum(m, M - 1) * stride_xm
                x0, x1, x2, x3 = _load_x4(xr, kb, mask_w, K, PRO_SILU, RAGGED)
                x4, x5, x6, x7 = _load_x4(xr, kb + 64, mask_w, K, PRO_SILU, RAGGED)
                x_sum = tl.sum(tl.reshape(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, (NC, 16)), axis=1)  # (NC,)
                x0, x1, x2, x3, x4, x5, x6, x7 = _prescale8(x0, x1, x2, x3, x4, x5, x6, x7)
                a_sum = tl.sum(tl.reshape(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, (NC, 16)), axis=1)
                part = _nibble_dot(va, vb, vc, vd, x0[None, :], x1[None, :], x2[None, :], x3[None, :], x4[None, :],
                                   x5[None, :], x6[None, :], x7[None, :], ONE)  # (BLOCK_N, W)
                gsum = tl.sum(tl.reshape(part, (BLOCK_N, NC, 16)), axis=2)  # (BLOCK_N, NC)
                val = tl.sum(s * (gsum - a_sum[None, :] - z * x_sum[None, :]), axis=1)
                acc += tl.where(offs_m[:, None] == m, val[None, :], 0.0)
        else:
            f0, f1, f2, f3 = _byte_floats(wd, ONE)
            for m in tl.static_range(BLOCK_M):
                xr = x_ptr + tl.minimum(m, M - 1) * stride_xm
                x0, x1, x2, x3 = _load_x4(xr, kb, mask_w, K, PRO_SILU)
                part = f0 * x0[None, :] + f1 * x1[None, :] + f2 * x2[None, :] + f3 * x3[None, :]
                val = 256.0 * tl.sum(part, axis=1) - 384.0 * tl.sum(x0 + x1 + x2 + x3, axis=0)  # (BLOCK_N,)
                acc += tl.where(offs_m[:, None] == m, val[None, :], 0.0)
        return acc

    @triton.jit
    def _wo_gemv_il_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        M, N, K, stride_xm, stride_wn, stride_sn, stride_ym, stride_ys, K_CHUNK, ONE,
        BITS: tl.constexpr, PRO_SILU: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
        RAGGED: tl.constexpr = False, PREFETCH: tl.constexpr = False, ROW_PF: tl.constexpr = 0,
    ):
        """GEMV over a WordWeight (int8 or int4 codes in 32-bit words, ``interleave`` layout), M <= BLOCK_M.
        ROW_PF (with PDL): before the wait, ask L2 for the program's next ROW_PF K steps of words (``ROW_PREFETCH``).

        Codes become floats without int-to-float conversions (which run at a fraction of the FMA rate): a code
        moved to the top of a float's mantissa, under the exponent of 1.0, reads as ``1 + code * 2^-e``.
        int8 (byte at bits 15..22, sign bit flipped: u = q + 128): ``f = 1 + u / 256``, ``q s = s (256 f - 384)``.
        int4: a word shifted four ways puts the even nibbles at bits 15..18 (``1 + q / 256``) and the odd ones
        at 19..22 (``1 + q / 16``); with x pre-scaled by 256 or 16 to match, per group
        ``sum_k x_k (q_k - z) s = s (sum_k x'_k f_k - sum_k x'_k - z sum_k x_k)``.
        ``ONE`` carries the exponent bits (1.0 for int4, 1.5 for int8) as a run-time argument: written as a
        constant, the compiler re-creates it in a register before each use, an extra instruction per weight
        (about 20% of the loop on an H200 with Triton 3.6).
        The interleaved layout makes the activations that meet bit position i of a tile's words one contiguous
        vector, loaded once per step and shared by the BLOCK_N rows.
        """
        CH: tl.constexpr = 128 if BITS == 4 else 64  # columns per 16-word chunk
        NC: tl.constexpr = BLOCK_K // CH
        W: tl.constexpr = NC * 16  # words per row per step
        pid_k, k_lo, k_hi, offs_n, mask_n = _program_tile(N, K, K_CHUNK, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_first = k_lo
        if PDL:  # the first words depend on no earlier kernel: load them before waiting for it
            wd, mask_w = _il_words(w_ptr, offs_n, mask_n, stride_wn, k_lo, K, CH, W)
            if ROW_PF > 0:
                _prefetch_rows(w_ptr, offs_n, mask_n, stride_wn, (k_lo // CH + NC) * 16,
                               (tl.minimum(k_hi, k_lo + (ROW_PF + 1) * BLOCK_K) + CH - 1) // CH * 16, 4)
            _pdl_enter(PDL)
            acc = _il_step(acc, wd, mask_w, k_lo, x_ptr, s_ptr, z_ptr, offs_n, mask_n, M, K, stride_xm, stride_sn,
                           ONE, BITS, PRO_SILU, BLOCK_M, BLOCK_N, CH, NC, W, RAGGED)
            k_first = k_lo + BLOCK_K
        if PREFETCH:  # the next step's words are loaded before this step's math: two steps of loads in flight
            wd, mask_w = _il_words(w_ptr, offs_n, mask_n, stride_wn, k_first, k_hi, CH, W)
            for k0 in range(k_first, k_hi, BLOCK_K):
                wd_next, mask_next = _il_words(w_ptr, offs_n, mask_n, stride_wn, k0 + BLOCK_K, k_hi, CH, W)
                acc = _il_step(acc, wd, mask_w, k0, x_ptr, s_ptr, z_ptr, offs_n, mask_n, M, K, stride_xm,
                               stride_sn, ONE, BITS, PRO_SILU, BLOCK_M, BLOCK_N, CH, NC, W, RAGGED)
                wd, mask_w = wd_next, mask_next
        else:
            for k0 in range(k_first, k_hi, BLOCK_K):
                wd, mask_w = _il_words(w_ptr, offs_n, mask_n, stride_wn, k0, K, CH, W)
                acc = _il_step(acc, wd, mask_w, k0, x_ptr, s_ptr, z_ptr, offs_n, mask_n, M, K, stride_xm,
                               stride_sn, ONE, BITS, PRO_SILU, BLOCK_M, BLOCK_N, CH, NC, W, RAGGED)
        if BITS == 8:
            acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & mask_n[None, :])

    @triton.jit
    def _il1_words(w_ptr, offs_n, mask_n, stride_wn, k0, K, CH: tl.constexpr, NC: tl.constexpr,
                   EVEN: tl.constexpr = False):
        """The words of one K step of the batch-1 word kernel as (BLOCK_N, NC, 16): chunk c's 16 words along the
        last axis; with the chunk indices and the mask of the chunks inside the row. EVEN: every row and chunk of
        every program is inside the weight (no masks)."""
        c_idx = k0 // CH + tl.arange(0, NC)
        mask_c = c_idx < (K + CH - 1) // CH
        offs = offs_n[:, None, None] * stride_wn + (c_idx * 16)[None, :, None] + tl.arange(0, 16)[None, None, :]
        if EVEN:
            wd = tl.load(w_ptr + offs)
        else:
            wd = tl.load(w_ptr + offs, mask=mask_n[:, None, None] & mask_c[None, :, None], other=0)
        return wd, c_idx, mask_c

    @triton.jit
    def _il1_step(acc, corr, xacc, wd, c_idx, mask_c, x_ptr, s_ptr, z_ptr, offs_n, mask_n, K, stride_sn, ONE,
                  BITS: tl.constexpr, PRO_SILU: tl.constexpr, CH: tl.constexpr, RAGGED: tl.constexpr = False,
                  EVEN: tl.constexpr = False):
        """One K step of the batch-1 word kernel. Every word position keeps its own fp32 accumulator across the
        whole K loop (``acc``, (BLOCK_N, NC, 16)), so nothing is summed across threads until the loop ends.
        int4: acc += s * sum_i x'_i f_i per word; ``corr`` (BLOCK_N, NC) += s (sum x' + z sum x) per group, whose
        sums over the chunk's columns are shared by all BLOCK_N rows. int8: acc += sum_i x_i f_i and ``xacc``
        (NC, 16) += sum_i x_i; the per-row scale comes after the loop."""
        kb = (c_idx * CH)[:, None] + tl.arange(0, 16)[None, :]  # (NC, 16): the column at bit position 0 of each word
        if EVEN:
            mask_x = None
        else:
            mask_x = mask_c[:, None] & (kb >= 0)
        if BITS == 4:
            x0, x1, x2, x3 = _load_x4(x_ptr, kb, mask_x, K, PRO_SILU, RAGGED)
            x4, x5, x6, x7 = _load_x4(x_ptr, kb + 64, mask_x, K, PRO_SILU, RAGGED)
            x_sum = tl.sum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, axis=1)  # (NC,)
            x0, x1, x2, x3, x4, x5, x6, x7 = _prescale8(x0, x1, x2, x3, x4, x5, x6, x7)
            a_sum = tl.sum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, axis=1)
            sz_off = offs_n[:, None] * stride_sn + c_idx[None, :]
            sz_mask = mask_n[:, None] & mask_c[None, :]
            if EVEN:
                s = tl.load(s_ptr + sz_off).to(tl.float32)  # (BLOCK_N, NC)
                z = tl.load(z_ptr + sz_off).to(tl.float32)
            else:
                s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
            va, vb, vc, vd = _nibble_words(wd)
            part = _nibble_dot(va, vb, vc, vd, x0[None], x1[None], x2[None], x3[None], x4[None], x5[None], x6[None],
                               x7[None], ONE)  # (BLOCK_N, NC, 16)
            acc += s[:, :, None] * part
            corr += s * (a_sum[None, :] + z * x_sum[None, :])
        else:
            x0, x1, x2, x3 = _load_x4(x_ptr, kb, mask_x, K, PRO_SILU)
            f0, f1, f2, f3 = _byte_floats(wd, ONE)
            acc += f0 * x0[None] + f1 * x1[None] + f2 * x2[None] + f3 * x3[None]
            xacc += x0 + x1 + x2 + x3
        return acc, corr, xacc

    @triton.jit
    def _wo_gemv_il1_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        N, K, stride_wn, stride_sn, stride_ys, K_CHUNK, ONE,
        BITS: tl.constexpr, PRO_SILU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PDL: tl.constexpr = False, RAGGED: tl.constexpr = False, EVEN: tl.constexpr = False,
    ):
        """The word kernel for one activation row (batch-1 decode): the dequantization of ``_wo_gemv_il_kernel``,
        but the K loop sums nothing across threads. There, each step reduces every group's 16 word products to one
        number (warp shuffles and a tree of adds, over a third of the loop's instructions in the sm_90 SASS); here
        each word position accumulates on its own, and the one reduction comes after the loop."""
        CH: tl.constexpr = 128 if BITS == 4 else 64  # columns per 16-word chunk
        NC: tl.constexpr = BLOCK_K // CH
        pid_k, k_lo, k_hi, offs_n, mask_n = _program_tile(N, K, K_CHUNK, BLOCK_N)
        acc = tl.zeros((BLOCK_N, NC, 16), dtype=tl.float32)
        corr = tl.zeros((BLOCK_N, NC), dtype=tl.float32)
        xacc = tl.zeros((NC, 16), dtype=tl.float32)
        k_first = k_lo
        if PDL:  # the first words depend on no earlier kernel: load them before waiting for it
            wd, c_idx, mask_c = _il1_words(w_ptr, offs_n, mask_n, stride_wn, k_lo, K, CH, NC, EVEN)
            _pdl_enter(PDL)
            acc, corr, xacc = _il1_step(acc, corr, xacc, wd, c_idx, mask_c, x_ptr, s_ptr, z_ptr, offs_n, mask_n, K,
                                        stride_sn, ONE, BITS, PRO_SILU, CH, RAGGED, EVEN)
            k_first = k_lo + BLOCK_K
        for k0 in range(k_first, k_hi, BLOCK_K):
            wd, c_idx, mask_c = _il1_words(w_ptr, offs_n, mask_n, stride_wn, k0, K, CH, NC, EVEN)
            acc, corr, xacc = _il1_step(acc, corr, xacc, wd, c_idx, mask_c, x_ptr, s_ptr, z_ptr, offs_n, mask_n, K,
                                        stride_sn, ONE, BITS, PRO_SILU, CH, RAGGED, EVEN)
        y = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BLOCK_N,)
        if BITS == 4:
            y = y - tl.sum(corr, axis=1)
        else:
            y = (256.0 * y - 384.0 * tl.sum(tl.sum(xacc, axis=1), axis=0)) * tl.load(
                s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + pid_k * stride_ys + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _h2_codes(wd, INTERPRET: tl.constexpr):
        """A word of eight int4 codes (WordWeight layout) as four fp16x2 registers, each an int32 holding two fp16:
        (q0, q4), (16 q1, 16 q5), (q2, q6), (16 q3, 16 q7), nibble n of the word in the low half, n + 4 in the high.
        One masked OR makes two codes at once: a nibble at bits 0..3 or 4..7 of a half under the bits of 1024.0
        (0x6400, where the fp16 spacing is 1) reads as 1024 + q or 1024 + 16 q, and one packed subtraction of 1024
        leaves q or 16 q, exactly. On a GPU this is PTX (lop3, sub.f16x2); under the interpreter the same bits are
        computed with integer arithmetic (there is no inline assembly there)."""
        if INTERPRET:
            lo = wd & 0xFFFF
            hi = (wd >> 16) & 0xFFFF
            return ((lo & 0xF) | ((hi & 0xF) << 16), (lo & 0xF0) | ((hi & 0xF0) << 16),
                    ((lo >> 8) & 0xF) | (((hi >> 8) & 0xF) << 16), ((lo >> 8) & 0xF0) | (((hi >> 8) & 0xF0) << 16))
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t, m;
            mov.b32 m, 0x64006400;
            lop3.b32 $0, $4, 0x000F000F, m, 0xEA;
            lop3.b32 $1, $4, 0x00F000F0, m, 0xEA;
            shr.u32 t, $4, 8;
            lop3.b32 $2, t, 0x000F000F, m, 0xEA;
            lop3.b32 $3, t, 0x00F000F0, m, 0xEA;
            mov.b32 m, 0xE400E400;
            add.rn.f16x2 $0, $0, m;
            add.rn.f16x2 $1, $1, m;
            add.rn.f16x2 $2, $2, m;
            add.rn.f16x2 $3, $3, m;
            }""",
            "=r,=r,=r,=r,r", [wd], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)

    @triton.jit
    def _h2_codes8(wd, INTERPRET: tl.constexpr):
        """A word of four int8 codes (WordWeight layout, byte b in bits 8b..8b+7) as two fp16x2 registers: (q0, q2)
        and (q1, q3), byte b in the low half, b + 2 in the high. One lop3 makes two codes at once: a byte under the
        bits 0x64 reads as 1024 + u; XOR-ing 0x80 into it as well turns the two's-complement code q into
        u = q + 128, so ``(w & 0x00FF00FF) ^ 0x64806480`` holds 1152 + q in each half, and one packed subtraction of
        1152 leaves q, exactly. Under the interpreter: the same values as 16-bit two's-complement integers."""
        if INTERPRET:
            b0, b1, b2, b3 = wd & 0xFF, (wd >> 8) & 0xFF, (wd >> 16) & 0xFF, (wd >> 24) & 0xFF
            return (((b0 ^ 0x80) - 0x80) & 0xFFFF) | ((((b2 ^ 0x80) - 0x80) & 0xFFFF) << 16), \
                (((b1 ^ 0x80) - 0x80) & 0xFFFF) | ((((b3 ^ 0x80) - 0x80) & 0xFFFF) << 16)
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t, m;
            mov.b32 m, 0x64806480;
            lop3.b32 $0, $2, 0x00FF00FF, m, 0x6A;
            shr.u32 t, $2, 8;
            lop3.b32 $1, t, 0x00FF00FF, m, 0x6A;
            mov.b32 m, 0xE480E480;
            add.rn.f16x2 $0, $0, m;
            add.rn.f16x2 $1, $1, m;
            }""",
            "=r,=r,r", [wd], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)

    @triton.jit
    def _h2_lane(v, HI: tl.constexpr, SIGNED: tl.constexpr = False):
        """One 16-bit half of an int32 register of the interpreter's model: a code (or 16 x code) from _h2_codes, a
        signed code from _h2_codes8 (SIGNED: the half read as two's complement), or the fp16 bits of an activation
        from _h2_pack."""
        h = ((v >> 16) & 0xFFFF) if HI else (v & 0xFFFF)
        if SIGNED:
            h = (h ^ 0x8000) - 0x8000
        return h

    @triton.jit
    def _h2_dot(c0, c1, c2, c3, x0, x1, x2, x3, INTERPRET: tl.constexpr, SIGNED: tl.constexpr = False):
        """sum over both halves of c0 x0 + c1 x1 + c2 x2 + c3 x3 (fp16x2 codes from _h2_codes, fp16x2 activations from
        _h2_pack) as fp32: one packed multiply and three packed FMAs in fp16, then the two halves converted and added
        (four products per half are summed in fp16, with its 11 significant bits, before fp32 takes over)."""
        if INTERPRET:  # the same arithmetic, each packed operation rounded to fp16 as the hardware rounds it
            out = tl.zeros(c0.shape, tl.float32)
            for HI in tl.static_range(2):
                s = (_h2_lane(c0, HI, SIGNED).to(tl.float32)
                     * _h2_lane(x0, HI).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)).to(tl.float16)
                s = (_h2_lane(c1, HI, SIGNED).to(tl.float32)
                     * _h2_lane(x1, HI).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                     + s.to(tl.float32)).to(tl.float16)
                s = (_h2_lane(c2, HI, SIGNED).to(tl.float32)
                     * _h2_lane(x2, HI).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                     + s.to(tl.float32)).to(tl.float16)
                s = (_h2_lane(c3, HI, SIGNED).to(tl.float32)
                     * _h2_lane(x3, HI).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                     + s.to(tl.float32)).to(tl.float16)
                out += s.to(tl.float32)
            return out
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 s;
            .reg .b16 lo, hi;
            .reg .f32 a, b;
            mul.rn.f16x2 s, $1, $5;
            fma.rn.f16x2 s, $2, $6, s;
            fma.rn.f16x2 s, $3, $7, s;
            fma.rn.f16x2 s, $4, $8, s;
            mov.b32 {lo, hi}, s;
            cvt.f32.f16 a, lo;
            cvt.f32.f16 b, hi;
            add.f32 $0, a, b;
            }""",
            "=f,r,r,r,r,r,r,r,r", [c0, c1, c2, c3, x0, x1, x2, x3], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _h2_pack(lo, hi, BF16: tl.constexpr = False):
        """Two fp32 tensors of activations -> int32 holding (fp16(lo), fp16(hi)) as two halves (bf16 with BF16)."""
        dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
        a = lo.to(dt).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        b = hi.to(dt).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return a | (b << 16)

    @triton.jit
    def _h2_words(w_ptr, offs_n, mask_n, stride_wn, k0, K, NC: tl.constexpr, EVEN: tl.constexpr, BITS: tl.constexpr,
                  TMA: tl.constexpr = False, offs_n_start=None):
        """The words of one K step of the packed-fp16 kernel for NC chunks of 128 columns, as two (BLOCK_N, NC, 16)
        tensors: int4, the chunk's 16 words (twice, the same tensor); int8, its first and second 64 columns (16 words
        each). With the chunk indices and the mask of the chunks inside the row. TMA: w_ptr is a tensor descriptor
        over the words seen as (N, chunks, 16) for int4, (N, chunks, 2, 16) for int8 (h2_descriptor); the tile
        arrives through the tensor memory accelerator, rows and chunks past the weight read as zero words."""
        c_idx = k0 // 128 + tl.arange(0, NC)
        mask_c = c_idx < (K + 127) // 128
        if TMA:
            n0 = offs_n_start if offs_n_start is not None else tl.program_id(0) * offs_n.shape[0]
            if BITS == 4:
                wa = tl.reshape(w_ptr.load([n0, k0 // 128, 0]), (offs_n.shape[0], NC, 16))
                wb = wa
            else:
                t = tl.reshape(w_ptr.load([n0, k0 // 128, 0, 0]), (offs_n.shape[0], NC, 2, 16))
                wa, wb = tl.split(tl.permute(t, (0, 1, 3, 2)))
        elif BITS == 4:
            wa, c_idx, mask_c = _il1_words(w_ptr, offs_n, mask_n, stride_wn, k0, K, 128, NC, EVEN)
            wb = wa
        else:
            offs = offs_n[:, None, None] * stride_wn + (c_idx * 32)[None, :, None] + tl.arange(0, 16)[None, None, :]
            if EVEN:
                wa = tl.load(w_ptr + offs)
                wb = tl.load(w_ptr + offs + 16)
            else:
                mask_a = mask_n[:, None, None] & mask_c[None, :, None]
                mask_b = mask_n[:, None, None] & (2 * c_idx + 1 < (K + 63) // 64)[None, :, None]
                wa = tl.load(w_ptr + offs, mask=mask_a, other=0)
                wb = tl.load(w_ptr + offs + 16, mask=mask_b, other=0)
        return wa, wb, c_idx, mask_c

    @triton.jit
    def _h2_step(acc, corr, wa, wb, c_idx, mask_c, x_ptr, s_ptr, z_ptr, offs_n, mask_n, K, stride_sn,
                 PRO_SILU: tl.constexpr, EVEN: tl.constexpr, RAGGED: tl.constexpr, INTERPRET: tl.constexpr,
                 BITS: tl.constexpr):
        """One K step of the packed-fp16 word kernel over NC chunks of 128 columns: acc (BLOCK_N, NC, 16) += 2^-k
        (times the group's scale s for int4) * (eight q x 2^k summed in fp16 per word position), corr (BLOCK_N, NC)
        += s z (sum of x) per int4 group, 2^k the power of two of each chunk. int4: one word holds the eight codes;
        int8: the words at the same position of the chunk's two halves (wa, wb) hold them."""
        kb = (c_idx * 128)[:, None] + tl.arange(0, 16)[None, :]  # (NC, 16): the column at nibble/byte 0 of each word
        mask_x = None if EVEN else mask_c[:, None] & (kb >= 0)
        x0, x1, x2, x3 = _load_x4(x_ptr, kb, mask_x, K, PRO_SILU, RAGGED)
        x4, x5, x6, x7 = _load_x4(x_ptr, kb + 64, mask_x, K, PRO_SILU, RAGGED)
        # activations in fp16, each 128-column chunk scaled by its own power of two 2^k (exact) that puts its largest
        # magnitude in [512, 1024) for int4, [32, 64) for int8: four products of a code (int4 <= 15, int8 >= -128)
        # stay below fp16's 65504 whatever the activations' size, and small activations keep fp16's 11 bits instead
        # of sinking into its subnormals. k = 9 - E (int4) or 5 - E (int8), with E the exponent of the chunk's
        # largest |x| (read from its fp32 bits); an all-zero chunk gives E = -20. int4's 16 q halves meet x 2^k / 16
        m = tl.max(tl.maximum(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                              tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7)))),
                   axis=1)  # (NC,)
        k = (9 if BITS == 4 else 5) - tl.maximum(((m.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -20)
        up = ((k + 127) << 23).to(tl.float32, bitcast=True)[:, None]  # 2^k, (NC, 1)
        down = ((127 - k) << 23).to(tl.float32, bitcast=True)  # 2^-k, (NC,)
        if BITS == 4:
            x_sum = tl.sum(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, axis=1)  # (NC,)
            up16 = up * (1.0 / 16.0)
            p0 = _h2_pack(x0 * up, x4 * up)
            p1 = _h2_pack(x1 * up16, x5 * up16)
            p2 = _h2_pack(x2 * up, x6 * up)
            p3 = _h2_pack(x3 * up16, x7 * up16)
            sz_off = offs_n[:, None] * stride_sn + c_idx[None, :]
            if EVEN:
                s = tl.load(s_ptr + sz_off).to(tl.float32)  # (BLOCK_N, NC)
                z = tl.load(z_ptr + sz_off).to(tl.float32)
            else:
                sz_mask = mask_n[:, None] & mask_c[None, :]
                s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
            c0, c1, c2, c3 = _h2_codes(wa, INTERPRET)
            d = _h2_dot(c0, c1, c2, c3, p0[None], p1[None], p2[None], p3[None], INTERPRET)  # (BLOCK_N, NC, 16)
            acc += (s * down[None, :])[:, :, None] * d  # the chunk's scale undone with the group's (exact)
            corr += s * z * x_sum[None, :]
        else:  # int8: bytes 0 and 2 of a word meet columns +0 and +32 of its half-chunk, bytes 1 and 3 +16 and +48
            c0, c1 = _h2_codes8(wa, INTERPRET)
            c2, c3 = _h2_codes8(wb, INTERPRET)
            p0 = _h2_pack(x0 * up, x2 * up)
            p1 = _h2_pack(x1 * up, x3 * up)
            p2 = _h2_pack(x4 * up, x6 * up)
            p3 = _h2_pack(x5 * up, x7 * up)
            d = _h2_dot(c0, c1, c2, c3, p0[None], p1[None], p2[None], p3[None], INTERPRET, True)
            acc += down[None, :, None] * d  # the row's scale is applied once, at the end
        return acc, corr

    @triton.jit
    def _wo_gemv_h2_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        N, K, stride_wn, stride_sn, stride_ys, K_CHUNK,
        PRO_SILU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PDL: tl.constexpr = False, EVEN: tl.constexpr = False, RAGGED: tl.constexpr = False,
        INTERPRET: tl.constexpr = False, BITS: tl.constexpr = 4, STAGES: tl.constexpr = None,
        ROW_PF: tl.constexpr = 0, TMA: tl.constexpr = False,
    ):
        """An int4 (groups of 128) or int8 (per row) WordWeight, one activation row, on the CUDA cores with packed
        fp16 arithmetic: the codes of a word become fp16x2 registers (two codes per lop3, _h2_codes / _h2_codes8)
        and meet the activations two at a time (fp16x2 FMAs, _h2_dot); eight products per word position (one int4
        word, two int8 words) are summed in fp16, then in fp32 with the group's (int4) or row's (int8) scale.
        About 2.8 (Triton 3.9) to 3.0 (Triton 3.6) instructions per int4 weight in the offline sm_90 SASS, against
        3.5 to 6.1 for the fp32 word kernels (scripts/sass_gemv.py). Rounding: each 128-column chunk of activations
        is scaled by a power of two (its largest magnitude to [512, 1024) for int4, [32, 64) for int8: no overflow,
        no subnormals) and rounded to fp16; each product and the three additions after it are rounded to fp16 (11
        significant bits). TMA: w_ptr is a tensor descriptor (h2_descriptor) and each K step's words are copied into
        shared memory by the tensor memory accelerator; with STAGES >= 2 the pipeliner keeps STAGES - 1 later steps'
        copies in flight while this one computes, without a load instruction per thread (ROW_PF is then ignored)."""
        NC: tl.constexpr = BLOCK_K // 128
        pid_k, k_lo, k_hi, offs_n, mask_n = _program_tile(N, K, K_CHUNK, BLOCK_N)
        acc = tl.zeros((BLOCK_N, NC, 16), dtype=tl.float32)
        corr = tl.zeros((BLOCK_N, NC), dtype=tl.float32)
        k_first = k_lo
        if PDL:  # the first words depend on no earlier kernel: load them before waiting for it
            wa, wb, c_idx, mask_c = _h2_words(w_ptr, offs_n, mask_n, stride_wn, k_lo, K, NC, EVEN, BITS, TMA)
            if ROW_PF > 0 and not TMA:  # and ask L2 for the next ROW_PF steps' words (ROW_PREFETCH); 128 columns = 16 or 32 words
                WPC: tl.constexpr = 16 if BITS == 4 else 32
                _prefetch_rows(w_ptr, offs_n, mask_n, stride_wn, (k_lo // 128 + NC) * WPC,
                               (tl.minimum(k_hi, k_lo + (ROW_PF + 1) * BLOCK_K) + 127) // 128 * WPC, 4)
            _pdl_enter(PDL)
            acc, corr = _h2_step(acc, corr, wa, wb, c_idx, mask_c, x_ptr, s_ptr, z_ptr, offs_n, mask_n, K, stride_sn,
                                 PRO_SILU, EVEN, RAGGED, INTERPRET, BITS)
            k_first = k_lo + BLOCK_K
        for k0 in tl.range(k_first, k_hi, BLOCK_K, num_stages=STAGES):
            wa, wb, c_idx, mask_c = _h2_words(w_ptr, offs_n, mask_n, stride_wn, k0, K, NC, EVEN, BITS, TMA)
            acc, corr = _h2_step(acc, corr, wa, wb, c_idx, mask_c, x_ptr, s_ptr, z_ptr, offs_n, mask_n, K, stride_sn,
                                 PRO_SILU, EVEN, RAGGED, INTERPRET, BITS)
        if BITS == 4:
            y = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(corr, axis=1)
        else:
            y = tl.sum(tl.sum(acc, axis=2), axis=1) * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + pid_k * stride_ys + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _wo_gemv_h2p_kernel(
        x_ptr, w_desc, s_ptr, z_ptr, y_ptr,
        N, K, stride_sn, stride_ys, K_CHUNK,
        PRO_SILU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
        PDL: tl.constexpr = False, EVEN: tl.constexpr = False, RAGGED: tl.constexpr = False,
        INTERPRET: tl.constexpr = False, BITS: tl.constexpr = 4,
    ):
        """The packed-fp16 GEMV with TMA copies (``_wo_gemv_h2_kernel`` with TMA), persistent: fewer programs than row
        blocks (GemvConfig.persist per SM), each taking row blocks pid, pid + programs, ... of its split. One flat loop
        runs over all (row block, K step) pairs of the program, so the pipeliner's copies run ahead across the end of
        a row block into the next one: no program starts cold after the first, and no SM idles at a wave's end
        waiting for a new program. The row block's output is stored at its last K step. With PDL the copies go out
        before the wait for the previous kernel (the weights depend on none), the activations are read after it."""
        NC: tl.constexpr = BLOCK_K // 128
        pid = tl.program_id(0)
        progs = tl.num_programs(0)
        pid_k = tl.program_id(1)
        k_lo = pid_k * K_CHUNK
        k_hi = tl.minimum(K, k_lo + K_CHUNK)
        nk = tl.cdiv(k_hi - k_lo, BLOCK_K)
        my_blocks = tl.cdiv(tl.cdiv(N, BLOCK_N) - pid, progs)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros((BLOCK_N, NC, 16), dtype=tl.float32)
        corr = tl.zeros((BLOCK_N, NC), dtype=tl.float32)
        for it in tl.range(0, my_blocks * nk, num_stages=STAGES):
            kk = it % nk
            n0 = (pid + (it // nk) * progs) * BLOCK_N
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            k0 = k_lo + kk * BLOCK_K
            wa, wb, c_idx, mask_c = _h2_words(w_desc, offs_n, mask_n, 0, k0, K, NC, EVEN, BITS, True, n0)
            if PDL:  # the activations are the previous kernel's output (a no-op once it has been waited for)
                tl.extra.cuda.gdc_wait()
            acc, corr = _h2_step(acc, corr, wa, wb, c_idx, mask_c, x_ptr, s_ptr, z_ptr, offs_n, mask_n, K, stride_sn,
                                 PRO_SILU, EVEN, RAGGED, INTERPRET, BITS)
            if kk == nk - 1:
                if BITS == 4:
                    y = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(corr, axis=1)
                else:
                    y = tl.sum(tl.sum(acc, axis=2), axis=1) * tl.load(s_ptr + offs_n, mask=mask_n,
                                                                      other=0.0).to(tl.float32)
                tl.store(y_ptr + pid_k * stride_ys + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)
                acc = tl.zeros((BLOCK_N, NC, 16), dtype=tl.float32)
                corr = tl.zeros((BLOCK_N, NC), dtype=tl.float32)

    # ------------------------------------------------------------------ int4 words on the tensor cores at one row
    # The batch-1 GEMV as Hopper/Ampere tensor-core MMAs (mma.sync m16n8k16), the weight the A operand: 16 rows x 16
    # columns per instruction. Tensors of shape (R, NW, 32) hold one value per lane of each of NW warps (the last
    # dimension is the lane), so each lane hands the instruction exactly its fragment registers; lane = 4 g + c holds
    # rows g and g + 8 of its 16-row slot. No data moves between lanes.
    # Every global access of the kernel is PTX of its own (_mma_ld4, _mma_ld2, _mma_lds, _mma_st): Triton picks the
    # register layout of a tl.load or tl.store from the addresses' contiguity, and that layout then spreads to the
    # element-wise operations around it, the inline MMAs among them. Triton 3.6 chose one that splits a warp's lanes
    # over two dimensions (threadsPerWarp [1, 2, 16]), which hands the MMA other lanes' registers: wrong sums with two
    # warps or more on an H200, right under the interpreter and with Triton 3.9. With no load or store op left, every
    # tensor keeps the default layout of its shape, lanes along the last dimension and warps along the middle one, in
    # both versions; mma_layout_ok checks a compiled kernel and wo_matmul refuses one that differs. Addresses enter
    # the PTX as 64-bit integers (Triton 3.6 does not take a pointer beside a float in one inline-assembly call).

    # the PTX of the tensor-core GEMV, one template per instruction and its bf16 / fp16 (and fp32) forms
    def _ptx_codes(magic: str) -> str:  # a word's eight nibbles -> four registers of two 16-bit floats BIAS + q
        return ("{\n.reg .b32 t;\n" + f"lop3.b32 $0, $4, 0x000F000F, {magic}, 0xEA;\n"
                + "".join(f"shr.u32 t, $4, {4 * r};\nlop3.b32 ${r}, t, 0x000F000F, {magic}, 0xEA;\n" for r in (1, 2, 3))
                + "}")

    def _ptx_ld(width: str, cvt: str) -> str:  # one predicated scalar load, converted to fp32; 0 where masked
        if not cvt:
            return "{\n.reg .pred p;\nsetp.ne.b32 p, $2, 0;\nmov.b32 $0, 0f00000000;\n@p ld.global.b32 $0, [$1];\n}"
        return ("{\n.reg .pred p;\n.reg .b16 h;\nsetp.ne.b32 p, $2, 0;\nmov.b16 h, 0;\n"
                f"@p ld.global.{width} h, [$1];\n{cvt} $0, h;\n}}")

    def _ptx_st(cvt: str) -> str:  # one predicated store of fp32 $2, rounded by cvt to 16 bits if given
        if not cvt:
            return "{\n.reg .pred p;\nsetp.ne.b32 p, $3, 0;\n@p st.global.b32 [$1], $2;\nmov.b32 $0, 0;\n}"
        return ("{\n.reg .pred p;\n.reg .b16 h;\nsetp.ne.b32 p, $3, 0;\n" + f"{cvt} h, $2;\n"
                "@p st.global.b16 [$1], h;\nmov.b32 $0, 0;\n}")

    # four consecutive 16-bit values at $2 as two registers (zeros where $3 is 0), and the two halves of a prmt
    _PTX_LD2 = ("{\n.reg .pred p;\nsetp.ne.b32 p, $3, 0;\nmov.b32 $0, 0;\nmov.b32 $1, 0;\n"
                "@p ld.global.v2.b32 {$0, $1}, [$2];\n}")
    _PTX_PRMT_LO = "prmt.b32 $0, $1, $2, 0x5410;"
    _PTX_PRMT_HI = "prmt.b32 $0, $1, $2, 0x7632;"

    def _ptx_mma(ab: str) -> str:
        return (f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32 {{$0, $1, $2, $3}}, {{$4, $5, $6, $7}}, "
                "{$8, $9}, {$10, $11, $12, $13};")

    _MMA_LD2 = tl.constexpr(_PTX_LD2)
    _MMA_PRMT_LO = tl.constexpr(_PTX_PRMT_LO)
    _MMA_PRMT_HI = tl.constexpr(_PTX_PRMT_HI)
    _MMA_CODES_BF16 = tl.constexpr(_ptx_codes("0x43004300"))  # 128.0 twice
    _MMA_CODES_F16 = tl.constexpr(_ptx_codes("0x64006400"))  # 1024.0 twice
    _MMA_SYNC_BF16 = tl.constexpr(_ptx_mma("bf16"))
    _MMA_SYNC_F16 = tl.constexpr(_ptx_mma("f16"))
    _MMA_LD_F32 = tl.constexpr(_ptx_ld("b32", ""))
    _MMA_LD_BF16 = tl.constexpr(_ptx_ld("b16", "cvt.f32.bf16"))
    _MMA_LD_F16 = tl.constexpr(_ptx_ld("b16", "cvt.f32.f16"))
    _MMA_ST_F32 = tl.constexpr(_ptx_st(""))
    _MMA_ST_BF16 = tl.constexpr(_ptx_st("cvt.rn.bf16.f32"))
    _MMA_ST_F16 = tl.constexpr(_ptx_st("cvt.rn.f16.f32"))

    @triton.jit
    def _mma_codes(wd, BF16: tl.constexpr, INTERPRET: tl.constexpr):
        """An int4 WordWeight word (nibble n = column 16 n + j of its chunk, j the word's index) as four registers of
        two 16-bit floats: register t holds (BIAS + q_t, BIAS + q_{t+4}), nibble t in the low half. BIAS (128 in
        bf16, 1024 in fp16) is where the float's spacing is 1, so one masked OR per register makes two codes
        exactly; the bias is not subtracted here but once per chunk from the sum (see _wo_gemv_mma_kernel)."""
        if INTERPRET:
            MAGIC: tl.constexpr = 0x43004300 if BF16 else 0x64006400
            return ((wd & 0x000F000F) | MAGIC, ((wd >> 4) & 0x000F000F) | MAGIC, ((wd >> 8) & 0x000F000F) | MAGIC,
                    ((wd >> 12) & 0x000F000F) | MAGIC)
        return tl.inline_asm_elementwise(_MMA_CODES_BF16 if BF16 else _MMA_CODES_F16, "=r,=r,=r,=r,r", [wd],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)

    @triton.jit
    def _mma_half(v, HI: tl.constexpr, BF16: tl.constexpr):
        """The low or high 16-bit float of a fragment register, as fp32 (the interpreter's model of the registers)."""
        h = _h2_lane(v, HI)
        if BF16:
            return (h << 16).to(tl.float32, bitcast=True)
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _mma_rows(r0, r1, S: tl.constexpr, BF16: tl.constexpr):
        """Interpreter: an (S, 8, 16) matrix [slot, row g, k] from the two fragment registers of 8 rows (r0: k = 2c,
        2c + 1; r1: k = 2c + 8, 2c + 9, for lane 4 g + c); the B operand's (n, k) the same way."""
        r0 = tl.reshape(r0, (S, 32))
        r1 = tl.reshape(r1, (S, 32))
        lo = tl.reshape(tl.join(_mma_half(r0, False, BF16), _mma_half(r0, True, BF16)), (S, 8, 8))
        hi = tl.reshape(tl.join(_mma_half(r1, False, BF16), _mma_half(r1, True, BF16)), (S, 8, 8))
        return tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), (S, 8, 16))

    @triton.jit
    def _mma_lanes(d, c_lo, c_hi, S: tl.constexpr):
        """Interpreter: an (S, 8, 8) result [slot, row g, column n] back to the lanes' accumulators: lane 4 g + c holds
        columns 2c and 2c + 1 of row g, added to c_lo / c_hi (any shape of S x 32 elements, lanes last)."""
        e0, e1 = tl.split(tl.reshape(d, (S, 8, 4, 2)))
        return c_lo + tl.reshape(e0, c_lo.shape), c_hi + tl.reshape(e1, c_hi.shape)

    @triton.jit
    def _mma16816(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, S: tl.constexpr, BF16: tl.constexpr,
                  INTERPRET: tl.constexpr):
        """D = A B + C for one m16n8k16 tile per slot, fp32 accumulators, operands as each lane holds them (PTX ISA,
        mma.m16n8k16 fragments): a0 (row g, k 2c..2c+1), a1 (row g + 8, same k), a2 (row g, k 2c + 8..2c + 9), a3 (row
        g + 8, same), b0 (k 2c..2c+1, column g), b1 (k 2c + 8.., column g); c0, c1 row g columns 2c, 2c + 1; c2, c3
        row g + 8. Every operand has the same shape, S slots of 32 lanes (the lane the last dimension). Under the
        interpreter the same product in fp32 (exact products, sums rounded in another order than the tensor
        cores')."""
        if INTERPRET:
            top = _mma_rows(a0, a2, S, BF16)  # (S, 8, 16): rows 0..7
            bot = _mma_rows(a1, a3, S, BF16)  # rows 8..15
            bt = _mma_rows(b0, b1, S, BF16)  # (S, 8, 16): column n, k
            d_top = tl.sum(top[:, :, None, :] * bt[:, None, :, :], axis=3)  # (S, 8 rows, 8 columns)
            d_bot = tl.sum(bot[:, :, None, :] * bt[:, None, :, :], axis=3)
            c0, c1 = _mma_lanes(d_top, c0, c1, S)
            c2, c3 = _mma_lanes(d_bot, c2, c3, S)
            return c0, c1, c2, c3
        return tl.inline_asm_elementwise(_MMA_SYNC_BF16 if BF16 else _MMA_SYNC_F16, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                                         [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
                                         dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)

    @triton.jit
    def _mma_ld4(ptr, live, INTERPRET: tl.constexpr):
        """Four consecutive int32 words at ptr (16-byte aligned), zeros where live is False: one 128-bit load."""
        if INTERPRET:
            return (tl.load(ptr, mask=live, other=0), tl.load(ptr + 1, mask=live, other=0),
                    tl.load(ptr + 2, mask=live, other=0), tl.load(ptr + 3, mask=live, other=0))
        return tl.inline_asm_elementwise(
            """{
            .reg .pred p;
            setp.ne.b32 p, $5, 0;
            mov.b32 $0, 0;
            mov.b32 $1, 0;
            mov.b32 $2, 0;
            mov.b32 $3, 0;
            @p ld.global.v4.b32 {$0, $1, $2, $3}, [$4];
            }""",
            "=r,=r,=r,=r,l,r", [ptr.to(tl.int64), live.to(tl.int32)], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)

    @triton.jit
    def _mma_ld2(ptr, live, INTERPRET: tl.constexpr):
        """Four consecutive 16-bit values at ptr (8-byte aligned) as two int32 (values 0, 1 and 2, 3; the first of
        each pair in the low half), zeros where live is False: one 64-bit load."""
        if INTERPRET:
            p16 = ptr.to(tl.pointer_type(tl.int16), bitcast=True)
            v = [tl.load(p16 + i, mask=live, other=0).to(tl.int32) & 0xFFFF for i in tl.static_range(4)]
            return v[0] | (v[1] << 16), v[2] | (v[3] << 16)
        return tl.inline_asm_elementwise(_MMA_LD2, "=r,=r,l,r", [ptr.to(tl.int64), live.to(tl.int32)],
                                         dtype=(tl.int32, tl.int32), is_pure=True, pack=1)

    @triton.jit
    def _mma_prmt(a, b, HI: tl.constexpr, INTERPRET: tl.constexpr):
        """(low half of a, low half of b) or, HI, (high half of a, high half of b): one prmt."""
        if INTERPRET:
            if HI:
                return ((a >> 16) & 0xFFFF) | (b & -65536)
            return (a & 0xFFFF) | (b << 16)
        return tl.inline_asm_elementwise(_MMA_PRMT_HI if HI else _MMA_PRMT_LO, "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _mma_silu_pair(g, u, HI: tl.constexpr, BF16: tl.constexpr):
        """silu(gate) * up for one 16-bit half of a register of gates and one of ups, each step rounded to the
        activations' dtype as torch rounds it, as fp32."""
        dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
        gf = _mma_half(g, HI, BF16)
        s = (gf / (1.0 + tl.exp(-gf))).to(dt).to(tl.float32)
        return (s * _mma_half(u, HI, BF16)).to(dt).to(tl.float32)

    @triton.jit
    def _mma_ldx(xp, kcol, K, live, PRO_SILU: tl.constexpr, BF16: tl.constexpr, INTERPRET: tl.constexpr):
        """The B registers of nibble pair t for the lane's four words i = 0..3: (x[k + i], x[k + 64 + i]) with
        k = kcol (the lane's column 16 t + 4c of the chunk), the activations' 16-bit patterns as they are, or with
        PRO_SILU silu(gate) * up computed from [gate | up] and rounded. Zeros past K and where live is False."""
        mlo = live & (kcol < K)
        mhi = live & (kcol + 64 < K)
        lo0, lo1 = _mma_ld2(xp + kcol, mlo, INTERPRET)
        hi0, hi1 = _mma_ld2(xp + kcol + 64, mhi, INTERPRET)
        if PRO_SILU:
            ul0, ul1 = _mma_ld2(xp + K + kcol, mlo, INTERPRET)
            uh0, uh1 = _mma_ld2(xp + K + kcol + 64, mhi, INTERPRET)
            return (_h2_pack(_mma_silu_pair(lo0, ul0, False, BF16), _mma_silu_pair(hi0, uh0, False, BF16), BF16),
                    _h2_pack(_mma_silu_pair(lo0, ul0, True, BF16), _mma_silu_pair(hi0, uh0, True, BF16), BF16),
                    _h2_pack(_mma_silu_pair(lo1, ul1, False, BF16), _mma_silu_pair(hi1, uh1, False, BF16), BF16),
                    _h2_pack(_mma_silu_pair(lo1, ul1, True, BF16), _mma_silu_pair(hi1, uh1, True, BF16), BF16))
        return (_mma_prmt(lo0, hi0, False, INTERPRET), _mma_prmt(lo0, hi0, True, INTERPRET),
                _mma_prmt(lo1, hi1, False, INTERPRET), _mma_prmt(lo1, hi1, True, INTERPRET))

    @triton.jit
    def _mma_lds(ptr, live, KIND: tl.constexpr, INTERPRET: tl.constexpr):
        """One scale or zero point as fp32 (KIND 0 fp32, 1 bf16, 2 fp16 as stored); 0 where live is False."""
        if INTERPRET:
            return tl.load(ptr, mask=live, other=0.0).to(tl.float32)
        return tl.inline_asm_elementwise(_MMA_LD_F32 if KIND == 0 else _MMA_LD_BF16 if KIND == 1 else _MMA_LD_F16,
                                         "=f,l,r", [ptr.to(tl.int64), live.to(tl.int32)], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _mma_st(ptr, v, live, KIND: tl.constexpr, INTERPRET: tl.constexpr):
        """Store fp32 v at ptr where live (KIND as in _mma_lds: the output's dtype, rounded to nearest)."""
        if INTERPRET:
            tl.store(ptr, v.to(ptr.dtype.element_ty), mask=live)
        else:
            tl.inline_asm_elementwise(_MMA_ST_F32 if KIND == 0 else _MMA_ST_BF16 if KIND == 1 else _MMA_ST_F16,
                                      "=r,l,f,r", [ptr.to(tl.int64), v, live.to(tl.int32)], dtype=tl.int32,
                                      is_pure=False, pack=1)

    @triton.jit
    def _mma_xsum(c0, c1, c2, c3, bp0, bp1, bp2, bp3, NW: tl.constexpr, BF16: tl.constexpr, INTERPRET: tl.constexpr):
        """Adds to c0 (every lane) the sum of the activations in the B registers of one word position's four nibble
        pairs: two MMAs against an all-ones A."""
        ones = tl.full((1, NW, 32), 0x3F803F80 if BF16 else 0x3C003C00, tl.int32)  # two 1.0s
        c0, c1, c2, c3 = _mma16816(ones, ones, ones, ones, bp0, bp1, c0, c1, c2, c3, NW, BF16, INTERPRET)
        return _mma16816(ones, ones, ones, ones, bp2, bp3, c0, c1, c2, c3, NW, BF16, INTERPRET)

    @triton.jit
    def _mma_word(c0, c1, c2, c3, wg, wh, bp0, bp1, bp2, bp3, R: tl.constexpr, NW: tl.constexpr, BF16: tl.constexpr,
                  INTERPRET: tl.constexpr):
        """One word position of a chunk for every slot: the codes of rows g and g + 8 (words wg, wh) against the B
        registers of its four nibble pairs, two MMAs added to c0..c3."""
        ga0, ga1, ga2, ga3 = _mma_codes(wg, BF16, INTERPRET)  # row g, nibble pairs t = 0..3
        ha0, ha1, ha2, ha3 = _mma_codes(wh, BF16, INTERPRET)  # row g + 8
        c0, c1, c2, c3 = _mma16816(ga0, ha0, ga1, ha1, tl.broadcast_to(bp0, (R, NW, 32)),
                                   tl.broadcast_to(bp1, (R, NW, 32)), c0, c1, c2, c3, R * NW, BF16, INTERPRET)
        return _mma16816(ga2, ha2, ga3, ha3, tl.broadcast_to(bp2, (R, NW, 32)), tl.broadcast_to(bp3, (R, NW, 32)),
                         c0, c1, c2, c3, R * NW, BF16, INTERPRET)

    @triton.jit
    def _mma_words(wg_ptr, wh_ptr, ch, c_end, mask_g, mask_h, zr, INTERPRET: tl.constexpr):
        """The lane's four words of rows g and g + 8 in chunk ch (zeros past N or for a chunk at or past c_end)."""
        w0, w1, w2, w3 = _mma_ld4(wg_ptr + ch * 16, mask_g & ((ch + zr) < c_end), INTERPRET)
        w4, w5, w6, w7 = _mma_ld4(wh_ptr + ch * 16, mask_h & ((ch + zr) < c_end), INTERPRET)
        return w0, w1, w2, w3, w4, w5, w6, w7

    @triton.jit
    def _mma_chunk(acc_g, acc_h, g0, g1, g2, g3, h0, h1, h2, h3, ch, c_end, xp, c4, K,
                   sg_ptr, zg_ptr, sh_ptr, zh_ptr, mask_g, mask_h,
                   R: tl.constexpr, NW: tl.constexpr, PRO_SILU: tl.constexpr, BF16: tl.constexpr,
                   S_KIND: tl.constexpr, Z_KIND: tl.constexpr, INTERPRET: tl.constexpr):
        """One chunk of 128 columns (one group) for the R x NW slots: acc += s (sum (BIAS + q) x - (BIAS + z) X)
        for rows g (acc_g) and g + 8 (acc_h) of every slot; nothing for a chunk at or past c_end."""
        BIAS: tl.constexpr = 128.0 if BF16 else 1024.0
        live_x = (ch + tl.zeros((1, NW, 32), tl.int32)) < c_end
        kc = ch * 128 + c4  # (1, 1, 32)
        b00, b01, b02, b03 = _mma_ldx(xp, kc, K, live_x, PRO_SILU, BF16, INTERPRET)  # bti: pair t, word i
        b10, b11, b12, b13 = _mma_ldx(xp, kc + 16, K, live_x, PRO_SILU, BF16, INTERPRET)
        b20, b21, b22, b23 = _mma_ldx(xp, kc + 32, K, live_x, PRO_SILU, BF16, INTERPRET)
        b30, b31, b32, b33 = _mma_ldx(xp, kc + 48, K, live_x, PRO_SILU, BF16, INTERPRET)
        z1 = tl.zeros((1, NW, 32), tl.float32)
        # X = the chunk's activations summed by the tensor cores (all-ones A), two chains of four MMAs
        xa, u1, u2, u3 = _mma_xsum(z1, z1, z1, z1, b00, b10, b20, b30, NW, BF16, INTERPRET)  # words 0 and 2
        xa, u1, u2, u3 = _mma_xsum(xa, u1, u2, u3, b02, b12, b22, b32, NW, BF16, INTERPRET)
        xb, v1, v2, v3 = _mma_xsum(z1, z1, z1, z1, b01, b11, b21, b31, NW, BF16, INTERPRET)  # words 1 and 3
        xb, v1, v2, v3 = _mma_xsum(xb, v1, v2, v3, b03, b13, b23, b33, NW, BF16, INTERPRET)
        xs = xa + xb
        zero = tl.zeros((R, NW, 32), tl.float32)
        # the weights: words 0 and 2 in one chain of MMAs, 1 and 3 in another (two chains in flight)
        p0, p1, p2, p3 = _mma_word(zero, zero, zero, zero, g0, h0, b00, b10, b20, b30, R, NW, BF16, INTERPRET)
        q0, q1, q2, q3 = _mma_word(zero, zero, zero, zero, g1, h1, b01, b11, b21, b31, R, NW, BF16, INTERPRET)
        p0, p1, p2, p3 = _mma_word(p0, p1, p2, p3, g2, h2, b02, b12, b22, b32, R, NW, BF16, INTERPRET)
        q0, q1, q2, q3 = _mma_word(q0, q1, q2, q3, g3, h3, b03, b13, b23, b33, R, NW, BF16, INTERPRET)
        live_g = mask_g & ((ch + tl.zeros((R, NW, 32), tl.int32)) < c_end)
        live_h = mask_h & ((ch + tl.zeros((R, NW, 32), tl.int32)) < c_end)
        sg = _mma_lds(sg_ptr + ch, live_g, S_KIND, INTERPRET)
        zg = _mma_lds(zg_ptr + ch, live_g, Z_KIND, INTERPRET)
        sh = _mma_lds(sh_ptr + ch, live_h, S_KIND, INTERPRET)
        zh = _mma_lds(zh_ptr + ch, live_h, Z_KIND, INTERPRET)
        acc_g += sg * ((p0 + q0) - (BIAS + zg) * xs)
        acc_h += sh * ((p2 + q2) - (BIAS + zh) * xs)
        return acc_g, acc_h

    @triton.jit
    def _wo_gemv_mma_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        N, K, stride_wn, stride_sn, stride_ys, K_CHUNK,
        PRO_SILU: tl.constexpr, BLOCK_N: tl.constexpr, NW: tl.constexpr, S_KIND: tl.constexpr, Z_KIND: tl.constexpr,
        Y_KIND: tl.constexpr, PDL: tl.constexpr = False, INTERPRET: tl.constexpr = False, BF16: tl.constexpr = True,
        EARLY: tl.constexpr = False,
    ):
        """An int4 WordWeight (groups of 128), one activation row, on the tensor cores: BLOCK_N // 16 slots of 16 rows
        (R per warp, NW warps), one mma.sync m16n8k16 per slot, word and pair of nibbles; two chunks of 128 columns
        per loop step, the next step's words loaded (into registers) before this step's MMAs. Lane 4 g + c of a warp
        loads words 4c..4c+3 of rows g and g + 8 of each of its slots (128 bits each), and one lop3 per register turns
        a word's nibbles t and t + 4 into two 16-bit floats BIAS + q (_mma_codes: three shifts and four lop3 per eight
        codes, no conversion or subtraction). The activations meet them as the B operand, each column of B the same
        vector (so the eight columns of the result are equal), prepared once per warp and chunk for its R slots. Per
        chunk of 128 columns (one group):

            sum_k (q_k - z) x_k s = s (sum_k (BIAS + q_k) x_k - (BIAS + z) X),   X = sum_k x_k,

        where the first sum is what the eight MMAs of the chunk accumulate (fp32) and X comes from eight more MMAs of
        the same activations against an all-ones A (per warp, shared by its slots). Products are exact (codes and
        activations are 16-bit floats); the activations are rounded to bf16 (fp16) once, which they already are
        unless PRO_SILU computes silu(gate) * up here. Tensors are (R, NW, 32): one warp per element of the middle
        dimension and one lane per element of the last (see the note at the head of this section)."""
        R: tl.constexpr = BLOCK_N // (16 * NW)
        pid_k = tl.program_id(1)
        ch_lo = pid_k * K_CHUNK // 128
        c_end = tl.minimum((K + 127) // 128, ch_lo + K_CHUNK // 128)  # this program's chunks: ch_lo .. c_end - 1
        lane = tl.arange(0, 32)[None, None, :]
        c4 = (lane % 4) * 4  # the lane's first word of a chunk: j = 4c + i, i = 0..3
        slot = tl.arange(0, R)[:, None, None] * NW + tl.arange(0, NW)[None, :, None]
        rows_g = tl.program_id(0) * BLOCK_N + slot * 16 + lane // 4  # (R, NW, 32)
        rows_h = rows_g + 8
        mask_g = rows_g < N
        mask_h = rows_h < N
        wg_ptr = w_ptr + rows_g * stride_wn + c4  # the lane's 4 words of row g, chunk 0
        wh_ptr = w_ptr + rows_h * stride_wn + c4
        sg_ptr = s_ptr + rows_g * stride_sn  # the scales and zeros of each lane's two rows, chunk 0
        zg_ptr = z_ptr + rows_g * stride_sn
        sh_ptr = s_ptr + rows_h * stride_sn
        zh_ptr = z_ptr + rows_h * stride_sn
        xp = x_ptr + tl.zeros((1, NW, 1), tl.int32)  # each warp reads the activations itself
        acc_g = tl.zeros((R, NW, 32), tl.float32)
        acc_h = tl.zeros((R, NW, 32), tl.float32)
        zr = tl.zeros((R, NW, 32), tl.int32)
        # the first step's words depend on no earlier kernel: loaded before the PDL wait
        a0, a1, a2, a3, a4, a5, a6, a7 = _mma_words(wg_ptr, wh_ptr, ch_lo, c_end, mask_g, mask_h, zr, INTERPRET)
        b0, b1, b2, b3, b4, b5, b6, b7 = _mma_words(wg_ptr, wh_ptr, ch_lo + 1, c_end, mask_g, mask_h, zr, INTERPRET)
        _pdl_enter(PDL)
        for ch in tl.range(ch_lo, c_end, 2):
            nx = ch + 2  # the next step's words, in flight during this step's MMAs
            # EARLY: a run-time branch that is always taken (K > 0), a basic block of its own that ptxas leaves at the
            # loop's top; without it the condition is a compile-time True and the loads are straight-line code
            if not EARLY or K > 0:
                n0, n1, n2, n3, n4, n5, n6, n7 = _mma_words(wg_ptr, wh_ptr, nx, c_end, mask_g, mask_h, zr, INTERPRET)
                m0, m1, m2, m3, m4, m5, m6, m7 = _mma_words(wg_ptr, wh_ptr, nx + 1, c_end, mask_g, mask_h, zr,
                                                            INTERPRET)
            else:  # never runs
                n0, n1, n2, n3, n4, n5, n6, n7 = zr, zr, zr, zr, zr, zr, zr, zr
                m0, m1, m2, m3, m4, m5, m6, m7 = zr, zr, zr, zr, zr, zr, zr, zr
            acc_g, acc_h = _mma_chunk(acc_g, acc_h, a0, a1, a2, a3, a4, a5, a6, a7, ch, c_end, xp, c4, K,
                                      sg_ptr, zg_ptr, sh_ptr, zh_ptr, mask_g, mask_h, R, NW, PRO_SILU, BF16,
                                      S_KIND, Z_KIND, INTERPRET)
            acc_g, acc_h = _mma_chunk(acc_g, acc_h, b0, b1, b2, b3, b4, b5, b6, b7, ch + 1, c_end, xp, c4, K,
                                      sg_ptr, zg_ptr, sh_ptr, zh_ptr, mask_g, mask_h, R, NW, PRO_SILU, BF16,
                                      S_KIND, Z_KIND, INTERPRET)
            a0, a1, a2, a3, a4, a5, a6, a7 = n0, n1, n2, n3, n4, n5, n6, n7
            b0, b1, b2, b3, b4, b5, b6, b7 = m0, m1, m2, m3, m4, m5, m6, m7
        first = (lane % 4 == 0) & (zr == 0)  # the four lanes of a row hold the same sums: one stores
        _mma_st(y_ptr + pid_k * stride_ys + rows_g, acc_g, mask_g & first, Y_KIND, INTERPRET)
        _mma_st(y_ptr + pid_k * stride_ys + rows_h, acc_h, mask_h & first, Y_KIND, INTERPRET)

    @triton.jit
    def _half_pair(v, dt: tl.constexpr):
        """An int32 holding two 16-bit float bit patterns -> (low half, high half) as floats of type dt."""
        return v.to(tl.int16).to(dt, bitcast=True), (v >> 16).to(tl.int16).to(dt, bitcast=True)

    @triton.jit
    def _wo_gemv_tc_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
        M, N, K, stride_xm, stride_wn, stride_sn, stride_ym, stride_ys, K_CHUNK, MAGIC, BIAS,
        PRO_SILU: tl.constexpr, WORDS: tl.constexpr,
        BLOCK_N: tl.constexpr, NG: tl.constexpr, BLOCK_M: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """int4 (Int4Weight, groups of 128) on the tensor cores: codes become 16-bit floats with one masked OR per
        two codes, then ``tl.dot`` with the activations, fp32 accumulation. The packed bytes are read as int32
        words: word w of a group holds columns 8w..8w+7, the code of column 8w + n in nibble n; with WORDS the
        weight is a WordWeight (int4) and nibble n of word w holds column 16n + w. Only the order in which the
        activations are gathered differs.

        ``(word >> 4p) & 0x000F000F | MAGIC`` puts nibbles p and p + 4 in the two halves of an int32 as the floats
        ``BIAS + code`` (MAGIC: the bits of BIAS twice; BIAS = 128 for bf16, 1024 for fp16, where the spacing of
        floats is exactly 1), so no conversion instruction runs per code. The zero point is factored out:
        ``sum_k x_k (q_k - z) s = s (sum_k x_k (BIAS + q_k)) - s (BIAS + z) sum_k x_k`` per group; the dot gives the
        first sum for a whole (BLOCK_N, 128) tile, the second is one multiply-add per row and group.
        BLOCK_M = 1: the activation row is broadcast to the 16 columns the MMA needs; else up to 16 rows of x.
        PRO_SILU: x is [gate | up], the kernel multiplies by silu(gate) * up on the fly (as the other kernels).
        """
        dt: tl.constexpr = x_ptr.dtype.element_ty
        _pdl_enter(PDL)
        pid_k, k_lo, k_hi, offs_n, mask_n = _program_tile(N, K, K_CHUNK, BLOCK_N)
        offs_w = tl.arange(0, 16)
        offs_c = tl.arange(0, 128)
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        acc = tl.zeros((BLOCK_N, 16), tl.float32)
        zt = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for k0 in range(k_lo, k_hi, 128 * NG):
            for gi in tl.static_range(NG):
                g = k0 // 128 + gi
                wp = w_ptr + offs_n[:, None] * stride_wn + g * 16 + offs_w[None, :]
                if EVEN:
                    wd = tl.load(wp)  # (BLOCK_N, 16) int32
                    z = tl.load(z_ptr + offs_n * stride_sn + g).to(tl.float32)
                    s = tl.load(s_ptr + offs_n * stride_sn + g).to(tl.float32)
                    xmask = mask_m
                else:  # rows past N, groups past K: zero scale and activations
                    live = mask_n & ((tl.zeros_like(offs_n) + g) < (K + 127) // 128)
                    wd = tl.load(wp, mask=live[:, None], other=0)
                    z = tl.load(z_ptr + offs_n * stride_sn + g, mask=live, other=0.0).to(tl.float32)
                    s = tl.load(s_ptr + offs_n * stride_sn + g, mask=live, other=0.0).to(tl.float32)
                    xmask = mask_m & ((tl.zeros_like(offs_m) + g) < (K + 127) // 128)
                l0, h0 = _half_pair((wd & 0x000F000F) | MAGIC, dt)
                l1, h1 = _half_pair(((wd >> 4) & 0x000F000F) | MAGIC, dt)
                l2, h2 = _half_pair(((wd >> 8) & 0x000F000F) | MAGIC, dt)
                l3, h3 = _half_pair(((wd >> 12) & 0x000F000F) | MAGIC, dt)
                # tile order along K: element 8 w + 2 p + c is nibble p + 4 c of word w (c = 0: low half). Each
                # masked-OR result is then two neighbouring elements, stored for the MMA as it is.
                lo = tl.join(tl.join(l0, l2), tl.join(l1, l3))  # (BLOCK_N, 16, 2, 2): p = 2 i + j
                hi = tl.join(tl.join(h0, h2), tl.join(h1, h3))
                a = tl.reshape(tl.join(lo, hi), (BLOCK_N, 128))  # BIAS + code, exact
                # the activations in the same order. Packed bytes: element 8 w + 2 p + c is column 8 w + p + 4 c;
                # WORDS (wo.interleave layout, nibble n of word w is column 16 n + w): column 16 (p + 4 c) + w
                if BLOCK_M == 1 and EVEN:
                    xr = _load_x(x_ptr, g * 128 + offs_c, offs_c < 128, K, PRO_SILU)[None, :]  # (1, 128)
                else:
                    xr = _load_x(x_ptr + offs_m[:, None] * stride_xm, g * 128 + offs_c[None, :],
                                 xmask[:, None] & (g * 128 + offs_c < K)[None, :], K, PRO_SILU)  # (BLOCK_M, 128)
                xr = xr.to(dt)
                xs = tl.sum(xr.to(tl.float32), axis=1)  # (BLOCK_M,) fp32 sums of the activations as the dot sees them
                if WORDS:
                    xr = tl.reshape(tl.permute(tl.reshape(xr, (BLOCK_M, 2, 4, 16)), (0, 3, 2, 1)), (BLOCK_M, 128))
                else:
                    xr = tl.reshape(tl.permute(tl.reshape(xr, (BLOCK_M, 16, 2, 4)), (0, 1, 3, 2)), (BLOCK_M, 128))
                xt = tl.trans(xr)  # (128, BLOCK_M)
                if BLOCK_M == 1:
                    xt = tl.broadcast_to(xt, (128, 16))
                acc += s[:, None] * tl.dot(a, xt)  # (BLOCK_N, 16)
                zt += (s * (z + BIAS))[:, None] * xs[None, :]
        if BLOCK_M == 1:
            out = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, acc, 0.0), axis=1, keep_dims=True) - zt
        else:
            out = acc - zt
        y_ptrs = y_ptr + pid_k * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])

    @triton.jit
    def _tc8_dot(acc, w, x_rows, kk, mask_m, K, PRO_SILU: tl.constexpr, dt: tl.constexpr):
        """acc (BLOCK_N, BLOCK_M) += the (BLOCK_N, BLOCK_K) int8 codes w, as dt (exact), times the activations of the
        columns kk, (BLOCK_K, BLOCK_M), in one tl.dot."""
        xt = _load_x(x_rows, kk[:, None], mask_m[None, :] & (kk < K)[:, None], K, PRO_SILU)
        return acc + tl.dot(w.to(tl.float32).to(dt), xt.to(dt))

    @triton.jit
    def _wo_gemv_tc8_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr,
        M, N, K, stride_xm, stride_wn, stride_ym, stride_ys, K_CHUNK,
        PRO_SILU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """int8 rows (Int8Weight) for a batch of up to 16 activation rows, on the tensor cores: each (BLOCK_N,
        BLOCK_K) tile of codes becomes bf16/fp16 (every code from -128 to 127 is exact in either) and meets the
        (BLOCK_K, BLOCK_M) activations in one ``tl.dot`` with fp32 accumulation; the row's scale multiplies the sum
        once at the end. The codes are dequantized once per tile for all rows of x, where the CUDA-core kernels
        reduce a product per row of x."""
        dt: tl.constexpr = x_ptr.dtype.element_ty
        pid_k, k_lo, k_hi, offs_n, mask_n = _program_tile(N, K, K_CHUNK, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        x_rows = x_ptr + offs_m[None, :] * stride_xm  # (1, BLOCK_M)
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        k_first = k_lo
        if PDL:  # the first tile of codes depends on no earlier kernel: load it before waiting for it
            kk = k_lo + offs_k
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=mask_n[:, None] & (kk < K)[None, :],
                        other=0)
            _pdl_enter(PDL)
            acc = _tc8_dot(acc, w, x_rows, kk, mask_m, K, PRO_SILU, dt)
            k_first = k_lo + BLOCK_K
        for k0 in range(k_first, k_hi, BLOCK_K):
            kk = k0 + offs_k
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=mask_n[:, None] & (kk < K)[None, :],
                        other=0)
            acc = _tc8_dot(acc, w, x_rows, kk, mask_m, K, PRO_SILU, dt)
        out = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + pid_k * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])

    @triton.jit
    def _sum_splits_kernel(p_ptr, y_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """y[i] = sum over s of p[s, i] (fp32 partials of a split-K GEMV), cast to y's dtype."""
        _pdl_enter(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), tl.float32)
        for sp in tl.static_range(SPLIT):
            acc += tl.load(p_ptr + sp * MN + offs, mask=mask, other=0.0)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- wrapper
@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters: output rows per program, K per loop step, warps."""

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    # "tile": any M, one weight tile reused by all rows; "acc": M = 1, element-wise accumulator (a hint: for
    # M > 1 the tile kernel runs); "tc": int4 on the tensor cores (_wo_gemv_tc_kernel, block_n >= 16, bf16/fp16
    # activations; Int4Weight or WordWeight). A WordWeight runs _wo_gemv_il1_kernel for "acc" at M = 1 (per-word
    # accumulators), otherwise _wo_gemv_il_kernel ("pf": each step's words loaded one step ahead); "h2": an int4
    # WordWeight at M = 1 with packed fp16 arithmetic (_wo_gemv_h2_kernel); "mma": an int4 WordWeight at M = 1 on the
    # tensor cores (_wo_gemv_mma_kernel, bf16/fp16 activations, block_n a multiple of 16 x num_warps, block_k 256).
    variant: str = "tile"
    split: int = 1  # split-K: programs along K write fp32 partials, a second small kernel sums them
    # software pipelining of the K loop's weight loads (the CUDA-core kernels: "tile", "acc", "h2"): None (or 1), a
    # plain loop (each step's loads wait for the step before to be done with its registers); n >= 2, Triton's pipeliner
    # copies the next n - 1 steps' weights into shared memory asynchronously (cp.async) while this step computes,
    # so more bytes are in flight per program
    stages: int | None = None
    # the packed-fp16 kernel ("h2") with its words copied by the tensor memory accelerator (TMA, Hopper and newer)
    # through a tensor descriptor (h2_descriptor), pipelined ``stages`` deep (2 or more): no load instruction per
    # thread for the weights, and the number of bytes in flight no longer bound by the registers. With "mma": the
    # Gluon kernel of wo_gluon, a ring of ``stages`` shared-memory slots, block_n 16 or 32 x num_warps, block_k a
    # multiple of 256
    tma: bool = False
    # with tma: a persistent grid of ``persist`` programs per SM (0: one program per row block), each taking every
    # programs-th row block of its split (_wo_gemv_h2p_kernel), its copies running ahead across row blocks
    persist: int = 0


# candidates the tuner tries; the first is the default when nothing was tuned
CANDIDATES = {
    0: [GemvConfig(8, 512, 4), GemvConfig(4, 1024, 4), GemvConfig(16, 256, 4), GemvConfig(16, 512, 8),
        GemvConfig(32, 256, 8), GemvConfig(2, 2048, 4)],
    1: [GemvConfig(8, 512, 4), GemvConfig(16, 512, 4), GemvConfig(8, 1024, 4), GemvConfig(32, 256, 8),
        GemvConfig(16, 1024, 8), GemvConfig(4, 2048, 4)],
    2: [GemvConfig(8, 512, 4), GemvConfig(16, 256, 4), GemvConfig(16, 512, 4), GemvConfig(32, 256, 8),
        GemvConfig(4, 1024, 4), GemvConfig(32, 512, 8)],
}
# the M = 1 element-wise-accumulator kernel, tried first for batch-1 decode
CANDIDATES_M1 = {
    0: [GemvConfig(2, 1024, 4, "acc"), GemvConfig(4, 512, 4, "acc"), GemvConfig(2, 2048, 8, "acc"),
        GemvConfig(8, 256, 4, "acc"), GemvConfig(4, 1024, 8, "acc")],
    1: [GemvConfig(4, 1024, 4, "acc"), GemvConfig(8, 512, 4, "acc"), GemvConfig(4, 2048, 8, "acc"),
        GemvConfig(16, 256, 4, "acc"), GemvConfig(8, 1024, 8, "acc")],
    2: [GemvConfig(8, 256, 4, "acc"), GemvConfig(16, 256, 4, "acc"), GemvConfig(8, 512, 4, "acc"),
        GemvConfig(16, 128, 4, "acc"), GemvConfig(32, 256, 8, "acc"), GemvConfig(4, 512, 4, "acc")],
}
# row-major int8 at one row, long K steps (32 KB of codes per program and step, more bytes in flight): on an H200 the
# fastest of a wider sweep for the 7B shape's qkv, gate_up and lm_head (results/nvidia-h200/gemv_int8_wide.json)
CANDIDATES_LONG_K = {1: [GemvConfig(8, 4096, 4), GemvConfig(8, 4096, 4, split=2)]}
# batch-1 configs with the K loop pipelined (GemvConfig.stages): on an H200 the fastest for the 7B shape's o and down
# in bf16 (10.5 / 27.9 us against 10.9 / 29.7 plain) and qkv and o in row-major int8 (15.7 / 7.3 us against 16.6 /
# 7.6), within 1-4% elsewhere or slower; the packed-fp16 word kernel was 11-23% slower pipelined at every GEMV, at
# the best of 2-4 stages (results/nvidia-h200/gemv_stages.json), so none is offered for it
CANDIDATES_STAGES = {0: [GemvConfig(4, 512, 4, "acc", stages=4), GemvConfig(4, 512, 4, "acc", stages=3)],
                     1: [GemvConfig(16, 256, 4, "acc", stages=4), GemvConfig(8, 512, 4, "acc", stages=3)]}
# split-K candidates: more rows per program (less re-reading of x) with enough programs along K
CANDIDATES_SPLIT = {
    0: [GemvConfig(8, 1024, 4, "acc", 2), GemvConfig(16, 512, 8, "acc", 4), GemvConfig(8, 512, 4, "tile", 4)],
    1: [GemvConfig(16, 1024, 4, "tile", 4), GemvConfig(32, 512, 8, "tile", 4), GemvConfig(16, 512, 4, "tile", 2),
        GemvConfig(32, 1024, 8, "tile", 8), GemvConfig(16, 1024, 4, "acc", 4), GemvConfig(32, 512, 8, "acc", 8)],
    2: [GemvConfig(32, 512, 4, "tile", 4), GemvConfig(64, 256, 8, "tile", 8), GemvConfig(32, 256, 4, "tile", 4),
        GemvConfig(16, 512, 4, "tile", 2), GemvConfig(32, 256, 4, "acc", 4), GemvConfig(64, 256, 8, "acc", 8)],
}
# WordWeight (interleaved int8 = kind 3, int4 = kind 4): any M, one kernel; rows per program x K per step.
# The best of a 7B-shape sweep on an H200 (scripts/gpu_decode.py sweep), the first one being the default.
CANDIDATES_IL = {
    3: [GemvConfig(16, 2048, 8), GemvConfig(32, 256, 4, split=4), GemvConfig(32, 512, 4, split=4),
        GemvConfig(16, 2048, 4, split=4), GemvConfig(8, 2048, 4)],
    4: [GemvConfig(16, 2048, 4), GemvConfig(16, 2048, 8), GemvConfig(64, 512, 4, split=4),
        GemvConfig(32, 1024, 4, split=4), GemvConfig(32, 512, 4, split=4), GemvConfig(8, 2048, 4),
        GemvConfig(16, 2048, 4, split=4)],
}
# WordWeight at M = 1 with per-word accumulators (_wo_gemv_il1_kernel: no reduction inside the K loop; fewer
# instructions per weight in the sm_90 SASS of Triton 3.9, more registers). Not among the tuner's candidates: on an
# H200 it was slower than the word kernel above at every 7B-shape GEMV (results/nvidia-h200/gemv_word_variants.json,
# beside the "pf" variant, also slower); tune(candidates=...) or scripts/gpu_decode.py (GEMV_SWEEP=variants) time it.
CANDIDATES_IL1 = {
    3: [GemvConfig(16, 2048, 8, "acc"), GemvConfig(16, 2048, 4, "acc"), GemvConfig(32, 1024, 4, "acc"),
        GemvConfig(32, 512, 4, "acc", split=4), GemvConfig(16, 1024, 4, "acc", split=2)],
    4: [GemvConfig(16, 2048, 4, "acc"), GemvConfig(32, 1024, 4, "acc"), GemvConfig(16, 2048, 8, "acc"),
        GemvConfig(32, 1024, 4, "acc", split=4), GemvConfig(32, 512, 4, "acc", split=4),
        GemvConfig(16, 2048, 4, "acc", split=4)],
}
# int4 WordWeight at M = 1 with packed fp16 arithmetic (_wo_gemv_h2_kernel, variant "h2"): fewer instructions per
# weight than either word kernel in the offline sm_90 SASS (Triton 3.6 and 3.9), activations rounded to fp16 (each
# chunk of 128 scaled by its own power of two) and each word's eight products summed in fp16. On an H200 it was the
# fastest config of every 7B-shape int4 GEMV, 9-25% ahead of the word kernel, and the int4 step went from 2.03 to
# 1.89 ms (results/nvidia-h200/decode_h2.json; that kernel scaled every activation by 1/16, which overflowed above
# about 16000). With the per-chunk scale (0.1-0.15 more instructions per weight offline) the tuner of decode.json
# (e130716) still chose it for four of the five GEMVs, and the step took 1.94 ms. TUNE_H2 = False leaves it (and the
# int8 variant below) out of tune()'s candidates (the fp32 word kernels only).
TUNE_H2 = True
CANDIDATES_H2 = [GemvConfig(32, 1024, 4, "h2"), GemvConfig(16, 2048, 4, "h2"), GemvConfig(32, 2048, 8, "h2"),
                 GemvConfig(32, 1024, 4, "h2", split=4), GemvConfig(32, 512, 4, "h2", split=4),
                 GemvConfig(64, 512, 4, "h2", split=4), GemvConfig(16, 2048, 4, "h2", split=4)]
# int8 WordWeight at M = 1 with packed fp16 arithmetic (the same kernel, BITS=8): two lop3 and two packed
# subtractions turn a word's four codes into fp16 (the fp32 int8 kernels spend 5.3-5.8 instructions per weight
# offline, against an issue budget of about 8 at an H200's bandwidth). Words per step as the int4 list's.
CANDIDATES_H2_INT8 = [GemvConfig(16, 1024, 4, "h2"), GemvConfig(32, 512, 4, "h2"), GemvConfig(16, 512, 4, "h2"),
                      GemvConfig(8, 2048, 4, "h2"), GemvConfig(32, 512, 4, "h2", split=2),
                      GemvConfig(16, 512, 4, "h2", split=4), GemvConfig(64, 256, 4, "h2", split=4)]
# the packed-fp16 kernel with its words copied by TMA (GemvConfig.tma) and pipelined: tried by tune() on a GPU that has
# the tensor memory accelerator (tma_supported). Offline (sm_90, Triton 3.6, scripts/sass_gemv.py) the int4 loop
# takes 128 registers instead of 168 and 3.5 instructions per weight instead of 3.0 (the loaded tile's register layout
# brings shuffles into the step); the int8 one 56 registers instead of 96 and 4.5 instructions instead of 3.25. On an
# H200 (results/nvidia-h200/gemv_tma_sweep.json, 737d7af; 2-4 stages, 7 tiles, split 1 or 4, beside every tuner
# candidate) it was the fastest config of four of the five 7B-shape GEMVs in both formats: int4 qkv 12.9 us against
# 13.8 for the same kernel without TMA, gate_up 20.3 against 23.8, down 15.5 against 17.6, lm_head 26.1 against
# 32.6 (51-65% of the read bandwidth); o (4096 x 4096) stayed faster without (6.9 against 7.5 us). int8 gained 3-5%
# (qkv 17.1 against 17.8 us, gate_up 26.8 against 28.3), about what the row-major int8 kernels of the step reach.
# The lists are the fastest of that sweep.
TUNE_TMA = True
CANDIDATES_H2_TMA = [GemvConfig(32, 1024, 4, "h2", stages=3, tma=True),
                     GemvConfig(32, 1024, 4, "h2", split=4, stages=2, tma=True),
                     GemvConfig(16, 2048, 4, "h2", stages=2, tma=True), GemvConfig(16, 1024, 4, "h2", stages=3, tma=True),
                     GemvConfig(32, 1024, 4, "h2", split=4, stages=3, tma=True)]
# The persistent form (GemvConfig.persist, _wo_gemv_h2p_kernel) is not among them: on an H200
# (results/nvidia-h200/gemv_persist_sweep.json, 2b3ee91; 1-4 programs per SM, six tiles, beside the same tiles one
# program per row block) it was slower at every int4 GEMV of the 7B shape, by 0-3% at 3-4 programs per SM (lm_head
# 26.0 against 25.9 us, down 16.2 against 15.9) and up to 30% at one (qkv 16.6 against 12.7 us): the copies running
# ahead across row blocks do not pay for the programs' unequal shares of row blocks.
CANDIDATES_H2_INT8_TMA = [GemvConfig(32, 512, 4, "h2", stages=3, tma=True),
                          GemvConfig(16, 1024, 4, "h2", stages=2, tma=True),
                          GemvConfig(32, 512, 4, "h2", split=4, stages=3, tma=True),
                          GemvConfig(16, 1024, 4, "h2", stages=3, tma=True)]
# int4 WordWeight at M = 1 on the tensor cores (variant "mma", _wo_gemv_mma_kernel): mma.sync from inline PTX, the
# codes by one lop3 per two and no subtraction, the activations' sum by MMAs too. Offline (sm_90, scripts/sass_gemv.py)
# about 2.2-2.3 instructions per weight at two 16-row slots per warp against 2.8-3.0 (packed fp16) and 3.5 (its TMA
# form), and its sums are exact products added in fp32 instead of fp16. On an H200 (results/nvidia-h200/gemv_mma_sweep.json,
# 73b7fb2; seven tiles of 1-4 slots per warp, split 1 or 4, beside every tuner candidate, all checked against the
# fp32 reference) it was slower at every 7B-shape GEMV called on its own: qkv 13.9 us against 12.9 for the TMA
# packed-fp16 kernel, o 9.5 against 6.9 (the packed kernel without TMA), gate_up 23.3 against 20.3, lm_head 31.1
# against 26.0, and down
# (silu(gate) * up computed by every warp for its own copy of the activations) 48.8 against 15.3. Fewer instructions
# did not buy bandwidth: its weight words in flight are registers (one step of two chunks ahead) where the TMA form
# keeps two or three steps in shared memory, and without a split it ran slower still (qkv 23.4 us). Those figures are
# calls of their own, the split-K ones with their reduction kernel; the step hands qkv's, o's and down's partial sums
# to the next kernel. Timed that way (gemv_mma_partials_sweep.json, 8a023f9, GEMV_PARTIALS=1) the qkv GEMV is
# fastest on the tensor cores: 12.2 us against 12.7 (TMA packed fp16); o, gate_up, down and lm_head stay with the
# CUDA-core kernels. In the step (decode_mma.json, same commit, two rounds each) the int4 token took 1.832-1.834 ms
# with these configs among tune()'s candidates against 1.857 without (47.4% -> 48.0% of the floor; the tuner chose
# the tensor cores for qkv only). TUNE_MMA puts them there; the list is the fastest of the 73b7fb2 sweep.
TUNE_MMA = True
CANDIDATES_MMA = [GemvConfig(64, 256, 2, "mma", split=4), GemvConfig(128, 256, 4, "mma", split=4),
                  GemvConfig(128, 256, 8, "mma", split=4), GemvConfig(64, 256, 2, "mma")]
# The same arithmetic with the words staged in shared memory by TMA (tma=True, a ring of ``stages`` slots; the Gluon
# kernel of wo_gluon): no registers hold the words in flight, and with PDL the first slots' copies go out before the
# wait for the kernel before. Tried by tune() where TMA exists (TUNE_MMA_TMA).
# On an NVIDIA H200 (7B shape, int4, timed as the step calls each GEMV): without PDL it was about level with the best
# CUDA-core kernel (results/nvidia-h200/gemv_mma_tma_sweep.json, c1476d6: qkv 12.6 us against 12.9, lm_head 25.3
# against 26.1, gate_up 20.7 against 20.4, o 7.0 against 6.2), and every deeper ring or longer K step was slower; with
# PDL, as the step's tuner times them, it took qkv 10.1 us against 11.1 (the register form) and gate_up 17.3 against
# 19.6 (packed fp16), and the int4 step went from 1.848 / 1.835 ms to 1.733 / 1.730 ms per token, 47.2-47.5% -> 50.3-50.4%
# of the floor, two rounds in one process (decode_mma_tma.json, c9a1fb6). The list is the fastest of that sweep.
# Since 925cab4 it also takes the down GEMV's silu(gate) * up prologue (into shared memory, once per program): its
# sums checked on the H200 (tests/test_wo_matmul.py::test_mma_tma_sums_like_the_register_form), its speed not yet
# measured; tune() times it beside the others like any candidate.
TUNE_MMA_TMA = True
CANDIDATES_MMA_TMA = [GemvConfig(128, 256, 4, "mma", split=4, stages=2, tma=True),
                      GemvConfig(64, 256, 2, "mma", split=4, stages=2, tma=True),
                      GemvConfig(64, 256, 2, "mma", split=2, stages=2, tma=True),
                      GemvConfig(64, 256, 2, "mma", stages=2, tma=True),
                      GemvConfig(128, 256, 4, "mma", split=2, stages=2, tma=True)]
_TUNED: dict = {}
# every config ``tune`` left out: {"config", "weight", "kind", "M", "error", "resources"} (+ "wrong_result": True when
# it ran but its sums failed ``check_config``)
TUNE_FAILURES: list[dict] = []
_TUNE_TIMES: dict = {}  # the key of ``_TUNED`` -> [(config, ms per call)] of every config ``tune`` timed


# int4 on the tensor cores (kinds 2 and 4, bf16/fp16 activations, groups of 128): 64 or 128 rows per program are the
# shapes Triton maps to Hopper's warpgroup MMA; split-K keeps enough programs for the narrow layers.
CANDIDATES_TC = [GemvConfig(64, 512, 4, "tc"), GemvConfig(64, 512, 4, "tc", 2), GemvConfig(64, 512, 4, "tc", 4),
                 GemvConfig(64, 256, 4, "tc", 4), GemvConfig(128, 256, 8, "tc"), GemvConfig(128, 512, 8, "tc", 2),
                 GemvConfig(64, 1024, 4, "tc")]


# int8 rows on the tensor cores for a batch (_wo_gemv_tc8_kernel, M > 1, bf16/fp16 activations): on an H200 the
# CUDA-core int8 GEMVs at 4 rows reached only 26-37% of the read bandwidth, behind cuBLAS in bf16 reading twice the
# bytes (results/nvidia-h200/gemv_int8_m4.json). With this kernel (gemv_int8_m4_tc.json) they took 26.1 / 12.1 /
# 45.9 / 31.4 / 57.0 us (qkv, o, gate_up, down, lm_head) against 40.8 / 16.2 / 67.0 / 44.2 / 90.7 us for the best
# CUDA-core config, 34-57% of the read bandwidth: ahead of cuBLAS bf16 except for down (28.5 us).
CANDIDATES_TC8 = [GemvConfig(64, 256, 4, "tc"), GemvConfig(64, 256, 4, "tc", 2), GemvConfig(64, 256, 4, "tc", 4),
                  GemvConfig(128, 128, 8, "tc"), GemvConfig(64, 512, 4, "tc", 2), GemvConfig(128, 256, 8, "tc", 4)]


def candidates_for(kind: int, M: int, dtype=torch.bfloat16, group: int = 128, tma: bool = False,
                   mma: bool = False) -> list:
    """The configs tune() tries for a weight kind (0 float, 1 int8, 2 int4, 3/4 WordWeight int8/int4) at M rows;
    the first is the default when nothing was tuned. ``tma``: the GPU has the tensor memory accelerator
    (``tma_supported``), so the packed-fp16 kernel's TMA configs are tried too (with TUNE_TMA); ``mma``: it runs
    mma.sync (``mma_supported``), so the int4 tensor-core configs are tried too (``TUNE_MMA``)."""
    tc = CANDIDATES_TC if kind in (2, 4) and group == 128 and dtype in (torch.bfloat16, torch.float16) else []
    if kind in CANDIDATES_IL:
        # one word layout, two kernels: CUDA cores for a single row, the tensor cores for a batch
        h2 = ({4: CANDIDATES_H2, 3: CANDIDATES_H2_INT8}[kind]
              if TUNE_H2 and M == 1 and dtype in (torch.bfloat16, torch.float16) else [])
        if h2 and tma and TUNE_TMA:
            h2 = h2 + {4: CANDIDATES_H2_TMA, 3: CANDIDATES_H2_INT8_TMA}[kind]
        if h2 and kind == 4 and mma and TUNE_MMA:
            h2 = h2 + CANDIDATES_MMA + (CANDIDATES_MMA_TMA if tma and TUNE_MMA_TMA else [])
        return CANDIDATES_IL[kind] + h2 + tc if M == 1 else tc + CANDIDATES_IL[kind]
    if kind == 1 and dtype in (torch.bfloat16, torch.float16):
        tc = [] if M == 1 else CANDIDATES_TC8
    if M == 1:
        return (tc + CANDIDATES_M1[kind] + CANDIDATES[kind] + CANDIDATES_SPLIT[kind] + CANDIDATES_LONG_K.get(kind, [])
                + CANDIDATES_STAGES.get(kind, []))
    return tc + CANDIDATES[kind] + CANDIDATES_SPLIT[kind]


def _kind(w) -> int:
    if isinstance(w, torch.Tensor):
        return 0
    if isinstance(w, Int8Weight):
        return 1
    if isinstance(w, Int4Weight):
        return 2
    if isinstance(w, WordWeight):
        return 3 if w.bits == 8 else 4
    raise TypeError(f"unsupported weight type {type(w).__name__}; use a tensor, Int8Weight, Int4Weight or WordWeight")


def _device(w) -> torch.device:
    return w.device if isinstance(w, torch.Tensor) else (w.q if isinstance(w, Int8Weight) else
                                                         w.packed if isinstance(w, Int4Weight) else w.words).device


def h2_descriptor(w: WordWeight, config: GemvConfig):
    """A TMA tensor descriptor over ``w.words`` for the packed-fp16 kernel at ``config``: the words seen as (N, K //
    128, 16) for int4 (a chunk's 16 words), (N, K // 128, 2, 16) for int8 (its two halves of 64 columns); one tile
    is the (block_n, block_k // 128, ...) words of one program's K step."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    N, nw = w.words.shape
    if w.bits == 4:
        shape, strides = [N, nw // 16, 16], [nw, 16, 1]
    else:
        shape, strides = [N, nw // 32, 2, 16], [nw, 32, 16, 1]
    return TensorDescriptor(w.words, shape, strides, h2_tile(w.bits, config))


def h2_tile(bits: int, config: GemvConfig) -> list:
    """The words one program copies per K step in the TMA form: (block_n, chunks of 128 columns, [2,] 16)."""
    return [config.block_n, config.block_k // 128] + ([16] if bits == 4 else [2, 16])


def _key(kind, N, K, M, silu, dtype, partials=False, pdl=False):
    return (kind, N, K, min(triton.next_power_of_2(M), MAX_M) if triton else M, silu, str(dtype), partials, pdl)


INTERPRETER_SMS = 3  # the SM count a persistent grid is sized for under the interpreter (a CPU has none)


def _sm_count(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def tma_fits(w) -> bool:
    """Whether a WordWeight has the shape the TMA form copies: whole 128-column chunks per row (int8 rows of 64-column
    chunks may end in half a chunk, as SmolLM2's 576 columns do) and 16-byte aligned words."""
    return (isinstance(w, WordWeight) and w.words.shape[1] % (16 if w.bits == 4 else 32) == 0
            and w.words.data_ptr() % 16 == 0)


def mma_supported(device) -> bool:
    """Whether variant 'mma' can run here: a CUDA GPU of compute capability 8.0 (Ampere) or newer, whose mma.sync
    takes bf16 operands."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


_MMA_LAYOUT_OK: dict = {}


def mma_layout_ok(ttgir: str) -> tuple[bool, str]:
    """Whether a compiled 'mma' GEMV (its TTGIR text) runs every mma.sync on tensors whose last dimension is the 32
    lanes of a warp, one element per lane (what the fragments assume), and names the offending layout if not."""
    import re

    layouts = dict(re.findall(r"^(#[\w]+) = (#ttg\.[^\n]+)$", ttgir, flags=re.M))
    found = 0
    for line in ttgir.splitlines():
        if "mma.sync" not in line:
            continue
        found += 1
        for name in set(re.findall(r"tensor<[^>]*?, (#[\w]+)>", line)):
            lay = layouts.get(name, "")
            tpw = re.search(r"threadsPerWarp = \[([\d, ]+)\]", lay)
            spt = re.search(r"sizePerThread = \[([\d, ]+)\]", lay)
            ok = (lay.startswith("#ttg.blocked") and tpw and spt
                  and [int(v) for v in tpw.group(1).split(",")][-1] == 32
                  and [int(v) for v in spt.group(1).split(",")][-1] == 1)
            if not ok:
                return False, f"{name} = {lay or 'not found'}"
    return (found > 0), ("" if found else "no mma.sync in the kernel")


def mma_layout_check(kernel) -> None:
    """Raise if the compiled 'mma' GEMV does not keep a warp's lanes on the last dimension (mma_layout_ok): its
    results would be wrong. Checked once per compiled kernel."""
    key = id(kernel)
    if key not in _MMA_LAYOUT_OK:
        _MMA_LAYOUT_OK[key] = mma_layout_ok(kernel.asm["ttgir"])
    ok, why = _MMA_LAYOUT_OK[key]
    if not ok:
        raise LabkitError(f"this Triton ({triton.__version__}) compiled the 'mma' GEMV with a register layout that "
                          f"does not give each lane its own MMA fragment ({why}); its results would be wrong. Use "
                          "variant 'h2' (the packed-fp16 kernel) on this Triton")


def tma_supported(device) -> bool:
    """Whether GemvConfig.tma can run here: a CUDA GPU of compute capability 9.0 (Hopper) or newer."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_supported(device) -> bool:
    """Whether kernels on ``device`` can use programmatic dependent launch (a CUDA GPU of compute capability 9.0+)."""
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9


def pdl_kwargs(pdl: bool, device) -> dict:
    """Launch arguments for a kernel with a ``PDL`` switch (``_pdl_enter``): programmatic dependent launch lets a
    kernel be scheduled while the one before it in the stream is still running (compute capability 9.0+)."""
    if not pdl:
        return {}
    if not pdl_supported(device):
        raise LabkitError("pdl=True (programmatic dependent launch) needs an NVIDIA GPU of compute capability 9.0 "
                          "or newer (Hopper); pass pdl=False")
    return {"PDL": True, "launch_pdl": True}


# K steps of its own weight rows that a word-layout GEMV program (the word kernel and the packed-fp16 one) asks L2
# to prefetch before its PDL wait, while the kernel before it still runs (0: none). Read at launch time, so a captured
# graph keeps the value it was captured with. The idea: with PDL a GEMV's programs are resident while the small
# kernel before them runs and HBM idles; today they load only their first step there. Prefetching from that small
# kernel itself made the step slower (fastgen.PREFETCH_L2; one explanation, not measured: the small kernel ends only
# once its requests are served, and the GEMV's PDL wait is for its end); here the GEMV's own programs ask. Measured
# on an NVIDIA H200 (scripts/gpu_decode.py rowpf -> results/nvidia-h200/decode_row_prefetch.json, 43bb006, configs
# tuned once and pinned, logits bit for bit equal): slower at 2 and at 64 steps, int4 1.967 -> 2.109 / 2.115 ms per
# token, int8 2.393 -> 2.844 / 2.842. Off.
ROW_PREFETCH = 0


# The tensor-core GEMV (variant "mma") is written to load the next K step's weight words while this step's MMAs run,
# but ptxas (Triton 3.6 and 3.9, sm_90) issues those loads at the end of the loop body, after the step's MMAs, so they
# have only the next step's activation loads to hide behind; it saves registers that way (146 per thread instead of
# 182 in the offline SASS of the first CANDIDATES_MMA config). With MMA_EARLY_LOADS the loads sit in a branch of their
# own that is always taken, a basic block ptxas leaves them in: all eight go out before the loop's first MMA
# (scripts/sass_gemv.py, rows int4-mma and int4-mma-early). On an NVIDIA H200 that was slower: the best tensor-core
# config of each 7B-shape int4 GEMV, timed as the step calls it, took qkv 14.9 us early against 12.1 late, gate_up 25.5
# against 23.7, lm_head 32.7 against 31.5, o 7.8 against 7.9, down 44.1 against 47.1, none of them the fastest kernel
# but qkv late (results/nvidia-h200/gemv_mma_early_sweep.json, 98742a9, every config checked against the fp32
# reference). The registers cost resident warps (at 182 per thread an SM holds 11 warps, at 146 13), and those
# hide the latency better than the earlier loads do. Off; read at launch time (a captured graph keeps its value).
MMA_EARLY_LOADS = False


def _row_pf(pdl: bool) -> int:
    return int(ROW_PREFETCH) if pdl and not flash_attn.interpreted() else 0


def wo_matmul(x: torch.Tensor, w, silu_gate_up: bool = False, config: GemvConfig | None = None,
              out: torch.Tensor | None = None, partials: bool = False, pdl: bool = False) -> torch.Tensor:
    """Triton GEMV: x (M, K) [or (M, 2K) = [gate | up] with silu_gate_up] times W^T -> (M, N) in x's dtype.

    w: (N, K) bf16/fp16 tensor, Int8Weight, Int4Weight or WordWeight. M must be at most 16 (use ``linear`` for
    any M). ``partials=True``: when the config splits K, return the (split, M, N) fp32 partial sums instead of
    reducing them (the consumer sums them, e.g. ``fastgen.add_rmsnorm_triton``); without a split, (M, N) as usual.
    ``pdl=True``: launch with programmatic dependent launch (see ``pdl_kwargs``; Hopper and newer).
    """
    if triton is None:
        raise LabkitError("wo_matmul needs Triton: pip install triton (Linux)")
    kind = _kind(w)
    N, K = w.shape
    if x.dim() != 2:
        raise ValueError(f"x must be (M, K), got {tuple(x.shape)}")
    M = x.shape[0]
    if x.shape[1] != K * (2 if silu_gate_up else 1):
        raise ValueError(f"x has {x.shape[1]} columns; the weight needs {K * (2 if silu_gate_up else 1)}")
    if not 1 <= M <= MAX_M:
        raise ValueError(f"wo_matmul is a GEMV for M in 1..{MAX_M} rows, got M={M}; use linear() for larger M")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be fp16/bf16/fp32, got {x.dtype}")
    if x.device != _device(w):
        raise ValueError("x and the weight must be on the same device")
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    cfg = config or config_for(w, M, x.dtype, silu_gate_up, partials, pdl)
    block_k = cfg.block_k
    if kind == 0:
        wp, sp, zp, stride_wn, stride_sn, group = w, w, w, w.stride(0), 0, 1
        if w.stride(1) != 1:
            raise ValueError("the weight must be contiguous along K")
    elif kind == 1:
        wp, sp, zp, stride_wn, stride_sn, group = w.q, w.scale, w.scale, w.q.stride(0), 0, 1
    elif kind >= 3:
        wp, sp, stride_wn = w.words, w.scale, w.words.stride(0)
        zp, stride_sn = (w.zero, w.scale.stride(0)) if kind == 4 else (w.scale, 0)
        group = 128 if kind == 4 else 64  # columns per 16-word chunk
        block_k = max(block_k, group)
        if w.words.stride(1) != 1:
            raise ValueError("WordWeight.words must be contiguous along K")
    else:
        wp, sp, zp, stride_wn, stride_sn, group = w.packed, w.scale, w.zero, w.packed.stride(0), w.scale.stride(0), w.group
        block_k = max(block_k, group)
        if block_k % group:
            raise ValueError(f"block_k={block_k} must be a multiple of the group size {group}")
    if cfg.persist and not cfg.tma:
        raise ValueError(f"persist={cfg.persist}: the persistent GEMV is the packed-fp16 kernel's TMA form; give tma=True")
    if cfg.tma and (cfg.variant not in ("h2", "mma") or kind < 3):
        raise ValueError("tma=True applies to the word-layout kernels 'h2' (packed fp16) and 'mma' (tensor cores) "
                         "only, with a WordWeight")
    if cfg.stages is not None and (cfg.stages < 1 or cfg.variant == "tc" or (cfg.variant == "mma" and not cfg.tma)
                                   or (kind >= 3 and cfg.variant not in ("h2", "mma"))):
        raise ValueError(f"stages={cfg.stages}: software pipelining takes an int >= 1 and applies to the CUDA-core "
                         "kernels ('tile', 'acc', and 'h2' for a WordWeight) and to the TMA ring of 'mma' with "
                         "tma=True; leave it None for the others")
    kw = pdl_kwargs(pdl, x.device)
    k_chunk = triton.cdiv(triton.cdiv(K, cfg.split), block_k) * block_k  # whole K blocks per split
    nsplit = triton.cdiv(K, k_chunk)
    grid = (triton.cdiv(N, cfg.block_n), nsplit)
    if nsplit > 1:
        y = torch.empty(nsplit, M, N, device=x.device, dtype=torch.float32)  # (split, M, N) partial sums
        if out.stride(0) != N:
            raise ValueError("split-K needs a contiguous output")
    else:
        y = out
    if cfg.variant == "tc" and kind == 1:
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"the 'tc' GEMV takes bf16/fp16 activations, got {x.dtype}")
        if block_k < 16 or block_k & (block_k - 1):
            raise ValueError(f"the int8 'tc' GEMV takes block_k a power of two >= 16, got {block_k}")
        _wo_gemv_tc8_kernel[grid](x, wp, sp, y, M, N, K, x.stride(0), stride_wn, N if nsplit > 1 else out.stride(0),
                                  M * N, k_chunk, PRO_SILU=silu_gate_up, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                                  BLOCK_M=16, num_warps=cfg.num_warps, **kw)
    elif cfg.variant == "tc":
        if kind not in (2, 4) or group != 128 or x.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError("the 'tc' GEMV takes int8 rows (Int8Weight), or int4 (Int4Weight or WordWeight) with "
                             "groups of 128, and bf16/fp16 activations")
        magic, bias = (0x43004300, 128.0) if x.dtype == torch.bfloat16 else (0x64006400, 1024.0)
        words = wp if kind == 4 else wp.view(torch.int32)
        _wo_gemv_tc_kernel[grid](x, words, sp, zp, y, M, N, K, x.stride(0), words.stride(0), stride_sn,
                                 N if nsplit > 1 else out.stride(0), M * N, k_chunk, magic, bias,
                                 PRO_SILU=silu_gate_up, WORDS=kind == 4, BLOCK_N=cfg.block_n, NG=block_k // 128,
                                 BLOCK_M=1 if M == 1 else 16, EVEN=N % cfg.block_n == 0 and K % k_chunk == 0,
                                 num_warps=cfg.num_warps, **kw)
    elif cfg.variant == "mma":
        if kind != 4 or M != 1:
            raise ValueError("the 'mma' GEMV (int4 on the tensor cores at one row) takes an int4 WordWeight "
                             f"(wo_matmul.interleave of an Int4Weight) and one row of x, got {type(w).__name__}"
                             f"{' of int8 codes' if kind == 3 else ''} and M={M}")
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"the 'mma' GEMV feeds the activations to the tensor cores as they are: bf16 or fp16, "
                            f"got {x.dtype} (convert x, or use variant 'h2')")
        if cfg.block_n % (16 * cfg.num_warps) or (block_k != 256 and not (cfg.tma and block_k % 256 == 0)):
            raise ValueError(f"the 'mma' GEMV takes block_n a multiple of 16 x num_warps (16 rows per MMA, every warp "
                             f"the same number of them) and block_k=256 (it steps through K two groups at a time; "
                             f"with tma=True a multiple of 256), "
                             f"got block_n={cfg.block_n}, num_warps={cfg.num_warps}, block_k={cfg.block_k}")
        if x.device.type == "cuda" and not mma_supported(x.device):
            raise LabkitError("the 'mma' GEMV runs mma.sync with bf16/fp16 inputs: a GPU of compute capability 8.0 "
                              f"(Ampere) or newer, this is {torch.cuda.get_device_name(x.device)}")
        if K % 4 or x.data_ptr() % 8 or w.words.data_ptr() % 16 or w.words.stride(0) % 4:
            raise ValueError("the 'mma' GEMV reads 4 activations (8 bytes) and 4 words (16 bytes) at a time: it needs "
                             "K a multiple of 4, x 8-byte aligned and each row of words 16-byte aligned")
        kinds = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
        if cfg.tma:
            _mma_tma(x, w, cfg, y, k_chunk, grid, silu_gate_up, kw)
        else:
            if w.scale.dtype not in kinds or w.zero.dtype not in kinds:
                raise TypeError(f"the 'mma' GEMV reads scales and zeros stored as fp32, bf16 or fp16, got "
                                f"{w.scale.dtype} / {w.zero.dtype}")
            k = _wo_gemv_mma_kernel[grid](x, wp, sp, zp, y, N, K, stride_wn, stride_sn, M * N, k_chunk,
                                          PRO_SILU=silu_gate_up, BLOCK_N=cfg.block_n, NW=cfg.num_warps,
                                          S_KIND=kinds[w.scale.dtype], Z_KIND=kinds[w.zero.dtype],
                                          Y_KIND=kinds[y.dtype], num_warps=cfg.num_warps,
                                          INTERPRET=flash_attn.interpreted(), BF16=x.dtype == torch.bfloat16,
                                          EARLY=bool(MMA_EARLY_LOADS), **kw)
            if not flash_attn.interpreted():
                mma_layout_check(k)
    elif cfg.variant == "h2":
        if kind < 3 or M != 1:
            raise ValueError("the 'h2' GEMV (packed fp16 arithmetic) takes an int4 or int8 WordWeight "
                             f"(wo_matmul.interleave) and one row of x, got {type(w).__name__} and M={M}")
        if block_k % 128:
            raise ValueError(f"the 'h2' GEMV takes block_k in whole chunks of 128 columns, got {cfg.block_k}")
        if cfg.tma:
            if cfg.stages is None or cfg.stages < 2:
                raise ValueError(f"tma=True copies each K step's words ahead of their use: give stages >= 2, got "
                                 f"{cfg.stages}")
            if x.device.type == "cuda" and not tma_supported(x.device):
                raise LabkitError("tma=True needs the tensor memory accelerator of a Hopper (sm_90) or newer GPU, "
                                  f"this is {torch.cuda.get_device_name(x.device)}: leave tma False")
            if not tma_fits(w):
                raise ValueError("tma=True needs whole chunks of 128 columns per row and 16-byte aligned words")
            wp = h2_descriptor(w, cfg)
        if cfg.persist:
            if not cfg.tma or cfg.persist < 0:
                raise ValueError(f"persist={cfg.persist}: the persistent GEMV takes tma=True and a count of programs "
                                 "per SM >= 1")
            sms = _sm_count(x.device)
            pgrid = (min(grid[0], cfg.persist * sms), grid[1])
            _wo_gemv_h2p_kernel[pgrid](x, wp, sp, zp, y, N, K, stride_sn, M * N, k_chunk, PRO_SILU=silu_gate_up,
                                       BLOCK_N=cfg.block_n, BLOCK_K=block_k, STAGES=cfg.stages,
                                       num_warps=cfg.num_warps, RAGGED=K % 128 != 0,
                                       EVEN=N % cfg.block_n == 0 and K % k_chunk == 0 and K % 128 == 0,
                                       INTERPRET=flash_attn.interpreted(), BITS=8 if kind == 3 else 4, **kw)
        else:
            _wo_gemv_h2_kernel[grid](x, wp, sp, zp, y, N, K, stride_wn, stride_sn, M * N, k_chunk,
                                     PRO_SILU=silu_gate_up, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                                     num_warps=cfg.num_warps, RAGGED=K % 128 != 0,
                                     EVEN=N % cfg.block_n == 0 and K % k_chunk == 0 and K % 128 == 0,
                                     INTERPRET=flash_attn.interpreted(), BITS=8 if kind == 3 else 4,
                                     STAGES=cfg.stages, ROW_PF=_row_pf(pdl), TMA=cfg.tma, **kw)
    elif kind >= 3 and cfg.variant == "acc" and M == 1:
        _wo_gemv_il1_kernel[grid](x, wp, sp, zp, y, N, K, stride_wn, stride_sn, M * N, k_chunk,
                                  0x3F800000 if kind == 4 else 0x3FC00000, BITS=8 if kind == 3 else 4,
                                  PRO_SILU=silu_gate_up, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                                  num_warps=cfg.num_warps, RAGGED=K % group != 0,
                                  EVEN=N % cfg.block_n == 0 and K % k_chunk == 0 and K % group == 0, **kw)
    elif kind >= 3:
        block_m = max(1, triton.next_power_of_2(M))
        _wo_gemv_il_kernel[grid](x, wp, sp, zp, y, M, N, K, x.stride(0), stride_wn, stride_sn,
                                 N if nsplit > 1 else out.stride(0), M * N, k_chunk,
                                 0x3F800000 if kind == 4 else 0x3FC00000, BITS=8 if kind == 3 else 4,
                                 PRO_SILU=silu_gate_up, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                                 num_warps=cfg.num_warps, RAGGED=K % group != 0, PREFETCH=cfg.variant == "pf",
                                 ROW_PF=_row_pf(pdl), **kw)
    elif cfg.variant == "acc" and M == 1:
        _wo_gemv1_kernel[grid](x, wp, sp, zp, y, N, K, stride_wn, stride_sn, M * N, k_chunk, KIND=kind, GROUP=group,
                               PRO_SILU=silu_gate_up, BLOCK_N=cfg.block_n, BLOCK_K=block_k, num_warps=cfg.num_warps,
                               STAGES=cfg.stages, **kw)
    else:
        block_m = max(1, triton.next_power_of_2(M))
        _wo_gemv_kernel[grid](x, wp, sp, zp, y, M, N, K, x.stride(0), stride_wn, stride_sn, N if nsplit > 1 else out.stride(0),
                              M * N, k_chunk, KIND=kind, GROUP=group, PRO_SILU=silu_gate_up, BLOCK_M=block_m,
                              BLOCK_N=cfg.block_n, BLOCK_K=block_k, num_warps=cfg.num_warps, STAGES=cfg.stages,
                              **kw)
    if nsplit > 1 and partials:
        return y
    if nsplit > 1:
        _sum_splits_kernel[(triton.cdiv(M * N, 1024),)](y, out, M * N, SPLIT=nsplit, BLOCK=1024, num_warps=4, **kw)
    return out


def _mma_tma(x, w, cfg: GemvConfig, y, k_chunk: int, grid: tuple, silu: bool, kw: dict) -> None:
    """The tensor-core GEMV with its words staged in shared memory by TMA (``wo_gluon``): its checks and launch, into
    y (the output, or the split-K partials ``wo_matmul`` sums or hands on)."""
    from labkit.kernels import wo_gluon

    if cfg.block_n not in (16 * cfg.num_warps, 32 * cfg.num_warps):
        raise ValueError(f"the 'mma' GEMV with tma=True takes block_n = 16 or 32 x num_warps (one or two 16-row MMAs "
                         f"per warp), got block_n={cfg.block_n}, num_warps={cfg.num_warps}")
    if cfg.stages is None or cfg.stages < 2:
        raise ValueError(f"tma=True copies K steps ahead of their use into a ring of shared-memory slots: give "
                         f"stages >= 2, got {cfg.stages}")
    if not tma_fits(w):
        raise ValueError("tma=True needs whole chunks of 128 columns per row and 16-byte aligned words")
    if x.device.type != "cuda" or not tma_supported(x.device) or wo_gluon.gluon is None:
        where = torch.cuda.get_device_name(x.device) if x.device.type == "cuda" else "a CPU"
        raise LabkitError("the 'mma' GEMV with tma=True is a Gluon kernel for the tensor memory accelerator of a "
                          f"Hopper (sm_90) or newer GPU with Triton's Gluon; this is {where}: use tma=False")
    N = w.words.shape[0]
    desc = wo_gluon.descriptor(w.words, cfg.block_n)
    wo_gluon._wo_gemv_mma_tma_kernel[grid](x, desc, w.scale, w.zero, y, N, w.shape[1], w.scale.stride(0),
                                           N, k_chunk, BLOCK_N=cfg.block_n, SUB=cfg.block_k // 256, STAGES=cfg.stages,
                                           BF16=x.dtype == torch.bfloat16, num_warps=cfg.num_warps,
                                           PRO_SILU=silu, XS=k_chunk if silu else 0,
                                           XSB=wo_gluon.silu_blocks(k_chunk if silu else 0), **({"PDL": False} | kw))


def linear(x: torch.Tensor, w, silu_gate_up: bool = False, use_kernel: bool = True,
           partials: bool = False, pdl: bool = False) -> torch.Tensor:
    """x (..., K) @ W^T for any leading shape: the Triton GEMV for up to 16 rows, else dequantize + cuBLAS.

    ``use_kernel=False`` always takes the reference path (what the CPU decode loop uses). ``partials``, ``pdl``: as
    in ``wo_matmul`` for a 2-D x on the kernel path (split-K partial sums may come back as (split, M, N) fp32).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if use_kernel and x2.shape[0] <= MAX_M:
        y = wo_matmul(x2, w, silu_gate_up=silu_gate_up, partials=partials and x.dim() == 2, pdl=pdl)
        if y.dim() == 3:
            return y
    else:
        if silu_gate_up:
            gate, up = x2.chunk(2, dim=-1)
            x2 = torch.nn.functional.silu(gate) * up
        # dequantized in x's dtype: in bf16 every code * scale is rounded to 8 significant bits (an int8 code alone
        # has up to 7), which the kernels never do (exact codes times x in fp32, the scale applied to the fp32 sum).
        # In bf16 it and the kernels are two different roundings of the same codes, neither exact, and a model's
        # greedy tokens through the two can part at a near-tie; fastgen.FastLlama.dequantized(torch.float32) is the
        # exact reference of a quantized model.
        y = torch.nn.functional.linear(x2, dequantize(w, x2.dtype))
    return y.reshape(*lead, y.shape[-1])


def _copies(w, n: int) -> list:
    """n independent copies of a weight (the first is w itself)."""
    out = [w]
    for _ in range(n - 1):
        if isinstance(w, torch.Tensor):
            out.append(w.clone())
        elif isinstance(w, Int8Weight):
            out.append(Int8Weight(w.q.clone(), w.scale.clone()))
        elif isinstance(w, WordWeight):
            out.append(WordWeight(w.words.clone(), w.scale.clone(), None if w.zero is None else w.zero.clone(),
                                  w.bits, w.group, w.in_features))
        else:
            out.append(Int4Weight(w.packed.clone(), w.scale.clone(), w.zero.clone(), w.group, w.in_features))
    return out


def time_gemv(x: torch.Tensor, w, silu_gate_up: bool = False, config: GemvConfig | None = None, calls: int = 32,
              rounds: int = 7, cold_bytes: int = 256 << 20, partials: bool = False, pdl: bool = False) -> float:
    """Milliseconds per ``wo_matmul`` call as a decode step sees it: back-to-back launches inside a CUDA graph.

    Timing single calls from Python measures the launch (tens of microseconds), not a kernel that reads a few
    megabytes; and one weight timed over and over stays in L2. So the calls cycle over enough copies of the
    weight (``cold_bytes`` in all, beyond any L2) and are replayed as one graph; median over ``rounds``.
    ``partials=True`` times the call as ``wo_matmul(..., partials=True)`` (no split-K reduction kernel);
    ``pdl=True`` launches every call with programmatic dependent launch, as a decode step with PDL does.
    """
    if x.device.type != "cuda":
        raise LabkitError("time_gemv times kernels on a CUDA GPU")
    n_copies = max(1, min(calls, -(-cold_bytes // max(1, weight_nbytes(w)))))
    ws = _copies(w, n_copies)
    out = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    fns = [lambda wi=wi: wo_matmul(x, wi, silu_gate_up, config, out, partials, pdl) for wi in ws]
    return bench.graph_time_ms(fns, calls, rounds)


def _out_of_resources(exc: BaseException) -> bool:
    """True for Triton's "this config needs more registers / shared memory than the GPU has"."""
    return type(exc).__name__ in ("OutOfResources", "OutOfResourcesError") or "out of resource" in str(exc).lower()


def config_for(w, M: int = 1, dtype=torch.bfloat16, silu_gate_up: bool = False, partials: bool = False,
               pdl: bool = False) -> GemvConfig:
    """The config ``wo_matmul`` launches for this weight and call when none is passed: the one ``tune`` or
    ``pin_config`` recorded for it, else the first candidate.

    The config fixes the summation order (rows per program, K per step, split-K), so two calls with different
    configs may differ in the last bits of their outputs; ``pdl`` is part of the key (``tune`` times PDL launches
    separately), so the same shape can get different configs with and without PDL."""
    return (_TUNED.get(_key(_kind(w), *w.shape, M, silu_gate_up, dtype, partials, pdl))
            or candidates_for(_kind(w), M, dtype, getattr(w, "group", 128))[0])


def kernel_name(w, config: GemvConfig, M: int = 1) -> str:
    """Which kernel ``wo_matmul`` runs for this weight, config and M (``+ split-K`` when it splits)."""
    kind = _kind(w)
    if config.variant == "tc":
        name = "int8 tensor-core GEMV" if kind == 1 else "int4 tensor-core GEMV"
    elif config.variant == "mma":
        name = "int4 tensor-core GEMV, one row (mma.sync)" + (", words by TMA" if config.tma else "")
    elif kind >= 3:
        name = ("word kernel, packed fp16 (M=1)" if config.variant == "h2"
                else "word kernel, per-word accumulators (M=1)" if config.variant == "acc" and M == 1
                else "word kernel, loads one step ahead" if config.variant == "pf" else "word kernel")
    else:
        name = "element-wise accumulator GEMV (M=1)" if config.variant == "acc" and M == 1 else "tile GEMV"
    return name + (" + split-K" if config.split > 1 else "")


def tuning_report(w, M: int = 1, dtype=torch.bfloat16, silu_gate_up: bool = False, partials: bool = False,
                  pdl: bool = False) -> dict | None:
    """What ``tune`` found for this weight and call: the config it chose, and the best microseconds per call of each
    kernel among the candidates it timed (one run, the same inputs: the kernels side by side). None if not tuned."""
    times = _TUNE_TIMES.get(_key(_kind(w), *w.shape, M, silu_gate_up, dtype, partials, pdl))
    if not times:
        return None
    best: dict = {}
    for cfg, t in times:
        name = kernel_name(w, cfg, M)
        best[name] = min(best.get(name, float("inf")), t * 1e3)
    chosen = config_for(w, M, dtype, silu_gate_up, partials, pdl)
    return {"chosen": asdict(chosen), "chosen_kernel": kernel_name(w, chosen, M),
            "best_us_by_kernel": dict(sorted(best.items(), key=lambda kv: kv[1]))}


def pin_config(w, config: GemvConfig, M: int = 1, dtype=torch.bfloat16, silu_gate_up: bool = False,
               partials: bool = False, pdl: bool = False) -> None:
    """Use ``config`` for this weight's shape and call (as ``tune`` would after timing), without timing anything.

    For the Triton interpreter (CPU tests): one program there costs about the same whatever its block, so the largest
    blocks run a GEMV in a few programs instead of thousands; the results are the same up to summation order."""
    _TUNED[_key(_kind(w), *w.shape, M, silu_gate_up, dtype, partials, pdl)] = config


class GemvReference(NamedTuple):
    """What a GEMV's output is checked against (``reference_check``)."""
    product: torch.Tensor  # the fp32 dequantize-then-matmul product
    bound: float  # the largest error a kernel may have against it
    torch_err: float  # torch's own error in x's dtype (dequantize in that dtype, then matmul)


def reference_check(x: torch.Tensor, w, silu_gate_up: bool = False) -> GemvReference:
    """What ``check_config`` compares a config's output with: the fp32 dequantize-then-matmul product of x (M, K)
    (or [gate | up]) and w, and the largest error a kernel may have against it: twice torch's own error in x's dtype
    (``matmul_reference``) plus 1e-3 of the product's largest magnitude, the bound the kernel tests hold every
    variant to."""
    ref32 = matmul_reference(x.float(), dequantize(w, torch.float32), silu_gate_up=silu_gate_up)
    err_torch = (matmul_reference(x, w, silu_gate_up=silu_gate_up).float() - ref32).abs().max().item()
    return GemvReference(ref32, 2 * err_torch + 1e-3 * ref32.abs().max().item(), err_torch)


def check_config(x: torch.Tensor, w, config: GemvConfig, ref: GemvReference, silu_gate_up: bool = False,
                 partials: bool = False, pdl: bool = False) -> str | None:
    """One ``wo_matmul`` call with ``config`` (split-K partials summed in fp32) against ``ref`` =
    ``reference_check(x, w, silu_gate_up)``: None when its largest error is within the bound, else why not (a
    non-finite output fails too)."""
    y = wo_matmul(x, w, silu_gate_up, config, partials=partials, pdl=pdl)
    y = (y.float().sum(0) if y.dim() == 3 else y.float())
    err = (y - ref.product).abs().max().item()
    if err <= ref.bound:  # False for a NaN
        return None
    return (f"wrong result: largest |y - fp32 product| = {err:.4g}, more than the bound {ref.bound:.4g} (twice "
            f"torch's own {x.dtype} error + 1e-3 of the largest output)")


def tune(w, M: int = 1, dtype=torch.bfloat16, silu_gate_up: bool = False, candidates=None,
         partials: bool = False, pdl: bool = False) -> GemvConfig:
    """Time each candidate config for this weight and M on the GPU (random x, ``time_gemv``), keep the fastest.

    ``partials=True`` tunes for callers that take split-K partial sums (the reduction costs nothing there);
    ``pdl=True`` for callers that launch with programmatic dependent launch (a separate choice: PDL overlaps
    the start of one call with the end of the one before, which favours other shapes).
    Every candidate's output is first checked against the fp32 dequantize-then-matmul product of the same x
    (``check_config``): a config whose sums are wrong is never timed, so never chosen, however fast it would be.
    A config that fails (an error, or a wrong result) is appended to ``TUNE_FAILURES`` with the reason; one that
    fails for another reason than running out of registers or shared memory also raises a ``RuntimeWarning``
    naming it.
    """
    if not torch.cuda.is_available():
        raise LabkitError("tune() times kernels on a CUDA GPU; on a CPU the default config is used.")
    kind = _kind(w)
    N, K = w.shape
    dev = _device(w)
    pdl_kwargs(pdl, dev)  # a GPU without PDL fails here with the reason, not as "no config ran"
    x = torch.randn(M, K * (2 if silu_gate_up else 1), device=dev, dtype=dtype)
    ref = reference_check(x, w, silu_gate_up)
    best, best_t = None, float("inf")
    times = _TUNE_TIMES[_key(kind, N, K, M, silu_gate_up, dtype, partials, pdl)] = []
    for cfg in candidates or candidates_for(kind, M, dtype, getattr(w, "group", 128), tma_supported(dev),
                                            mma_supported(dev)):
        if (cfg.variant == "acc" and M != 1) or (cfg.variant == "h2" and (M != 1 or kind < 3)):
            continue
        if cfg.variant == "mma" and (M != 1 or kind != 4 or dtype not in (torch.bfloat16, torch.float16)):
            continue
        if kind == 2 and (max(cfg.block_k, w.group) % w.group):
            continue
        if cfg.tma and not tma_fits(w):  # a shape the TMA form does not take (wo_matmul would refuse it)
            continue
        try:
            err = check_config(x, w, cfg, ref, silu_gate_up, partials, pdl)
            if err is not None:
                TUNE_FAILURES.append({"config": cfg, "weight": tuple(w.shape), "kind": kind, "M": M, "error": err,
                                      "resources": False, "wrong_result": True})
                warnings.warn(f"wo_matmul.tune: config {cfg} on weight {tuple(w.shape)} M={M} gave a wrong result, "
                              f"left out: {err}", RuntimeWarning, stacklevel=2)
                continue
            t = time_gemv(x, w, silu_gate_up, cfg, partials=partials, pdl=pdl)
        except Exception as exc:  # recorded with its config, never silently dropped
            resources = _out_of_resources(exc)
            TUNE_FAILURES.append({"config": cfg, "weight": tuple(w.shape), "kind": kind, "M": M,
                                  "error": f"{type(exc).__name__}: {str(exc)[:300]}", "resources": resources})
            if not resources:  # a config over the registers/shared memory is expected; anything else is a bug
                warnings.warn(f"wo_matmul.tune: config {cfg} failed on weight {tuple(w.shape)} M={M}: "
                              f"{type(exc).__name__}: {str(exc)[:200]}", RuntimeWarning, stacklevel=2)
            continue
        times.append((cfg, t))
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        errs = "; ".join(f"{f['config']}: {f['error'][:80]}" for f in TUNE_FAILURES[-3:])
        raise LabkitError(f"no GEMV config ran for weight {tuple(w.shape)} kind {kind} (last failures: {errs})")
    _TUNED[_key(kind, N, K, M, silu_gate_up, dtype, partials, pdl)] = best
    return best


def offline_sass(json_path, bandwidths=(2.97e12, 4.22e12), timeout_s: int = 600) -> dict:
    """Compile the batch-1 GEMV kernels for sm_90 without a GPU and count their K loops (``scripts/sass_gemv.py``,
    run as its own process: it needs Triton compiling, not the interpreter this process may run under).

    Returns the script's JSON: ``rows`` with, per kernel, ``per_weight`` (loop instructions per weight),
    ``registers``, ``opcodes`` and ``budget`` {bandwidth: instructions per weight the SMs' issue rate allows}."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from labkit import env

    script = env.repo_root() / "scripts" / "sass_gemv.py"
    if not script.exists():
        raise LabkitError(f"{script} is missing: offline_sass runs from a checkout of the workbook")
    if triton is None:
        raise LabkitError("offline_sass needs Triton (pip install triton, Linux): its bundled ptxas compiles the "
                          "kernels")
    bw = ",".join(f"{b:.6g}" for b in bandwidths)
    res = subprocess.run([sys.executable, str(script), "--json", str(json_path), "--bandwidth", bw],
                         capture_output=True, text=True, timeout=timeout_s)
    if res.returncode != 0:
        raise LabkitError(f"scripts/sass_gemv.py failed (exit {res.returncode}): {res.stderr.strip()[-1500:]}")
    return json.loads(Path(json_path).read_text())
