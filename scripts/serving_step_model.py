"""Static vs continuous batching on notebook 07's full-profile trace, with a modelled step time instead of a model.

The real scheduler and block manager run the trace; a stand-in runner answers every step at once and advances the
replay clock by ``decode_ms`` plus ``us_per_token`` for each token of the step's prompt chunks, counted as the token
bucket its CUDA graph pads them to. The defaults are medians of an H200 run of notebook 07 at commit 6fc2430
(`results/nvidia-h200/gpu_runs_2026-12-02.log`, section 5): decode-only steps 4.0 ms, steps with prompt tokens
10.7 ms for about 4,096 bucket tokens, so (10.7 - 4.0) / 4096 = 1.64 us a token. What it shows: how much fewer steps
can gain (the throughput ratio), and what prompt tokens in the decoding steps cost the time per token, for a few
admission and token-budget settings. Runs on a CPU in a few seconds; no model is loaded.

Usage: python scripts/serving_step_model.py [--decode-ms 4.0] [--us-per-token 1.64] [--requests 512]
"""
import argparse
import dataclasses
import itertools

import torch

from labkit import serving as S
from labkit.serving_bench import BenchSizes


class ModelledRunner:
    """The engine's runner interface with no model: logits of zeros, a clock that adds each step's modelled time."""

    device = torch.device("cpu")

    def __init__(self, decode_ms: float, us_per_token: float, max_step_tokens: int):
        self.decode_s, self.per_token_s = decode_ms / 1e3, us_per_token / 1e6
        self.buckets = S.PagedRunner.token_buckets_for(max_step_tokens)
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def forward(self, work):
        tokens = sum(n for _, n in work)
        if tokens > len(work):  # prompt tokens in the step: padded to the token bucket its graph replays
            padded = next((b for b in self.buckets if b >= tokens), tokens)
            self.now += self.per_token_s * padded
        self.now += self.decode_s
        return torch.zeros(len(work), 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode-ms", type=float, default=4.0, help="a decode-only step (ms)")
    p.add_argument("--us-per-token", type=float, default=1.64, help="each prompt token of a step (us)")
    p.add_argument("--requests", type=int, default=512, help="requests in the trace (the full profile: 512)")
    args = p.parse_args(argv)
    if args.decode_ms <= 0 or args.us_per_token < 0 or args.requests < 2:
        p.error("--decode-ms must be positive, --us-per-token at least 0, --requests at least 2")
    sz = BenchSizes.for_profile("full")
    system = list(range(100, 132))  # a 32-token shared system prompt, as SmolLM2's tokenizer gives the benchmark's
    trace = S.make_trace(args.requests, sz.rate, sz.prompt_len, sz.answer_len, system, 0.5, 49152, seed=0)
    main_len = sz.prompt_len[1] + sz.answer_len[1] + len(system) + 8  # the engine sizes of run_serving_benchmark
    bs = 16
    base = S.EngineConfig(max_batch=sz.max_batch, block_size=bs, num_blocks=sz.max_batch * -(-main_len // bs) + 16,
                          max_model_len=max(main_len, sz.long_len + sz.answer_len[1] + 8), prefix_caching=True)

    def run(cfg):
        eng = S.Engine(None, cfg, runner=ModelledRunner(args.decode_ms, args.us_per_token, cfg.max_step_tokens))
        return S.summarize_run(eng.replay(trace, progress=False), eng)

    st = run(dataclasses.replace(base, scheduler="static"))
    print(f"modelled steps: decode-only {args.decode_ms} ms, + {args.us_per_token} us a prompt token; "
          f"{args.requests} requests")
    print(f"static: {st['steps']} steps, p99 time per output token {st['tpot_p99_ms']:.2f} ms")
    print(f"{'admit_batch':>11} {'token budget':>12} {'chunk':>5} {'steps':>5} {'with prompts':>12} "
          f"{'throughput vs static':>20} {'TPOT p99 ms':>11}")
    for admit, budget, chunk in itertools.product((1, 4, 16), (1024, 4096), (None, 256)):
        c = run(dataclasses.replace(base, admit_batch=admit, max_step_tokens=budget, chunk_size=chunk))
        print(f"{admit:11d} {budget:12d} {str(chunk):>5} {c['steps']:5d} {c['steps_mixed']:12d} "
              f"{c['throughput_tok_s'] / st['throughput_tok_s']:19.2f}x {c['tpot_p99_ms']:11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
