"""Triton (and Gluon) kernels compiled for an NVIDIA target without a GPU: Triton's bundled ptxas builds the cubin,
its bundled cuobjdump reads the registers and spills. Used to check on a CPU what a kernel is made of (PTX, SASS)
before any GPU runs it. Call it in a process where Triton was imported without ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile


def compile_kernel(fn, signature: dict, constexprs: dict, options: dict, divisible=(), arch: int = 90):
    """``fn`` (``triton.jit`` or ``gluon.jit``) compiled for sm_``arch``: ``.asm`` holds its PTX and cubin.

    ``signature`` maps argument names to Triton types ("*bf16", "i32", "constexpr"), ``constexprs`` gives the
    constexpr values, ``options`` the launch options (``num_warps``, ``maxnreg``). Arguments named in ``divisible``
    are marked multiples of 16, as Triton marks pointers aligned to 16 bytes and integers that are multiples of 16
    when a kernel is launched with them (it vectorizes loads only then)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = source(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def tool(name: str) -> str | None:
    """The path of a CUDA binary Triton ships (nvdisasm, cuobjdump), or None."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local-memory (spill) bytes of a cubin, from cuobjdump; None where unknown."""
    out = dict(registers=None, local=None)
    if tool("cuobjdump") is None:
        return out
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
    for key, name in (("REG", "registers"), ("LOCAL", "local")):
        m = re.search(key + r":(\d+)", usage)
        out[name] = int(m.group(1)) if m else None
    return out
