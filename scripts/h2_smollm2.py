"""The packed-fp16 GEMV's arithmetic on the real SmolLM2, on a CPU: greedy tokens and perplexity, int4 or int8.

    python scripts/h2_smollm2.py [--weights int4|int8] [--new-tokens 32] [--ppl-tokens 128] [--out DIR]

The GPU's int4 decode step uses the "h2" GEMV wherever the tuner finds it fastest (on an H200: most 7B-shape GEMVs),
and the int8 step of a batch-1 model (word layout) where it wins (on an H200: the o projection), so its fp16
roundings meet real weights and real activations. This runs SmolLM2-135M-Instruct's int4 (FastLlama's own group-128
quantization) or int8 (per channel) build through the decode step three ways, every one-row GEMV of codes computed as
  exact:  in float64 from the bf16 activations (what the fp32 kernels approximate),
  h2:     wo_matmul.matmul_h2_reference, the h2 kernel's arithmetic written out (checked against the kernel in
          tests/test_wo_matmul.py), activations to fp16 and eight products per word position summed in fp16,
  torch:  FastLlama's torch path, dequantize-then-matmul in bf16 (the reference the GPU token checks use),
and compares greedy continuations (prefix of equal tokens), decode perplexity over pydoc eval tokens, and the
largest activation magnitude each GEMV saw. Prompts run through torch's prefill in every case. Writes
h2_smollm2.json (int4) or h2_smollm2_int8.json to --out (default results/local/). Slow: the reference is numpy,
several seconds a token.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from labkit import bench, data, fastgen, models
from labkit.kernels import wo_matmul as wo


def build(model, how: str, seen: dict, weights: str = "int4") -> fastgen.FastLlama:
    fast = fastgen.FastLlama(model, weights=weights, kernels="torch", max_seq_len=512)
    kind = wo.Int4Weight if weights == "int4" else wo.Int8Weight
    torch_lin = fast._lin
    dense = {}

    def lin(x, w, silu=False, use_kernel=False, partials=False):
        if how == "torch" or x.dim() != 2 or x.shape[0] != 1 or not isinstance(w, kind):  # prefill: torch
            return torch_lin(x, w, silu, use_kernel, partials)
        key = f"{w.shape[0]}x{w.shape[1]}" + (" (silu(gate) * up)" if silu else "")
        xa = x
        if silu:  # the activations the GEMV multiplies
            gate, up = x.chunk(2, dim=-1)
            xa = F.silu(gate) * up
        seen[key] = max(seen.get(key, 0.0), xa.abs().max().item())
        if how == "h2":
            return wo.matmul_h2_reference(x, w, silu_gate_up=silu).to(x.dtype)
        if id(w) not in dense:  # the codes' exact values, once per weight
            dense[id(w)] = wo.dequantize(w, torch.float64).t()
        return (xa.double() @ dense[id(w)]).to(x.dtype)

    fast._lin = lin
    return fast


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", choices=("int4", "int8"), default="int4")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--ppl-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not 1 <= args.new_tokens <= 256 or not 2 <= args.ppl_tokens <= 480:
        p.error("--new-tokens takes 1 to 256, --ppl-tokens 2 to 480")
    t0 = time.time()
    model, tok = models.load("smollm2-135m", device="cpu", dtype=torch.bfloat16)
    ids = data.load_splits(tok, "pydoc").eval[:args.ppl_tokens]
    prompt = tok("The three primary colours are", return_tensors="pt").input_ids
    seen: dict = {}
    builds = {how: build(model, how, seen, args.weights) for how in ("exact", "h2", "torch")}
    tokens, ppl = {}, {}
    for how, fast in builds.items():
        print(f"{how}: {args.new_tokens} greedy tokens ({time.time() - t0:.0f} s)", flush=True)
        tokens[how] = fast.generate(prompt, args.new_tokens, use_graph=False)
        ppl[how] = fastgen.decode_perplexity(fast, ids, progress=f"{how} perplexity")
        print(f"{how:6s} ppl {ppl[how]:.4f}  {tok.decode(tokens[how][0])!r}  "
              f"({time.time() - t0:.0f} s)", flush=True)

    def prefix(a, b):
        return int((a == b).long().cumprod(dim=1).sum())

    summary = {"model": "SmolLM2-135M-Instruct (real weights), FastLlama "
                        + ("int4 (group 128)" if args.weights == "int4" else "int8 (per channel)"),
               "new_tokens": args.new_tokens, "ppl_tokens": int(ids.numel()), "corpus": "pydoc",
               "greedy_prefix": {"h2_vs_exact": prefix(tokens["h2"], tokens["exact"]),
                                 "h2_vs_torch": prefix(tokens["h2"], tokens["torch"]),
                                 "exact_vs_torch": prefix(tokens["exact"], tokens["torch"])},
               "decode_perplexity": ppl, "h2_ppl_vs_exact": ppl["h2"] / ppl["exact"],
               "max_abs_activation_per_gemv": seen,
               "seconds": time.time() - t0}
    print(json.dumps({k: v for k, v in summary.items() if k != "max_abs_activation_per_gemv"}, indent=1))
    print("largest activation any GEMV saw:", f"{max(seen.values()):.1f}")
    out = args.out or bench.results_dir()
    out.mkdir(parents=True, exist_ok=True)
    meta = bench.run_metadata()
    meta["note"] = "the h2 GEMV's arithmetic emulated in numpy on this machine's CPU (no GPU kernel ran)"
    bench.write_results(out / ("h2_smollm2.json" if args.weights == "int4" else "h2_smollm2_int8.json"), [], summary,
                        meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
