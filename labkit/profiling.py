"""Where the time of a forward pass goes: ``torch.profiler`` traces summarized by category.

A trace is thousands of operator and kernel events. To read it we label the model's modules: while a module
runs, a profiler range named ``labkit::<category>`` is open (``label_modules``), so each operator (and each GPU
kernel, through the launch that queued it) belongs to the innermost labelled module around it. ``breakdown``
then sums, inside each step range (``labkit::prefill``, ``labkit::decode``):

- host time per category: the duration of every top-level operator, by the category of its module;
- ``overhead``: the host time of the step in which no operator ran — Python, the framework's own bookkeeping
  between operators, and (on a GPU) the time spent issuing kernel launches;
- on a GPU, device time per category (kernel durations) and ``idle``: the part of the step's device span in
  which no kernel ran — the GPU waiting for the host to launch the next kernel.

The input is the Chrome trace JSON that ``torch.profiler`` exports (``prof.export_chrome_trace``): a list of
``{"ph": "X", "cat", "name", "ts", "dur", "tid", "args"}`` events, times in microseconds. The functions at the
bottom work on that list only, so they are tested on synthetic traces (``tests/test_profiling.py``).
"""
from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "labkit::"
CATEGORIES = ("attention", "mlp", "norm", "lm_head", "embedding", "other")
HOST_ONLY = ("overhead",)     # host time in a step with no operator running
DEVICE_ONLY = ("idle",)       # device time in a step with no kernel running
KERNEL_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")   # cudaLaunchKernel (runtime) or cuLaunchKernel (driver, e.g. Triton)

# what to try first when a category dominates (read off the chart by ``advice``)
ADVICE = {
    "mlp": "the MLP's matmuls: weight-only quantization (fewer bytes per step) or faster GEMMs; "
           "at batch 1 they are bound by reading weights",
    "attention": "attention: an SDPA/flash backend, a smaller KV cache (GQA, KV quantization), shorter context",
    "norm": "the norms: fuse them (torch.compile) — many small element-wise kernels",
    "lm_head": "the output projection: a vocabulary of 49k rows is read every step; quantize it or fuse sampling",
    "embedding": "the embedding lookup (rarely worth it)",
    "other": "unlabelled operators: rotary embeddings, masks, sampling — profile them one level deeper",
    "overhead": "host overhead: fewer, larger operations — CUDA graphs, torch.compile, a larger batch",
    "idle": "device idle time: the GPU waits for launches — CUDA graphs or torch.compile(mode='reduce-overhead')",
}


# ---------------------------------------------------------------------------------------------- labelling
def module_category(name: str, module=None) -> str | None:
    """The category of a module from its qualified name (and class name), or None to leave it unlabelled.

    Llama-style names: ``model.layers.3.self_attn`` -> attention, ``...mlp`` -> mlp, ``...input_layernorm`` and
    ``model.norm`` -> norm, ``lm_head`` -> lm_head, ``model.embed_tokens`` -> embedding. The projections inside
    attention and the MLP are not labelled: they count as their block.
    """
    last = name.rsplit(".", 1)[-1].lower()
    cls = type(module).__name__.lower() if module is not None else ""
    if last == "lm_head":
        return "lm_head"
    if "embed" in last and "rotary" not in last:
        return "embedding"
    if "norm" in last or "norm" in cls:
        return "norm"
    if last in ("self_attn", "attn", "attention") or cls.endswith("attention"):
        return "attention"
    if last in ("mlp", "feed_forward", "ffn") or cls.endswith("mlp"):
        return "mlp"
    return None


@contextlib.contextmanager
def label_modules(model, categorize=module_category):
    """While inside, every module that ``categorize(name, module)`` names runs inside a profiler range
    ``labkit::<category>``. Hooks are removed on exit."""
    import torch

    handles, open_ranges = [], {}

    def enter(mod, args, cat):
        rf = torch.profiler.record_function(PREFIX + cat)
        rf.__enter__()
        open_ranges.setdefault(id(mod), []).append(rf)

    def leave(mod, args, out):
        stack = open_ranges.get(id(mod))
        if stack:
            stack.pop().__exit__(None, None, None)

    for name, mod in model.named_modules():
        cat = categorize(name, mod)
        if cat:
            handles.append(mod.register_forward_pre_hook(lambda m, a, c=cat: enter(m, a, c)))
            handles.append(mod.register_forward_hook(leave))
    try:
        yield len(handles) // 2
    finally:
        for h in handles:
            h.remove()


def profile_prefill_decode(model, input_ids, decode_steps: int = 4, trace_path=None, warmup: bool = True) -> list[dict]:
    """Profile one prefill of ``input_ids`` (batch, prompt_len) and ``decode_steps`` greedy decode steps.

    Each phase sits in a range ``labkit::prefill`` / ``labkit::decode`` (one per step). One untimed prefill
    and decode step run first (``warmup``), so that first-call costs stay out of the trace. Returns the trace
    events (and writes the Chrome trace to ``trace_path`` when given: open it in chrome://tracing or Perfetto).
    """
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    if decode_steps < 1:
        raise ValueError(f"decode_steps must be at least 1, got {decode_steps}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, prompt_len) with prompt_len >= 1, got {tuple(input_ids.shape)}")
    dev = input_ids.device
    # newer transformers name the cache argument ``cache`` (``past_key_values`` is deprecated there)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])

    def run(record: bool):
        ctx = record_function if record else (lambda name: contextlib.nullcontext())
        with torch.inference_mode():
            with ctx(PREFIX + "prefill"):
                out = model(input_ids=input_ids, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
            cache = _cache_of(out)
            for _ in range(decode_steps if record else 1):
                with ctx(PREFIX + "decode"):
                    out = model(input_ids=token, use_cache=True, **{cache_kw: cache})
                    token = out.logits[:, -1:].argmax(-1)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                cache = _cache_of(out)

    with label_modules(model):
        if warmup:
            run(False)
        with profile(activities=activities) as prof:
            run(True)
    if trace_path is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            return load_trace(path)
    trace_path = Path(trace_path)
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    return load_trace(trace_path)


def _cache_of(out):
    """The KV cache a forward returned (``cache`` in newer transformers, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def load_trace(path) -> list[dict]:
    """The complete ('X') events of a Chrome trace JSON file written by ``torch.profiler``."""
    doc = json.loads(Path(path).read_text())
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    return [e for e in events if e.get("ph") == "X"]


# ---------------------------------------------------------------------------------------------- summary
@dataclass
class Breakdown:
    """Microseconds by category over every range of one step name.

    ``host``: categories of ``CATEGORIES`` plus ``overhead``; ``device`` (None without GPU kernels): the same
    categories plus ``idle``. ``wall_us``: summed host durations of the step ranges; ``steps``: their number.
    """

    step: str
    host: dict = field(default_factory=dict)
    device: dict | None = None
    wall_us: float = 0.0
    device_span_us: float = 0.0
    steps: int = 0

    def shares(self, side: str = "host") -> dict:
        """Fraction of the total per category (``side``: 'host' or 'device')."""
        d = self.host if side == "host" else self.device
        if not d:
            raise ValueError(f"no {side} times in this breakdown (device times need a GPU trace)")
        total = sum(d.values())
        return {k: v / total for k, v in d.items()} if total else {k: 0.0 for k in d}

    def top(self, side: str = "host") -> tuple[str, float]:
        """The category with the largest share, and that share."""
        s = self.shares(side)
        cat = max(s, key=s.get)
        return cat, s[cat]


def _is_range(e: dict) -> bool:
    return e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(PREFIX)


def _inside(e: dict, outer: dict) -> bool:
    return e["ts"] >= outer["ts"] and e["ts"] + e["dur"] <= outer["ts"] + outer["dur"]


def _innermost_category(t: float, ranges: list[dict]) -> str:
    """The category of the shortest labelled module range that contains time t (``other`` if none)."""
    best = None
    for r in ranges:
        if r["ts"] <= t <= r["ts"] + r["dur"] and (best is None or r["dur"] < best["dur"]):
            best = r
    return best["name"][len(PREFIX):] if best is not None else "other"


def top_level(ops: list[dict]) -> list[dict]:
    """Operators not nested inside another operator (one thread's list): their durations do not overlap."""
    out, end = [], float("-inf")
    for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] >= end:
            out.append(e)
            end = e["ts"] + e["dur"]
    return out


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def breakdown(events: list[dict], step: str) -> Breakdown:
    """Sum the trace's time by category over every range named ``labkit::<step>`` (see the module docstring)."""
    name = PREFIX + step
    steps = [e for e in events if _is_range(e) and e["name"] == name]
    if not steps:
        raise ValueError(f"no range named {name!r} in the trace; profile inside record_function({name!r})")
    module_ranges = [e for e in events if _is_range(e) and e["name"][len(PREFIX):] in CATEGORIES]
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    kernels = [e for e in events if e.get("cat") in KERNEL_CATS]

    host = dict.fromkeys(CATEGORIES + HOST_ONLY, 0.0)
    device = dict.fromkeys(CATEGORIES + DEVICE_ONLY, 0.0)
    wall = span = 0.0
    any_kernel = False
    for st in steps:
        mine = [r for r in module_ranges if r.get("tid") == st.get("tid") and _inside(r, st)]
        tops = top_level([o for o in ops if o.get("tid") == st.get("tid") and _inside(o, st)])
        for op in tops:
            host[_innermost_category(op["ts"] + op["dur"] / 2, mine)] += op["dur"]
        wall += st["dur"]
        host["overhead"] += max(st["dur"] - sum(op["dur"] for op in tops), 0.0)
        # kernels launched from inside this step, categorized by where their launch call sat
        ks = []
        for k in kernels:
            launch = launches.get(k.get("args", {}).get("correlation"))
            if launch is not None and _inside(launch, st):   # by time: the runtime may log its own thread id
                ks.append(k)
                device[_innermost_category(launch["ts"], mine)] += k["dur"]
        if ks:
            any_kernel = True
            lo = min(k["ts"] for k in ks)
            hi = max(k["ts"] + k["dur"] for k in ks)
            span += hi - lo
            device["idle"] += (hi - lo) - union_length([(k["ts"], k["ts"] + k["dur"]) for k in ks])
    return Breakdown(step, host, device if any_kernel else None, wall, span, len(steps))


def advice(b: Breakdown, side: str | None = None) -> str:
    """'what to optimise first': the largest category of the breakdown and what usually shrinks it."""
    side = side or ("device" if b.device else "host")
    cat, share = b.top(side)
    return f"{b.step}: {cat} takes {share:.0%} of the {side} time -> optimise {ADVICE[cat]}"


def plot_breakdowns(items: dict, side: str = "host", ax=None, title: str = ""):
    """Stacked horizontal bars: one per label of ``items`` ({label: Breakdown}), shares by category."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.9 + 0.6 * len(items)))
    cats = list(CATEGORIES) + list(HOST_ONLY if side == "host" else DEVICE_ONLY)
    shares = [b.shares(side) for b in items.values()]
    left = [0.0] * len(items)
    for c, color in zip(cats, plt.get_cmap("tab10").colors):
        widths = [s.get(c, 0.0) for s in shares]
        if not any(widths):
            continue
        ax.barh(range(len(items)), widths, left=left, color=color, label=c)
        for i, w in enumerate(widths):
            if w > 0.06:
                ax.text(left[i] + w / 2, i, f"{w:.0%}", ha="center", va="center", fontsize=8)
        left = [l + w for l, w in zip(left, widths)]
    ax.set_yticks(range(len(items)), list(items))
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of {side} time")
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    ax.set_title(title)
    return ax
