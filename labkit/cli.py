"""The ``labkit`` command: ``doctor``, ``bench``, ``quality``, ``report``, ``student``.

    labkit doctor [--json] [--no-measure]     what this machine has, and its measured ceilings
    labkit bench ceilings                      copy bandwidth and matmul rate, written to results/local/<device>/
    labkit bench attention|decode|pipeline|serving|parallel|rag …   the notebooks' benchmarks
    labkit serve [--port 8000]                 an OpenAI-compatible HTTP server over the serving engine
    labkit quality --methods …                 the quantization quality table (notebook 02)
    labkit report [--reference]                this machine's runs beside the reference runs (results/local/)
    labkit student [--out DIR]                 student copies of the notebooks, solutions replaced by stubs

Subcommands implemented in the module that teaches their topic are listed in ``DELEGATED``. The argument types
below (``positive_int``, ``int_list``, ``choice_list``) make every command check its input before any work starts:
a bad value gives one line naming the argument and what it accepts, and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from labkit import env
from labkit.env import LabkitError

HELP = """usage: labkit COMMAND [options]   (labkit COMMAND --help for each command's options)

  doctor                     what this machine has (device, versions, packages, the embedded model, the cache)
                             and its measured copy bandwidth and matmul rate; exits 1 when an essential is missing
  bench ceilings             copy bandwidth and matmul rate of this device
  bench attention            attention variants against sequence length (notebook 04)
  bench pipeline             Hugging Face generate: quantization x attention back-end (notebook 05)
  bench decode               static-cache decode against the bandwidth floor (notebook 06, CUDA GPU)
  quality                    quantize SmolLM2 with each method: perplexity, KL, top-1 (notebooks 02/03)
  report                     compare this machine's runs with the reference runs
  student [--out DIR]        student copies of the notebooks, solutions replaced by stubs

Benchmarks write to results/local/<device>/ (not tracked); --reference writes results/<device>/ instead,
the committed reference runs.
"""

# subcommands implemented in the module that teaches the topic: "module:function", called with the rest of argv
DELEGATED = {
    ("bench", "attention"): "labkit.attention:cli_main",
    ("bench", "decode"): "labkit.fastgen:cli_main",
    ("bench", "pipeline"): "labkit.pipeline:cli_main",
    ("bench", "parallel"): "labkit.parallel:cli_main",
    ("bench", "rag"): "labkit.rag:cli_main",
    ("bench", "serving"): "labkit.serving_bench:cli_main",
    ("serve",): "labkit.server:cli_main",
    ("quality",): "labkit.ptq:cli_main",
}

BENCHMARKS = {
    "ceilings": "copy bandwidth and matmul rate of this device",
    "attention": "attention variants against sequence length (notebook 04)",
    "pipeline": "HF generate: quantization x attention back-end (notebook 05)",
    "decode": "static-cache decode against the bandwidth floor (notebook 06; CUDA GPU)",
    "serving": "schedulers on a seeded request trace: throughput, TTFT, time per token, KV waste (notebook 07)",
    "parallel": "tensor and pipeline parallelism over torchrun processes, all-reduces, offload (notebook 08)",
    "rag": "retriever fp32 vs int8, faiss indexes, answering by stage (notebook 09)",
}


# ---------------------------------------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1, e.g. ``512,1024``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one value, comma-separated (e.g. 512,1024)")
    return [positive_int(t) for t in items]


def choice_list(choices) -> "callable":
    """argparse type: comma-separated names, each one of ``choices``."""
    choices = tuple(choices)

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or 'nothing'} not known; choose from {','.join(choices)}")
        return items

    parse.__name__ = "list"
    return parse


def _delegate(target: str, argv: list[str]) -> int:
    module, func = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise LabkitError(f"{module} is not part of this checkout; update labkit.") from exc
        raise
    return int(getattr(mod, func)(argv) or 0)


# ---------------------------------------------------------------------------------------------- doctor
def doctor(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="labkit doctor", description="Check this machine for the workbook.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-measure", action="store_true", help="skip the bandwidth and matmul measurements")
    p.add_argument("--rebuild-model", action="store_true",
                   help="convert the embedded model into the cache again (after a damaged or interrupted conversion)")
    args = p.parse_args(argv)
    import torch

    if args.rebuild_model:
        import shutil

        from labkit import models

        shutil.rmtree(env.cache_dir() / "smollm2-135m-instruct", ignore_errors=True)
        print(f"converted {models.smollm2_checkpoint()}")

    checks = env.capabilities()
    report = {"device": env.device_name(), "profile": env.profile(), "versions": env.versions(),
              "checks": [c.__dict__ for c in checks]}
    if not args.no_measure:
        dev = env.device()
        report["copy_bandwidth_GBps"] = env.measure_copy_bandwidth(dev) / 1e9
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        report["matmul_TFLOPs"] = env.measure_matmul_rate(dev, dtype) / 1e12
        report["matmul_dtype"] = str(dtype).replace("torch.", "")
    missing = [c for c in checks if c.essential and not c.ok]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"device   {report['device']}")
        print(f"profile  {report['profile']}   (LABKIT_PROFILE overrides: quick | full)")
        print(f"python   {report['versions']['python']}")
        for c in checks:
            mark = "ok " if c.ok else ("MISSING" if c.essential else "-- ")
            print(f"  [{mark}] {c.name:34s} {c.detail}")
            if not c.ok and not c.essential and c.fix and c.name in ("torch build",):
                print(f"  {'':39s} fix: {c.fix}")
        if "copy_bandwidth_GBps" in report:
            print(f"measured copy bandwidth (read+write): {report['copy_bandwidth_GBps']:.1f} GB/s")
            print(f"measured matmul rate ({report['matmul_dtype']}): {report['matmul_TFLOPs']:.2f} TFLOP/s")
    if missing:
        print("\nMissing essentials; fix with:", file=sys.stderr)
        for c in missing:
            print(f"  {c.name}: {c.fix}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- bench
def bench(argv: list[str]) -> int:
    if argv and ("bench", argv[0]) in DELEGATED:
        return _delegate(DELEGATED[("bench", argv[0])], argv[1:])
    p = argparse.ArgumentParser(
        prog="labkit bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmarks (each has its own --help, e.g. `labkit bench attention --help`):\n" +
                    "\n".join(f"  {k:10s} {v}" for k, v in BENCHMARKS.items()))
    p.add_argument("what", choices=list(BENCHMARKS), help="which benchmark")
    p.add_argument("--out", help="JSON path (default results/local/<device>/ceilings.json)")
    p.add_argument("--reference", action="store_true",
                   help="write the committed reference folder results/<device>/ instead of results/local/")
    args = p.parse_args(argv)
    import torch

    from labkit import bench as B
    from labkit import results

    out = args.out or results.output_dir(args.reference) / "ceilings.json"
    env.writable_dir(Path(out).parent)
    dev = env.device()
    records = [{"what": "copy_bandwidth", "bytes_per_s": env.measure_copy_bandwidth(dev)}]
    for dtype in ([torch.bfloat16, torch.float16, torch.float32] if dev.type == "cuda" else [torch.float32]):
        records.append({"what": "matmul", "dtype": str(dtype).replace("torch.", ""),
                        "flop_per_s": env.measure_matmul_rate(dev, dtype)})
    path = B.write_results(out, records,
                           {"copy_GBps": records[0]["bytes_per_s"] / 1e9,
                            "matmul_TFLOPs": {r["dtype"]: r["flop_per_s"] / 1e12 for r in records[1:]}})
    print(json.dumps(B.read_results(path)["summary"], indent=2))
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------- report
def report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="labkit report",
        description="Compare this machine's runs (results/local/<device>/*.json) with the reference runs of the same "
                    "benchmarks; writes results/local/REPORT.md. With --reference, regenerate the committed summary "
                    "results/RESULTS.md from the reference runs (results/<device>/*.json) instead.")
    p.add_argument("--reference", action="store_true", help="write results/RESULTS.md from the reference runs")
    p.add_argument("--results", default=str(env.repo_root() / "results"), help="the results folder (default results/)")
    args = p.parse_args(argv)
    from labkit import results

    root = Path(args.results)
    if not root.is_dir():
        raise LabkitError(f"{root} is not a folder; give --results the results/ folder of a checkout.")
    refs = sorted(p for p in root.glob("*/*.json") if p.parent.name != results.LOCAL)
    if args.reference:
        if not refs:
            raise LabkitError(f"No results/<device>/*.json under {root}: run a benchmark with --reference first.")
        lines = ["# Reference results", "",
                 "Generated by `labkit report --reference` from the JSON files beside it; each was measured on the "
                 "device named", "in its folder, with the versions and commit recorded in the file.", ""]
        for path in refs:
            lines += _section(path, f"## {path.parent.name} / {path.stem}")
        out = root / "RESULTS.md"
        env.writable_dir(root)
        out.write_text("\n".join(lines))
        print(f"wrote {out} ({len(refs)} reference result files)")
        return 0
    local = sorted((root / results.LOCAL).glob("*/*.json"))
    if not local:
        raise LabkitError(f"No runs of this machine under {root / results.LOCAL}: run a benchmark first "
                          "(e.g. `labkit bench ceilings`), then `labkit report`.")
    lines = ["# Your runs beside the reference runs", "",
             "Generated by `labkit report` (not tracked by git). \"This run\" is a file under results/local/; each",
             "reference run is labelled with its device, commit and date.", ""]
    for path in local:
        lines += _section(path, f"## This machine: {path.parent.name} / {path.stem}")
        same = [r for r in refs if r.stem == path.stem]
        mine = dict(_flatten(json.loads(path.read_text()).get("summary") or {}))
        if same and mine:
            docs = [results.Reference(r, json.loads(r.read_text())) for r in same]
            lines += [f"Compared with the reference runs of `{path.stem}`:", "",
                      "| key | this machine | " + " | ".join(f"reference: {d.device}, {d.commit}, {d.date}" for d in docs) + " |",
                      "|---|---|" + "---|" * len(docs)]
            theirs = [dict(_flatten(d.summary)) for d in docs]
            for key, value in mine.items():
                lines.append(f"| {key} | {_fmt(value)} | " + " | ".join(_fmt(t.get(key, "")) for t in theirs) + " |")
            lines.append("")
        elif not same:
            lines += [f"No reference run of `{path.stem}` to compare with.", ""]
    out = root / results.LOCAL / "REPORT.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out} ({len(local)} local result files, {len(refs)} reference result files)")
    return 0


def _section(path: Path, title: str) -> list[str]:
    doc = json.loads(path.read_text())
    meta = doc.get("meta", {})
    ver = meta.get("versions", {})
    lines = [title, "",
             f"- device: {meta.get('device')}; profile {meta.get('profile')}; measured {meta.get('utc')}; "
             f"commit {meta.get('git_commit') or meta.get('source_commit') or 'not recorded'}",
             f"- torch {ver.get('torch')}, CUDA {ver.get('cuda')}, transformers {ver.get('transformers')}, "
             f"triton {ver.get('triton')}, bitsandbytes {ver.get('bitsandbytes')}", ""]
    summary = doc.get("summary") or {}
    if summary:
        lines += ["| key | value |", "|---|---|"]
        for key, value in _flatten(summary):
            lines.append(f"| {key} | {_fmt(value)} |")
        lines.append("")
    pngs = sorted(path.parent.glob(f"{path.stem}*.png"))
    lines += [f"![{png.stem}]({png.parent.name}/{png.name})" for png in pngs] + ([""] if pngs else [])
    return lines


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = str(v)
    return text if len(text) <= 120 else f"({type(v).__name__} of {len(v)}: see the JSON file)"


# ---------------------------------------------------------------------------------------------- student
def student(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="labkit student",
                                description="Write student copies of the notebooks: each solution between "
                                            "# BEGIN SOLUTION and # END SOLUTION becomes a stub.")
    p.add_argument("notebooks", nargs="*", help="notebooks (default: notebooks/*.ipynb)")
    p.add_argument("--out", default="student", help="output folder (default: student/)")
    args = p.parse_args(argv)
    from labkit import exercises

    paths = [Path(n) for n in args.notebooks] or sorted((env.repo_root() / "notebooks").glob("*.ipynb"))
    for path in paths:
        if not path.is_file() or path.suffix != ".ipynb":
            raise LabkitError(f"{path} is not a notebook file; give paths like notebooks/01_quantization_basics.ipynb "
                              "(or none, for every notebook).")
    out_dir = env.writable_dir(args.out, "student folder")
    total = 0
    for path in paths:
        try:
            out, n = exercises.write_student_copy(path, out_dir)
        except ValueError as exc:
            raise LabkitError(f"{path}: {exc}") from None
        total += n
        print(f"{out}: {n} exercise(s) stubbed")
    return 0 if total else 1


COMMANDS = {"doctor": doctor, "bench": bench, "report": report, "student": student}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if (cmd,) in DELEGATED:
            return _delegate(DELEGATED[(cmd,)], rest)
        if cmd not in COMMANDS:
            print(f"labkit: unknown command {cmd!r}; one of: {', '.join([*COMMANDS, 'quality', 'serve'])} (labkit --help)",
                  file=sys.stderr)
            return 2
        return COMMANDS[cmd](rest)
    except LabkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
