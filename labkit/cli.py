"""The ``labkit`` command: ``doctor``, ``bench``, ``quality``, ``report``, ``student``.

    labkit doctor [--json] [--no-measure]     what this machine has, and its measured ceilings
    labkit bench ceilings                      copy bandwidth and matmul rate, written to results/<device>/
    labkit bench attention|decode|pipeline|serving|parallel|rag …   the notebooks' benchmarks
    labkit serve [--port 8000]                 an OpenAI-compatible HTTP server over the serving engine
    labkit quality --methods …                 the quantization quality table (notebook 02)
    labkit report                              results/RESULTS.md from every results/<device>/*.json
    labkit student [--out DIR]                 student copies of the notebooks, solutions replaced by stubs
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from labkit import env
from labkit.env import LabkitError

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
    args = p.parse_args(argv)
    import torch

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
            print(f"  [{mark}] {c.name:30s} {c.detail}")
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
    p = argparse.ArgumentParser(prog="labkit bench", description="Benchmarks: ceilings | attention | decode | pipeline | rag")
    p.add_argument("what", choices=["ceilings"], help="ceilings: copy bandwidth and matmul rate of this device")
    p.add_argument("--out", help="JSON path (default results/<device>/ceilings.json)")
    args = p.parse_args(argv)
    import torch

    from labkit import bench as B

    dev = env.device()
    records = [{"what": "copy_bandwidth", "bytes_per_s": env.measure_copy_bandwidth(dev)}]
    for dtype in ([torch.bfloat16, torch.float16, torch.float32] if dev.type == "cuda" else [torch.float32]):
        records.append({"what": "matmul", "dtype": str(dtype).replace("torch.", ""),
                        "flop_per_s": env.measure_matmul_rate(dev, dtype)})
    path = B.write_results(args.out or B.results_dir() / "ceilings.json", records,
                           {"copy_GBps": records[0]["bytes_per_s"] / 1e9,
                            "matmul_TFLOPs": {r["dtype"]: r["flop_per_s"] / 1e12 for r in records[1:]}})
    print(json.dumps(B.read_results(path)["summary"], indent=2))
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------- report
def report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="labkit report", description="Write results/RESULTS.md from results/*/*.json")
    p.add_argument("--results", default=str(env.repo_root() / "results"))
    args = p.parse_args(argv)
    from pathlib import Path

    root = Path(args.results)
    lines = ["# Reference results", "",
             "Generated by `labkit report` from the JSON files beside it; each was measured on the device named",
             "in its folder, with the versions and commit recorded in the file.", ""]
    files = sorted(root.glob("*/*.json"))
    if not files:
        raise LabkitError(f"No results/*/*.json under {root}: run a benchmark first (e.g. `labkit bench ceilings`).")
    for path in files:
        doc = json.loads(path.read_text())
        meta = doc.get("meta", {})
        ver = meta.get("versions", {})
        lines += [f"## {path.parent.name} / {path.stem}", "",
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
    out = root / "RESULTS.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out} ({len(files)} result files)")
    return 0


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
                                description="Write student copies of the notebooks: solutions become stubs.")
    p.add_argument("notebooks", nargs="*", help="notebooks (default: notebooks/*.ipynb)")
    p.add_argument("--out", default="student", help="output folder (default: student/)")
    args = p.parse_args(argv)
    from pathlib import Path

    from labkit import exercises

    paths = [Path(n) for n in args.notebooks] or sorted((env.repo_root() / "notebooks").glob("*.ipynb"))
    total = 0
    for path in paths:
        out, n = exercises.write_student_copy(path, Path(args.out))
        total += n
        print(f"{out}: {n} exercise(s) stubbed")
    return 0 if total else 1


COMMANDS = {"doctor": doctor, "bench": bench, "report": report, "student": student}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if (cmd,) in DELEGATED:
            return _delegate(DELEGATED[(cmd,)], rest)
        if cmd not in COMMANDS:
            print(f"unknown command {cmd!r}; one of: {', '.join([*COMMANDS, 'quality', 'serve'])}", file=sys.stderr)
            return 2
        return COMMANDS[cmd](rest)
    except LabkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
