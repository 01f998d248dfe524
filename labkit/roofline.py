"""The arithmetic of inference: bytes and FLOPs of a decoder, and the floors they imply.

For a Llama-family decoder of shape ``labkit.models.ModelShape``:

- weight bytes = parameters × bits / 8 (+ the scales a quantized format stores);
- KV cache bytes per token = 2 (K and V) × layers × kv_heads × head_dim × bytes per element;
- prefill FLOPs ≈ 2 × (matmul parameters) × tokens + the attention score/value products;
- the decode floor: one token at batch 1 must read every weight (and the KV cache) once, so
  time/token ≥ bytes read / memory bandwidth. At batch B the weights are read once for B tokens.

These are the workbook's only definitions of the KV bytes (``kv_bytes``) and of the floor (``decode_floor``,
``decode_floor_ms``); ``pipeline`` and ``fastgen`` and the notebooks call them.

**How the embedding table is counted** (everywhere, once): a decode step reads every matmul weight once, the
LM head included, and of the embedding table only one row per sequence. Those rows are counted as zero
(for Llama-2-7B at batch 1, 8 KiB of a 13 GB step). So an *untied* embedding table (Llama-2-7B) is stored
but not read (``step_weight_bytes`` leaves it out), while a *tied* one (SmolLM2: the LM head is the
embedding table) is read whole, as the LM head, and counted once.

All functions are pure arithmetic (no torch), so the numbers can be checked by hand.
"""
from __future__ import annotations

from dataclasses import dataclass


def linear_params(shape) -> int:
    """Parameters in the decoder's matmuls per token (all layers; LM head included, embedding lookup excluded)."""
    h, i, L = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    kv = shape.num_key_value_heads * shape.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i  # q, o ; k, v ; gate, up, down
    return L * per_layer + h * shape.vocab_size


def weight_bytes(n_params: int, bits: float, group_size: int | None = None, scale_bits: int = 16,
                 zero_bits: int = 0) -> float:
    """Bytes of ``n_params`` weights stored at ``bits`` each, plus one scale (and zero) per group when grouped."""
    total = n_params * bits / 8
    if group_size:
        total += n_params / group_size * (scale_bits + zero_bits) / 8
    return total


def bits_per_weight(bits: float, group_size: int | None = None, scale_bits: int = 16, zero_bits: int = 0) -> float:
    """Effective bits per weight including the per-group metadata (e.g. 4-bit, g128, fp16 scale: 4.125)."""
    return bits + ((scale_bits + zero_bits) / group_size if group_size else 0.0)


def kv_bytes(n_layers: int, n_kv_heads: int, head_dim: int, context_len: float, batch: int = 1,
             bytes_per_element: float = 2) -> float:
    """Bytes of KV cache a decode step reads: K and V, every layer, ``context_len`` cached positions per row."""
    return 2 * n_layers * batch * n_kv_heads * context_len * head_dim * bytes_per_element


def head_dim(config) -> int:
    """``config.head_dim`` where the config has one, else hidden / heads (HF configs and ``ModelShape``)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(shape, bytes_per_element: float = 2) -> float:
    """K and V of one token across all layers (``shape``: a ``ModelShape`` or an HF Llama config)."""
    return kv_bytes(shape.num_hidden_layers, shape.num_key_value_heads, head_dim(shape), 1, 1, bytes_per_element)


def step_weight_bytes(stored_bytes: float, embedding_bytes: float, tied: bool) -> float:
    """Weight bytes one decode step reads, from the bytes stored (see the module docstring on the embedding):
    an untied embedding table is stored but not read; a tied one is the LM head and is read."""
    return stored_bytes if tied else stored_bytes - embedding_bytes


def prefill_flops(shape, n_tokens: int, causal: bool = True) -> float:
    """FLOPs of a forward over ``n_tokens``: 2·params·tokens for the matmuls + QKᵀ and PV (halved when causal)."""
    matmul = 2 * linear_params(shape) * n_tokens
    attn = 4 * shape.num_hidden_layers * shape.num_attention_heads * shape.head_dim * n_tokens**2
    return matmul + (attn / 2 if causal else attn)


@dataclass
class DecodeFloor:
    """Bytes one decode step must read and the time that takes at a given bandwidth."""

    weight_bytes: float
    kv_bytes: float
    bandwidth: float  # bytes/s

    @property
    def bytes_per_step(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def seconds(self) -> float:
        return self.bytes_per_step / self.bandwidth

    @property
    def ms(self) -> float:
        return self.seconds * 1e3


def decode_floor(weight_bytes_: float, bandwidth: float, kv_bytes_per_tok: float = 0.0, context: int = 0,
                 batch: int = 1) -> DecodeFloor:
    """The memory-bandwidth floor of one decode step: weights once, plus each sequence's KV cache."""
    return DecodeFloor(weight_bytes_, kv_bytes_per_tok * context * batch, bandwidth)


def decode_floor_ms(weight_bytes_: float, kv_bytes_: float, bandwidth: float) -> float:
    """The decode floor in ms: (weight bytes read + KV bytes read) / bandwidth (bytes/s)."""
    return DecodeFloor(weight_bytes_, kv_bytes_, bandwidth).ms


def implied_bandwidth(bytes_per_step: float, seconds_per_step: float) -> float:
    """The bandwidth a quoted time per token would need if every step read ``bytes_per_step``: bytes/s."""
    return bytes_per_step / seconds_per_step


@dataclass(frozen=True)
class StreamFit:
    """A kernel's time as ``fixed_s + bytes / rate_Bps``, fitted over runs of several sizes (``fixed_plus_stream``);
    ``rel_residuals``: (fit - measured) / measured of each run, in the order given."""
    fixed_s: float
    rate_Bps: float
    rel_residuals: tuple

    @property
    def max_rel_residual(self) -> float:
        return max(abs(r) for r in self.rel_residuals)

    def seconds(self, nbytes: float) -> float:
        return self.fixed_s + nbytes / self.rate_Bps


def fixed_plus_stream(nbytes, seconds) -> StreamFit:
    """Fit t = fixed + bytes / rate to runs of one kernel over several sizes (bytes read, seconds each).

    Hockney's alpha-beta model of a message (a latency plus the size over a bandwidth; ``parallel.fit_ring`` fits it
    to ring all-reduces in notebook 08), applied to a kernel that streams its bytes once: ``fixed`` is what a call costs whatever it reads (its launch, the first bytes' latency,
    the last wave's tail), ``rate`` how fast the bytes go once they flow. Weighted least squares on the relative
    error, so the small runs count as much as the large. Needs three runs or more (two would fit exactly and test
    nothing) of at least two sizes, with times that grow with the bytes.
    """
    b = [float(v) for v in nbytes]
    t = [float(v) for v in seconds]
    if len(b) != len(t) or len(b) < 3:
        raise ValueError(f"give bytes and seconds of three runs or more, of equal length (got {len(b)} and {len(t)})")
    if min(b) <= 0 or min(t) <= 0:
        raise ValueError("bytes and seconds must be positive")
    if len(set(b)) < 2:
        raise ValueError("the runs must read at least two different numbers of bytes")
    # minimise sum(((fixed + s * b_i) - t_i) / t_i)^2: rows (1 / t_i, b_i / t_i), target 1
    s11 = sum(1 / ti**2 for ti in t)
    s12 = sum(bi / ti**2 for bi, ti in zip(b, t))
    s22 = sum(bi**2 / ti**2 for bi, ti in zip(b, t))
    r1 = sum(1 / ti for ti in t)
    r2 = sum(bi / ti for bi, ti in zip(b, t))
    det = s11 * s22 - s12 * s12
    fixed = (r1 * s22 - r2 * s12) / det
    slope = (s11 * r2 - s12 * r1) / det
    if slope <= 0:
        raise ValueError("the times do not grow with the bytes: no streaming rate to fit (are the runs cached, or "
                         "too small to leave the fixed cost?)")
    return StreamFit(fixed, 1 / slope, tuple((fixed + slope * bi - ti) / ti for bi, ti in zip(b, t)))
