"""``labkit bench serving``: the notebook 07 benchmark over ``labkit.serving``'s engine.

One seeded trace replayed with static and with continuous batching (throughput, TTFT, time per output token, KV
waste paged vs contiguous, prefix-cache hit rate), a long-prompt trace with and without chunked prefill, and a subset
of answers checked against running each request alone. On a GPU also the batched decode step of the 7B shape
(random weights) at batch 64 against its bandwidth floor, and vLLM on the same trace where it is installed.
Results go to ``labkit.results.output_dir(reference)/serving.json`` (``serving-<model>.json`` for other models).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from dataclasses import dataclass

import torch

from labkit import env, roofline
from labkit.env import LabkitError
from labkit.serving import (Engine, EngineConfig, Request, Sequence, compare_outputs, default_kernels,
                            kv_waste_contiguous, make_long_prompt_trace, make_trace, replay_together, run_alone,
                            shared_weights, summarize_run)


# ---------------------------------------------------------------------------------------------- benchmark
@dataclass
class BenchSizes:
    """Trace sizes of ``labkit bench serving`` per profile (quick: SmolLM2 on a CPU in about a minute)."""

    n_requests: int = 48  # six static batches (full: eight): fewer and the start and the last long answers' tail
    # decide the comparison (SmolLM2 on an H200: 1.73x with 256 requests at 07b836e, 2.55x with 512 at 92c5cdc)
    prompt_len: tuple = (8, 32)
    answer_len: tuple = (1, 40)
    max_batch: int = 8
    n_chunk: int = 6  # short requests decoding when the long prompts arrive (n_chunk + n_long <= max_batch)
    n_long: int = 2
    chunk_answer_len: tuple = (12, 16)
    long_len: int = 192
    chunk_size: int = 16
    n_alone: int = 4
    rate: float = 400.0
    admit_batch: int = 1  # continuous batching on the main trace: admit this many requests at once (EngineConfig)

    @classmethod
    def for_profile(cls, profile: str) -> "BenchSizes":
        if profile == "quick":
            return cls()
        return cls(n_requests=512, prompt_len=(32, 512), answer_len=(4, 256), max_batch=64, n_chunk=48, n_long=4,
                   chunk_answer_len=(32, 64), long_len=2048, chunk_size=256, n_alone=16, rate=1e4, admit_batch=16)


def run_serving_benchmark(model_name: str = "smollm2-135m", sizes: BenchSizes | None = None, out_dir=None,
                          progress: bool = True, log=print, tpot_target_ms: float | None = None) -> dict:
    """Static vs continuous batching on one trace, chunked prefill on a trace with long prompts, KV waste paged vs
    contiguous, prefix-cache hit rate, and answers checked against running alone. Writes serving.json + plot."""
    sizes = sizes or BenchSizes.for_profile(env.profile())
    dev = env.device()
    st = _setup(model_name, sizes)
    hf, eos, trace, base, model = st.hf, st.eos, st.trace, st.base, st.model
    info, kernels, vocab, bs = hf.labkit_info, base.kernels, hf.config.vocab_size, base.block_size
    records, outs = [], {}
    target = tpot_target_ms / 1e3 if tpot_target_ms else None
    # each comparison steps its engines in turn (replay_together): a load on the machine falls on both alike
    names = ("static", "continuous")
    engines = [Engine(model, dataclasses.replace(base, scheduler="static"), eos),
               Engine(model, dataclasses.replace(base, admit_batch=sizes.admit_batch), eos)]
    for name, eng, seqs in zip(names, engines, replay_together(engines, trace, progress, list(names))):
        s = summarize_run(seqs, eng, target)
        s["kv_waste_contiguous"] = kv_waste_contiguous(seqs, eng)
        records.append({"model": info.label, "trace": "mixed", "scheduler": name, **s})
        outs[name] = [q.output for q in _in_order(seqs)]
        log(f"{name:>10}: {s['throughput_tok_s']:.1f} tok/s, TTFT p50 {s['ttft_p50_ms']:.0f} ms, "
            f"TPOT p99 {s['tpot_p99_ms']:.0f} ms, {s['steps']} steps: {s['steps_mixed']} with prompt tokens "
            f"(median {s['step_ms_mixed_p50'] or 0:.1f} ms), {s['steps_decode']} decode-only "
            f"(median {s['step_ms_decode_p50'] or 0:.1f} ms)")
    thr = {r["scheduler"]: r["throughput_tok_s"] for r in records}
    cont = records[-1]
    # chunked prefill: a few long prompts among short ones; the per-token interval p99 with and without chunks
    long_trace = make_long_prompt_trace(sizes.n_chunk, sizes.n_long, (8, 24), sizes.chunk_answer_len, sizes.long_len,
                                        vocab)
    chunk_p99 = {}
    names = ("no chunking", "chunked")
    engines = eng = None  # drop the KV pools of the runs above before these are built
    long_blocks = sum(-(-(len(r.prompt) + r.max_tokens) // bs) for r in long_trace) + 16  # all of them at once
    engines = [Engine(model, dataclasses.replace(base, chunk_size=chunk, prefix_caching=False, num_blocks=long_blocks),
                      eos) for chunk in (None, sizes.chunk_size)]
    for name, eng, seqs in zip(names, engines, replay_together(engines, long_trace, progress, list(names))):
        s = summarize_run(seqs, eng, target)
        records.append({"model": info.label, "trace": "long prompts", "scheduler": f"continuous, {name}", **s})
        chunk_p99[name] = s["itl_p99_ms"]
        outs[name] = [q.output for q in _in_order(seqs)]
        log(f"{name:>12}: inter-token p99 {s['itl_p99_ms']:.0f} ms, TTFT p50 {s['ttft_p50_ms']:.0f} ms")
    # the answers against each request run alone (a subset: alone is one sequence per step)
    n = sizes.n_alone
    engines = eng = None
    alone, gaps = run_alone(model, base, trace[:n], progress, eos)
    check = compare_outputs({k: outs[k][:n] for k in ("static", "continuous")}, alone, gaps)
    alone_l, gaps_l = run_alone(model, base, long_trace[:n], progress, eos)
    check_l = compare_outputs({k: outs[k][:n] for k in ("no chunking", "chunked")}, alone_l, gaps_l)
    summary = {
        "model": info.label, "device": env.device_name(), "profile": env.profile(),
        "clock": "process CPU time" if dev.type == "cpu" else "wall time",
        "continuous_vs_static_throughput": thr["continuous"] / thr["static"],
        "chunked_prefill_tpot_p99_ratio": chunk_p99["chunked"] / chunk_p99["no chunking"],
        "kv_waste_paged": cont["kv_waste_paged"], "kv_waste_contiguous": cont["kv_waste_contiguous"],
        "prefix_cache_hit_rate": cont["prefix_cache_hit_rate"],
        "outputs_equal_alone": bool(check["all_ok"] and check_l["all_ok"]),
        "outputs_checked_alone": 2 * n,
        "near_ties": sum(len(r["near_ties"]) for c in (check, check_l) for r in c["runs"].values()),
        "tpot_p99_ms": {"static": records[0]["tpot_p99_ms"], "continuous": records[1]["tpot_p99_ms"]},
        "steps": {"static": records[0]["steps"], "continuous": records[1]["steps"]},
        "step_ms_p50": {r["scheduler"]: {"with_prompt_tokens": r["step_ms_mixed_p50"], "decode_only":
                                         r["step_ms_decode_p50"]} for r in records[:2]},
        "trace": {"requests": sizes.n_requests, "prompt_len": sizes.prompt_len, "answer_len_loguniform":
                  sizes.answer_len, "shared_system_prompt_tokens": len(st.system), "max_batch": sizes.max_batch,
                  "block_size": bs, "long_prompt_len": sizes.long_len, "chunk_size": sizes.chunk_size,
                  "admit_batch": sizes.admit_batch},
    }
    if dev.type == "cuda":  # the batch-64 decode step is judged on the 7B shape (random weights)
        from labkit import models

        del model
        big = hf if model_name == GPU_FLOOR_MODEL else models.load(GPU_FLOOR_MODEL, device=dev)[0]
        summary["decode_batch64"] = gpu_decode_floor(big, kernels, log=log)
        del big
        summary["vllm"] = vllm_comparison(model_name, trace, thr["continuous"], log=log)
    log(f"continuous / static throughput {summary['continuous_vs_static_throughput']:.2f}x; chunked prefill "
        f"p99 ratio {summary['chunked_prefill_tpot_p99_ratio']:.2f}; KV waste paged "
        f"{summary['kv_waste_paged']:.1%} vs contiguous {summary['kv_waste_contiguous']:.1%}; prefix hit rate "
        f"{summary['prefix_cache_hit_rate']:.0%}; outputs equal alone: {summary['outputs_equal_alone']}")
    doc = {"records": records, "summary": summary}
    if out_dir is not None:
        from pathlib import Path

        from labkit import bench

        stem = results_name(model_name)
        bench.write_results(Path(out_dir) / f"{stem}.json", records, summary)
        plot_serving(records, Path(out_dir) / f"{stem}.png")
    return doc


GPU_FLOOR_MODEL = "llama2-7b-shape"


@dataclass
class _Setup:
    hf: object  # the transformers model
    eos: object
    system: list  # the shared system prompt's token ids
    trace: list
    base: EngineConfig  # the engine config every run starts from
    model: object  # shared_weights(hf): one converted copy for every engine


def _setup(model_name: str, sizes: BenchSizes) -> _Setup:
    """The model, the main trace and the engine config every run of the benchmark shares; the first-call costs
    (allocator, kernel compiles) paid by a short warm-up replay, outside the timed runs."""
    from labkit import models

    dev = env.device()
    hf, tok = models.load(model_name, device=dev)
    eos = getattr(hf.generation_config, "eos_token_id", None)
    vocab = hf.config.vocab_size
    system = (tok("You are a helpful assistant. Answer the question briefly and politely, in plain English.")
              ["input_ids"] if tok is not None else list(range(100, 132)))
    main_len = sizes.prompt_len[1] + sizes.answer_len[1] + len(system) + 8
    max_len = max(main_len, sizes.long_len + sizes.answer_len[1] + 8)
    bs = 16
    num_blocks = sizes.max_batch * -(-main_len // bs) + 16  # room for a full batch at the main trace's longest
    kernels = default_kernels(dev)
    base = EngineConfig(max_batch=sizes.max_batch, block_size=bs, num_blocks=num_blocks, max_model_len=max_len,
                        prefix_caching=True, kernels=kernels)
    trace = make_trace(sizes.n_requests, sizes.rate, sizes.prompt_len, sizes.answer_len, system, 0.5, vocab, seed=0)
    model = shared_weights(hf, max_len)  # one copy of the converted weights for every engine
    Engine(model, base, eos).replay([dataclasses.replace(r, arrival=0.0 if i < 2 else 1e-9)
                                     for i, r in enumerate(trace[:3])], progress=False)  # a prefill of two,
    # decode-only steps, and a step mixing a prompt into the decodes
    return _Setup(hf, eos, system, trace, base, model)


def run_prefill_budget_sweep(model_name: str = "smollm2-135m", budgets=(32, 64, 128, 256), sizes=None, out_dir=None,
                             progress: bool = True, log=print, tag: str | None = None) -> dict:
    """Static batching against continuous batching with chunked prefill at several token budgets per step, on the
    main trace: what each budget buys in throughput and costs in time per output token.

    A step computes one token for every decoding sequence and, within ``max_step_tokens``, prompt chunks of the
    sequences being admitted. A small budget spreads the prompts thinly over many steps (each decode step a little
    slower, the prompts' first tokens later); a large one takes them in few, long steps that stall every decoding
    sequence. Static batching keeps the prompts out of the decoding entirely: a batch's prompts run before its first
    decode step, so its time per token is that of decode-only steps, paid for in time to first token.
    Writes ``serving-budgets[-<model>][-<tag>].json``; its summary holds, per budget, the throughput ratio over
    static and the p99 time per output token beside static's, and the best ratio among the budgets whose p99 TPOT is
    not worse than static's (None when none is)."""
    sizes = sizes or BenchSizes.for_profile(env.profile())
    budgets = _check_budgets(budgets, sizes.max_batch)
    st = _setup(model_name, sizes)
    info, eos, trace, base, model = st.hf.labkit_info, st.eos, st.trace, st.base, st.model
    records = []
    runs = [("static", dataclasses.replace(base, scheduler="static"))] + [
        (f"continuous, budget {b}", dataclasses.replace(base, max_step_tokens=b, chunk_size=b)) for b in budgets]
    for name, cfg in runs:  # one engine at a time: on a GPU, the 7B shape's KV pools do not fit side by side
        eng = Engine(model, cfg, eos)
        seqs = eng.replay(trace, progress, name)
        s = summarize_run(seqs, eng)
        records.append({"model": info.label, "trace": "mixed", "scheduler": name,
                        "max_step_tokens": cfg.max_step_tokens if cfg.scheduler != "static" else None, **s})
        log(f"{name:>22}: {s['throughput_tok_s']:.1f} tok/s, TPOT p50 {s['tpot_p50_ms']:.1f} p99 "
            f"{s['tpot_p99_ms']:.1f} ms, TTFT p50 {s['ttft_p50_ms']:.0f} ms, {s['steps']} steps")
        eng = None
    static = records[0]
    rows = [{"max_step_tokens": r["max_step_tokens"],
             "throughput_vs_static": r["throughput_tok_s"] / static["throughput_tok_s"],
             "tpot_p99_ms": r["tpot_p99_ms"], "tpot_p99_vs_static": r["tpot_p99_ms"] / static["tpot_p99_ms"],
             "ttft_p50_ms": r["ttft_p50_ms"]} for r in records[1:]]
    ok = [r["throughput_vs_static"] for r in rows if r["tpot_p99_vs_static"] <= 1.0]
    summary = {"model": info.label, "device": env.device_name(), "profile": env.profile(),
               "clock": "process CPU time" if env.device().type == "cpu" else "wall time",
               "static_tpot_p99_ms": static["tpot_p99_ms"], "static_ttft_p50_ms": static["ttft_p50_ms"],
               "budgets": rows, "best_throughput_vs_static_at_equal_or_better_tpot_p99": max(ok) if ok else None,
               "trace": {"requests": sizes.n_requests, "prompt_len": sizes.prompt_len,
                         "answer_len_loguniform": sizes.answer_len, "max_batch": sizes.max_batch}}
    for r in rows:
        log(f"budget {r['max_step_tokens']:>5}: {r['throughput_vs_static']:.2f}x static's throughput, TPOT p99 "
            f"{r['tpot_p99_vs_static']:.2f}x static's")
    doc = {"records": records, "summary": summary}
    if out_dir is not None:
        from pathlib import Path

        from labkit import bench

        stem = results_name(model_name).replace("serving", "serving-budgets", 1) + (f"-{tag}" if tag else "")
        bench.write_results(Path(out_dir) / f"{stem}.json", records, summary)
    return doc


def results_name(model_name: str) -> str:
    """``serving`` for the embedded model, ``serving-<model>`` for another (so runs of two models sit side by side)."""
    return "serving" if model_name == "smollm2-135m" else "serving-" + model_name.replace("/", "_")


def _in_order(seqs: list[Sequence]) -> list[Sequence]:
    return sorted(seqs, key=lambda s: int(s.id.rsplit("-", 1)[1]))


def gpu_decode_floor(model, kernels: str = "triton", batch: int = 64, context: int = 512, steps: int = 8,
                     log=print) -> dict:
    """One batched decode step of ``batch`` sequences at ``context`` tokens against its bandwidth floor
    (weights + every sequence's K/V, read once, at the measured read bandwidth). GPU only."""
    from labkit import bench

    env.require_cuda("the batched decode floor")
    dev = env.device()
    bs = 16
    new = steps + 16  # answer room for the warm-up and timed steps
    cfg = EngineConfig(max_batch=batch, block_size=bs, num_blocks=batch * -(-(context + new) // bs),
                       max_model_len=context + new, kernels=kernels, max_step_tokens=batch * context)
    eng = Engine(model, cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(batch):
        eng.add(Request(torch.randint(10, model.config.vocab_size, (context,), generator=g).tolist(), new,
                        ignore_eos=True))
    while eng.scheduler.waiting or any(not s.output for s in eng.scheduler.running):
        eng.step()  # the prefills
    m = bench.measure(eng.step, warmup=2, iters=steps, device=dev)
    read_bw = env.measure_read_bandwidth(dev)
    fl = roofline.decode_floor(eng.runner.fast.weight_bytes_per_step(), read_bw,
                               roofline.kv_bytes_per_token(model.config, eng.runner.dtype.itemsize), context, batch)
    frac = fl.seconds / m.median_s
    log(f"decode batch {batch} at {context} tokens: {m.median_ms:.2f} ms/step, floor {fl.ms:.2f} ms ({frac:.0%})")
    return {"batch": batch, "context": context, "step_ms": m.median_ms, "floor_ms": fl.ms, "fraction_of_floor": frac,
            "bytes_per_step": fl.bytes_per_step, "read_bandwidth_Bps": read_bw,
            "tokens_per_s": batch / m.median_s, "model": model.labkit_info.label}


def vllm_comparison(model_name: str, trace: list[Request], ours_tok_s: float, log=print, run: bool = True) -> dict:
    """The same trace through ``vllm.LLM`` (offline, greedy, ignore_eos) where vLLM is installed (and ``run``)."""
    import importlib.util

    plan = (f"vllm.LLM(model=<{model_name} checkpoint>).generate(prompt_token_ids of the {len(trace)} requests, "
            "SamplingParams(temperature=0, max_tokens=each answer length, ignore_eos=True)); "
            "throughput = output tokens / wall time, beside ours")
    if not run or importlib.util.find_spec("vllm") is None:
        log(f"vLLM {'is not installed' if run else 'needs a GPU'}: would run {plan}")
        return {"ran": False, "would_run": plan}
    import vllm

    from labkit import models

    path = str(models.smollm2_checkpoint()) if model_name == "smollm2-135m" else model_name
    torch.cuda.empty_cache()
    llm = vllm.LLM(model=path, dtype="bfloat16", gpu_memory_utilization=0.4)  # our engine's pools still hold memory
    prompts = [{"prompt_token_ids": r.prompt} for r in trace]
    params = [vllm.SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in trace]
    t0 = time.perf_counter()
    res = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    tok = sum(len(o.outputs[0].token_ids) for o in res)
    out = {"ran": True, "vllm_tok_s": tok / dt, "ours_tok_s": ours_tok_s, "ours_fraction_of_vllm": ours_tok_s * dt / tok,
           "vllm_version": vllm.__version__}
    log(f"vLLM {out['vllm_tok_s']:.0f} tok/s; ours {ours_tok_s:.0f} tok/s ({out['ours_fraction_of_vllm']:.0%})")
    return out


def plot_serving(records: list[dict], path=None):
    """Throughput and latency percentiles of each run, side by side."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [f"{r['scheduler']}\n({r['trace']})" for r in records]
    axes[0].barh(names, [r["throughput_tok_s"] for r in records], color="tab:blue")
    axes[0].set_xlabel("output tokens / s")
    for ax, key in ((axes[1], "ttft"), (axes[2], "itl")):
        for i, q in enumerate((50, 90, 99)):
            ax.barh([j + (i - 1) * 0.27 for j in range(len(records))], [r[f"{key}_p{q}_ms"] for r in records],
                    height=0.27, label=f"p{q}")
        ax.set_yticks(range(len(records)), names if ax is axes[0] else [""] * len(records))
        ax.set_xscale("log")
        ax.set_xlabel({"ttft": "time to first token (ms)", "itl": "time between tokens (ms)"}[key])
        ax.legend(fontsize=8)
    axes[0].invert_yaxis()
    for ax in axes[1:]:
        ax.invert_yaxis()
    fig.suptitle(records[0]["model"], fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def _length_range(text: str) -> tuple[int, int]:
    """argparse type: ``MIN,MAX`` token lengths, whole numbers with 1 <= MIN <= MAX."""
    from labkit.cli import int_list

    values = int_list(text)
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: give MIN,MAX with MIN <= MAX (tokens), e.g. 32,512")
    return values[0], values[1]


def _check_budgets(budgets, max_batch: int) -> list[int]:
    """The prefill budgets sorted, each above ``max_batch`` (or a LabkitError that says why)."""
    budgets = sorted(set(int(b) for b in budgets))
    if not budgets or budgets[0] <= max_batch:
        raise LabkitError(f"prefill budgets {budgets}: each must exceed max_batch={max_batch} (a step's decode "
                          "tokens count against its budget; the rest is room for prompt chunks)")
    return budgets


def cli_main(argv: list[str]) -> int:
    """``labkit bench serving``: the 07 benchmark from the command line."""
    from labkit.cli import int_list

    p = argparse.ArgumentParser(prog="labkit bench serving", description="Static vs continuous batching, chunked "
                                "prefill, paged KV waste and prefix caching on a seeded trace; on a GPU also the "
                                "batch-64 decode step against its bandwidth floor and vLLM where installed")
    p.add_argument("--model", default="smollm2-135m", help="a labkit model name (e.g. llama2-7b-shape: random weights)")
    p.add_argument("--profile", choices=["quick", "full"], default=None, help="trace sizes (default: the device's)")
    p.add_argument("--requests", type=int, default=None, help="requests in the main trace (default: the profile's)")
    p.add_argument("--prompt-len", type=_length_range, default=None, metavar="MIN,MAX",
                   help="prompt lengths of the main trace, uniform in [MIN, MAX] tokens (default: the profile's)")
    p.add_argument("--answer-len", type=_length_range, default=None, metavar="MIN,MAX",
                   help="answer lengths of the main trace, log-uniform in [MIN, MAX] tokens (default: the profile's)")
    p.add_argument("--tag", default=None, help="with --prefill-budgets: appended to the results file's name "
                   "(letters, digits, - and _), e.g. the trace's name")
    p.add_argument("--tpot-target-ms", type=float, default=None, help="latency target for goodput")
    p.add_argument("--prefill-budgets", type=int_list, default=None, metavar="N,N,...",
                   help="instead: static batching against continuous batching with chunked prefill at each of these "
                        "token budgets per step (each above the profile's max batch), throughput and p99 time per "
                        "token side by side")
    p.add_argument("--reference", action="store_true", help="write to results/<device>/ (committed) instead of "
                   "results/local/<device>/")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from labkit import results

    sizes = BenchSizes.for_profile(args.profile or env.profile())
    if args.requests is not None:
        if args.requests < 2:
            raise LabkitError(f"--requests {args.requests}: use at least 2")
        sizes.n_requests = args.requests
    sizes.prompt_len = args.prompt_len or sizes.prompt_len
    sizes.answer_len = args.answer_len or sizes.answer_len
    if args.tpot_target_ms is not None and args.tpot_target_ms <= 0:
        raise LabkitError("--tpot-target-ms must be positive")
    if args.prefill_budgets is not None:
        budgets = _check_budgets(args.prefill_budgets, sizes.max_batch)  # before anything is written
        if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", args.tag):
            raise LabkitError(f"--tag {args.tag!r}: use up to 40 letters, digits, - and _")
        out = results.output_dir(args.reference)
        doc = run_prefill_budget_sweep(args.model, budgets, sizes, out, progress=not args.no_progress, tag=args.tag)
        print(json.dumps(doc["summary"]["budgets"], indent=2))
        return 0
    out = results.output_dir(args.reference)
    doc = run_serving_benchmark(args.model, sizes, out, progress=not args.no_progress,
                                tpot_target_ms=args.tpot_target_ms)
    keys = ("continuous_vs_static_throughput", "chunked_prefill_tpot_p99_ratio", "kv_waste_paged",
            "kv_waste_contiguous", "prefix_cache_hit_rate", "outputs_equal_alone")
    print(json.dumps({k: doc["summary"][k] for k in keys}, indent=2))
    print(f"wrote {out / (results_name(args.model) + '.json')}")
    return 0
