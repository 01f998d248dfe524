"""Where the batch-1 decode step spends its time, kernel by kernel (7B shape, random weights; a CUDA GPU).

    python scripts/profile_decode_step.py [--formats bf16,int8,int4] [--no-pdl]
                                          [--what-if | --attn-knobs | --h2 | --int8-layout | --mma | --mma-early
                                           | --mma-tma]
                                          [--out DIR]

For each format: the captured step's time per token (as the decode benchmark measures it), then torch.profiler over
replays of the CUDA graph. The step launches the same kernels in the same order every time, so kernel i of one step
is kernel i of the next: the table gives, for every kernel of the first layer and of the step's tail, its median
duration and the median time from the previous kernel's end to its start (negative: they overlap, as programmatic
dependent launch allows). The summary splits the step into GEMV time, other kernels and time with no kernel running.
--h2 times the int4 step tuned without and with the packed-fp16 GEMV among the candidates; --mma the same with the
tensor-core GEMV (wo_matmul.TUNE_MMA; tuned as the step calls each GEMV, split-K partials handed on); --mma-early
the int4 step with the tensor-core GEMV's next weight words loaded late and early (wo_matmul.MMA_EARLY_LOADS), each
record with the tuner's best time per GEMV and kernel; --mma-tma the int4 step tuned without and with the tensor-core
GEMV's TMA form (wo_matmul.TUNE_MMA_TMA); --int8-layout
the int8 step with row-major weights and with word-layout weights (where the packed-fp16 GEMV is a candidate).
--attn-knobs times the step (no profile) under each block size and warp count of the decode-attention kernel.
--what-if times the step (no profile) with parts taken out, an upper bound on what fusing them away could save:
without the add+RMSNorm kernels, without the RoPE+attention kernel, without both (the outputs are then wrong); and
with programmatic dependent launch but the launch configs tuned without it.
Writes decode_profile.json (decode_what_if.json, decode_attn_knobs.json, decode_h2.json, decode_mma.json,
decode_mma_early.json, decode_mma_tma.json, decode_int8_layout.json) to --out (default: results/local/).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from labkit import bench, env, models
from labkit.fastgen import FastLlama, time_decode


def kernel_rows(prof) -> list:
    """(name, start µs, end µs) of every GPU kernel the profiler saw, in start order."""
    rows = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0:
            rows.append((e.name, e.time_range.start, e.time_range.end))
    return sorted(rows, key=lambda r: r[1])


def per_position(rows: list, per_step: int, steps: int) -> list:
    """Median duration and lead gap of kernel i across the profiled steps (the last ``steps`` complete ones)."""
    rows = rows[-per_step * steps:]
    out = []
    for i in range(per_step):
        durs, gaps = [], []
        for s in range(steps):
            name, t0, t1 = rows[s * per_step + i]
            durs.append(t1 - t0)
            if s * per_step + i > 0:
                gaps.append(t0 - rows[s * per_step + i - 1][2])
        out.append({"i": i, "name": rows[i][0][:60], "us": statistics.median(durs),
                    "gap_us": statistics.median(gaps) if gaps else None})
    return out


def profile_format(model, fmt: str, pdl: bool, prompt_len: int = 32, steps: int = 16) -> dict:
    fast = FastLlama(model, weights=fmt, kernels="triton", max_seq_len=prompt_len + 512, pdl=pdl)
    t = time_decode(fast, 1, prompt_len, 128)
    # one step's kernels: count them from a profile of a single replay
    start = prompt_len + 56  # the profiled steps attend over 89-104 positions, the mean of the timed run (33-160)
    with profile(activities=[ProfilerActivity.CUDA]) as p1:
        fast.decode_n(1, start, 1)
        torch.cuda.synchronize()
    n1 = len(kernel_rows(p1))  # one step's kernels and what decode_n launches once (setting the position)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fast.decode_n(1, start, steps)
        torch.cuda.synchronize()
    rows = kernel_rows(prof)
    per_step, extra = divmod(len(rows) - n1, steps - 1)
    if extra or per_step <= 0:
        raise RuntimeError(f"{len(rows)} kernels for {steps} steps, {n1} for one: the step is not regular")
    pos = per_position(rows, per_step, steps)
    n_layers = fast.cfg.n_layers
    per_layer = (per_step - 1) // n_layers  # kernels of one layer (the step's tail is what is left)
    tail = per_step - per_layer * n_layers
    gemv = sum(r["us"] for r in pos if "gemv" in r["name"] or "sum_splits" in r["name"])
    busy = sum(r["us"] for r in pos)
    span = (rows[-1][2] - rows[0][1]) / steps
    fast_cfgs = {k: str(v) for k, v in fast.gemv_configs(1).items()}
    rec = {"weights": fmt, "pdl": pdl, "decode_ms_per_token": t["decode_ms_per_token"],
           "bytes_per_step": t["bytes_per_step"],
           "kernels_per_step": per_step, "kernels_per_layer": per_layer, "tail_kernels": tail,
           "profiled_step_us": span, "kernel_sum_us": busy, "gemv_and_split_sums_us": gemv,
           "other_kernels_us": busy - gemv, "gemv_configs": fast_cfgs,
           "first_layer": pos[:per_layer + 1], "tail": pos[per_step - tail:]}
    del fast
    torch.cuda.empty_cache()
    return rec


class _Without(FastLlama):
    """The step with some kernels left out (timing only: the results are wrong)."""

    def __init__(self, *a, skip=(), **kw):
        super().__init__(*a, **kw)
        self.skip = set(skip)

    def _ops(self):
        norm, attn, kern = super()._ops()
        nq = self.cfg.n_heads * self.cfg.head_dim
        if "norm" in self.skip:
            norm = lambda x, delta, w, eps, nxt=None: x  # noqa: E731
        if "attention" in self.skip:
            attn = lambda qkv, *a, nxt=None: (qkv[0] if qkv.dim() == 3 else qkv)[:, :nq]  # noqa: E731  (maybe partials)
        return norm, attn, kern


def what_if(model, fmt: str, prompt_len: int = 32) -> list:
    out = []

    def run(label, **kw):
        pin = kw.pop("pin", None)
        fast = _Without(model, weights=fmt, kernels="triton", max_seq_len=prompt_len + 512, **kw)
        if pin:
            fast.pin_gemv_configs(pin)
        ms = time_decode(fast, 1, prompt_len, 128)["decode_ms_per_token"]
        cfgs = fast.gemv_configs(1)
        out.append({"weights": fmt, "what": label, "decode_ms_per_token": ms})
        print(f"  {fmt} {label}: {ms * 1e3:.0f} us/token", flush=True)
        del fast
        torch.cuda.empty_cache()
        return cfgs

    run("pdl, tuned")
    run("pdl, no add+rmsnorm", skip=("norm",))
    run("pdl, no rope+attention", skip=("attention",))
    run("pdl, neither", skip=("norm", "attention"))
    no_pdl = run("no pdl, tuned", pdl=False)
    run("pdl, configs tuned without pdl", pin=no_pdl)  # last: pinning replaces the tuned configs
    return out


def attn_knobs(model, fmt: str, grid=None, rounds: int = 1, prompt_len: int = 32) -> list:
    """The step time under each decode-attention launch setting (fastgen.ATTN_BLOCK_L, fastgen.ATTN_WARPS) of
    ``grid`` [(block, warps, pdl)], by default blocks 64 and 128 by 4 and 8 warps with PDL and the first without,
    then the step without attention (a bound); ``rounds`` passes over the grid, the median kept."""
    from labkit import fastgen

    if grid is None:
        grid = [(bl, nw, True) for bl in (64, 128) for nw in (4, 8)] + [(64, 4, False)]
    saved = fastgen.ATTN_BLOCK_L, fastgen.ATTN_WARPS
    times = {g: [] for g in grid + ["no attention"]}
    try:
        for _ in range(rounds):
            for g in grid + ["no attention"]:
                if g == "no attention":
                    fast = _Without(model, weights=fmt, kernels="triton", max_seq_len=prompt_len + 512,
                                    skip=("attention",))
                else:
                    fastgen.ATTN_BLOCK_L, fastgen.ATTN_WARPS = g[0], g[1]
                    fast = FastLlama(model, weights=fmt, kernels="triton", max_seq_len=prompt_len + 512, pdl=g[2])
                times[g].append(time_decode(fast, 1, prompt_len, 128)["decode_ms_per_token"])
                print(f"  {fmt} {g}: {times[g][-1] * 1e3:.0f} us/token", flush=True)
                del fast
                torch.cuda.empty_cache()
    finally:
        fastgen.ATTN_BLOCK_L, fastgen.ATTN_WARPS = saved
    out = []
    for g, ts in times.items():
        rec = {"weights": fmt, "decode_ms_per_token": statistics.median(ts), "rounds_ms": ts}
        rec.update({"what": g} if isinstance(g, str) else {"attn_block_l": g[0], "attn_warps": g[1], "pdl": g[2]})
        out.append(rec)
    return out


def toggled_steps(model, weights: str, owner, attr: str, values: tuple, key: str, prompt_len: int = 32,
                  rounds: int = 2) -> list:
    """The step in ``weights`` built and tuned afresh under each value of the module setting ``owner.attr``, ``rounds``
    passes over the values: one record per build with the value under ``key``, the step time, its bytes and the
    configs each tuning chose. The setting and the tuning cache are restored afterwards."""
    from labkit.kernels import wo_matmul as wo

    out, saved = [], getattr(owner, attr)
    try:
        for _ in range(rounds):
            for value in values:
                setattr(owner, attr, value)
                wo._TUNED.clear()  # tune afresh: the cache does not know the candidate list or the layout
                fast = FastLlama(model, weights=weights, kernels="triton", max_seq_len=prompt_len + 512)
                t = time_decode(fast, 1, prompt_len, 128)
                cfgs = {k: str(v) for k, v in fast.gemv_configs(1).items()}
                out.append({"weights": weights, key: value, "decode_ms_per_token": t["decode_ms_per_token"],
                            "bytes_per_step": t["bytes_per_step"], "gemv_configs": cfgs,
                            "gemv_tuning": fast.gemv_tuning(1)})
                print(f"  {weights} {key}={value}: {t['decode_ms_per_token'] * 1e3:.0f} us/token; "
                      + ", ".join(f"{k} {v}" for k, v in cfgs.items()), flush=True)
                del fast
                torch.cuda.empty_cache()
    finally:
        setattr(owner, attr, saved)
        wo._TUNED.clear()
    return out


def h2_step(model, rounds: int = 2) -> list:
    """The int4 step with its GEMVs tuned over the usual candidates, then with the packed-fp16 word kernel among
    them (wo_matmul.TUNE_H2)."""
    from labkit.kernels import wo_matmul as wo

    return toggled_steps(model, "int4", wo, "TUNE_H2", (False, True), "tune_h2", rounds=rounds)


def mma_step(model, rounds: int = 2) -> list:
    """The int4 step with its GEMVs tuned over the usual candidates, then with the tensor-core GEMV among them
    (wo_matmul.TUNE_MMA)."""
    from labkit.kernels import wo_matmul as wo

    return toggled_steps(model, "int4", wo, "TUNE_MMA", (False, True), "tune_mma", rounds=rounds)


def mma_early_step(model, rounds: int = 2) -> list:
    """The int4 step (the tensor-core GEMV among the tuner's candidates) with its next K step's weight words loaded
    where ptxas puts them, at the end of the loop body, and in a branch of their own at its top
    (wo_matmul.MMA_EARLY_LOADS)."""
    from labkit.kernels import wo_matmul as wo

    return toggled_steps(model, "int4", wo, "MMA_EARLY_LOADS", (False, True), "mma_early_loads", rounds=rounds)


def mma_tma_step(model, rounds: int = 2) -> list:
    """The int4 step tuned without and with the TMA form of the tensor-core GEMV among the candidates
    (wo_matmul.TUNE_MMA_TMA)."""
    from labkit.kernels import wo_matmul as wo

    return toggled_steps(model, "int4", wo, "TUNE_MMA_TMA", (False, True), "tune_mma_tma", rounds=rounds)


def int8_layout_step(model, rounds: int = 2) -> list:
    """The int8 step with row-major weights (fastgen.INT8_LAYOUT = "rows") and with word-layout weights ("words",
    the packed-fp16 GEMV among the tuner's candidates at one row)."""
    from labkit import fastgen

    return toggled_steps(model, "int8", fastgen, "INT8_LAYOUT", ("rows", "words"), "int8_layout", rounds=rounds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="bf16,int8,int4")
    p.add_argument("--no-pdl", action="store_true", help="also profile every format without PDL")
    p.add_argument("--what-if", action="store_true", help="time the step with parts taken out instead of profiling")
    p.add_argument("--attn-knobs", action="store_true",
                   help="time the step under each decode-attention block size and warp count instead of profiling")
    p.add_argument("--h2", action="store_true",
                   help="time the int4 step tuned without and with the packed-fp16 GEMV (wo_matmul.TUNE_H2)")
    p.add_argument("--mma", action="store_true",
                   help="time the int4 step tuned without and with the tensor-core GEMV (wo_matmul.TUNE_MMA)")
    p.add_argument("--mma-early", action="store_true",
                   help="time the int4 step with the tensor-core GEMV's next words loaded late and early "
                        "(wo_matmul.MMA_EARLY_LOADS)")
    p.add_argument("--mma-tma", action="store_true",
                   help="time the int4 step tuned without and with the TMA form of the tensor-core GEMV "
                        "(wo_matmul.TUNE_MMA_TMA)")
    p.add_argument("--int8-layout", action="store_true",
                   help="time the int8 step with row-major and with word-layout weights (fastgen.INT8_LAYOUT)")
    p.add_argument("--attn-grid", default=None,
                   help="with --attn-knobs: BLOCKxWARPS settings, comma-separated (e.g. 64x4,128x8), all with PDL")
    p.add_argument("--rounds", type=int, default=None,
                   help="passes over the settings (--attn-knobs: default 1; the toggles --h2, --mma, ...: default 2)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--commit", default=None, help="recorded in the output")
    args = p.parse_args(argv)
    grid = None
    if args.attn_grid is not None:
        try:
            grid = [(int(b), int(w), True) for b, w in (g.split("x") for g in args.attn_grid.split(","))]
        except ValueError:
            p.error(f"--attn-grid takes BLOCKxWARPS settings separated by commas (e.g. 64x4,128x8), got "
                    f"{args.attn_grid!r}")
        if any(b < 16 or b & (b - 1) or w not in (1, 2, 4, 8, 16) for b, w, _ in grid):
            p.error("--attn-grid: blocks are powers of two >= 16, warps 1, 2, 4, 8 or 16")
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be at least 1")
    try:
        env.require_cuda("the decode-step profile")
    except env.LabkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    dev = env.device()
    read_bw = env.measure_read_bandwidth(dev)  # the floor of a step: its bytes at this rate
    model, _ = models.load("llama2-7b-shape", device=dev)
    recs = []
    if args.h2 or args.int8_layout or args.mma or args.mma_early or args.mma_tma:
        step = (h2_step if args.h2 else mma_step if args.mma else mma_early_step if args.mma_early else mma_tma_step
                if args.mma_tma else int8_layout_step)
        recs += step(model, rounds=args.rounds or 2)
        for r in recs:
            r["fraction_of_floor"] = r["bytes_per_step"] / read_bw / (r["decode_ms_per_token"] / 1e3)
            setting = next(r[k] for k in ("int8_layout", "tune_h2", "tune_mma", "mma_early_loads", "tune_mma_tma")
                           if k in r)
            print(f"  {r['weights']} {setting}: {r['fraction_of_floor']:.1%} of the floor", flush=True)
        args.formats = ""
    elif args.what_if or args.attn_knobs:
        for fmt in args.formats.split(","):
            recs += what_if(model, fmt) if args.what_if else attn_knobs(model, fmt, grid, args.rounds or 1)
        args.formats = ""
    for fmt in filter(None, args.formats.split(",")):
        for pdl in ([True, False] if args.no_pdl else [True]):
            r = profile_format(model, fmt, pdl)
            r["fraction_of_floor"] = r["bytes_per_step"] / read_bw / (r["decode_ms_per_token"] / 1e3)
            recs.append(r)
            print(f"\n{fmt} pdl={pdl}: {r['decode_ms_per_token'] * 1e3:.0f} us/token (graph timing), "
                  f"{r['fraction_of_floor']:.1%} of the floor; profiled step "
                  f"{r['profiled_step_us']:.0f} us: kernels {r['kernel_sum_us']:.0f} (GEMV {r['gemv_and_split_sums_us']:.0f},"
                  f" other {r['other_kernels_us']:.0f}); {r['kernels_per_step']} kernels, {r['kernels_per_layer']} a layer",
                  flush=True)
            for row in r["first_layer"] + r["tail"]:
                print(f"  {row['i']:3d} {row['name']:60s} {row['us']:7.2f} us  gap {row['gap_us'] or 0:6.2f}")
    out = args.out or bench.results_dir()
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "model": "llama2-7b-shape (RANDOM weights, bfloat16)", "batch": 1, "prompt_len": 32,
            "new_tokens_timed": 128, "read_bandwidth_Bps": read_bw, "triton": triton.__version__,
            "versions": env.versions(),
            "git_commit": args.commit,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    name = ("decode_h2.json" if args.h2 else "decode_mma.json" if args.mma else "decode_mma_early.json"
            if args.mma_early else "decode_mma_tma.json" if args.mma_tma else "decode_int8_layout.json"
            if args.int8_layout else "decode_what_if.json" if args.what_if else "decode_attn_knobs.json"
            if args.attn_knobs else "decode_profile.json")
    (out / name).write_text(json.dumps({"meta": meta, "records": recs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
