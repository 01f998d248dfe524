"""Offline SASS of the decode GEMV kernels: what one weight costs in instructions, without a GPU.

Compiles labkit's word kernels (int4 and int8 codes: ``_wo_gemv_il1_kernel``, the batch-1 one with per-word
accumulators, ``_wo_gemv_il_kernel``, which reduces each K step, ``_wo_gemv_h2_kernel``, packed fp16 arithmetic, and
for int4 ``_wo_gemv_mma_kernel``, the tensor cores through mma.sync, twice: as written, and with the next step's
weight words loaded in a branch of their own, ``int4-mma-early``; for both it reports how many of the loop's word loads
go out before its first MMA) and the bf16 GEMV (``_wo_gemv1_kernel``)
at their default batch-1 configs for a Hopper target (sm_90) with this machine's Triton and its bundled ptxas, then
disassembles the cubin (nvdisasm, bundled too), finds the main K loop (the backward branch) and counts its
instructions per weight, by class. No GPU is needed; the runner's Triton may schedule differently from this one, so
the report names the version that compiled it.

Why it matters: a GEMV at batch 1 streams each weight once. On an H100 or H200 SXM (132 SMs, 4 schedulers each
issuing one warp instruction per clock) at clock ``--clock-ghz``, the SMs issue 132 x 4 x 32 x clock
thread-instructions per second; streaming weights at a bandwidth of B bytes/s leaves ``issue rate / weights per
second`` instructions per weight before instruction issue, not memory, is the wall. The report prints that budget
beside the count for each bandwidth of ``--bandwidth`` (default: the read bandwidths measured in the committed decode
runs, H100 2.97 TB/s and H200 4.22 TB/s). The clock is an assumption (the SXM parts' 1.98 GHz maximum boost): the
budget scales with it, and a GEMV that runs slower than its budget allows is bound by something else as well.
The registers per thread (cuobjdump, bundled) bound the warps an SM keeps resident, hence the weight loads in flight:
the per-word-accumulator kernel issues about a third fewer instructions per weight here but needs more registers,
and on an H200 it ran slower than the word kernel at every 7B-shape GEMV (results/nvidia-h200/gemv_word_variants.json).

    python scripts/sass_gemv.py [--out FILE] [--json FILE] [--bandwidth 2.97e12,4.22e12] [--clock-ghz 1.98] [--sms 132]
        [--silu]

``--silu`` compiles every kernel a second time as the decode step's down GEMV runs it, with silu(gate) * up computed
from [gate | up] in the prologue of each K step, and reports what that adds per weight: every program computes it
again for the columns it reads.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret (nothing runs here), with or without a GPU
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default the runner's Triton uses

CLASSES = {  # SASS opcode -> what the weight's instruction is for
    "LDG": "memory", "LDS": "memory", "STS": "memory", "LDC": "memory", "ULDC": "memory", "LDGSTS": "memory",
    "FFMA": "fp32 math", "FADD": "fp32 math", "FMUL": "fp32 math", "FMNMX": "fp32 math",
    "HFMA2": "packed 16-bit math", "HADD2": "packed 16-bit math", "HMUL2": "packed 16-bit math",
    "LOP3": "integer/logic", "SHF": "integer/logic", "IMAD": "integer/logic", "IADD3": "integer/logic",
    "LEA": "integer/logic", "PRMT": "integer/logic", "VIADD": "integer/logic", "ISETP": "integer/logic",
    "SEL": "integer/logic", "MOV": "integer/logic", "I2F": "conversion", "F2F": "conversion", "F2FP": "conversion",
    "SHFL": "shuffle (reductions)",
}


def compile_offline(fn, signature: dict, constexprs: dict, num_warps: int, arch: int = 90):
    """A Triton kernel compiled for sm_``arch`` without a GPU (``labkit.kernels.offline``): ``.asm`` holds its PTX and
    cubin. ``signature`` maps argument names to Triton types ("*bf16", "i32", "constexpr"), ``constexprs`` gives
    the constexpr values."""
    from labkit.kernels import offline

    # Triton compiles a kernel for the arguments it is called with: pointers aligned to 16 bytes and integers that
    # are multiples of 16 are marked so, and only then are loads vectorized and masks along K known constant. Every
    # argument of the 7B shape's qkv GEMV is such a multiple, so all are marked here (without, the loads are scalar
    # and the count about 40% higher than what runs)
    divisible = [k for k, v in signature.items() if v.startswith("*") or v == "i32"]
    return offline.compile_kernel(fn, signature, constexprs, {"num_warps": num_warps}, divisible, arch)


def compile_sass(fn, signature: dict, constexprs: dict, num_warps: int, arch: int = 90) -> tuple[str, int | None]:
    from labkit.kernels import offline

    kernel = compile_offline(fn, signature, constexprs, num_warps, arch)
    path = f"/tmp/sass_gemv_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([offline.tool("nvdisasm"), "-c", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.remove(path)
    # registers per thread: what sets the warps per SM
    return out, offline.resource_usage(kernel.asm["cubin"])["registers"]


def main_loop(sass: str, text: bool = False) -> list[str]:
    """The opcodes of the longest loop: from a label to the branch that jumps back to it (``text``: its lines)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = [(ln if text else op) for ln in lines[labels[m.group(1)]:i + 1] if (op := opcode(ln))]
            if len(body) > len(best):
                best = body
    return best


def opcode(line: str) -> str | None:
    m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
    return m.group(1) if m else None


def kernels():
    """(name, label, kernel, signature, constexprs, warps, weights per thread per loop iteration) at the batch-1
    defaults of labkit.kernels.wo_matmul: the word kernel with per-word accumulators (CANDIDATES_IL1, every row and
    chunk inside the weight, as in the 7B shape's qkv, o, gate_up and lm_head), the word kernel that reduces each
    step (CANDIDATES_IL) and the bf16 GEMV (CANDIDATES_M1); the first config of each list."""
    from labkit.kernels import wo_matmul as wo

    il = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": "*bf16",
          "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32",
          "stride_ym": "i32", "stride_ys": "i32", "K_CHUNK": "i32", "ONE": "i32"}
    il.update({k: "constexpr" for k in ("BITS", "PRO_SILU", "BLOCK_M", "BLOCK_N", "BLOCK_K", "PDL", "RAGGED",
                                        "PREFETCH", "ROW_PF")})
    il1 = {k: v for k, v in il.items() if k not in ("M", "stride_xm", "stride_ym", "BLOCK_M", "PREFETCH", "ROW_PF")}
    il1["EVEN"] = "constexpr"
    out = []
    for bits, kind in ((4, 4), (8, 3)):
        cfg = wo.CANDIDATES_IL1[kind][0]
        c = {"BITS": bits, "PRO_SILU": False, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "PDL": False,
             "RAGGED": False, "EVEN": True}
        out.append((f"int{bits}-acc", f"int{bits} word kernel with per-word accumulators, {cfg.block_n} rows x "
                    f"{cfg.block_k} columns, {cfg.num_warps} warps", wo._wo_gemv_il1_kernel, il1, c, cfg.num_warps,
                    cfg.block_n * cfg.block_k / (32 * cfg.num_warps)))
        cfg = wo.CANDIDATES_IL[kind][0]
        c = {"BITS": bits, "PRO_SILU": False, "BLOCK_M": 1, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
             "PDL": False, "RAGGED": False, "PREFETCH": False, "ROW_PF": 0}
        out.append((f"int{bits}", f"int{bits} word kernel reducing each step, {cfg.block_n} rows x {cfg.block_k} "
                    f"columns, {cfg.num_warps} warps", wo._wo_gemv_il_kernel, il, c, cfg.num_warps,
                    cfg.block_n * cfg.block_k / (32 * cfg.num_warps)))
    h2 = {k: v for k, v in il1.items() if k not in ("ONE", "BITS")}
    h2["INTERPRET"] = "constexpr"
    h2["BITS"] = "constexpr"
    h2["STAGES"] = "constexpr"  # None: the plain K loop the tuner's h2 configs run
    h2["ROW_PF"] = "constexpr"
    h2["TMA"] = "constexpr"
    for bits, cfg in ((4, wo.CANDIDATES_H2[0]), (8, wo.CANDIDATES_H2_INT8[0])):
        c = {"PRO_SILU": False, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "PDL": False, "RAGGED": False,
             "EVEN": True, "INTERPRET": False, "BITS": bits, "STAGES": None, "ROW_PF": 0, "TMA": False}
        out.append((f"int{bits}-h2", f"int{bits} word kernel with packed fp16 arithmetic, {cfg.block_n} rows x "
                    f"{cfg.block_k} columns, {cfg.num_warps} warps", wo._wo_gemv_h2_kernel, h2, c, cfg.num_warps,
                    cfg.block_n * cfg.block_k / (32 * cfg.num_warps)))
    for bits, cfg in ((4, wo.CANDIDATES_H2_TMA[0]), (8, wo.CANDIDATES_H2_INT8_TMA[0])):  # words copied by TMA
        tile = ", ".join(str(d) for d in wo.h2_tile(bits, cfg))
        c = {"PRO_SILU": False, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "PDL": False, "RAGGED": False,
             "EVEN": True, "INTERPRET": False, "BITS": bits, "STAGES": cfg.stages, "ROW_PF": 0, "TMA": True}
        out.append((f"int{bits}-h2-tma", f"int{bits} packed fp16 kernel, words by TMA in {cfg.stages} stages, "
                    f"{cfg.block_n} rows x {cfg.block_k} columns, {cfg.num_warps} warps", wo._wo_gemv_h2_kernel,
                    dict(h2, w_ptr=f"tensordesc<i32[{tile}]>"), c, cfg.num_warps,
                    cfg.block_n * cfg.block_k / (32 * cfg.num_warps)))
    # int4 words on the tensor cores (variant "mma"), the first config of wo.CANDIDATES_MMA: 16 rows per MMA and slot
    cfg = wo.CANDIDATES_MMA[0]
    mma = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": "*fp32", "N": "i32",
           "K": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_ys": "i32", "K_CHUNK": "i32"}
    mma.update({k: "constexpr" for k in ("PRO_SILU", "BLOCK_N", "NW", "S_KIND", "Z_KIND", "Y_KIND", "PDL", "INTERPRET",
                                         "BF16", "EARLY")})
    c = {"PRO_SILU": False, "BLOCK_N": cfg.block_n, "NW": cfg.num_warps, "S_KIND": 1, "Z_KIND": 1,
         "Y_KIND": 0 if cfg.split > 1 else 1, "PDL": False, "INTERPRET": False, "BF16": True}
    out.append(("int4-mma", f"int4 words on the tensor cores (mma.sync), {cfg.block_n // 16} slots of 16 rows x "
                f"{cfg.block_k} columns, {cfg.num_warps} warps", wo._wo_gemv_mma_kernel, mma, c, cfg.num_warps,
                cfg.block_n * cfg.block_k / (32 * cfg.num_warps)))
    out.append(("int4-mma-early", out[-1][1] + ", the next step's words loaded at the top of the loop (EARLY)",
                wo._wo_gemv_mma_kernel, mma, dict(c, EARLY=True), cfg.num_warps, out[-1][6]))
    g1 = {"x_ptr": "*bf16", "w_ptr": "*bf16", "s_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": "*bf16",
          "N": "i32", "K": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_ys": "i32", "K_CHUNK": "i32"}
    g1.update({k: "constexpr" for k in ("KIND", "GROUP", "PRO_SILU", "BLOCK_N", "BLOCK_K", "PDL", "STAGES")})
    cfg = wo.CANDIDATES_M1[0][0]
    c = {"KIND": 0, "GROUP": 128, "PRO_SILU": False, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "PDL": False,
         "STAGES": None}
    out.append(("bf16", f"bf16 GEMV (acc), {cfg.block_n} rows x {cfg.block_k} columns, {cfg.num_warps} warps",
                wo._wo_gemv1_kernel, g1, c, cfg.num_warps, cfg.block_n * cfg.block_k / (32 * cfg.num_warps)))
    cfg = wo.CANDIDATES_M1[1][0]  # the row-major int8 weight of the decode path (Int8Weight), same kernel
    c = {"KIND": 1, "GROUP": 128, "PRO_SILU": False, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "PDL": False,
         "STAGES": None}
    out.append(("int8-rows", f"int8 row-major GEMV (acc), {cfg.block_n} rows x {cfg.block_k} columns, "
                f"{cfg.num_warps} warps", wo._wo_gemv1_kernel, {**g1, "w_ptr": "*i8"}, c, cfg.num_warps,
                cfg.block_n * cfg.block_k / (32 * cfg.num_warps)))
    return out


def _loop(label, fn, sig, consts, warps) -> tuple[list[str], int | None]:
    sass, regs = compile_sass(fn, sig, consts, warps)
    body = main_loop(sass)
    if not body:
        raise RuntimeError(f"{label}: no loop found in the SASS")
    return body, regs


def load_order(sass: str) -> dict:
    """Where the 128-bit global loads (the tensor-core GEMV's weight words) sit in the main loop against its MMAs:
    how many there are and how many are issued before the loop's first HMMA."""
    body = main_loop(sass, text=True)
    first = next((i for i, ln in enumerate(body) if opcode(ln) == "HMMA"), len(body))
    loads = [i for i, ln in enumerate(body) if opcode(ln) == "LDG" and ".128" in ln]
    return {"word_loads": len(loads), "word_loads_before_first_mma": sum(i < first for i in loads)}


def analyse(issue: float, bandwidths: list[float], silu: bool = False) -> list[dict]:
    """One row per kernel: its loop length, instructions per weight (total, by class, top opcodes) and, for each
    bandwidth, the instructions per weight the issue rate ``issue`` (thread-instructions/s) allows. With ``silu``,
    each kernel is compiled a second time with silu(gate) * up computed from [gate | up] in its prologue, as the
    down GEMV of the decode step runs it (``silu_per_weight``, ``silu_opcodes``)."""
    rows = []
    for name, label, fn, sig, consts, warps, per_thread in kernels():
        body, regs = _loop(label, fn, sig, consts, warps)
        bytes_per_weight = {"int4": 0.5, "int8": 1.0}.get(name[:4], 2.0)
        rows.append({
            "name": name, "label": label, "loop": len(body), "weights_per_thread": per_thread, "registers": regs,
            # resident warps per SM as the registers allow (64K registers, whole programs of `warps` warps, at most 64)
            "warps_per_sm": min(64, (65536 // (regs * 32 * warps)) * warps) if regs else None,
            "per_weight": len(body) / per_thread,
            "budget": {bw: issue / (bw / bytes_per_weight) for bw in bandwidths},
            "by_class": {k: v / per_thread for k, v in
                         collections.Counter(CLASSES.get(op, "other") for op in body).most_common()},
            "top": {op: n / per_thread for op, n in collections.Counter(body).most_common(8)},
            "opcodes": dict(collections.Counter(body)),
            # bar.sync per K step: Triton moves data between layouts through shared memory, and every warp of the
            # program waits at each barrier, so only other programs on the SM hide the latency meanwhile
            "barriers": body.count("BAR"),
        })
        if "-mma" in name:  # whether every mma.sync gets each lane's own fragment (wo.mma_layout_ok)
            from labkit.kernels import wo_matmul as wo

            rows[-1]["mma_layout_ok"] = list(wo.mma_layout_ok(
                compile_offline(fn, sig, consts, warps).asm["ttgir"]))
            rows[-1].update(load_order(compile_sass(fn, sig, consts, warps)[0]))
        if silu:
            sbody, sregs = _loop(label, fn, sig, dict(consts, PRO_SILU=True), warps)
            rows[-1].update(silu_per_weight=len(sbody) / per_thread, silu_registers=sregs,
                            silu_opcodes=dict(collections.Counter(sbody)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("--json", default=None, help="also write the rows (with each loop's opcode counts) as JSON")
    p.add_argument("--bandwidth", default="2.97e12,4.22e12",
                   help="comma list of weight-streaming bandwidths, bytes/s (default: the read bandwidths of the "
                        "committed H100 and H200 decode runs)")
    p.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock (default: the SXM parts' 1.98 GHz boost)")
    p.add_argument("--sms", type=int, default=132, help="streaming multiprocessors (H100/H200 SXM: 132)")
    p.add_argument("--silu", action="store_true",
                   help="also compile each kernel with silu(gate) * up in its prologue (the down GEMV's form)")
    args = p.parse_args(argv)
    try:
        bandwidths = [float(b) for b in args.bandwidth.split(",")]
    except ValueError:
        bandwidths = []
    if not bandwidths or min(bandwidths) <= 0 or args.clock_ghz <= 0 or args.sms <= 0:
        print("error: --bandwidth takes positive numbers in bytes/s separated by commas (e.g. 2.97e12,4.22e12); "
              "--clock-ghz and --sms must be positive", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("error: triton is not installed (pip install triton); it compiles the kernels", file=sys.stderr)
        return 1
    issue = args.sms * 4 * 32 * args.clock_ghz * 1e9  # thread-instructions per second
    report = [f"offline SASS, sm_90, triton {triton.__version__} (this machine; the GPU runner's version may "
              f"schedule differently); issue rate {args.sms} SMs x 4 x 32 x {args.clock_ghz} GHz = "
              f"{issue / 1e12:.1f} T thread-instructions/s"]
    rows = analyse(issue, bandwidths, silu=args.silu)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": "sm_90", "issue_per_s": issue,
                       "rows": [dict(r, budget={str(k): v for k, v in r["budget"].items()}) for r in rows]}, f,
                      indent=1)
    for row in rows:
        report.append(f"{row['label']}: loop of {row['loop']} instructions for {row['weights_per_thread']:.0f} weights "
                      f"per thread -> {row['per_weight']:.2f} instructions per weight")
        if row["registers"]:
            report.append(f"    {row['registers']} registers per thread: at most {row['warps_per_sm']} warps resident "
                          "per SM (the loads in flight that hide the memory latency)")
        for bw, budget in row["budget"].items():
            report.append(f"    at {bw / 1e12:.2f} TB/s the budget is {budget:.2f} instructions per weight: "
                          f"issue alone caps the GEMV at {min(1.0, budget / row['per_weight']):.0%} of the "
                          "bandwidth floor")
        report.append(f"    {row['barriers']} barriers (bar.sync) per K step")
        if "mma_layout_ok" in row:
            ok, why = row["mma_layout_ok"]
            report.append("    register layout of the MMA operands: " + ("one lane per element of the last dimension, "
                                                                         "as the fragments need" if ok else why))
        if "word_loads" in row:
            report.append(f"    {row['word_loads_before_first_mma']} of the loop's {row['word_loads']} weight-word loads "
                          "(128-bit) issued before its first MMA")
        if "silu_per_weight" in row:
            extra = row["silu_per_weight"] - row["per_weight"]
            report.append(f"    with silu(gate) * up in the prologue (the down GEMV): {row['silu_per_weight']:.2f} "
                          f"instructions per weight ({extra:+.2f}; {row['silu_opcodes'].get('MUFU', 0)} MUFU per K "
                          f"step against {row['opcodes'].get('MUFU', 0)}), {row['silu_registers']} registers")
        report.append("    per weight by class: " + ", ".join(f"{k} {v:.2f}" for k, v in row["by_class"].items()))
        report.append("    top opcodes per weight: " + ", ".join(f"{k} {v:.2f}" for k, v in row["top"].items()))
    text = "\n".join(report)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
