"""One timing path for the whole workbook.

``measure(fn)`` warms up, then times ``fn`` repeatedly with CUDA events on a GPU (``perf_counter`` on a CPU)
and returns a ``Measurement``: median and spread, plus peak device memory. ``time_generate`` measures the two
numbers a chat user feels, time to first token (TTFT) and per-token decode latency, of a Hugging Face
``generate()``, from a timestamp per generated token (``TokenClock``); ``article_streamer_benchmark``
reproduces a commonly copied benchmark (a printing streamer timed with the work) so its errors can be measured. ``record``/``write_results`` turn measurements into JSON records that carry the device, the
versions and the git commit, so a number is never separated from where it was measured.

Physical units always sit beside the times: ``tflops(flops, m)`` and ``gbps(nbytes, m)``, and a fraction of a
measured floor where there is one (see ``labkit.env`` for the ceilings).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from labkit import env


@dataclass
class Measurement:
    """Timing of one callable: seconds per call (median and spread over ``n`` timed calls) and peak memory."""

    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    n: int
    peak_mem_bytes: int | None = None
    times_s: list = field(default_factory=list, repr=False)

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative spread; compare two versions only when they differ by more."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("times_s")
        d["median_ms"] = self.median_ms
        return d


def _quantile(sorted_xs: list[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_s: list[float], peak_mem_bytes: int | None = None) -> Measurement:
    """Median, p10, p90 and min of a list of durations in seconds."""
    if not times_s:
        raise ValueError("no timings to summarize")
    xs = sorted(times_s)
    return Measurement(statistics.median(xs), _quantile(xs, 0.1), _quantile(xs, 0.9), xs[0], len(xs),
                       peak_mem_bytes, list(times_s))


def measure(fn: Callable[[], object], *, warmup: int = 3, iters: int = 20, device=None,
            min_time_s: float = 0.0, max_iters: int = 1000) -> Measurement:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``iters`` timed calls (more until ``min_time_s``).

    On CUDA each call sits between two recorded events, so the time is the GPU's; peak memory is the
    allocator's peak during the timed calls. On CPU, ``perf_counter`` around each call and no memory figure.
    """
    import torch

    dev = torch.device(device) if device is not None else env.device()
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start_all = time.perf_counter()
        while len(times) < iters or (time.perf_counter() - start_all < min_time_s and len(times) < max_iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        start_all = time.perf_counter()
        while len(times) < iters or (time.perf_counter() - start_all < min_time_s and len(times) < max_iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        peak = None
    return summarize(times, peak)


def tflops(flops: float, m: Measurement) -> float:
    """Achieved TFLOP/s at the median time."""
    return flops / m.median_s / 1e12


def gbps(nbytes: float, m: Measurement) -> float:
    """Achieved GB/s (1e9 bytes) at the median time."""
    return nbytes / m.median_s / 1e9


# ---------------------------------------------------------------------------------------------- generate()
class TokenClock:
    """A ``generate`` streamer that timestamps every new token: ``put`` is HF's per-token hook.

    ``generate`` calls ``put`` once with the prompt, then once per step with that step's tokens (batch,),
    already copied to the host. On a GPU we also synchronize before reading the clock, so a stamp is the
    moment the token exists, not the moment its kernels were queued. ``stamps`` holds ``perf_counter``
    seconds, one per generated token; ``start()`` sets the zero (just before calling ``generate``).
    """

    def __init__(self, device=None):
        import torch

        self.device = torch.device(device) if device is not None else None
        self.t0 = None
        self.stamps: list[float] = []
        self._prompt_seen = False

    def _now(self) -> float:
        import torch

        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self.t0 = self._now()
        self.stamps = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first call carries the prompt, not a generated token
            self._prompt_seen = True
            return
        self.stamps.append(self._now())

    def end(self) -> None:
        pass

    @property
    def ttft_s(self) -> float:
        """Seconds from ``start()`` to the first generated token (prefill + first sampling)."""
        return self.stamps[0] - self.t0

    @property
    def gaps_s(self) -> list[float]:
        """Seconds between consecutive tokens: one decode step each (len(stamps) - 1 of them)."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def time_generate(model, input_ids, new_tokens: int = 32, *, warmup: int = 1, iters: int = 5,
                  attention_mask=None, **generate_kwargs) -> dict:
    """TTFT and per-token decode latency of ``model.generate`` (greedy, exactly ``new_tokens`` new tokens).

    Every run timestamps each token as ``generate`` hands it out (``TokenClock``, HF's streamer hook), so
    both numbers come from the same runs: TTFT is the median over runs of (first token - call), the
    per-token decode latency is the median of every inter-token gap of every run ((new_tokens - 1) x iters
    gaps). No difference of two noisy totals: a gap is one measured step, always > 0.
    ``input_ids``: (batch, prompt_len) on the model's device.
    """
    import torch

    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 to separate decode from prefill")
    if iters < 1:
        raise ValueError("iters must be at least 1")
    if "streamer" in generate_kwargs:
        raise ValueError("time_generate installs its own streamer (the token clock); do not pass one")
    dev = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kwargs = dict(do_sample=False, attention_mask=attention_mask, pad_token_id=generate_kwargs.pop("pad_token_id", 0),
                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, **generate_kwargs)
    clock = TokenClock(dev)
    ttfts, gaps, totals = [], [], []
    with torch.inference_mode():
        for _ in range(warmup):
            model.generate(input_ids, **kwargs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(iters):
            clock.start()
            model.generate(input_ids, streamer=clock, **kwargs)
            end = clock._now()
            if len(clock.stamps) != new_tokens:
                raise RuntimeError(f"generate produced {len(clock.stamps)} tokens, expected {new_tokens}")
            ttfts.append(clock.ttft_s)
            gaps.extend(clock.gaps_s)
            totals.append(end - clock.t0)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    first, step, total = summarize(ttfts), summarize(gaps), summarize(totals)
    batch = input_ids.shape[0]
    return {
        "batch": batch,
        "prompt_len": input_ids.shape[1],
        "new_tokens": new_tokens,
        "iters": iters,
        "ttft_ms": first.median_ms,
        "ttft_spread": first.spread,
        "total_ms": total.median_ms,
        "decode_ms_per_token": step.median_ms,
        "decode_min_ms": step.min_s * 1e3,
        "decode_p10_ms": step.p10_s * 1e3,
        "decode_p90_ms": step.p90_s * 1e3,
        "decode_spread": step.spread,
        "tokens_per_s": batch / step.median_s,
        "peak_mem_bytes": peak,
    }


def article_streamer_benchmark(model, tokenizer, prompt: str, max_new_tokens: int = 128, repeats: int = 30,
                               stream=None) -> dict:
    """The source article's benchmark, reproduced so that its numbers can be compared with ``time_generate``.

    As there: no warm-up run, a fresh ``TextStreamer`` per run that decodes and prints every token *inside*
    the timed region, wall-clock ``time.time()`` around ``generate`` (synchronized on a GPU, as there), the
    mean over runs, and tokens/s = ``max_new_tokens`` / mean time, i.e. prefill folded into the per-token
    figure and every run assumed to reach ``max_new_tokens`` (an early EOS makes fewer). ``stream`` is where
    the streamer's text goes (default ``sys.stdout``, as there; pass a ``StringIO`` to keep a notebook short).
    The attention mask and pad id are passed only to silence transformers' warnings (it builds the same mask).

    Returned beside the article's two figures: every run's time and token count, so that what it folds
    together can be taken apart (the first, cold run; the tokens really made).
    """
    import contextlib
    import sys

    import torch
    from transformers import TextStreamer

    dev = model.device
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(dev)
    timings, made = [], []
    with contextlib.redirect_stdout(stream or sys.stdout):
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.time()
            out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones_like(input_ids),
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                 streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.time() - start)
            made.append(out.shape[1] - input_ids.shape[1])
    avg = sum(timings) / repeats
    return {
        "prompt_len": input_ids.shape[1],
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "timings_s": timings,
        "tokens_made": made,
        "avg_latency_ms": avg * 1e3,  # the article's "avg latency per generation"
        "ms_per_token": avg * 1e3 / max_new_tokens,  # its "avg token latency": prefill and printing included
        "tokens_per_s": max_new_tokens / avg,  # its throughput, counting max_new_tokens whatever was made
    }


# ---------------------------------------------------------------------------------------------- records
def git_commit() -> str | None:
    """The checkout's commit (with '+dirty' when it has uncommitted changes), or None outside git.

    ``LABKIT_GIT_COMMIT`` supplies it where the checkout travelled without its ``.git`` (e.g. to a GPU runner).
    """
    import os

    if os.environ.get("LABKIT_GIT_COMMIT"):
        return os.environ["LABKIT_GIT_COMMIT"]
    try:
        root = env.repo_root()
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata() -> dict:
    """Where and when: device, profile, versions, git commit, UTC time."""
    return {
        "device": env.device_name(),
        "device_slug": env.device_slug(),
        "profile": env.profile(),
        "versions": env.versions(),
        "git_commit": git_commit(),
        "utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def results_dir(slug: str | None = None) -> Path:
    """``results/<device-slug>/`` in the checkout (created)."""
    path = env.repo_root() / "results" / (slug or env.device_slug())
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(path, records: list[dict], summary: dict | None = None, meta: dict | None = None) -> Path:
    """Write ``{"meta": ..., "summary": ..., "records": [...]}`` as JSON and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta or run_metadata(), "summary": summary or {}, "records": records}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # whole or not at all: a reader never sees half a file
    tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def read_results(path) -> dict:
    return json.loads(Path(path).read_text())


def _json_default(obj):
    if isinstance(obj, Measurement):
        return obj.as_dict()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def graph_time_ms(fns: list, calls: int = 32, rounds: int = 7) -> float:
    """Median milliseconds per call of ``calls`` calls cycling over ``fns``, captured and replayed as a CUDA graph.

    For kernels too short to time one launch at a time from Python (the launch would be what is measured).
    """
    env.require_cuda("graph_time_ms (CUDA-graph timing)")
    import torch

    dev = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for f in fns:  # compile and warm up outside the capture
            f()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(calls):
            fns[c % len(fns)]()
    graph.replay()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del graph
    return sorted(times)[len(times) // 2]
