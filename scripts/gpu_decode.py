"""GPU run for notebooks 05 and 06: checks, then timings, results to $LABKIT_OUT (or results/<device>/).

    python3 scripts/gpu_decode.py kernels decode pipeline   # any subset of the parts, in order

kernels: every 7B-shape GEMV (bf16 / int8 / int4 Triton vs cuBLAS bf16 vs dequantize-then-matmul), checked
         against the reference on the GPU first, then timed (% of read bandwidth).
decode:  labkit.fastgen.run_decode_benchmark on the 7B shape (HF generate in the same run) -> decode.json.
smollm2: token equality of the fast loop with HF generate on SmolLM2 (bf16, GPU) -> smollm2_check.json.
pipeline: labkit.pipeline.run_matrix on SmolLM2 and the 7B shape -> pipeline.json.
prefetch: the batch-1 step with the small kernels' L2 prefetch at several sizes -> decode_prefetch.json.
rowpf:   the batch-1 step with the word-layout GEMVs prefetching their own rows before the PDL wait
         -> decode_row_prefetch.json.
silu:    the down GEMV with silu(gate) * up in its prologue against the same GEMV given h -> decode_silu.json
         (GEMV_FORMATS, default bf16,int8-il,int4-il: the step's batch-1 layouts).
Environment: GEMV_FORMATS, GEMV_SHAPES (subsets for kernels), GEMV_M (rows of x, default 1), GEMV_PARTIALS=1 (qkv, o and
down timed as the decode step calls them: a split-K config hands its partial sums on, no reduction kernel of its own),
GEMV_SWEEP=wide (row-major
int8 at longer K steps), GEMV_SWEEP=tma (the packed-fp16 word kernel with its words copied by TMA, 2-4 stages), GEMV_SWEEP=persist (its
persistent form, 1-4 programs per SM), GEMV_SWEEP=stages (the batch-1 CUDA-core configs with their K loop pipelined 2-4 deep) or
GEMV_SWEEP=mma (int4 words on the tensor cores, variant "mma": rows and warps, split), GEMV_SWEEP=mma-tma (the same with
the words staged in shared memory by TMA: slots per warp, warps, K step, split, ring depth) or GEMV_SWEEP=variants
(sweep: the word kernel's loop variants, each step reducing / loading one step ahead / per-word accumulators /
packed fp16 arithmetic for int4). GEMV_MMA_EARLY=0 or 1 sets wo_matmul.MMA_EARLY_LOADS (where the tensor-core GEMV
loads its next weight words) for the run; gemv.json records the value.
"""
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from labkit import bench, env

OUT = Path(os.environ.get("LABKIT_OUT") or bench.results_dir())
LOG = None  # opened by the first log line: a run refused for its arguments writes nothing


def log(*a):
    global LOG
    if LOG is None:
        OUT.mkdir(parents=True, exist_ok=True)
        LOG = open(OUT / "gpu_log.txt", "a")
    msg = " ".join(str(x) for x in a)
    print(msg, flush=True)
    LOG.write(msg + "\n")
    LOG.flush()


def _sweep_configs(kind):
    """A wider grid than the tuner's, for the interleaved-word kernel (exploration)."""
    from labkit.kernels import wo_matmul as wo

    if os.environ.get("GEMV_SWEEP") == "stages":  # the batch-1 CUDA-core configs, each with its K loop pipelined
        base = {0: wo.CANDIDATES_M1[0], 1: wo.CANDIDATES_M1[1] + wo.CANDIDATES_LONG_K[1], 2: [],
                3: wo.CANDIDATES_H2_INT8, 4: wo.CANDIDATES_H2}[kind]
        return [dataclasses.replace(c, stages=st) for c in base for st in (None, 2, 3, 4)]
    if kind < 3:
        if os.environ.get("GEMV_SWEEP") == "wide" and kind == 1:  # int8 rows: longer K steps, more bytes in flight
            return [wo.GemvConfig(bn, bk, warps, variant, split) for variant in ("tile", "acc")
                    for bn in (1, 2, 4, 8) for bk in (2048, 4096, 8192) for warps in (4, 8) for split in (1, 2)
                    if bn * bk <= 32768]
        return []
    if os.environ.get("GEMV_SWEEP") == "tma":  # the packed-fp16 word kernel with its words copied by TMA, pipelined
        if kind < 3:
            return []
        tiles = ((32, 1024, 4), (16, 2048, 4), (64, 512, 4), (32, 2048, 8), (64, 1024, 8), (16, 1024, 4),
                 (32, 512, 4))
        return [wo.GemvConfig(bn, bk, warps, "h2", split, stages=st, tma=True) for bn, bk, warps in tiles
                for st in (2, 3, 4) for split in (1, 4) if st * bn * bk // (2 if kind == 4 else 1) <= 160 * 1024]
    if os.environ.get("GEMV_SWEEP") == "persist":  # the TMA form on a persistent grid, 1-4 programs per SM
        if kind < 3:
            return []
        tiles = [(32, 1024, 4, 1), (16, 1024, 4, 1), (16, 2048, 4, 1), (8, 2048, 4, 1), (32, 1024, 4, 4), (16, 1024, 4, 4)]
        return ([wo.GemvConfig(bn, bk, warps, "h2", split, stages=3, tma=True, persist=p) for bn, bk, warps, split in tiles
                 for p in (1, 2, 3, 4)] + [wo.GemvConfig(bn, bk, warps, "h2", split, stages=3, tma=True)
                                           for bn, bk, warps, split in tiles])
    if os.environ.get("GEMV_SWEEP") == "mma":  # int4 words on the tensor cores (variant "mma"), rows x warps x split
        if kind != 4:
            return []
        tiles = ((32, 2), (64, 4), (128, 8), (64, 2), (128, 4), (128, 2), (256, 4))  # 1, 2 and 4 slots per warp
        return [wo.GemvConfig(bn, 256, warps, "mma", split) for bn, warps in tiles for split in (1, 4)]
    if os.environ.get("GEMV_SWEEP") == "mma-tma":  # the tensor-core GEMV with its words staged by TMA (wo_gluon)
        if kind != 4:
            return []
        return [wo.GemvConfig(slots * 16 * warps, bk, warps, "mma", split, stages=st, tma=True)
                for slots in (1, 2) for warps in (2, 4) for bk in (256, 512) for split in (1, 2, 4) for st in (2, 3)]
    if os.environ.get("GEMV_SWEEP") == "variants":  # the word kernel's loop variants on a narrower grid (M = 1)
        variants = ("tile", "pf", "acc") + (("h2",) if kind == 4 else ())  # h2: int4 in packed fp16 arithmetic
        return [wo.GemvConfig(bn, bk, warps, variant, split) for variant in variants
                for bn in (8, 16, 32) for bk in (512, 1024, 2048) for warps in (4, 8) for split in (1, 4)
                if bn * bk <= 32768 and not (variant == "pf" and bn * bk > 16384)]
    return [wo.GemvConfig(bn, bk, warps, split=split) for bn in (8, 16, 32, 64) for bk in (256, 512, 1024, 2048)
            for warps in (4, 8) for split in (1, 4) if bn * bk <= 32768]


def _quantized(w, fmt: str):
    """A bf16 weight in one of GEMV_FORMATS: bf16, int8 / int4 (row-major), int8-il / int4-il (word layout)."""
    from labkit.kernels import wo_matmul as wo

    return {"bf16": lambda: w, "int8": lambda: wo.quantize_int8(w), "int4": lambda: wo.quantize_int4(w, 128),
            "int8-il": lambda: wo.interleave(wo.quantize_int8(w)),
            "int4-il": lambda: wo.interleave(wo.quantize_int4(w, 128))}[fmt]()


def _time_configs(x, qw, silu, cands, ref32, label, partials=False):
    """Every config of cands run once (its largest error against ref32) and timed (wo.time_gemv, a CUDA graph over
    weight copies beyond L2): [(ms, config, max error)], fastest first; a config that cannot run is logged and
    skipped. ``partials``: timed as the decode step calls it, a split-K config handing its fp32 partial sums to the
    next kernel (no reduction kernel of its own)."""
    from labkit.kernels import wo_matmul as wo

    timed = []
    for cfg in dict.fromkeys(cands):
        try:
            y = wo.wo_matmul(x, qw, silu_gate_up=silu, config=cfg)
            err = (y.float() - ref32).abs().max().item()
            t = wo.time_gemv(x, qw, silu, cfg, partials=partials)
        except Exception as exc:  # too many registers and the like
            log(f"  {label} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        timed.append((t, cfg, err))
    if not timed:
        raise RuntimeError(f"{label}: no config could run")
    return sorted(timed, key=lambda r: r[0])


def part_silu():
    """What silu(gate) * up costs the down GEMV: the 7B shape's down (4096 x 11008) at batch 1, every tuner candidate
    timed with the activation product computed in the GEMV's prologue from [gate | up] (as the step does now) and
    with h = silu(gate) * up already computed (what a gate_up GEMV writing h would hand over), beside the product
    as a kernel of its own -> decode_silu.json."""
    from labkit import models
    from labkit.kernels import wo_matmul as wo

    dev = env.device()
    read_bw = env.measure_read_bandwidth(dev)
    shape = models.PRESETS["llama2-7b-shape"]
    N, K = shape.hidden_size, shape.intermediate_size
    gen = torch.Generator(dev).manual_seed(0)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
    gu = torch.randn(1, 2 * K, device=dev, dtype=torch.bfloat16, generator=gen)
    h = torch.nn.functional.silu(gu[:, :K]) * gu[:, K:]
    t_product = bench.graph_time_ms([lambda: torch.nn.functional.silu(gu[:, :K]) * gu[:, K:]])
    recs = []
    for fmt in os.environ.get("GEMV_FORMATS", "bf16,int8-il,int4-il").split(","):
        qw = _quantized(w, fmt)
        ref32 = wo.matmul_reference(h.float(), wo.dequantize(qw, torch.float32))
        cands = wo.candidates_for(wo._kind(qw), 1, tma=wo.tma_supported(dev))
        nbytes = wo.weight_nbytes(qw)
        r = {"shape": "down", "N": N, "K": K, "M": 1, "weights": fmt, "weight_bytes": nbytes,
             "silu_mul_kernel_ms": t_product}
        for mode, x, silu in (("prologue", gu, True), ("given_h", h, False)):
            timed = _time_configs(x, qw, silu, cands, ref32, f"down {fmt} {mode}")
            t, cfg, err = timed[0]
            r[mode] = {"ms": t, "config": cfg.__dict__, "max_err": err, "fraction_of_read_bw": nbytes / (t / 1e3) / read_bw}
        r["saving_ms"] = r["prologue"]["ms"] - r["given_h"]["ms"]
        recs.append(r)
        log(f"down {fmt:7s} silu in the prologue {r['prologue']['ms'] * 1e3:6.1f} us "
            f"({r['prologue']['fraction_of_read_bw']:.0%}), h given {r['given_h']['ms'] * 1e3:6.1f} us "
            f"({r['given_h']['fraction_of_read_bw']:.0%}); silu * up on its own {t_product * 1e3:.1f} us")
    bench.write_results(OUT / "decode_silu.json", recs, {
        "read_bandwidth_Bps": read_bw, "what": "the down GEMV at batch 1 with silu(gate) * up in its prologue and "
        "with h given; the best tuner candidate of each, timed in CUDA graphs over weight copies beyond L2",
        "saving_ms": {r["weights"]: r["saving_ms"] for r in recs}})


def part_kernels(sweep=False):
    """Every 7B-shape GEMV: all tuner candidates (and a wider word-kernel grid with sweep), timed in CUDA graphs."""
    from labkit import models
    from labkit.kernels import wo_matmul as wo

    dev = env.device()
    read_bw = env.measure_read_bandwidth(dev)
    shape = models.PRESETS["llama2-7b-shape"]
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.num_key_value_heads * shape.head_dim
    shapes = {"qkv": (h + 2 * kv, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (shape.vocab_size, h)}
    recs = []
    gen = torch.Generator(dev).manual_seed(0)
    only = os.environ.get("GEMV_SHAPES")
    for name, (N, K) in shapes.items():
        if only and name not in only.split(","):
            continue
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
        silu = name == "down"
        M = int(os.environ.get("GEMV_M", "1"))  # rows of x (batch)
        x = torch.randn(M, K * (2 if silu else 1), device=dev, dtype=torch.bfloat16, generator=gen)
        xin = x if not silu else torch.nn.functional.silu(x[:, :K]) * x[:, K:]
        copies = [w] + [w.clone() for _ in range(max(0, -(-(256 << 20) // (N * K * 2)) - 1))]
        t_cublas = bench.graph_time_ms([lambda wi=wi: torch.nn.functional.linear(xin, wi) for wi in copies])
        del copies
        fmts = os.environ.get("GEMV_FORMATS", "bf16,int8,int4,int8-il,int4-il").split(",")
        for fmt in fmts:
            qw = _quantized(w, fmt)
            kind = wo._kind(qw)
            ref = wo.reference_check(x, qw, silu)  # the fp32 product and the bound the tuner holds configs to
            ref32, err_torch = ref.product, ref.torch_err
            nbytes = wo.weight_nbytes(qw)
            if sweep and os.environ.get("GEMV_SWEEP") == "stages":  # the pipelining sweep replaces the tuner's list
                cands = _sweep_configs(kind)
            else:
                cands = wo.candidates_for(kind, M, tma=wo.tma_supported(dev)) + (_sweep_configs(kind) if sweep else [])
            # GEMV_PARTIALS=1: qkv, o and down timed as the decode step calls them (split-K partial sums consumed by
            # the attention and add+RMSNorm kernels after them, fastgen.FastLlama.step)
            partials = os.environ.get("GEMV_PARTIALS") == "1" and name in ("qkv", "o", "down")
            timed = _time_configs(x, qw, silu, cands, ref32, f"{name} {fmt}", partials)
            t, cfg, err = timed[0]
            ok = all(e <= ref.bound for _, _, e in timed)
            best_by_variant = {}
            for tv, cv, _ in timed:
                key = (cv.variant + (f"/stages={cv.stages}" if cv.stages else "") + ("/tma" if cv.tma else "")
                       + (f"/persist={cv.persist}" if cv.persist else ""))
                best_by_variant.setdefault(key, {"ms": tv, "config": cv.__dict__,
                                                 "fraction_of_read_bw": nbytes / (tv / 1e3) / read_bw})
            r = {"shape": name, "N": N, "K": K, "M": M, "weights": fmt, "partials": partials, "config": cfg.__dict__,
                 "max_err": err,
                 "torch_bf16_err": err_torch, "ok": ok, "ms": t, "cublas_bf16_ms": t_cublas,
                 "weight_bytes": nbytes, "fraction_of_read_bw": nbytes / (t / 1e3) / read_bw,
                 "best_by_variant": best_by_variant, "n_configs": len(timed)}
            if sweep:
                r["all"] = [{"ms": tv, "config": cv.__dict__} for tv, cv, _ in timed[:40]]
            recs.append(r)
            log(f"{name:8s} {fmt:5s} {t * 1e3:7.1f} us ({r['fraction_of_read_bw']:.0%} of read bw) cuBLAS bf16 "
                f"{t_cublas * 1e3:7.1f} us  ok={ok}  best {cfg}  | " + "  ".join(
                    f"{v}: {b['ms'] * 1e3:.1f} us {b['fraction_of_read_bw']:.0%}" for v, b in best_by_variant.items()))
    bench.write_results(OUT / "gemv.json", recs, {"read_bandwidth_Bps": read_bw, "all_ok": all(r["ok"] for r in recs),
                                                 "mma_early_loads": bool(wo.MMA_EARLY_LOADS),
                                                 "timing": "CUDA graph of 32 back-to-back calls over weight copies "
                                                           "(>= 256 MB, beyond L2); median of 7 replays"})


def part_sweep():
    part_kernels(sweep=True)


def part_decode():
    from labkit import fastgen

    fastgen.run_decode_benchmark("llama2-7b-shape", batches=(1, 4), out_dir=OUT, log=log)


def part_smollm2():
    from labkit import fastgen, models

    model, tok = models.load("smollm2-135m")
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    res = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids.to(model.device)
        for kern in ("torch", "triton"):
            fast = fastgen.FastLlama(model, kernels=kern, max_seq_len=256)
            r = fastgen.compare_with_hf(model, fast, ids, 48, use_graph=kern == "triton")
            r.update(prompt=p, kernels=kern)
            res.append(r)
            log(f"smollm2 {kern:6s} {p!r}: equal={r['all_equal']} prefix {r['min_match_prefix']}/{r['rows'][0]['hf_len']} "
                f"rel logit diff {r['rel_logit_diff']:.4f} (HF vs itself {r['hf_self_rel_logit_diff']:.4f})")
    fast = fastgen.FastLlama(model, kernels="triton", max_seq_len=256)
    t = fastgen.time_decode(fast, 1, 16, 128)
    ids = tok(prompts[0], return_tensors="pt").input_ids.to(model.device)
    hf = bench.time_generate(model, ids, 32, iters=3)
    log(f"smollm2 decode: ours {t['decode_ms_per_token']:.3f} ms/token, HF generate {hf['decode_ms_per_token']:.2f} ms/token")
    bench.write_results(OUT / "smollm2_check.json", res, {"ours": t, "hf_generate": hf})


def _decode_settings(settings, apply, label, key, out_name, note, formats):
    """The batch-1 step of the 7B shape under each of ``settings``, per format: one build, its GEMV configs tuned
    under settings[0] and pinned (only the setting differs); tokens and logits of 8 greedy steps under settings[0]
    and settings[1] compared bit for bit; then every setting timed twice, the second round in reverse order.
    ``apply(fast, setting)`` puts a setting in place before a capture; ``label(setting)`` names it in the log."""
    from labkit import fastgen, models

    model, _ = models.load("llama2-7b-shape", device="cuda")
    ids = torch.randint(3, 32000, (1, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    recs, read_bw = [], fastgen.measure_read_bandwidth(torch.device("cuda"))
    for fmt in formats:
        fast = fastgen.FastLlama(model, weights=fmt, kernels="triton", max_seq_len=32 + 512)
        apply(fast, settings[0])
        fast.tune(1)
        fast.pin_gemv_configs(fast.gemv_configs(1), 1)

        def run(st, what):
            apply(fast, st)
            fast._graphs.clear()
            return what()

        (ta, la), (tb, lb) = [run(st, lambda: fast.generate(ids, 8, use_graph=True, return_logits=True))
                              for st in settings[:2]]
        same = torch.equal(ta, tb) and all(torch.equal(a, b) for a, b in zip(la, lb))
        log(f"  {fmt}: tokens and logits of 8 steps, {label(settings[1])} against {label(settings[0])}: "
            f"bit for bit equal {same}")
        times = {i: [] for i in range(len(settings))}
        for order in (range(len(settings)), reversed(range(len(settings)))):
            for i in order:
                times[i].append(run(settings[i], lambda: fastgen.time_decode(fast, 1, 32, 128)))
        for i, st in enumerate(settings):
            ms = sorted(t["decode_ms_per_token"] for t in times[i])
            floor = times[i][0]["bytes_per_step"] / read_bw * 1e3
            recs.append({"weights": fmt, key: st, "decode_ms_per_token": ms[0], "runs_ms": ms, "floor_ms": floor,
                         "fraction_of_floor": floor / ms[0], "logits_equal_first_two_settings": same,
                         "gemv_configs": {k: dataclasses.asdict(v) for k, v in fast.gemv_configs(1).items()}})
            log(f"  {fmt} {label(st)}: {ms[0]:.3f} ms/token (runs {', '.join(f'{m:.3f}' for m in ms)}), "
                f"{floor / ms[0]:.1%} of the floor")
        apply(fast, settings[0])
        del fast
        torch.cuda.empty_cache()
    bench.write_results(OUT / out_name, recs,
                        {"model": "llama2-7b-shape (RANDOM weights, bfloat16)", "batch": 1, "prompt_len": 32,
                         "new_tokens": 128, "read_bandwidth_Bps": read_bw, "what": note,
                         "gemv_configs": "tuned once per format under the first setting and pinned"})


def part_prefetch():
    """The small kernels' L2 prefetch of the next GEMV's weights at several sizes (fastgen.PREFETCH_L2), against
    none -> decode_prefetch.json."""
    MB = 1 << 20
    on = {"norm": 8 * MB, "attention": 16 * MB, "mode": "lines", "norm_programs": 32}
    settings = [{**on, **st} for st in (
        {"norm": 0, "attention": 0}, {}, {"norm": 4 * MB, "attention": 8 * MB}, {"norm": 16 * MB, "attention": 32 * MB},
        {"norm": 0}, {"attention": 0}, {"mode": "bulk"}, {"norm_programs": 128})]

    def label(st):
        return (f"prefetch norm {st['norm'] // MB} MB, attention {st['attention'] // MB} MB, {st['mode']}, "
                f"{st['norm_programs']} norm programs")

    _decode_settings(settings, lambda fast, st: setattr(fast, "prefetch_l2", dict(st)), label, "prefetch_l2",
                     "decode_prefetch.json", "the small kernels' L2 prefetch of the next GEMV's weights",
                     os.environ.get("GEMV_FORMATS", "bf16,int8,int4").split(","))


def part_rowpf():
    """The word-layout GEMVs asking L2 for their own next weight rows before their PDL wait (wo.ROW_PREFETCH K
    steps: 0, all, 2) -> decode_row_prefetch.json."""
    from labkit.kernels import wo_matmul as wo

    _decode_settings((0, 64, 2), lambda fast, n: setattr(wo, "ROW_PREFETCH", n), lambda n: f"row prefetch {n} steps",
                     "row_prefetch_steps", "decode_row_prefetch.json",
                     "the word-layout GEMVs' prefetch of their own next rows before the PDL wait (wo.ROW_PREFETCH)",
                     os.environ.get("GEMV_FORMATS", "int4,int8").split(","))


def part_pipeline():
    from labkit import pipeline

    pipeline.run_all(out_dir=OUT, log=log)


PARTS = {"kernels": part_kernels, "sweep": part_sweep, "decode": part_decode, "smollm2": part_smollm2,
         "prefetch": part_prefetch, "rowpf": part_rowpf, "pipeline": part_pipeline, "silu": part_silu}

if __name__ == "__main__":
    unknown = [a for a in sys.argv[1:] if a not in PARTS]
    if unknown or len(sys.argv) < 2:
        sys.exit(f"error: name parts to run from {', '.join(PARTS)} (got {' '.join(sys.argv[1:]) or 'none'})")
    step_parts = {"prefetch", "rowpf"} & set(sys.argv[1:])  # whole decode steps: FastLlama's weight formats only
    ok = ("bf16", "int8", "int4") if step_parts else ("bf16", "int8", "int4", "int8-il", "int4-il")
    bad = [f for f in os.environ.get("GEMV_FORMATS", "bf16").split(",") if f not in ok]
    if bad:
        sys.exit(f"error: GEMV_FORMATS takes {', '.join(ok)} separated by commas (got {', '.join(bad)})")
    for var in ("GEMV_PARTIALS", "GEMV_MMA_EARLY"):
        if os.environ.get(var, "0") not in ("0", "1"):
            sys.exit(f"error: {var} takes 0 or 1 (got {os.environ[var]!r})")
    if "GEMV_MMA_EARLY" in os.environ:
        from labkit.kernels import wo_matmul as _wo

        _wo.MMA_EARLY_LOADS = os.environ["GEMV_MMA_EARLY"] == "1"
    try:  # every part times on a GPU: say so once, before any log is opened
        env.require_cuda("scripts/gpu_decode.py")
    except env.LabkitError as exc:
        sys.exit(f"error: {exc}")
    log(f"== {time.strftime('%H:%M:%S')} {env.device_name()} {json.dumps(env.versions())}")
    for name in sys.argv[1:]:
        t0 = time.time()
        try:
            PARTS[name]()
        except Exception:
            log(f"PART {name} FAILED:\n{traceback.format_exc()}")
        log(f"-- part {name}: {time.time() - t0:.0f} s")
        import gc

        gc.collect()
        torch.cuda.empty_cache()
