"""The claims ledger: every figure, claim and API of the source article, against what this workbook measures.

The article the workbook grew from (a blog post on quantization and FlashAttention for LLM inference) quotes
figures for Llama-2-7B on an A100, calls some bitsandbytes APIs and describes GPTQ and FlashAttention. Each is a
``Claim``: what the article says, what *this run* measured or computed for it, what a *reference run* measured
(labelled with device, commit and date, never taken for this run), and a verdict with its reason. Verdicts are
computed here from those numbers by the rules below, never typed; notebook 05 builds and prints the table.

Rules (each a pure function at the bottom of this module):

- a memory figure **holds** when within 20 % of the bytes computed from the shape;
- a time per token is **possible** when it needs no more than the A100's datasheet bandwidth for the bytes a
  step reads (``roofline``), and it **holds for a loop** when a measured loop's time, scaled by bandwidth
  (``ms x measured read bandwidth / 1.555 TB/s``), is at most 1.25x the quoted time;
- a throughput **is consistent** with its latency when it equals 1000 / ms within 5 % (batch 1);
- an API **does not exist** when calling it as written raises in the installed library (the exception is kept).
"""
from __future__ import annotations

from dataclasses import dataclass, field

A100_40GB_BW = 1.555e12  # bytes/s, datasheet
A100_BF16_FLOPS = 312e12  # dense bf16 tensor-core FLOP/s, datasheet

# The article's figures for Llama-2-7B on an A100 40GB at batch 1: (weights GB, ms/token, tokens/s).
ARTICLE_TABLE = {
    "fp16": (14.2, 12.4, 83),
    "int8 + flash": (7.1, 6.8, 150),
    "int4 + flash": (5.0, 4.3, 250),
}


@dataclass
class Claim:
    """One row of the ledger."""

    item: str  # short name
    claim: str  # what the article says (paraphrased, with its figure)
    this_run: str  # what this run measured or computed for it ("" when it cannot)
    verdict: str  # holds / does not hold / possible / not possible / inconsistent / does not exist / wrong / ...
    reason: str
    reference: list[str] = field(default_factory=list)  # reference-run figures, each line labelled by the caller
    kind: str = "figure"  # figure | api | wording


# ---------------------------------------------------------------------------------------------- rules
def memory_verdict(claimed_gb: float, computed_bytes: float, tol: float = 0.2) -> tuple[str, str]:
    rel = claimed_gb * 1e9 / computed_bytes - 1
    v = "holds" if abs(rel) <= tol else "does not hold"
    return v, f"{claimed_gb:.1f} GB claimed vs {computed_bytes / 1e9:.2f} GB computed ({rel:+.0%})"


def time_possible(claimed_ms: float, step_bytes: float, bandwidth: float = A100_40GB_BW) -> tuple[str, str]:
    floor_ms = step_bytes / bandwidth * 1e3
    frac = floor_ms / claimed_ms
    v = "possible" if frac <= 1.0 else "not possible"
    return v, (f"the A100 floor for {step_bytes / 1e9:.2f} GB read per step is {floor_ms:.2f} ms: the claim is "
               f"{frac:.0%} of it")


def time_holds_for(claimed_ms: float, measured_ms: float, measured_bw: float,
                   bandwidth: float = A100_40GB_BW) -> tuple[bool, float]:
    """(holds, ratio): the measured time scaled to the A100's bandwidth, against the claim."""
    scaled = measured_ms * measured_bw / bandwidth
    return scaled <= 1.25 * claimed_ms, scaled / claimed_ms


def throughput_consistent(tokens_per_s: float, ms_per_token: float, tol: float = 0.05) -> tuple[str, str]:
    implied = 1e3 / ms_per_token
    rel = tokens_per_s / implied - 1
    v = "consistent" if abs(rel) <= tol else "inconsistent"
    return v, f"{tokens_per_s:g} tok/s claimed; 1000 / {ms_per_token:g} ms = {implied:.1f} tok/s ({rel:+.1%})"


def api_verdict(call) -> tuple[str, str]:
    """Call ``call()`` (the article's API as written); its exception, or that it ran."""
    try:
        call()
    except Exception as exc:  # the installed library's own error is the evidence
        return "does not exist", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return "exists", "ran without error"


# ---------------------------------------------------------------------------------------------- table
def table(claims: list[Claim], width: int = 110) -> str:
    """The ledger as text: one block per claim."""
    import textwrap

    out = []
    for i, c in enumerate(claims, 1):
        out.append(f"{i:2d}. [{c.kind}] {c.item}: {c.verdict.upper()}")
        for label, text in (("article", c.claim), ("this run", c.this_run or "not measurable here"),
                            ("why", c.reason)):
            out.extend(textwrap.wrap(text, width, initial_indent=f"    {label:9s} ",
                                     subsequent_indent=" " * 14))
        for line in c.reference:
            out.extend(textwrap.wrap(line, width, initial_indent="    reference ", subsequent_indent=" " * 14))
    return "\n".join(out)
