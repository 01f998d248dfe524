"""The serving engine's decode attention and decode step against the keys per loop iteration (a CUDA GPU).

For each ``block_n`` (key positions a program reads per iteration of its walk through the block table): the paged
decode kernel alone at batch 64 and a 512-token context (SmolLM2's 9/3 heads and the 7B shape's 32/32), as time and
as the rate it reads K/V at; then SmolLM2's whole decode step of the engine (CUDA graph replay) at batch 64, context
512, with that kernel. All in one run, CUDA events, medians.

Usage: python scripts/gpu_serving_decode.py [out.json]
"""
import functools
import json
import sys

import torch

from labkit import bench, env, models
from labkit import serving as S

try:
    env.require_cuda("the paged decode benchmark")
except env.LabkitError as exc:
    raise SystemExit(f"error: {exc}")
dev = env.device()
BLOCK_NS = (16, 32, 64, 128)
B, CTX, BS = 64, 512, 16
out = {"device": env.device_name(), "torch": torch.__version__, "batch": B, "context": CTX, "block_size": BS,
       "kernel": [], "step": []}
g = torch.Generator(device=dev).manual_seed(0)
for name, nkv, nq, hd in (("smollm2-135m", 3, 9, 64), ("llama2-7b-shape", 32, 32, 128)):
    nb = B * CTX // BS
    kc = torch.randn(nb, BS, nkv, hd, generator=g, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(B, nq, hd, generator=g, device=dev, dtype=torch.bfloat16)
    tables = torch.randperm(nb, generator=g, device=dev).to(torch.int32).view(B, CTX // BS)  # scattered blocks
    lens = torch.full((B,), CTX, dtype=torch.int32, device=dev)
    ref = S.paged_decode_attention_ref(q[:2].float().cpu(), kc.float().cpu(), vc.float().cpu(), tables[:2].cpu(),
                                       lens[:2].cpu())
    kv_bytes = 2 * B * CTX * nkv * hd * 2
    for bn in BLOCK_NS:
        o = S.paged_decode_attention(q, kc, vc, tables, lens, block_n=bn)
        err = (o[:2].float().cpu() - ref).abs().max().item()
        m = bench.measure(lambda: S.paged_decode_attention(q, kc, vc, tables, lens, block_n=bn), warmup=5, iters=50,
                          device=dev)
        row = {"heads": name, "block_n": bn, "median_us": m.median_s * 1e6, "kv_GB_s": kv_bytes / m.median_s / 1e9,
               "max_err_vs_ref": err}
        out["kernel"].append(row)
        print(row, flush=True)
    del kc, vc

hf, _ = models.load("smollm2-135m", device=dev)
W = S.shared_weights(hf, max_model_len=CTX + 64)
original = S.paged_decode_attention
for bn in BLOCK_NS:
    S.paged_decode_attention = functools.partial(original, block_n=bn)  # what the engine's graphs capture
    eng = S.Engine(W, S.EngineConfig(max_batch=B, block_size=BS, num_blocks=B * (CTX + 64) // BS + 8,
                                     max_model_len=CTX + 64, kernels="triton", max_step_tokens=4096))
    gen = torch.Generator().manual_seed(1)
    for _ in range(B):
        eng.add(S.Request(torch.randint(10, 40000, (CTX,), generator=gen).tolist(), 60, ignore_eos=True))
    while any(not s.output for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    m = bench.measure(eng.step, warmup=3, iters=30, device=dev)
    row = {"block_n": bn, "engine_decode_step_ms": m.median_ms}
    out["step"].append(row)
    print(row, flush=True)
    del eng
S.paged_decode_attention = original
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
