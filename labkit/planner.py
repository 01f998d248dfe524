"""Capacity planning from measured decode records: how many GPUs, at what batch, for what cost per token.

The model of one GPU serving one LLM (all arithmetic, no torch):

- a decode step at batch B takes ``step_ms(B)``: the measured step times of a benchmark record (batch 1 and, when
  measured, a larger batch; linear in B between and beyond them), never below the roofline floor of
  ``labkit.roofline`` (weights read once per step plus each sequence's KV cache, at the measured read bandwidth;
  and 2 FLOPs per weight per token at the measured matmul rate);
- the latency target is the time between two output tokens (what the source article calls "token latency"), so a
  GPU may batch up to the largest B with ``step_ms(B) <= target`` — and no more sequences than the memory left
  after the weights holds KV caches for;
- one message costs a GPU ``prompt / prefill_rate`` seconds of prefill plus ``answer × step_ms(B) / B`` of decode;
- the fleet is sized for the peak (messages per day / 86,400 × peak-to-average) and paid around the clock, so the
  cost per million answer tokens = GPUs × 24 h × price per GPU-hour / (answer tokens per day / 10⁶).

``plan(traffic, record, price)`` gives one format's answer; ``plan_all`` the bf16 / int8 / int4 table. Records come
from ``labkit bench decode`` output (``from_decode_doc``: this device's ``results/local`` file, or a committed
reference through ``labkit.results``), or from ``project`` (a record's fraction of the floor carried to another
model shape or device; labelled as a projection). Bad traffic or a target under the floor raises ``LabkitError``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

from labkit import roofline
from labkit.env import LabkitError

SECONDS_PER_DAY = 86_400
FORMATS = ("bf16", "int8", "int4")
BITS = {"bf16": 16, "int8": 8, "int4": 4}
GROUP = {"bf16": None, "int8": None, "int4": 128}  # int8 per channel (scale count negligible), int4 group 128


@dataclass(frozen=True)
class Traffic:
    """What the service must carry. ``latency_ms``: the target time between output tokens (per decode step)."""

    messages_per_day: float
    peak_to_average: float = 3.0
    prompt_tokens: int = 30
    answer_tokens: int = 200
    latency_ms: float = 100.0

    def check(self) -> None:
        bad = [(n, v) for n, v in (("messages_per_day", self.messages_per_day), ("prompt_tokens", self.prompt_tokens),
                                   ("answer_tokens", self.answer_tokens), ("latency_ms", self.latency_ms)) if not v > 0]
        if bad:
            n, v = bad[0]
            raise LabkitError(f"Traffic {n} = {v} cannot be planned for: it must be positive (a fleet for no traffic, "
                              "or for a zero or negative length or latency, has no meaning).")
        if not self.peak_to_average >= 1:
            raise LabkitError(f"peak_to_average = {self.peak_to_average} is impossible: the peak of a day's traffic "
                              "is at least its average, so the ratio is >= 1.")

    @property
    def peak_messages_per_s(self) -> float:
        return self.messages_per_day / SECONDS_PER_DAY * self.peak_to_average


@dataclass(frozen=True)
class Record:
    """One model in one weight format on one device: measured decode steps and the ceilings the floor uses.

    ``step_ms``: batch -> measured milliseconds per decode step. ``label`` says where the numbers come from
    (device, commit, date, and whether they are measured, scaled or projected).
    """

    label: str
    weights: str
    step_ms: dict
    weight_bytes: float
    kv_bytes_per_token: float
    matmul_params: float
    read_bandwidth: float  # bytes/s
    matmul_flops: float    # FLOP/s
    prefill_tokens_per_s: float
    memory_bytes: float
    context_measured: float = 0.0  # average tokens in each sequence's KV cache during the measured steps

    def floor_ms(self, batch: int, context: float) -> float:
        """The roofline floor of one step: max(memory time, compute time) at ``batch`` sequences of ``context``."""
        mem = roofline.decode_floor(self.weight_bytes, self.read_bandwidth, self.kv_bytes_per_token, context,
                                    batch).ms
        compute = 2 * self.matmul_params * batch / self.matmul_flops * 1e3
        return max(mem, compute)

    def step(self, batch: int, context: float) -> float:
        """Modelled ms per decode step at ``batch``: the measured line through the record's points, >= the floor."""
        pts = sorted(self.step_ms.items())
        b1, t1 = pts[0]
        if len(pts) > 1:
            b2, t2 = pts[-1]
            slope = (t2 - t1) / (b2 - b1)
        else:  # one point: each extra sequence costs at least its KV read and its FLOPs
            slope = max(self.kv_bytes_per_token * context / self.read_bandwidth,
                        2 * self.matmul_params / self.matmul_flops) * 1e3
        return max(t1 + (batch - b1) * slope, self.floor_ms(batch, context))


@dataclass
class Plan:
    weights: str
    gpus: int
    batch: int
    step_ms: float
    floor_ms: float
    tokens_per_s_per_gpu: float
    gpu_seconds_per_message: float
    utilisation_at_peak: float
    cost_per_million_tokens: float
    batch_limit: str
    label: str
    notes: list = field(default_factory=list)

    def row(self) -> str:
        return (f"{self.weights:>5} | {self.gpus:5d} | {self.batch:5d} ({self.batch_limit:7s}) | {self.step_ms:7.2f} | "
                f"{self.floor_ms:6.2f} | {self.tokens_per_s_per_gpu:9.0f} | {self.utilisation_at_peak:5.0%} | "
                f"{self.cost_per_million_tokens:8.3f}")


HEADER = ("  fmt |  GPUs | batch (limit)   | step ms | floor  | tok/s/GPU | util  | $/M tok\n"
          "------|-------|-----------------|---------|--------|-----------|-------|---------")


def max_batch(traffic: Traffic, record: Record, cap: int = 4096) -> tuple[int, str]:
    """Largest batch whose step meets the latency target and whose KV caches fit; and which limit binds."""
    context = traffic.prompt_tokens + traffic.answer_tokens
    floor1 = record.floor_ms(1, context)
    if traffic.latency_ms < floor1:
        raise LabkitError(
            f"A {traffic.latency_ms:g} ms per-token target cannot be met with {record.weights} weights on "
            f"{record.label}: one decode step must read {record.weight_bytes / 1e9:.2f} GB at "
            f"{record.read_bandwidth / 1e12:.2f} TB/s, a floor of {floor1:.2f} ms at batch 1. More GPUs do not "
            f"shorten a step; fewer bytes per step (lower-bit weights, a smaller model) or faster memory would.")
    step1 = record.step(1, context)
    if traffic.latency_ms < step1:
        raise LabkitError(
            f"A {traffic.latency_ms:g} ms per-token target cannot be met with {record.weights} weights on "
            f"{record.label}: the measured step at batch 1 is {step1:.2f} ms (the floor is {floor1:.2f} ms). More "
            f"GPUs do not shorten a step; a faster decode loop might (it is {step1 / floor1:.1f}x the floor).")
    kv_seq = record.kv_bytes_per_token * context
    free = record.memory_bytes - record.weight_bytes
    if free < kv_seq:
        raise LabkitError(f"{record.weights} weights ({record.weight_bytes / 1e9:.1f} GB) leave no room on "
                          f"{record.label} ({record.memory_bytes / 1e9:.0f} GB) for one sequence's KV cache.")
    mem_cap = cap if kv_seq == 0 else min(cap, int(free // kv_seq))
    lo, hi = 1, mem_cap  # step() grows with the batch: bisect for the largest batch under the target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if record.step(mid, context) <= traffic.latency_ms:
            lo = mid
        else:
            hi = mid - 1
    limit = "memory" if lo == mem_cap and mem_cap < cap else ("cap" if lo == cap else "latency")
    return lo, limit


def plan(traffic: Traffic, record: Record, price_per_gpu_hour: float) -> Plan:
    """GPUs, batch per GPU and cost per million answer tokens for one record. See the module docstring."""
    traffic.check()
    if not price_per_gpu_hour > 0:
        raise LabkitError(f"price_per_gpu_hour = {price_per_gpu_hour} must be positive.")
    batch, limit = max_batch(traffic, record)
    context = traffic.prompt_tokens + traffic.answer_tokens
    step = record.step(batch, context)
    decode_tok_s = batch / (step / 1e3)
    gpu_s = traffic.prompt_tokens / record.prefill_tokens_per_s + traffic.answer_tokens / decode_tok_s
    need = traffic.peak_messages_per_s * gpu_s
    gpus = max(1, math.ceil(need - 1e-9))
    tokens_per_day = traffic.messages_per_day * traffic.answer_tokens
    cost = gpus * 24 * price_per_gpu_hour / (tokens_per_day / 1e6)
    return Plan(record.weights, gpus, batch, step, record.floor_ms(batch, context), decode_tok_s, gpu_s, need / gpus,
                cost, limit, record.label)


def plan_all(traffic: Traffic, records: dict, price_per_gpu_hour: float) -> dict:
    """``{format: Plan}`` for each record of ``records`` ``{format: Record}``; a format that cannot meet the target
    gets the LabkitError's message instead of a Plan."""
    out = {}
    for fmt, rec in records.items():
        try:
            out[fmt] = plan(traffic, rec, price_per_gpu_hour)
        except LabkitError as exc:
            out[fmt] = str(exc)
    return out


def table(plans: dict) -> str:
    """The plans as a text table (a format that cannot meet the target shows why)."""
    lines = [HEADER]
    for fmt, p in plans.items():
        lines.append(p.row() if isinstance(p, Plan) else f"{fmt:>5} | cannot: {p}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- records
DEVICE_MEMORY = {"NVIDIA H200": 141e9, "NVIDIA H100 80GB HBM3": 80e9, "A100 80GB": 80e9}


def from_decode_doc(doc: dict, shape, label: str, memory_bytes: float | None = None) -> dict:
    """``{format: Record}`` from a ``labkit bench decode`` results document (``meta``, ``summary``, ``records``).

    Uses the "our loop" rows (static cache, CUDA graph) of each format, the prefill row, and the ceilings the run
    measured. ``shape``: the ``ModelShape`` the run decoded (its KV bytes and matmul parameter count).
    """
    ceil = doc.get("summary", {}).get("ceilings", {})
    if not ceil.get("read_bandwidth_Bps"):
        raise LabkitError(f"{label}: the decode record has no measured read bandwidth (summary.ceilings); re-run "
                          "labkit bench decode on a GPU.")
    device = doc.get("meta", {}).get("device", "")
    mem = memory_bytes or DEVICE_MEMORY.get(device)
    if mem is None:
        raise LabkitError(f"{label}: device memory of {device!r} is unknown; pass memory_bytes.")
    prefill = [r for r in doc["records"] if r.get("variant", "").startswith("prefill")]
    out = {}
    for fmt in FORMATS:
        rows = [r for r in doc["records"] if r.get("weights") == fmt and r.get("variant", "").startswith("our loop")
                and "CUDA graph" in r.get("variant", "") and "decode_ms_per_token" in r and "no PDL" not in r["variant"]]
        if not rows:
            continue
        ctx = rows[0].get("kv_bytes", 0) / rows[0]["batch"] / roofline.kv_bytes_per_token(shape)
        out[fmt] = Record(label=label, weights=fmt, step_ms={r["batch"]: r["decode_ms_per_token"] for r in rows},
                          weight_bytes=rows[0]["weight_bytes"], kv_bytes_per_token=roofline.kv_bytes_per_token(shape),
                          matmul_params=roofline.linear_params(shape), read_bandwidth=ceil["read_bandwidth_Bps"],
                          matmul_flops=ceil.get("bf16_matmul_flops", float("inf")),
                          prefill_tokens_per_s=prefill[0]["tokens_per_s"] if prefill else float("inf"),
                          memory_bytes=mem, context_measured=ctx)
    if not out:
        raise LabkitError(f"{label}: no 'our loop' decode rows in this record; it is not a labkit bench decode file.")
    return out


def project(rec: Record, shape, label: str, read_bandwidth: float | None = None, matmul_flops: float | None = None,
            memory_bytes: float | None = None) -> Record:
    """``rec``'s measured fraction of its floor carried to another model ``shape`` and/or device (bandwidth, FLOP/s,
    memory): each measured step time becomes new_floor / (old_floor / measured). A projection, labelled so."""
    bw = read_bandwidth or rec.read_bandwidth
    fl = matmul_flops or rec.matmul_flops
    params = roofline.linear_params(shape)
    wb = roofline.weight_bytes(params, BITS[rec.weights], GROUP[rec.weights])  # matmul weights, read every step
    new = replace(rec, label=label, weight_bytes=wb, kv_bytes_per_token=roofline.kv_bytes_per_token(shape),
                  matmul_params=params, read_bandwidth=bw, matmul_flops=fl, memory_bytes=memory_bytes or rec.memory_bytes,
                  prefill_tokens_per_s=rec.prefill_tokens_per_s * (fl / rec.matmul_flops) * (rec.matmul_params / params))
    steps = {}
    for b, t in rec.step_ms.items():
        frac = rec.floor_ms(b, rec.context_measured) / t
        steps[b] = new.floor_ms(b, rec.context_measured) / frac
    return replace(new, step_ms=steps)


def to_json(plans: dict) -> str:
    return json.dumps({k: (v.__dict__ if isinstance(v, Plan) else v) for k, v in plans.items()}, indent=1)


def show(traffic: Traffic, records: dict, price_per_gpu_hour: float) -> dict:
    """Print the plan table for one setting (what each slider move redraws); returns the plans."""
    plans = plan_all(traffic, records, price_per_gpu_hour)
    print(f"{traffic.messages_per_day:,.0f} messages/day, peak x{traffic.peak_to_average:g}, prompt "
          f"{traffic.prompt_tokens} + answer {traffic.answer_tokens} tokens, <= {traffic.latency_ms:g} ms/token, "
          f"${price_per_gpu_hour:g}/GPU-hour")
    print(f"records: {next(iter(records.values())).label}")
    print(table(plans))
    return plans


def sliders(records: dict, traffic: Traffic, price_per_gpu_hour: float):
    """The default table, printed, then ipywidgets sliders over ``show`` that redraw it in a live notebook."""
    show(traffic, records, price_per_gpu_hour)  # printed, so a headless run (nbval, nbconvert) shows the table
    try:
        import ipywidgets as W
    except ImportError:
        return None

    def redraw(messages_per_day, peak_to_average, prompt_tokens, answer_tokens, latency_ms, price):
        try:
            show(Traffic(messages_per_day, peak_to_average, prompt_tokens, answer_tokens, latency_ms), records, price)
        except LabkitError as exc:
            print(exc)

    return W.interactive(redraw,
                      messages_per_day=W.FloatLogSlider(value=traffic.messages_per_day, base=10, min=4, max=9,
                                                        description="msgs/day"),
                      peak_to_average=W.FloatSlider(value=traffic.peak_to_average, min=1, max=10, step=0.5,
                                                    description="peak/avg"),
                      prompt_tokens=W.IntSlider(value=traffic.prompt_tokens, min=1, max=4096, description="prompt"),
                      answer_tokens=W.IntSlider(value=traffic.answer_tokens, min=1, max=2048, description="answer"),
                      latency_ms=W.FloatSlider(value=traffic.latency_ms, min=1, max=500, step=1, description="ms/token"),
                      price=W.FloatSlider(value=price_per_gpu_hour, min=0.1, max=20, step=0.1, description="$/GPU-h"))

