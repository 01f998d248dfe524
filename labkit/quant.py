"""Number formats and quantize/dequantize pairs, with the error metrics that judge them.

Three layers, bottom to top:

1. Pure tensor functions. ``quantize(x, scale, zero, maxq)`` / ``dequantize(q, scale, zero)`` on an integer grid;
   ``absmax_*`` (symmetric, zero at 0) and ``zeropoint_*`` (asymmetric, min-max) pairs at a *granularity*:
   ``"tensor"`` (one scale), ``"channel"`` (one per output row) or ``"group"`` (one per ``group_size`` consecutive
   inputs of a row); NF4 (blockwise absmax + a 16-value code from normal quantiles, identical to bitsandbytes);
   FP8 E4M3 (a scaled cast, with a pure-PyTorch rounding reference beside torch's cast); codebook grids (log);
   activation scales, dynamic (per token, at run time) or static (calibrated once).
2. Metrics: ``mse`` and ``sqnr_db`` (signal-to-quantization-noise ratio; higher is better, ~6 dB per bit).
3. A weight-only runtime module, ``QuantLinear`` (integer weights + scales, dequantized in ``forward``), and
   ``replace_linear`` which swaps a model's ``nn.Linear`` layers (skipping ``lm_head``) for anything built from them.

Shapes: a weight is ``W: (out_features, in_features)`` (rows = output channels, the ``nn.Linear`` layout). Scales
are stored as ``(R, G)``: R = 1 (tensor) or out_features; G = number of groups per row (1 unless ``"group"``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

GRANULARITIES = ("tensor", "channel", "group")


# ---------------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, ``exp_bits`` exponent bits, ``man_bits`` mantissa bits."""

    name: str
    dtype: torch.dtype
    exp_bits: int
    man_bits: int

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def finfo(self):
        return torch.finfo(self.dtype)

    def describe(self) -> dict:
        fi = self.finfo
        return {"format": self.name, "bits": self.bits, "exponent": self.exp_bits, "mantissa": self.man_bits,
                "max": float(fi.max), "smallest normal": float(fi.smallest_normal), "eps": float(fi.eps),
                "decimal digits": round(math.log10(2 ** (self.man_bits + 1)), 2)}


FLOAT_FORMATS = {
    "fp32": FloatFormat("fp32", torch.float32, 8, 23),
    "fp16": FloatFormat("fp16", torch.float16, 5, 10),
    "bf16": FloatFormat("bf16", torch.bfloat16, 8, 7),
    # E4M3 "fn": no infinities, one NaN pattern, so the top binade is usable and max = 448.
    "fp8_e4m3": FloatFormat("fp8_e4m3", torch.float8_e4m3fn, 4, 3),
}


def fp8_e4m3_values() -> torch.Tensor:
    """All finite E4M3 values, sorted (the 256 bit patterns minus the two NaNs: 254 values, +0 and -0 both kept)."""
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = bits.view(torch.float8_e4m3fn).float()
    return torch.sort(vals[~torch.isnan(vals)]).values


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid of a b-bit code: symmetric ``[-(2^(b-1)-1), 2^(b-1)-1]`` (-128 unused), asymmetric ``[0, 2^b-1]``."""
    _check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [2, 16], got {bits!r}")


# ---------------------------------------------------------------------------------------------- grouping
def _rows(x: torch.Tensor, granularity: str, group_size: int | None) -> tuple[torch.Tensor, int]:
    """View ``x`` as ``(R, cols)`` rows that own scales, and the number of values per scale ``g``.

    ``"group"`` allows a ragged last group when ``group_size`` does not divide the row (SmolLM2's hidden size
    576 = 4 x 128 + 64): groups are ``[0, g), [g, 2g), ...`` as in GPTQ's ``g_idx = column // g``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "tensor":
        return x.reshape(1, -1), x.numel()  # (1, numel)
    if x.dim() != 2:
        raise ValueError(f"granularity={granularity!r} needs a 2-D weight (out_features, in_features), "
                         f"got shape {tuple(x.shape)}; use granularity='tensor' or reshape first.")
    if granularity == "channel":
        return x, x.shape[1]  # (out, in)
    if not group_size or group_size < 1:
        raise ValueError(f"granularity='group' needs a positive group_size, got {group_size!r}")
    return x, group_size


def _grouped(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """``(R, G, g)`` view of x, the last group zero-padded. Zero padding changes no absmax and no
    0-including min-max range, so the scales of a ragged group are those of its real values."""
    x2, g = _rows(x, granularity, group_size)
    pad = (-x2.shape[1]) % g
    return torch.nn.functional.pad(x2, (0, pad)).reshape(x2.shape[0], -1, g)  # (R, G, g)


def expand_groups(t: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """Per-group values ``(R, G)`` -> per-element ``(R, cols)`` (the ragged last group cut)."""
    return t.repeat_interleave(group_size, dim=1)[:, :cols]


def _group_size_of(cols: int, n_groups: int, group_size: int | None) -> int:
    if group_size:
        return group_size
    if cols % n_groups:
        raise ValueError(f"{n_groups} groups over {cols} columns is ragged: pass group_size explicitly")
    return cols // n_groups


def _apply(fn, q: torch.Tensor, rows: int, n_groups: int, group_size: int | None, *per_group):
    """Run ``fn(q2, *expanded)`` on q viewed as ``(rows, cols)`` with per-group tensors expanded to it."""
    q2 = q.reshape(rows, -1)
    g = _group_size_of(q2.shape[1], n_groups, group_size)
    return fn(q2, *(expand_groups(t, q2.shape[1], g) for t in per_group)).reshape(q.shape)


# ---------------------------------------------------------------------------------------------- integer grid
def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, minq: int = 0) -> torch.Tensor:
    """``clamp(round(x / scale) + zero, minq, maxq)``, the integer code (returned as float, exact)."""
    return torch.clamp(torch.round(x / scale) + zero, minq, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale``: back to real values on the grid."""
    return (q - zero) * scale


def absmax_quantize(x: torch.Tensor, bits: int = 8, granularity: str = "tensor", group_size: int | None = None):
    """Symmetric quantization: scale = absmax / (2^(b-1)-1), zero at 0.

    x: any shape for ``"tensor"``, ``(out, in)`` otherwise. Returns ``(q, scale)``: q int8/int16 of x's shape,
    scale float32 ``(R, G)`` (R = 1 or out; G = groups per row).
    """
    qmin, qmax = int_range(bits, symmetric=True)
    scale = _grouped(x.float(), granularity, group_size).abs().amax(dim=-1).clamp(min=1e-12) / qmax  # (R, G)
    q = _apply(lambda x2, s: quantize(x2, s, 0, qmax, qmin), x.float(), scale.shape[0], scale.shape[1],
               _rows(x, granularity, group_size)[1], scale)
    return q.to(_int_dtype(bits)), scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Inverse of ``absmax_quantize``; the layout comes from the scale's shape ``(R, G)`` (give ``group_size``
    when the last group is ragged)."""
    return _apply(lambda q2, s: dequantize(q2, s, 0), q.float(), scale.shape[0], scale.shape[1], group_size, scale)


def zeropoint_params(x: torch.Tensor, bits: int, granularity: str = "tensor", group_size: int | None = None):
    """Asymmetric (min-max) scale and integer zero point, range widened to contain 0 so 0 is exact.

    Returns ``(scale, zero)``, both float32 ``(R, G)``; zero is an integer in ``[0, 2^b-1]``.
    """
    _, maxq = int_range(bits, symmetric=False)
    xg = _grouped(x.float(), granularity, group_size)  # (R, G, g)
    xmin = xg.amin(dim=-1).clamp(max=0)
    xmax = xg.amax(dim=-1).clamp(min=0)
    scale = ((xmax - xmin) / maxq).clamp(min=1e-12)  # (R, G)
    zero = torch.round(-xmin / scale)
    return scale, zero


def zeropoint_quantize(x: torch.Tensor, bits: int = 8, granularity: str = "tensor", group_size: int | None = None):
    """Asymmetric quantization to ``[0, 2^b-1]``. Returns ``(q uint8/int32 of x's shape, scale, zero)``."""
    _, maxq = int_range(bits, symmetric=False)
    scale, zero = zeropoint_params(x, bits, granularity, group_size)
    q = _apply(lambda x2, s, z: quantize(x2, s, z, maxq), x.float(), scale.shape[0], scale.shape[1],
               _rows(x, granularity, group_size)[1], scale, zero)
    return q.to(torch.uint8 if bits <= 8 else torch.int32), scale, zero


def zeropoint_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                         group_size: int | None = None) -> torch.Tensor:
    """Inverse of ``zeropoint_quantize`` (layout from the scale's shape; ``group_size`` when ragged)."""
    return _apply(dequantize, q.float(), scale.shape[0], scale.shape[1], group_size, scale, zero)


def fake_quant(x: torch.Tensor, bits: int, scheme: str = "zeropoint", granularity: str = "group",
               group_size: int | None = 128) -> torch.Tensor:
    """Quantize then dequantize (same shape and dtype as x). scheme: 'absmax', 'zeropoint', 'nf4', 'fp8', 'log'."""
    if scheme == "absmax":
        gs = group_size if granularity == "group" else None
        return absmax_dequantize(*absmax_quantize(x, bits, granularity, group_size), gs).to(x.dtype)
    if scheme == "zeropoint":
        gs = group_size if granularity == "group" else None
        return zeropoint_dequantize(*zeropoint_quantize(x, bits, granularity, group_size), gs).to(x.dtype)
    if scheme == "nf4":
        if bits != 4:
            raise ValueError("scheme='nf4' is a 4-bit code; pass bits=4")
        block = group_size if granularity == "group" else x.numel() if granularity == "tensor" else x.shape[-1]
        packed, absmax = nf4_quantize(x, block)
        return nf4_dequantize(packed, absmax, x.shape, block, x.dtype)
    if scheme == "fp8":
        if bits != 8:
            raise ValueError("scheme='fp8' (E4M3) is an 8-bit format; pass bits=8")
        gs = group_size if granularity == "group" else None
        return fp8_dequantize(*fp8_quantize(x, granularity, group_size), gs).to(x.dtype)
    if scheme == "log":
        return codebook_fake_quant(x, log_grid(bits), granularity, group_size).to(x.dtype)
    raise ValueError(f"unknown scheme {scheme!r}; use 'absmax', 'zeropoint', 'nf4', 'fp8' or 'log'")


def bits_per_weight(bits: int, group_size: int | None, scale_bits: int = 16, zero_bits: int = 0,
                    in_features: int | None = None, granularity: str = "group") -> float:
    """Storage cost per weight, metadata included: ``bits + (scale_bits + zero_bits) / values_per_scale``."""
    if granularity == "tensor":
        return float(bits)
    per = group_size if granularity == "group" else in_features
    if not per:
        raise ValueError("give group_size (granularity='group') or in_features (granularity='channel')")
    return bits + (scale_bits + zero_bits) / per


def _int_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32


# ---------------------------------------------------------------------------------------------- codebooks
def codebook_quantize(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of a sorted 1-D ``code`` for each element of x (ties go to the lower value).

    Done with ``bucketize`` over the midpoints between neighbouring code values: O(log n) per element.
    """
    if code.dim() != 1 or not bool((code[1:] > code[:-1]).all()):
        raise ValueError("code must be a sorted 1-D tensor of distinct values")
    mid = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, mid.to(x.dtype))


def codebook_quantize_reference(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Same as ``codebook_quantize`` by brute force: argmin of |x - code| (first index wins ties)."""
    return (x.unsqueeze(-1) - code).abs().argmin(dim=-1)


def codebook_fake_quant(x: torch.Tensor, code: torch.Tensor, granularity: str = "group",
                        group_size: int | None = 128) -> torch.Tensor:
    """Absmax-scale each group to [-1, 1], snap to the nearest code value, scale back."""
    absmax = _grouped(x.float(), granularity, group_size).abs().amax(dim=-1).clamp(min=1e-12)  # (R, G)
    g = _rows(x, granularity, group_size)[1]

    def snap(x2, a):
        return code.float()[codebook_quantize(x2 / a, code.float())] * a

    return _apply(snap, x.float(), absmax.shape[0], absmax.shape[1], g, absmax)


def log_grid(bits: int) -> torch.Tensor:
    """A sign + power-of-two grid in [-1, 1]: 0 and ±2^-k for k = 0 .. 2^(b-1)-2 (2^b - 1 values)."""
    _check_bits(bits)
    mags = 2.0 ** -torch.arange(2 ** (bits - 1) - 1, dtype=torch.float32)  # 1, 1/2, 1/4, ...
    return torch.sort(torch.cat([-mags, torch.zeros(1), mags])).values


def uniform_grid(bits: int) -> torch.Tensor:
    """The symmetric integer grid scaled to [-1, 1] (for side-by-side plots with the other codebooks)."""
    qmin, qmax = int_range(bits, symmetric=True)
    return torch.arange(qmin, qmax + 1, dtype=torch.float32) / qmax


# ---------------------------------------------------------------------------------------------- NF4
# The NF4 code of QLoRA (Dettmers et al. 2023, arXiv:2305.14314), as bitsandbytes stores it (float32).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def nf4_code_from_normal(offset: float = 0.9677083) -> torch.Tensor:
    """Derive the NF4 code from standard-normal quantiles (QLoRA, appendix E).

    8 positive values: the quantiles of N(0,1) at 8 evenly spaced probabilities from ``offset`` down to 0.5
    (excluded); 7 negative values from ``offset`` to 0.5 in 7 steps, negated; plus an exact 0. Then divide by the
    largest magnitude so the code spans [-1, 1]. ``offset`` < 1 keeps the extreme quantiles finite (the quantile
    at probability 1 is infinite); 0.9677083 is the value QLoRA and bitsandbytes use. Asymmetric (8 positive,
    7 negative) so that 0 is exact with 16 codes.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values
    vals = torch.sort(torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])).values
    return (vals / vals.abs().max()).float()


def nf4_quantize(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise NF4 over the flattened tensor, in bitsandbytes' layout.

    Blocks of ``blocksize`` consecutive elements (of ``x.reshape(-1)``) are scaled by their absmax (fp32) to
    [-1, 1] (times 1/absmax in a full block, divided by absmax in a partial last one, as bitsandbytes) and snapped to the nearest ``NF4_CODE`` value (ties to the lower one). Two 4-bit indices per byte,
    the first in the high nibble. Returns ``(packed uint8 (ceil(n/2), 1), absmax float32 (n_blocks,))``.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(n_blocks, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=-1)  # (n_blocks,)
    # bitsandbytes multiplies a full block by the reciprocal of its absmax but divides the partial last block by
    # it; the two differ in the last bit, which decides near-ties between two codes, so we do the same
    safe = absmax.clamp(min=1e-38).unsqueeze(1)  # (n_blocks, 1)
    scaled = blocks * (1.0 / safe)
    if pad:
        scaled[-1] = blocks[-1] / safe[-1]
    scaled = torch.clamp(scaled, -1, 1).reshape(-1)[:n]
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    idx = codebook_quantize(scaled, NF4_CODE.to(x.device)).to(torch.uint8)  # (n_even,)
    packed = (idx[0::2] << 4) | idx[1::2]  # (n_even/2,)
    return packed.unsqueeze(1), absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``nf4_quantize``: unpack nibbles, look up the code, multiply by the block's absmax (fp32)."""
    p = packed.reshape(-1)
    idx = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1).long()  # (n_even,)
    n = math.prod(shape)
    vals = NF4_CODE.to(p.device)[idx][:n]
    n_blocks = absmax.numel()
    vals = torch.nn.functional.pad(vals, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    return (vals * absmax.unsqueeze(1)).reshape(-1)[:n].reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------------- FP8 E4M3
def round_to_e4m3_reference(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the nearest E4M3 value (ties to even mantissa), saturating at ±448, in plain math.

    E4M3: exponent bias 7, normal numbers 2^(e-7) * (1 + m/8) for e in 1..15, subnormals 2^-6 * m/8. So the spacing
    of representable values in the binade [2^k, 2^(k+1)) is 2^(k-3), and 2^-9 below 2^-6.
    """
    x = x.float()
    mag = x.abs()
    k = torch.floor(torch.log2(mag.clamp(min=2.0 ** -6)))  # binade exponent, subnormals share 2^-6's spacing
    step = 2.0 ** (k - 3)  # 3 mantissa bits
    r = torch.round(mag / step) * step  # torch.round rounds half to even: ties to even mantissa
    r = torch.clamp(r, max=448.0)
    return torch.where(mag == 0, mag, r) * torch.sign(x)


def fp8_quantize(x: torch.Tensor, granularity: str = "tensor", group_size: int | None = None):
    """Scale so the absmax maps to E4M3's max (448) and cast. Returns ``(q float8_e4m3fn of x's shape, scale (R, G))``."""
    xg = _grouped(x.float(), granularity, group_size)  # (R, G, g)
    scale = xg.abs().amax(dim=-1).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max  # (R, G)
    q = _apply(lambda x2, s: x2 / s, x.float(), scale.shape[0], scale.shape[1], _rows(x, granularity, group_size)[1],
               scale)
    return q.to(torch.float8_e4m3fn), scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    return _apply(lambda q2, s: q2 * s, q.float(), scale.shape[0], scale.shape[1], group_size, scale)



# ---------------------------------------------------------------------------------------------- KV cache
def kv_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization of a K or V cache, one scale per token and head (the rows of head_dim values).

    x: (batch, n_kv_heads, seqlen, head_dim) -> q: int8 of x's shape, scale: fp32 (batch, n_kv_heads, seqlen, 1).
    """
    q, scale = absmax_quantize(x.reshape(-1, x.shape[-1]), bits, granularity="channel")
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def kv_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``kv_quantize``: (batch, n_kv_heads, seqlen, head_dim) in ``dtype``."""
    return (q.to(torch.float32) * scale).to(dtype)

# ---------------------------------------------------------------------------------------------- metrics
def mse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x.detach().float() - y.detach().float()) ** 2).mean())


def sqnr_db(x: torch.Tensor, xq: torch.Tensor) -> float:
    """10 log10(‖x‖² / ‖x - xq‖²). Each extra bit of a uniform grid adds about 6.02 dB."""
    x, xq = x.detach().float(), xq.detach().float()
    noise = ((x - xq) ** 2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10((x.float() ** 2).sum() / noise))


# ---------------------------------------------------------------------------------------------- activations
def dynamic_act_fake_quant(x: torch.Tensor, bits: int = 8, per_token: bool = True) -> torch.Tensor:
    """Dynamic absmax: the scale is computed from this very input (per token row, or per tensor)."""
    qmin, qmax = int_range(bits, symmetric=True)
    if per_token:
        scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax  # (..., 1)
    else:
        scale = x.float().abs().amax().clamp(min=1e-12) / qmax
    return dequantize(quantize(x.float(), scale, 0, qmax, qmin), scale, 0).to(x.dtype)


def static_act_scale(calibration: list[torch.Tensor] | torch.Tensor, bits: int = 8, percentile: float = 100.0) -> float:
    """Static (calibrated) per-tensor scale: the ``percentile`` of |x| over the calibration activations / qmax."""
    _, qmax = int_range(bits, symmetric=True)
    xs = calibration if isinstance(calibration, torch.Tensor) else torch.cat([c.reshape(-1) for c in calibration])
    a = xs.float().abs().reshape(-1)
    if percentile >= 100:
        bound = a.max()
    else:
        k = max(1, int(round(a.numel() * percentile / 100)))
        bound = a.kthvalue(k).values
    return float(bound.clamp(min=1e-12)) / qmax


def static_act_fake_quant(x: torch.Tensor, scale: float, bits: int = 8) -> torch.Tensor:
    """Quantize with a fixed scale; values beyond the calibrated range clip."""
    qmin, qmax = int_range(bits, symmetric=True)
    return dequantize(quantize(x.float(), scale, 0, qmax, qmin), scale, 0).to(x.dtype)


# ---------------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """Weight-only quantized linear: integer weights ``q (out, in)`` with per-group ``scale`` and ``zero``
    ``(out, in/g)``; ``forward`` dequantizes to the activation dtype and calls ``F.linear``.

    The integer codes are kept one per int8/uint8 byte (not packed): memory here is the simulated format's, and
    ``bits_per_weight`` reports what a packed kernel would store.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 bias: torch.Tensor | None = None, group_size: int | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits = bits
        self.group_size = _group_size_of(self.in_features, scale.shape[1], group_size)
        self.register_buffer("q", q.to(torch.uint8))
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("zero", zero.to(torch.float32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None):
        gran = "group" if group_size else "channel"
        q, scale, zero = zeropoint_quantize(linear.weight.data, bits, gran, group_size)
        return cls(q, scale, zero, bits, linear.bias, group_size or linear.in_features)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """``(q - zero) * scale`` in fp32, then ``dtype``: ``(out, in)``. The same numbers as
        ``zeropoint_dequantize`` (the reference), bit for bit, but the per-group scale and zero broadcast over a
        ``(out, G, g)`` view instead of being expanded to the weight's size: one fp32 copy of the weight instead of
        three, which matters because ``forward`` runs this on every call."""
        out, cols, g = self.out_features, self.in_features, self.group_size
        n_groups = self.scale.shape[1]
        qf = self.q.float()
        if n_groups * g != cols:  # a ragged last group (576 = 4 x 128 + 64): pad it to g columns, cut after
            qf = nn.functional.pad(qf, (0, n_groups * g - cols))
        w = qf.view(out, n_groups, g).sub_(self.zero[..., None]).mul_(self.scale[..., None])  # (out, G, g)
        return w.view(out, n_groups * g)[:, :cols].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @property
    def bits_per_weight(self) -> float:
        """bits + (fp16 scale + bits-wide zero) per group, averaged over the row (ragged last group included)."""
        return self.bits + (16 + self.bits) * self.scale.shape[1] / self.in_features

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def linear_layers(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """Name -> ``nn.Linear`` for every linear layer whose own name is not in ``skip``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in skip}


def replace_linear(model: nn.Module, make, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Swap every ``nn.Linear`` (except names in ``skip``) for ``make(name, linear)``; returns how many.

    ``lm_head`` is skipped by default: SmolLM2 ties it to the embedding, and quantizing the output layer costs
    far more quality than it saves memory. Raises if nothing was replaced (a silent no-op hides bugs).
    """
    targets = linear_layers(model, skip)
    for name, lin in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, lin))
    if not targets:
        raise ValueError("replace_linear found no nn.Linear to replace (already quantized, or everything skipped?)")
    return len(targets)


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes a packed weight-only format would need: QuantLinear layers at their bits per weight, the rest as stored."""
    total = 0
    seen = set()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += int(math.ceil(mod.q.numel() * mod.bits_per_weight / 8))
            seen.update(id(b) for b in mod.buffers())
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) not in seen:
            total += p.numel() * p.element_size()
    return total
