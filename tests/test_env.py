import pytest
import torch

from labkit import env
from labkit.env import LabkitError


def test_profile_default_follows_cuda(monkeypatch):
    monkeypatch.delenv("LABKIT_PROFILE", raising=False)
    assert env.profile() == ("full" if torch.cuda.is_available() else "quick")


def test_profile_override_and_bad_value(monkeypatch):
    monkeypatch.setenv("LABKIT_PROFILE", "full")
    assert env.profile() == "full"
    monkeypatch.setenv("LABKIT_PROFILE", "fast")
    with pytest.raises(LabkitError, match="quick"):
        env.profile()


def test_device_override_to_missing_gpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.setenv("LABKIT_DEVICE", "cuda")
    with pytest.raises(LabkitError, match="no CUDA GPU"):
        env.device()


def test_require_package_names_the_fix():
    with pytest.raises(LabkitError, match="pip install"):
        env.require_package("surely_not_a_package_xyz")
    assert env.require_package("json").__name__ == "json"


def test_require_cuda_message():
    if torch.cuda.is_available():
        env.require_cuda("this test")
    else:
        with pytest.raises(LabkitError, match="needs a CUDA GPU"):
            env.require_cuda("this test")


def test_cache_dir_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "c"))
    assert env.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_versions_and_capabilities():
    v = env.versions()
    assert v["torch"] and v["python"]
    names = {c.name for c in env.capabilities()}
    for needed in ("torch", "transformers", "bitsandbytes", "triton", "flash-attn", "flash-attn-4", "sdpa backends",
                   "smollm2-135m (embedded model)"):
        assert needed in names


def test_measured_ceilings_are_plausible():
    bw = env.measure_copy_bandwidth(nbytes=1 << 24, iters=3)
    rate = env.measure_matmul_rate(n=256, iters=3)
    read = env.measure_read_bandwidth(nbytes=1 << 24, iters=3)
    assert 1e8 < bw < 1e13 and 1e8 < read < 1e13  # between 0.1 GB/s and 10 TB/s
    assert 1e8 < rate < 2e15


def test_kernel_check_flags_ipykernel_7():
    assert env.kernel_check("6.31.0").ok and not env.kernel_check("7.4.0").ok
    assert "<7" in env.kernel_check("7.4.0").fix and not env.kernel_check(None).ok


def test_requirement_conflicts_finds_an_incompatible_pair():
    requires = {"bitsandbytes": ["torch<3,>=2.4", "numpy>=1.17", 'pytest~=8.3; extra == "test"'],
                "torch": ['triton==3.6.0; platform_system == "Linux"', "filelock"]}
    bad = env.requirement_conflicts({"bitsandbytes": "0.50.2", "torch": "2.3.1+cu121", "numpy": "2.1.0",
                                     "pytest": "7.0"}, requires)
    assert bad == ["bitsandbytes 0.50.2 needs torch<3,>=2.4; torch 2.3.1+cu121 is installed"]
    assert env.requirement_conflicts({"bitsandbytes": "0.50.2", "torch": "2.11.0"}, requires) == []
    import platform

    if platform.system() == "Linux":   # the marker holds here, so a wrong triton is caught
        clash = env.requirement_conflicts({"torch": "2.11.0", "triton": "3.9.0"}, requires)
        assert clash == ["torch 2.11.0 needs triton==3.6.0; triton 3.9.0 is installed"]


def test_installed_packages_checked_in_doctor():
    names = [c.name for c in env.capabilities()]
    assert "package versions fit together" in names
    assert isinstance(env.installed_requirement_conflicts(), list)
