"""The quality table: apply a quantization method to SmolLM2, evaluate it against the unquantized model, record.

Methods (names are the keys of ``results/<device>/quality.json``'s ``summary``):

- ``bf16`` (GPU) / ``fp32`` (CPU): the unquantized reference every other row is compared with.
- ``int8``, ``nf4``, ``nf4_dq``: bitsandbytes LLM.int8 and NF4 (without / with double quantization) through
  transformers (``labkit.models.load(..., quant=...)``).
- ``rtn_w{b}`` / ``rtn_w{b}g{g}``: round-to-nearest, per output channel or per group of g inputs.
- ``gptq_w{b}g{g}``: GPTQ (``labkit.gptq``), act-order, calibrated on the calibration split.
- ``qat_w{b}g{g}``: fake-quant fine-tuning by distillation from the reference (``labkit.qat``), then RTN of the
  trained weights.

``evaluate_quality`` scores a model in one pass over non-overlapping windows of the evaluation tokens:
perplexity, mean KL(reference ‖ model) per token and top-1 agreement with the reference. ``cli_main`` is
``labkit quality --methods ... [--out PATH]``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from labkit import env

METHOD_RE = re.compile(r"^(rtn|gptq|qat)_w(\d+)(?:g(\d+))?$")
BNB_METHODS = {"int8": "int8", "nf4": "nf4", "nf4_dq": "nf4-dq", "nf4-dq": "nf4-dq"}
DEFAULT_METHODS = ("reference", "int8", "nf4", "nf4_dq", "rtn_w8", "rtn_w4g128", "gptq_w4g128", "rtn_w3g128",
                   "gptq_w3g128", "qat_w3g128")


@dataclass
class QualityConfig:
    """Sizes of one quality run; ``for_profile`` gives the quick (CPU) and full (GPU) presets."""

    eval_tokens: int = 2048
    ctx_len: int = 512
    batch_size: int = 4
    calib_samples: int = 16
    calib_seq_len: int = 128
    corpus: str = "pydoc"
    qat_steps: int = 10  # quick (CPU): a QAT step costs seconds there; the full profile trains 200
    qat_batch: int = 2
    qat_seq_len: int = 64
    qat_lr: float = 2e-4
    gptq_blocksize: int = 128
    gptq_percdamp: float = 0.01
    gptq_actorder: bool = True

    @classmethod
    def for_profile(cls, profile: str | None = None) -> "QualityConfig":
        if (profile or env.profile()) == "full":
            return cls(eval_tokens=32768, ctx_len=1024, batch_size=16, calib_samples=128, calib_seq_len=512,
                       qat_steps=200, qat_batch=8, qat_seq_len=512, qat_lr=5e-5)
        return cls()


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_quality(model, ids: torch.Tensor, reference=None, ctx_len: int = 512, batch_size: int = 4,
                     reference_logprobs: list | None = None) -> dict:
    """Perplexity, KL(reference ‖ model) and top-1 agreement over non-overlapping windows of ``ids``.

    ids: 1-D token stream, cut to whole windows ``(n_win, ctx_len)``. Within a window, token t is predicted from
    tokens 0..t-1 of the window (the first token of each window is not scored). ``reference`` (a model) or
    ``reference_logprobs`` (its cached log-probs per batch, from ``reference_logprobs_of``) gives KL and top-1;
    without either, only perplexity is returned.
    """
    n_win = ids.numel() // ctx_len
    if n_win == 0:
        raise ValueError(f"need at least ctx_len={ctx_len} tokens, have {ids.numel()}")
    windows = ids[: n_win * ctx_len].view(n_win, ctx_len)  # (n_win, ctx_len)
    dev = next(model.parameters()).device
    nll, kl, agree, n = 0.0, 0.0, 0, 0
    for bi, i in enumerate(range(0, n_win, batch_size)):
        x = windows[i: i + batch_size].to(dev)  # (B, T)
        lp = torch.log_softmax(model(input_ids=x).logits.float(), dim=-1)[:, :-1]  # (B, T-1, V)
        nll -= lp.gather(-1, x[:, 1:, None]).sum().item()
        n += x[:, 1:].numel()
        if reference is not None or reference_logprobs is not None:
            if reference_logprobs is not None:
                lq = reference_logprobs[bi].to(lp.device)
            else:
                ref_dev = next(reference.parameters()).device
                lq = torch.log_softmax(reference(input_ids=x.to(ref_dev)).logits.float(), dim=-1)[:, :-1].to(lp.device)
            kl += (lq.exp() * (lq - lp)).sum().item()
            agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
    out = {"ppl": math.exp(nll / n), "nll": nll / n, "n_tokens": n}
    if reference is not None or reference_logprobs is not None:
        out.update(kl=kl / n, top1=agree / n)
    return out


@torch.no_grad()
def reference_logprobs_of(reference, ids: torch.Tensor, ctx_len: int = 512, batch_size: int = 4) -> list:
    """The reference's log-probs for ``evaluate_quality``, batch by batch (keep them when they fit in memory)."""
    n_win = ids.numel() // ctx_len
    windows = ids[: n_win * ctx_len].view(n_win, ctx_len)
    dev = next(reference.parameters()).device
    return [torch.log_softmax(reference(input_ids=windows[i: i + batch_size].to(dev)).logits.float(), -1)[:, :-1]
            for i in range(0, n_win, batch_size)]


# ---------------------------------------------------------------------------------------------- methods
@contextlib.contextmanager
def quiet_bnb():
    """Silence bitsandbytes' per-call 'inputs will be cast to float16' log line (LLM.int8 on fp32 inputs)."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
            yield
    finally:
        logger.setLevel(level)


def parse_method(name: str) -> dict:
    """``'gptq_w4g128'`` -> ``{'kind': 'gptq', 'bits': 4, 'groupsize': 128}``; bnb and reference names too."""
    if name in ("reference", "bf16", "fp32", "fp16"):
        return {"kind": "reference"}
    if name in BNB_METHODS:
        return {"kind": "bnb", "quant": BNB_METHODS[name]}
    m = METHOD_RE.match(name)
    if not m:
        raise env.LabkitError(f"Unknown method {name!r}. Use reference/bf16/fp32, int8, nf4, nf4_dq, or "
                              "rtn_w<bits>[g<group>], gptq_w<bits>g<group>, qat_w<bits>g<group> (e.g. gptq_w4g128).")
    kind, bits, g = m.group(1), int(m.group(2)), m.group(3)
    return {"kind": kind, "bits": bits, "groupsize": int(g) if g else None}


def bnb_bits_per_weight(quant: str, in_features: int = 576) -> float:
    """Stored bits per linear weight of bitsandbytes formats, scales included.

    LLM.int8: int8 + one fp32 scale per output row (``in_features`` weights). NF4: 4 bits + one fp32 absmax per
    64 weights. NF4 with double quant: absmax in 8 bits per 64 weights + one fp32 per 256 absmax values.
    """
    if quant == "int8":
        return 8 + 32 / in_features
    if quant == "nf4":
        return 4 + 32 / 64
    if quant == "nf4-dq":
        return 4 + 8 / 64 + 32 / (64 * 256)
    raise ValueError(quant)


def _linear_bits(model) -> float:
    """Mean stored bits per weight over the model's quantized linear layers (weighted by size)."""
    from labkit.quant import QuantLinear

    num = den = 0.0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            num += mod.bits_per_weight * mod.q.numel()
            den += mod.q.numel()
    return num / den


def apply_method(name: str, reference, calib: torch.Tensor, cfg: QualityConfig, qat_data: torch.Tensor | None = None,
                 progress: bool = False):
    """Build the model of one method. Returns ``(model, info)``: info has bits per weight, quantization seconds.

    ``reference`` is the unquantized model (copied, never modified); ``calib (n, seq_len)`` feeds GPTQ;
    ``qat_data (n, seq_len)`` feeds QAT (defaults to ``calib``).
    """
    from labkit import gptq, models, qat, quant

    spec = parse_method(name)
    t0 = time.perf_counter()
    ref_bits = torch.finfo(next(reference.parameters()).dtype).bits
    if spec["kind"] == "reference":
        return reference, {"bits_per_weight": float(ref_bits), "quant_seconds": 0.0}
    if spec["kind"] == "bnb":
        dev = next(reference.parameters()).device
        model, _ = models.load(models.EMBEDDED, quant=spec["quant"], device=dev,
                               dtype=next(reference.parameters()).dtype)
        # per-layer in_features differ (576 or 1536): average bits over the linear weights
        lins = [(m.in_features, m.in_features * m.out_features) for m in reference.modules()
                if isinstance(m, torch.nn.Linear) and m.out_features != reference.config.vocab_size]
        bits = sum(bnb_bits_per_weight(spec["quant"], fi) * n for fi, n in lins) / sum(n for _, n in lins)
        return model, {"bits_per_weight": bits, "quant_seconds": time.perf_counter() - t0}
    model = copy.deepcopy(reference)
    bits, g = spec["bits"], spec["groupsize"]
    if spec["kind"] == "rtn":
        gptq.rtn_quantize_model(model, bits, g)
    elif spec["kind"] == "gptq":
        gptq.gptq_quantize_model(model, calib, bits, g, blocksize=cfg.gptq_blocksize,
                                 percdamp=cfg.gptq_percdamp, actorder=cfg.gptq_actorder, progress=progress)
    else:
        # train in fp32 (bf16 weights would swallow small AdamW steps), then return to the reference dtype;
        # the QuantLinear scales stay fp32 so the converted weights are exactly those trained against
        ref_dtype = next(reference.parameters()).dtype
        model.float()
        qat.prepare(model, bits, g)
        data = qat_data if qat_data is not None else calib
        qat.qat_finetune(model, reference, data, cfg.qat_steps, lr=cfg.qat_lr, batch_size=cfg.qat_batch,
                         progress=progress)
        qat.convert(model)
        for prm in model.parameters():
            prm.data = prm.data.to(ref_dtype)
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return model, {"bits_per_weight": _linear_bits(model), "quant_seconds": seconds,
                   "weight_bytes_packed": quant.quantized_weight_bytes(model)}


# ---------------------------------------------------------------------------------------------- the table
def run_quality(methods=DEFAULT_METHODS, cfg: QualityConfig | None = None, progress: bool = True,
                log=print) -> tuple[list[dict], dict]:
    """Load SmolLM2 (bf16 on GPU, fp32 on CPU), apply each method, evaluate; returns ``(records, summary)``."""
    from labkit import data, models

    cfg = cfg or QualityConfig.for_profile()
    reference, tok = models.load(models.EMBEDDED)
    ref_name = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[next(reference.parameters()).dtype]
    splits = data.load_splits(tok, cfg.corpus, eval_tokens=cfg.eval_tokens)
    calib = data.calibration_batches(splits.calib, cfg.calib_samples, cfg.calib_seq_len)
    qat_data = data.calibration_batches(splits.calib, max(256, cfg.qat_steps * cfg.qat_batch), cfg.qat_seq_len, seed=1)
    ids = splits.eval
    n_win = ids.numel() // cfg.ctx_len
    cache = None
    if n_win * cfg.ctx_len * reference.config.vocab_size * 4 < 2e9:
        cache = reference_logprobs_of(reference, ids, cfg.ctx_len, cfg.batch_size)
    records, summary = [], {}
    for name in methods:
        spec = parse_method(name)
        key = ref_name if spec["kind"] == "reference" else ("nf4_dq" if name == "nf4-dq" else name)
        with quiet_bnb():
            model, info = apply_method(name, reference, calib, cfg, qat_data, progress=progress)
            t0 = time.perf_counter()
            q = evaluate_quality(model, ids, None if cache is not None else reference, cfg.ctx_len, cfg.batch_size,
                                 reference_logprobs=cache)
        mem = models.weight_bytes(model) if spec["kind"] in ("reference", "bnb") else info["weight_bytes_packed"]
        rec = {"method": key, **spec, "bits_per_weight": round(info["bits_per_weight"], 4), "weight_bytes": mem,
               "ppl": q["ppl"], "kl": q["kl"], "top1": q["top1"], "quant_seconds": info["quant_seconds"],
               "eval_seconds": time.perf_counter() - t0, "eval_tokens": q["n_tokens"]}
        records.append(rec)
        summary[key] = q["ppl"]
        log(f"{key:>12}  bits/w {rec['bits_per_weight']:6.3f}  mem {mem / 2**20:7.1f} MiB  ppl {q['ppl']:8.3f}  "
            f"KL {q['kl']:.4f}  top1 {q['top1']:.3f}  quant {info['quant_seconds']:6.1f}s")
        if model is not reference:
            del model
    return records, summary


def format_table(records: list[dict]) -> str:
    """A markdown table of quality records."""
    head = "| method | bits/weight | weight MiB | perplexity | KL vs ref (nats) | top-1 agree | quant s |\n" \
           "|---|---:|---:|---:|---:|---:|---:|\n"
    return head + "\n".join(
        f"| {r['method']} | {r['bits_per_weight']:.3f} | {r['weight_bytes'] / 2**20:.1f} | {r['ppl']:.3f} | "
        f"{r['kl']:.4f} | {r['top1']:.3f} | {r['quant_seconds']:.1f} |" for r in records)


def cli_main(argv: list[str] | None = None) -> int:
    """``labkit quality --methods a,b,... [--profile quick|full] [--eval-tokens N] [--out PATH]``."""
    from labkit import bench, results
    from pathlib import Path

    from labkit.cli import positive_int

    p = argparse.ArgumentParser(prog="labkit quality",
                                description="Quantize SmolLM2 with each method and measure perplexity, KL and top-1 "
                                            "against the unquantized model; writes results/local/<device>/quality.json "
                                            "(results/<device>/ with --reference).")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated: reference,int8,nf4,nf4_dq,rtn_w8,rtn_w4g128,gptq_w4g128,... "
                        f"(default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--profile", choices=("quick", "full"), default=None, help="sizes (default: from the device)")
    p.add_argument("--eval-tokens", type=positive_int, default=None, help="evaluation tokens (default: by profile)")
    p.add_argument("--qat-steps", type=positive_int, default=None, help="QAT optimizer steps (default: by profile)")
    p.add_argument("--out", default=None, help="output JSON (default: results/local/<device-slug>/quality.json)")
    p.add_argument("--reference", action="store_true", help="write the committed reference folder results/<device>/")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        p.error("--methods: give at least one method")
    for m in methods:
        parse_method(m)  # fail before loading anything
    out = Path(args.out) if args.out else results.output_dir(args.reference) / "quality.json"
    env.writable_dir(out.parent)
    cfg = QualityConfig.for_profile(args.profile)
    if args.eval_tokens:
        cfg.eval_tokens = args.eval_tokens
    if args.qat_steps is not None:
        cfg.qat_steps = args.qat_steps
    t0 = time.perf_counter()
    records, summary = run_quality(methods, cfg)
    meta = bench.run_metadata()
    meta.update(config=asdict(cfg), total_seconds=time.perf_counter() - t0, reference=records[0]["method"]
                if records and records[0]["kind"] == "reference" else None)
    path = bench.write_results(out, records, summary, meta)
    print(format_table(records))
    print(f"wrote {path}")
    return 0


def plot_quality(records: list[dict], path=None, title: str = ""):
    """Perplexity and KL against bits per weight, one labelled point per method; saved to ``path`` if given."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ref = next((r for r in records if r["kind"] == "reference"), None) if records and "kind" in records[0] else None
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for r in records:
        m = r["method"]
        color = "C0" if m.startswith("rtn") else "C3" if m.startswith("gptq") else "C1" if m.startswith("qat") \
            else "C2" if m in BNB_METHODS else "k"
        for a, y in ((ax[0], r["ppl"]), (ax[1], max(r["kl"], 1e-5))):
            a.scatter(r["bits_per_weight"], y, color=color)
            a.annotate(m, (r["bits_per_weight"], y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    if ref is not None:
        ax[0].axhline(ref["ppl"], color="k", lw=0.8, ls="--")
    ax[0].set(xscale="log", yscale="log", xlabel="bits per weight (scales included)", ylabel="perplexity",
              title=title or "SmolLM2-135M: quality vs bits")
    ax[1].set(xscale="log", yscale="log", xlabel="bits per weight", ylabel="KL(reference ‖ method), nats/token")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
