"""The standard Hugging Face recipe, measured: {bf16, int8, nf4} x {eager, sdpa, flash_attention_2}.

Each cell of the matrix loads a model through ``labkit.models.load`` (bitsandbytes ``BitsAndBytesConfig``
for int8 = LLM.int8 and for NF4 with double quantization and bf16/fp16 compute; ``attn_implementation``
switched with ``model.set_attn_implementation``), then times ``generate`` with ``labkit.bench.time_generate``:

- TTFT: a ``generate`` of one token after a ``prompt_len``-token prompt (512 on a GPU);
- per-token decode latency: the median gap between consecutive tokens, each stamped as ``generate`` hands it
  out (TTFT from the same runs), and tokens/s = batch / that;
- weight memory as stored (``models.weight_bytes``) and the allocator's peak during generate;
- the **decode floor** (``labkit.roofline``): bytes one step must read (weights as stored, an untied embedding
  table left out, + the KV cache at the mean context) divided by the read bandwidth measured in the same run;
  every row shows floor / measured.

A cell that cannot run here (flash-attn not installed, no GPU) becomes a row whose ``status`` holds the
LabkitError's message, never a made-up number. ``run_all`` runs the GPU matrix on SmolLM2 and on the 7B
shape (random weights, labelled so), plus a batch sweep, and writes ``pipeline.json`` and a plot;
``quoted_comparison`` sets commonly quoted A100 figures beside ours, scaled by bandwidth.
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from labkit import bench, env, models, results, roofline
from labkit.env import LabkitError

QUANTS = ("none", "int8", "nf4-dq")
ATTNS = ("eager", "sdpa", "flash_attention_2", "flash_attention_4")
A100_40GB_BW = 1.555e12  # bytes/s, datasheet
# Commonly quoted figures for Llama-2-7B on an A100 40GB, batch 1 (weights GB, ms/token, tokens/s).
QUOTED_A100 = {
    "fp16": {"weights_GB": 14.2, "ms_per_token": 12.4, "tokens_per_s": 83},
    "int8 + flash": {"weights_GB": 7.1, "ms_per_token": 6.8, "tokens_per_s": 150},
    "int4 + flash": {"weights_GB": 5.0, "ms_per_token": 4.3, "tokens_per_s": 250},
}


def kv_bytes_per_step(config, context_len: int, batch: int, dtype_bytes: int) -> int:
    """K and V of every layer, ``context_len`` cached positions, ``batch`` rows (``roofline.kv_bytes``)."""
    return roofline.kv_bytes(config.num_hidden_layers, config.num_key_value_heads, roofline.head_dim(config),
                             context_len, batch, dtype_bytes)


decode_floor_ms = roofline.decode_floor_ms  # the one definition of the floor


def step_weight_bytes(model) -> int:
    """Weight bytes a decode step of ``model`` reads: as stored, minus an untied embedding table
    (``roofline``'s rule: one row of it per sequence is read, counted as zero)."""
    emb = model.get_input_embeddings().weight
    tied = emb.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    return int(roofline.step_weight_bytes(models.weight_bytes(model), emb.numel() * emb.element_size(), tied))


measure_read_bandwidth = env.measure_read_bandwidth  # the decode ceiling lives with the others in labkit.env


def _prompt(model, tokenizer, batch: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """(batch, prompt_len) token ids: real text for a model with a tokenizer, random ids otherwise."""
    dev = model.device
    if tokenizer is not None:
        import pydoc_data.topics as topics

        text = " ".join(topics.topics[k] for k in sorted(topics.topics)[:40])
        ids = tokenizer(text, return_tensors="pt").input_ids[0, :prompt_len]
        if ids.numel() < prompt_len:
            raise LabkitError(f"the prompt text has only {ids.numel()} tokens; ask for prompt_len <= that")
        return ids.repeat(batch, 1).to(dev)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=g).to(dev)


def measure_cell(model, tokenizer, *, batch: int, prompt_len: int, new_tokens: int, read_bw: float,
                 iters: int = 3) -> dict:
    """One timed configuration: TTFT, decode ms/token, tokens/s, memory, % of the decode floor."""
    ids = _prompt(model, tokenizer, batch, prompt_len)
    dev = ids.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    r = bench.time_generate(model, ids, new_tokens, warmup=1, iters=iters)
    wbytes = models.weight_bytes(model)
    read_bytes = step_weight_bytes(model)
    dtype_bytes = 2 if dev.type == "cuda" else 4
    kv = kv_bytes_per_step(model.config, prompt_len + new_tokens // 2, batch, dtype_bytes)
    floor = decode_floor_ms(read_bytes, kv, read_bw)
    return {**r, "weight_bytes": wbytes, "weight_bytes_read": read_bytes, "kv_bytes_per_step": kv, "floor_ms": floor,
            "fraction_of_floor": floor / r["decode_ms_per_token"], "status": "ok"}


def _free():
    """Return the memory of objects the caller has already deleted (``del model`` first: a function cannot
    drop its caller's references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_matrix(model_name: str, quants=QUANTS, attns=ATTNS, *, prompt_len: int = 512, new_tokens: int = 16,
               batches=(), read_bw: float | None = None, iters: int = 3, dtype=None, log=print,
               loaded: dict | None = None, skip: dict | None = None) -> list[dict]:
    """The benchmark matrix for one model: a record per (quant, attn) at batch 1, plus a batch sweep (sdpa).

    A cell that cannot run on this machine is a record with ``status`` = the LabkitError's message.
    ``loaded``: optional {quant: (model, tokenizer)} already loaded (used as is and left loaded).
    ``skip``: optional {(quant, attn): reason}: cells not run, recorded with the reason as their status.
    """
    dev = env.device()
    read_bw = read_bw or measure_read_bandwidth(dev)
    records = []
    for quant in quants:
        q = None if quant == "none" else quant
        try:
            if loaded and quant in loaded:
                model, tok = loaded[quant]
            else:
                model, tok = models.load(model_name, quant=q, attn="sdpa", dtype=dtype)
        except LabkitError as exc:
            for attn in attns:
                records.append({"model": model_name, "quant": quant, "attn": attn, "batch": 1, "status": str(exc)})
            log(f"{model_name} {quant}: {exc}")
            continue
        label = model.labkit_info.label
        for attn in attns:
            base = {"model": model_name, "label": label, "random_weights": model.labkit_info.random_weights,
                    "quant": quant, "dtype": model.labkit_info.dtype, "attn": attn, "batch": 1}
            if skip and (quant, attn) in skip:
                records.append({**base, "status": skip[(quant, attn)]})
                log(f"{model_name:18s} {quant:7s} {attn:18s} -- {skip[(quant, attn)][:90]}")
                continue
            try:
                # the checks models.load makes (GPU, flash-attn installed, dtype), on the model already loaded:
                # their error is the row; no second copy of the model is loaded to find out
                models.check_request(model_name, quant=q, attn=attn, device=model.device, dtype=model.dtype)
                try:
                    model.set_attn_implementation(attn)
                except (ImportError, ValueError) as exc:  # transformers refuses the implementation: say why
                    raise LabkitError(f"transformers cannot use attn_implementation={attn!r} here: "
                                      f"{str(exc).splitlines()[0][:160]}") from exc
                rec = {**base, **measure_cell(model, tok, batch=1, prompt_len=prompt_len, new_tokens=new_tokens,
                                              read_bw=read_bw, iters=iters)}
            except LabkitError as exc:
                rec = {**base, "status": str(exc)}
            records.append(rec)
            if rec["status"] == "ok":
                log(f"{model_name:18s} {quant:7s} {attn:18s} TTFT {rec['ttft_ms']:8.1f} ms  decode "
                    f"{rec['decode_ms_per_token']:7.2f} ms/token  {rec['tokens_per_s']:7.1f} tok/s  "
                    f"weights {rec['weight_bytes'] / 1e9:6.2f} GB  {rec['fraction_of_floor']:.1%} of floor")
            else:
                log(f"{model_name:18s} {quant:7s} {attn:18s} -- {rec['status'][:90]}")
        model.set_attn_implementation("sdpa")
        for b in batches:
            if b == 1:
                continue
            base = {"model": model_name, "label": label, "random_weights": model.labkit_info.random_weights,
                    "quant": quant, "dtype": model.labkit_info.dtype, "attn": "sdpa", "batch": b, "sweep": True}
            try:
                rec = {**base, **measure_cell(model, tok, batch=b, prompt_len=prompt_len, new_tokens=new_tokens,
                                              read_bw=read_bw, iters=iters)}
                if rec["status"] == "ok":
                    log(f"{model_name:18s} {quant:7s} sdpa batch {b:3d}: {rec['decode_ms_per_token']:7.2f} ms/step "
                        f"{rec['tokens_per_s']:8.1f} tok/s  {rec['fraction_of_floor']:.1%} of floor")
            except torch.OutOfMemoryError as exc:
                rec = {**base, "status": f"out of memory: {exc!s:.100}"}
            records.append(rec)
        if not (loaded and quant in loaded):
            del model, tok
            _free()
    return records


def quoted_comparison(records: list[dict], read_bw: float) -> list[dict]:
    """Commonly quoted A100-40GB figures beside ours on the 7B shape, the quoted times scaled by bandwidth.

    Scaling: a bandwidth-bound step takes bytes / bandwidth, so the A100 figure predicts
    ``ms * 1.555 TB/s / our read bandwidth`` here. The floor column says what the quoted memory would allow.
    """
    scale = A100_40GB_BW / read_bw
    ours = {r["quant"]: r for r in records if r.get("status") == "ok" and r.get("random_weights")
            and r.get("batch") == 1 and r.get("attn") == "sdpa" and "7b" in r["model"]}
    pairs = {"fp16": "none", "int8 + flash": "int8", "int4 + flash": "nf4-dq"}
    rows = []
    for name, q in QUOTED_A100.items():
        a100_floor_ms = q["weights_GB"] * 1e9 / A100_40GB_BW * 1e3
        row = {"quoted": name, **q, "a100_floor_ms": a100_floor_ms,
               "quoted_fraction_of_a100_floor": a100_floor_ms / q["ms_per_token"],
               "predicted_ms_here": q["ms_per_token"] * scale}
        r = ours.get(pairs[name])
        if r:
            row.update(ours_quant=pairs[name], ours_weights_GB=r["weight_bytes"] / 1e9,
                       ours_ms_per_token=r["decode_ms_per_token"], ours_tokens_per_s=r["tokens_per_s"],
                       ours_floor_ms=r["floor_ms"], ratio_ours_to_predicted=r["decode_ms_per_token"] / (q["ms_per_token"] * scale))
        rows.append(row)
    return rows


def run_all(out_dir=None, *, models_to_run=("smollm2-135m", "llama2-7b-shape"), batches=(1, 4, 16),
            iters: int = 3, log=print) -> dict:
    """GPU: matrix on SmolLM2 and the 7B shape, batch sweep, quoted-figures table -> pipeline.json + png.

    ``iters``: timed repeats per cell (median); notebook 05 uses fewer, and one model, to stay short.
    """
    env.require_cuda("the full pipeline matrix")
    dev = env.device()
    read_bw = measure_read_bandwidth(dev)
    copy_bw = env.measure_copy_bandwidth(dev)
    log(f"read bandwidth {read_bw / 1e12:.2f} TB/s, copy {copy_bw / 1e12:.2f} TB/s")
    records = []
    for name in models_to_run:
        try:
            records += run_matrix(name, prompt_len=512, new_tokens=16, batches=batches, read_bw=read_bw,
                                  iters=iters, log=log)
        except LabkitError as exc:
            records.append({"model": name, "status": str(exc)})
            log(f"{name}: {exc}")
    summary = {"read_bandwidth_Bps": read_bw, "copy_bandwidth_Bps": copy_bw, "floor_uses": "read bandwidth",
               "quoted_a100": quoted_comparison(records, read_bw)}
    if out_dir is not None:
        out = Path(out_dir)
        bench.write_results(out / "pipeline.json", records, summary)
        plot_matrix(records, out / "pipeline.png")
    return {"records": records, "summary": summary}


def plot_matrix(records: list[dict], path=None):
    """ms/token of every batch-1 cell next to its floor, one panel per model (log scale)."""
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok" and r.get("batch") == 1]
    names = sorted({r["model"] for r in ok})
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [r for r in ok if r["model"] == name]
        labels = [f"{r['quant']}/{r['attn']}" for r in rows]
        ax.barh(labels, [r["decode_ms_per_token"] for r in rows], color="tab:blue", label="HF generate")
        ax.scatter([r["floor_ms"] for r in rows], labels, color="tab:red", zorder=3, label="decode floor")
        ax.set_xscale("log")
        ax.set_xlabel("ms per token, batch 1")
        ax.set_title(rows[0].get("label", name), fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def table(records: list[dict]) -> str:
    """A plain-text table of the records (for notebooks and the CLI)."""
    head = f"{'model':18s} {'quant':7s} {'attn':18s} {'B':>3s} {'TTFT ms':>8s} {'ms/tok':>8s} {'tok/s':>8s} " \
           f"{'weights GB':>10s} {'peak GB':>8s} {'floor ms':>8s} {'% floor':>7s}"
    lines = [head]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"{r['model']:18s} {r.get('quant', ''):7s} {r.get('attn', ''):18s} {r.get('batch', ''):>3} "
                         f"-- {r.get('status', '')[:70]}")
            continue
        peak = r.get("peak_mem_bytes")
        lines.append(f"{r['model']:18s} {r['quant']:7s} {r['attn']:18s} {r['batch']:3d} {r['ttft_ms']:8.1f} "
                     f"{r['decode_ms_per_token']:8.2f} {r['tokens_per_s']:8.1f} {r['weight_bytes'] / 1e9:10.3f} "
                     f"{(peak or 0) / 1e9:8.2f} {r['floor_ms']:8.3f} {r['fraction_of_floor']:7.1%}")
    return "\n".join(lines)


def cli_main(argv: list[str]) -> int:
    """``labkit bench pipeline``: the 05 matrix from the command line."""
    from labkit.cli import choice_list, int_list, positive_int
    from labkit.models import ATTN_CHOICES, QUANT_CHOICES

    p = argparse.ArgumentParser(prog="labkit bench pipeline", description="HF generate: quantization x attention")
    p.add_argument("--model", default=None, help="one model (default: SmolLM2 and the 7B shape on a GPU, SmolLM2 on CPU)")
    p.add_argument("--quant", type=choice_list(q for q in QUANT_CHOICES if q), default=list(QUANTS),
                   help="comma list of none,int8,nf4,nf4-dq")
    p.add_argument("--attn", type=choice_list(ATTN_CHOICES), default=list(ATTNS),
                   help="comma list of eager,sdpa,flash_attention_2,flash_attention_4")
    p.add_argument("--prompt-len", type=positive_int, default=None, help="default 512 on a GPU, 64 on a CPU")
    p.add_argument("--new-tokens", type=positive_int, default=None, help="default 16 on a GPU, 8 on a CPU")
    p.add_argument("--batch", type=int_list, default=[1, 4, 16], help="comma list: batch sizes for the sdpa sweep")
    p.add_argument("--out", default=None, help="directory for pipeline.json and pipeline.png "
                   "(default results/local/<device>/, not tracked by git)")
    p.add_argument("--reference", action="store_true",
                   help="write to results/<device>/ (a committed reference run) instead of results/local/<device>/")
    args = p.parse_args(argv)
    if args.out is not None:
        env.writable_dir(args.out)
    gpu = env.has_cuda()
    batches = tuple(args.batch)
    if args.model is None and gpu and args.prompt_len is None and args.new_tokens is None:
        doc = run_all(args.out or results.output_dir(args.reference), batches=batches)
        print(table(doc["records"]))
        return 0
    names = [args.model] if args.model else (["smollm2-135m", "llama2-7b-shape"] if gpu else ["smollm2-135m"])
    read_bw = measure_read_bandwidth()
    records = []
    for name in names:
        records += run_matrix(name, tuple(args.quant), tuple(args.attn),
                              prompt_len=args.prompt_len or (512 if gpu else 64),
                              new_tokens=args.new_tokens or (16 if gpu else 8), batches=batches, read_bw=read_bw)
    out = Path(args.out or results.output_dir(args.reference))
    bench.write_results(out / "pipeline.json", records, {"read_bandwidth_Bps": read_bw, "floor_uses": "read bandwidth",
                                                         "quoted_a100": quoted_comparison(records, read_bw)})
    print(table(records))
    print(json.dumps({"written": str(out / "pipeline.json")}))
    return 0
