"""One GPU run for the peer comparisons: flash-attn-4 and SDPA's cuDNN beside our Triton attention, torchao beside our
decode GEMVs, GPTQ weights of SmolLM2 served by the fast decode loop. Installs nothing (the wheels of
scripts/gpu_wheelhouse.sh must already be importable: /root/site-flash on PYTHONPATH).

    . .gpu/bin/env.sh && . /root/site-flash/env.sh     # the two bundles' paths (scripts/gpu_wheelhouse.sh)
    python3 scripts/gpu_issue14.py --out $OUT [--commit SHA] [--steps attention,formats,gptq,decode]
    python3 scripts/gpu_issue14.py --out $OUT --steps decode --gptq-json PATH   # GPTQ from an earlier invocation

A gptq and a decode step together take longer than one command may run on some machines: run gptq first, keep its
gptq.json on the machine, and hand it to the decode invocation with --gptq-json; it must name the same commit, and
decode.json's summary says which run its GPTQ figures come from.

Writes under --out: attention.json (+ .png), decode.json (+ .png), gptq.json, issue14.json (the summaries, the package
versions) and issue14.log. Every step records its failure and the run goes on with the next one.

- attention: bf16, head dim 128, 32 heads, 16k tokens per call, 512 ... 16k, causal and not: the TMA kernel's
  configurations tuned first (labkit.kernels.flash_attn_fast.tune, at 4k and 16k), then every variant of
  `labkit bench attention` (our two Triton kernels, teaching and TMA, SDPA's backends, flash_attn.cute of
  flash-attn-4, the naive and tiled references), timed in one run; then SmolLM2 through transformers with
  attn_implementation="flash_attention_4": greedy tokens against SDPA.
- decode: the 7B shape (random weights), batch 1, HF generate, then bf16/int8/int4 through our loop, with
  torchao's weight-only int8 and int4 (tinygemm) for each GEMV and a whole step
  (labkit.fastgen.run_decode_benchmark(torchao=True)).
- formats: SmolLM2-135M (real weights, bf16) in FastLlama's own int8 and int4, the Triton path against the torch path
  and the fp32 dequantization: greedy token prefixes and teacher-forced logits over 256 pydoc tokens -> formats.json
  (also part of gptq).
- gptq: SmolLM2-135M (real weights, bf16), GPTQ W4 g128 act-order (labkit.gptq) calibrated on the pydoc calibration
  split, served by FastLlama from its codes: perplexity of the Triton decode path against the dequantize-then-matmul
  model (HF forward over QuantLinear), greedy tokens Triton vs torch dequant, speed in each format beside bf16.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from labkit import bench, env

PPL_TOLERANCE_BF16 = 0.01  # |ppl(Triton decode path) / ppl(dequantize-then-matmul) - 1| in bf16
LOG = None


def log(*a):
    msg = " ".join(str(x) for x in a)
    print(msg, flush=True)
    if LOG is not None:
        with open(LOG, "a") as f:
            f.write(msg + "\n")


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for d in ("torch", "triton", "transformers", "flash-attn-4", "flash-attn", "nvidia-cutlass-dsl",
              "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-cu13", "quack-kernels", "apache-tvm-ffi",
              "torch-c-dlpack-ext", "torchao"):
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = None
    out["cuda"] = torch.version.cuda
    return out


def meta(commit: str | None) -> dict:
    m = bench.run_metadata()
    if commit:  # given on the command line: the checkout's own git state may be a stale copy on a runner
        m["git_commit"] = commit
    m["packages"] = versions()
    return m


# ---------------------------------------------------------------------------------------------- attention
def step_attention(out: Path, commit) -> dict:
    from labkit import attention as A
    from labkit import models
    from labkit.kernels import flash_attn as fa

    t0 = time.time()
    tuning = A.tune_fast_kernel(A.FULL_SEQLENS, head_dim=128, n_heads=32, tokens=16384, log=log)
    picked = tuning["picked"]
    # the whole benchmark of `labkit bench attention` (every variant, 512 ... 16k): this file is the reference run
    records = A.run_benchmark(A.FULL_SEQLENS, causal_modes=(True, False), head_dim=128, n_heads=32,
                              dtype=torch.bfloat16, tokens=16384, variants=A.VARIANTS, log=log)
    summary = A.summarize(records, dtype="bfloat16", head_dim=128)
    summary["triton_fast_tuning"] = tuning
    summary["triton_config"] = fa.default_config(128, True)  # the teaching kernel's tiles
    summary["batch_rule"] = "batch = 16384 // seqlen (at least 1), 32 heads, head dim 128, bf16"
    for r in records:
        if r["variant"] == "flash_attn_4" and r.get("status") == "ok":
            log(f"  flash-attn-4 {r['seqlen']} causal={r['causal']}: max |diff| vs SDPA {r.get('max_abs_diff_vs_sdpa')}")
    # flash-attn-4 through transformers: SmolLM2 greedy tokens with attn_implementation="flash_attention_4" vs sdpa
    hf = {}
    try:
        m4, tok = models.load("smollm2-135m", attn="flash_attention_4", device="cuda", dtype=torch.bfloat16)
        ids = tok("The three primary colours are", return_tensors="pt").input_ids.cuda()
        with torch.no_grad():
            a = m4.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
            m4.set_attn_implementation("sdpa")
            b = m4.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0)
        n = int((a == b).long().cumprod(dim=1).sum()) - ids.shape[1]
        hf = {"model": "smollm2-135m", "fa4_vs_sdpa_greedy_prefix": n, "n": 24, "status": "ok"}
        log(f"transformers flash_attention_4 on SmolLM2: greedy prefix {n}/24 equal to sdpa")
        del m4
    except Exception as exc:
        hf = {"status": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        log(f"transformers flash_attention_4: {hf['status']}")
    summary["transformers_flash_attention_4"] = hf
    path = bench.write_results(out / "attention.json", records, summary, meta(commit))
    try:
        A.plot_benchmark(bench.read_results(path), path.with_suffix(".png"))
    except Exception as exc:  # the plot is a convenience
        log(f"attention plot: {exc}")
    log(f"attention: {time.time() - t0:.0f} s")
    for k in ("ratio_vs_sdpa_flash", "ratio_vs_sdpa_cudnn", "ratio_vs_flash_attn_4"):
        log(f"  {k}: {json.dumps(summary[k])}")
    log(f"  TMA kernel tiles picked: {json.dumps(picked)}")
    return {k: summary[k] for k in ("ours", "ratio_vs_sdpa_flash", "ratio_vs_sdpa_cudnn", "ratio_vs_flash_attn_4",
                                    "tflops")}


# ---------------------------------------------------------------------------------------------- decode
def step_decode(out: Path, commit) -> dict:
    from labkit import fastgen

    t0 = time.time()
    doc = fastgen.run_decode_benchmark("llama2-7b-shape", formats=("bf16", "int8", "int4"), batches=(1,),
                                       prompt_len=32, new_tokens=128, hf_generate=True, prefill_len=512,
                                       out_dir=None, log=log, torchao=True)
    log(f"decode: {time.time() - t0:.0f} s; fraction of floor {json.dumps(doc['summary']['fraction_of_floor'])}; "
        f"ratio vs torchao {json.dumps(doc['summary'].get('ratio_vs_torchao'))}")
    return doc


# ---------------------------------------------------------------------------------------------- formats
FORMAT_EVAL_TOKENS = 256  # teacher-forced positions of the pydoc eval split for the logit agreement


def format_checks(model, prompt, ids) -> tuple[dict, dict]:
    """FastLlama's own int8 and int4 quantization of the real SmolLM2, Triton path against the torch path (the same
    codes, each weight dequantized to bf16) and the fp32 dequantization (the exact value of the codes): greedy token
    prefixes (of 32) from ``prompt``, and the logits of every position of ``ids`` under teacher forcing
    (fastgen.logit_agreement: RMS and max difference, argmax flips and the fp32 path's top-2 gap where they flip).
    A prefix ends at the first near-tie whichever rounding is right; the logits show whether the paths differ by
    rounding (flips only at small gaps) or by a fault. tests/test_fastgen_gptq.py::
    test_own_quantization_on_gpu_against_fp32_dequant asserts the same comparison on a GPU (along the fp32 path's
    own greedy continuation); this records it, over eval text, in the run's results."""
    from labkit import fastgen

    checks, agreement = {}, {}
    for fmt in ("int8", "int4"):  # int4: ragged groups at K=576
        ref_fl = fastgen.FastLlama(model, weights=fmt, kernels="torch", max_seq_len=max(128, ids.numel() + 1))
        fast = fastgen.FastLlama(model, weights=fmt, kernels="triton", max_seq_len=max(128, ids.numel() + 1))
        exact = ref_fl.dequantized(torch.float32)
        r = ref_fl.generate(prompt, 32, use_graph=False)
        f = fast.generate(prompt, 32)
        # both bf16 paths are roundings of the same codes (the torch one rounds each dequantized weight to bf16): the
        # exact value is the fp32 dequantization, and a bf16 continuation parts from it at the first near-tie
        e = exact.generate(prompt, 32, use_graph=False)
        checks[f"{fmt}_triton_vs_torch_dequant"] = int((r == f).long().cumprod(dim=1).sum())
        checks[f"{fmt}_triton_vs_fp32_dequant"] = int((e == f).long().cumprod(dim=1).sum())
        checks[f"{fmt}_torch_dequant_vs_fp32_dequant"] = int((e == r).long().cumprod(dim=1).sum())
        ctx = ids[None, :-1]
        le = fastgen.decode_logits(exact, ctx)[0]
        agreement[fmt] = {"triton_vs_fp32_dequant": fastgen.logit_agreement(le, fastgen.decode_logits(fast, ctx)[0]),
                          "torch_vs_fp32_dequant": fastgen.logit_agreement(le, fastgen.decode_logits(ref_fl, ctx)[0]),
                          "layouts": {"wqkv": type(fast.layers[0].wqkv).__name__}}
        for k in ("triton_vs_fp32_dequant", "torch_vs_fp32_dequant"):
            a = agreement[fmt][k]
            log(f"{fmt} logits {k}: rms {a['rms']:.4f} max {a['max_abs']:.3f}, argmax agrees at {a['top1_agree']}/"
                f"{a['positions']}, flips at top-2 gaps {[round(g, 3) for g in a['flip_gaps']]} (median gap "
                f"{a['median_gap']:.3f})")
        del ref_fl, fast, exact
    return checks, agreement


def step_formats(out: Path, commit) -> dict:
    """format_checks alone (no GPTQ): formats.json."""
    from labkit import data, models

    t0 = time.time()
    model, tok = models.load("smollm2-135m", device="cuda", dtype=torch.bfloat16)
    ids = data.load_splits(tok, "pydoc").eval[:FORMAT_EVAL_TOKENS]
    prompt = tok("The three primary colours are", return_tensors="pt").input_ids.cuda()
    checks, agreement = format_checks(model, prompt, ids)
    summary = {"token_checks_of_32": checks, "logit_agreement": agreement, "eval_tokens": ids.numel(),
               "corpus": "pydoc", "model": "SmolLM2-135M-Instruct (real weights, bf16)"}
    bench.write_results(out / "formats.json", [], summary, meta(commit))
    log(f"formats: {time.time() - t0:.0f} s; {json.dumps(checks)}")
    return summary


# ---------------------------------------------------------------------------------------------- GPTQ
def step_gptq(out: Path, commit) -> dict:
    import copy

    from labkit import data, evaluate, fastgen, gptq, models

    t0 = time.time()
    model, tok = models.load("smollm2-135m", device="cuda", dtype=torch.bfloat16)
    splits = data.load_splits(tok, "pydoc")
    calib = data.calibration_batches(splits.calib, 64, 512)
    ids = splits.eval[:512]
    q = copy.deepcopy(model)
    info = gptq.gptq_quantize_model(q, calib, 4, 128, actorder=True, progress=False)
    log(f"GPTQ w4g128 act-order on SmolLM2: {info['linears']} linears in {info['seconds']:.1f} s")
    T = ids.numel()
    ppl = {"bf16_reference_model": evaluate.perplexity(model, ids, ctx_len=T, stride=T - 1),
           "gptq_dequant_matmul_reference": evaluate.perplexity(q, ids, ctx_len=T, stride=T - 1)}
    fast = fastgen.FastLlama(q, weights="int4", kernels="triton", max_seq_len=T + 64)
    torch_path = fastgen.FastLlama(q, weights="int4", kernels="torch", max_seq_len=T + 64)
    ppl["gptq_fastgen_triton_decode"] = fastgen.decode_perplexity(fast, ids)
    ppl["gptq_fastgen_torch_decode"] = fastgen.decode_perplexity(torch_path, ids)
    ratio = ppl["gptq_fastgen_triton_decode"] / ppl["gptq_dequant_matmul_reference"]
    log(f"perplexity over {T} pydoc eval tokens: " + ", ".join(f"{k} {v:.4f}" for k, v in ppl.items()))
    log(f"GPTQ int4 ppl, Triton decode path / dequantize-then-matmul: {ratio:.5f} "
        f"({'within' if abs(ratio - 1) <= PPL_TOLERANCE_BF16 else 'OUTSIDE'} the {PPL_TOLERANCE_BF16:.0%} bf16 tolerance)")
    prompt = tok("The three primary colours are", return_tensors="pt").input_ids.cuda()
    checks = {}
    a = torch_path.generate(prompt, 32, use_graph=False)
    b = fast.generate(prompt, 32)
    checks["gptq_int4_triton_vs_torch_dequant"] = int((a == b).long().cumprod(dim=1).sum())
    del torch_path
    fmt_checks, agreement = format_checks(model, prompt, ids[:FORMAT_EVAL_TOKENS])
    checks.update(fmt_checks)
    log(f"greedy token prefixes (of 32), Triton vs torch dequant on real SmolLM2: {json.dumps(checks)}")
    records = []
    speed = {}
    for label, mk in (("bf16", lambda: fastgen.FastLlama(model, weights="bf16", max_seq_len=256)),
                      ("int8", lambda: fastgen.FastLlama(model, weights="int8", max_seq_len=256)),
                      ("int4", lambda: fastgen.FastLlama(model, weights="int4", max_seq_len=256)),
                      ("gptq_int4", lambda: fastgen.FastLlama(q, weights="int4", max_seq_len=256))):
        fl = mk()
        r = fastgen.time_decode(fl, 1, 32, 128)
        speed[label] = r["decode_ms_per_token"]
        records.append({"model": "SmolLM2-135M-Instruct (real weights)", "variant": f"our loop, Triton + graph ({label})",
                        "weights": label, "batch": 1, **r,
                        "lm_head": "bf16 (GPTQ leaves it unquantized)" if label == "gptq_int4" else label})
        log(f"SmolLM2 {label}: {r['decode_ms_per_token']:.3f} ms/token, {r['tokens_per_s']:.0f} tok/s")
        del fl
    summary = {"gptq_int4_ppl_vs_reference": ratio, "ppl_tolerance_bf16": PPL_TOLERANCE_BF16, "perplexity": ppl,
               "eval_tokens": T, "corpus": "pydoc", "gptq": {"bits": 4, "groupsize": 128, "actorder": True,
                                                            "calib": list(calib.shape), "seconds": info["seconds"]},
               "token_checks_of_32": checks, "logit_agreement": agreement, "smollm2_ms_per_token": speed}
    bench.write_results(out / "gptq.json", records, summary, meta(commit))
    log(f"gptq: {time.time() - t0:.0f} s")
    return summary


def _read_gptq(path: Path, commit, steps: str) -> tuple[dict, dict]:
    """The summary and meta of an earlier gptq.json, refused unless this run has a decode step and no gptq step of
    its own, and the file is a gptq step's output at this run's commit."""
    names = steps.split(",")
    if "decode" not in names or "gptq" in names:
        raise ValueError(f"--gptq-json goes with a decode step and no gptq step of this run (--steps {steps})")
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--gptq-json {path}: cannot read it as JSON ({exc}); pass the gptq.json an earlier "
                         f"`--steps gptq` run wrote") from None
    summary, gmeta = doc.get("summary") or {}, doc.get("meta") or {}
    if "gptq_int4_ppl_vs_reference" not in summary:
        raise ValueError(f"--gptq-json {path} is not a gptq step's output (no gptq_int4_ppl_vs_reference)")
    if commit is None or gmeta.get("git_commit") != commit:
        raise ValueError(f"--gptq-json {path} was measured at commit {gmeta.get('git_commit')!r}, this run is "
                         f"{commit!r}: pass --commit and rerun the gptq step at this commit")
    return summary, gmeta


def main(argv=None) -> int:
    global LOG
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--commit", default=None, help="the commit of the checkout (recorded when git is unavailable)")
    p.add_argument("--steps", default="attention,gptq,decode", help="in this order by default: the longest last")
    p.add_argument("--gptq-json", type=Path, default=None,
                   help="gptq.json of an earlier invocation at the same commit, for decode.json's GPTQ figures")
    args = p.parse_args(argv)
    carried_gptq = None
    if args.gptq_json is not None:
        try:
            carried_gptq = _read_gptq(args.gptq_json, args.commit, args.steps)
        except ValueError as exc:
            print(f"error: {exc}")
            return 1
    args.out.mkdir(parents=True, exist_ok=True)
    LOG = args.out / "issue14.log"
    try:
        env.require_cuda("scripts/gpu_issue14.py")
    except env.LabkitError as exc:
        print(f"error: {exc}")
        return 1
    log(f"device {env.device_name()}; packages {json.dumps(versions())}")
    result, t_all = {}, time.time()
    gptq_summary, decode_doc = None, None
    for step in args.steps.split(","):
        try:
            if step == "attention":
                result["attention"] = step_attention(args.out, args.commit)
            elif step == "decode":
                decode_doc = step_decode(args.out, args.commit)
                result["decode"] = {k: decode_doc["summary"].get(k) for k in
                                    ("fraction_of_floor", "ratio_vs_torchao", "torchao_gemv_ratios")}
            elif step == "formats":
                result["formats"] = step_formats(args.out, args.commit)
            elif step == "gptq":
                gptq_summary = step_gptq(args.out, args.commit)
                result["gptq"] = gptq_summary
            else:
                raise ValueError(f"unknown step {step!r}")
        except Exception as exc:
            result[step] = {"status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            log(f"step {step} FAILED:\n{traceback.format_exc()}")
        torch.cuda.empty_cache()
        result["seconds"] = time.time() - t_all  # written after every step: a run cut short keeps what it measured
        bench.write_results(args.out / "issue14.json", [], result, meta(args.commit))
    if decode_doc is not None:  # decode.json's summary carries the GPTQ figures of the same run
        from labkit import fastgen

        summary = dict(decode_doc["summary"])
        if gptq_summary is None and carried_gptq is not None:
            gptq_summary, gmeta = carried_gptq
            summary["note_gptq"] = (f"the GPTQ and SmolLM2 figures (gptq) come from the gptq step of an earlier invocation "
                                    f"on this machine at the same commit ({gmeta.get('git_commit')}, "
                                    f"{gmeta.get('utc')}, {gmeta.get('device')})")
        if gptq_summary is not None:
            summary["gptq_int4_ppl_vs_reference"] = gptq_summary["gptq_int4_ppl_vs_reference"]
            summary["gptq"] = gptq_summary
        # its records stay the 7B shape's (notebook 06 reads each as a step of the summary's model, with a floor);
        # the SmolLM2 rows of the GPTQ step are gptq.json's
        bench.write_results(args.out / "decode.json", decode_doc["records"], summary, meta(args.commit))
        try:
            fastgen.plot_decode(decode_doc["records"], args.out / "decode.png")
        except Exception as exc:
            log(f"decode plot: {exc}")
    result["seconds"] = time.time() - t_all
    bench.write_results(args.out / "issue14.json", [], result, meta(args.commit))
    log(f"all steps: {result['seconds']:.0f} s; wrote {sorted(x.name for x in args.out.iterdir())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
