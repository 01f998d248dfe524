"""Where the batch-64 decode step of the serving engine spends its time (7B shape, random weights; a CUDA GPU).

Usage: python scripts/profile_serving_step.py   (prints the step time, the forward alone and torch.profiler tables)
"""
import sys, time, torch
from labkit import models, env, bench
from labkit.serving import Engine, EngineConfig, Request
from torch.profiler import profile, ProfilerActivity

env.require_cuda("the serving step profile")
dev = env.device()
model, _ = models.load("llama2-7b-shape", device=dev)
batch, context, new, bs = 64, 512, 40, 16
cfg = EngineConfig(max_batch=batch, block_size=bs, num_blocks=batch * -(-(context + new) // bs),
                   max_model_len=context + new, kernels="triton", max_step_tokens=batch * context)
eng = Engine(model, cfg)
g = torch.Generator().manual_seed(0)
for _ in range(batch):
    eng.add(Request(torch.randint(10, model.config.vocab_size, (context,), generator=g).tolist(), new, ignore_eos=True))
t = time.perf_counter()
while eng.scheduler.waiting or any(not s.output for s in eng.scheduler.running):
    eng.step()
torch.cuda.synchronize(); print(f"prefill {time.perf_counter()-t:.2f} s", flush=True)
m = bench.measure(eng.step, warmup=2, iters=6, device=dev)
print(f"step median {m.median_ms:.2f} ms", flush=True)
work = eng.scheduler.schedule()
m2 = bench.measure(lambda: eng.runner.forward(work), warmup=1, iters=4, device=dev)
print(f"runner.forward alone {m2.median_ms:.2f} ms", flush=True)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
