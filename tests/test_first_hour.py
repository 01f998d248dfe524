"""What a learner meets in the first hour: input checked up front, a damaged cache noticed, clear help texts.

Every bad input gives one line that names the argument and what it accepts, a non-zero exit and no traceback,
before any model is loaded or any file written.
"""
import json
import struct
import subprocess
import sys

import pytest

from labkit import cli, env, models


def _labkit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "labkit", *args], capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("args, says", [
    (["quality", "--eval-tokens", "-5"], "--eval-tokens: -5 must be at least 1"),
    (["quality", "--qat-steps", "0"], "--qat-steps: 0 must be at least 1"),
    (["quality", "--methods", "bogus"], "Unknown method 'bogus'"),
    (["bench", "attention", "--seqlens", "0"], "--seqlens: 0 must be at least 1"),
    (["bench", "attention", "--seqlens", "-128"], "--seqlens: -128 must be at least 1"),
    (["bench", "attention", "--seqlens", "512,abc"], "'abc' is not a whole number"),
    (["bench", "attention", "--tokens", "0"], "--tokens: 0 must be at least 1"),
    (["bench", "attention", "--variants", "nope"], "nope not known; choose from naive"),
    (["bench", "pipeline", "--quant", "bogus"], "--quant: bogus not known; choose from none,int8,nf4,nf4-dq"),
    (["bench", "pipeline", "--batch", "0"], "--batch: 0 must be at least 1"),
    (["bench", "decode", "--weights", "int3"], "--weights: int3 not known"),
    (["bench", "decode", "--new-tokens", "0"], "--new-tokens: 0 must be at least 1"),
    (["bench", "nonsense"], "invalid choice: 'nonsense'"),
    (["bench", "serving", "--prefill-budgets", "4,16"], "each must exceed max_batch"),
    (["bench", "serving", "--prefill-budgets", "64,x"], "--prefill-budgets: 'x' is not a whole number"),
    (["bench", "serving", "--prefill-budgets", "512", "--tag", "a/b"], "--tag 'a/b': use up to 40 letters"),
    (["bench", "serving", "--answer-len", "9,3"], "--answer-len: '9,3': give MIN,MAX with MIN <= MAX"),
    (["bench", "serving", "--prompt-len", "32"], "--prompt-len: '32': give MIN,MAX with MIN <= MAX"),
    (["student", "nope.ipynb"], "nope.ipynb is not a notebook file"),
])
def test_bad_input_is_one_clear_line(args, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(env, "repo_root", lambda: tmp_path)  # nothing may be written, not even an empty folder
    code, err = _main(args, capsys)
    assert code != 0
    assert says in err.strip().splitlines()[-1], err
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(env.device().type == "cuda", reason="on a GPU --kernels triton is valid (it would start a server)")
def test_serve_refuses_triton_kernels_without_a_gpu(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    monkeypatch.setattr(env, "repo_root", lambda: tmp_path)
    code, err = _main(["serve", "--kernels", "triton"], capsys)
    assert code != 0
    assert "--kernels triton needs a CUDA GPU" in err.strip().splitlines()[-1], err


def _main(args, capsys):
    """cli.main in this process (argparse exits with SystemExit); (exit status, stderr)."""
    try:
        code = cli.main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    out = _labkit("student", "nope.ipynb", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("error: nope.ipynb is not a notebook file; give paths like "
                                  "notebooks/01_quantization_basics.ipynb (or none, for every notebook).")
    out = _labkit("bench", "attention", "--seqlens", "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    for args in (["quality", "--out", str(blocker / "q.json")], ["bench", "ceilings", "--out", str(blocker / "c.json")],
                 ["bench", "pipeline", "--out", str(blocker)], ["student", "--out", str(blocker / "s")]):
        code, err = _main(args, capsys)
        assert code == 1, (args, err)
        assert "cannot be created" in err or "not writable" in err, (args, err)


def test_unwritable_cache(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("LABKIT_CACHE", str(blocker / "cache"))
    with pytest.raises(env.LabkitError, match="set LABKIT_CACHE to a folder you can write"):
        env.cache_dir()
    assert cli.main(["doctor", "--no-measure"]) == 1
    captured = capsys.readouterr()
    assert "[MISSING] cache (LABKIT_CACHE)" in captured.out
    assert "export LABKIT_CACHE=" in captured.err
    # the command that needs the cache says the same in one line
    out = _labkit("doctor", "--rebuild-model", "--no-measure", env={**__import__("os").environ,
                                                                     "LABKIT_CACHE": str(blocker / "cache")})
    assert out.returncode == 1 and "Traceback" not in out.stderr and "LABKIT_CACHE" in out.stderr


def test_help_texts(capsys):
    top = _labkit("--help")
    assert top.returncode == 0 and "``" not in top.stdout
    for word in ("doctor", "bench ceilings", "bench attention", "bench pipeline", "bench decode", "quality", "report",
                 "student"):
        assert word in top.stdout
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    benches = capsys.readouterr().out
    assert exc.value.code == 0
    for name in ("ceilings", "attention", "pipeline", "decode"):
        assert f"  {name}  " in benches or f"  {name} " in benches, benches
    for args in (["quality"], ["bench", "attention"], ["bench", "pipeline"], ["bench", "decode"], ["report"],
                 ["student"], ["doctor"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*args, "--help"])
        assert exc.value.code == 0 and "usage: labkit" in capsys.readouterr().out, args


def test_no_kernels_community_notice():
    """bitsandbytes' notice about an optional hub kernel is dropped; bitsandbytes' own CPU kernel is used."""
    code = "import labkit, bitsandbytes, labkit.env as e; print(e.capabilities()[0].ok)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kernels-community" not in out.stderr + out.stdout


def test_cuda_build_without_gpu_is_flagged(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(env, "nvidia_gpu_present", lambda: False)
    check = env.torch_build_check()
    assert not check.ok and "no NVIDIA GPU" in check.detail
    assert "--index-url https://download.pytorch.org/whl/cpu" in check.fix
    monkeypatch.setattr(env, "nvidia_gpu_present", lambda: True)
    assert env.torch_build_check().ok


# ---------------------------------------------------------------------------------------------- the cached model
def _tiny_safetensors(path, n=16):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.arange(n, dtype=torch.float32)}, str(path))


def test_safetensors_problem(tmp_path):
    path = tmp_path / "model.safetensors"
    assert models.safetensors_problem(path) == "has no model.safetensors"
    _tiny_safetensors(path)
    assert models.safetensors_problem(path) is None
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    assert "truncated" in models.safetensors_problem(path)
    path.write_bytes(data[:4])
    assert models.safetensors_problem(path) is not None
    path.write_bytes(struct.pack("<Q", 5) + b"notjs")
    assert "unreadable" in models.safetensors_problem(path)


def test_damaged_checkpoint_is_detected_and_rebuilt(tmp_path, monkeypatch, capsys):
    """Truncated or deleted files in the cached conversion are noticed and the conversion runs again."""
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    conversions = []

    def fake_convert(gguf, out, source):  # the real conversion takes a minute; its output is what matters here
        conversions.append(out)
        out.mkdir(parents=True, exist_ok=True)
        for f in models.CHECKPOINT_FILES:
            (out / f).write_text("{}")
        _tiny_safetensors(out / "model.safetensors")
        (out / "labkit_source.json").write_text(json.dumps(source))

    monkeypatch.setattr(models, "_convert_smollm2", fake_convert)
    out = tmp_path / "smollm2-135m-instruct"
    assert models.checkpoint_problem(out) == "is not converted yet"
    assert models.smollm2_checkpoint() == out and len(conversions) == 1
    assert models.checkpoint_problem(out) is None
    assert models.smollm2_checkpoint() == out and len(conversions) == 1  # complete: reused

    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in models.checkpoint_problem(out)
    checks = {c.name: c for c in env.capabilities()}
    bad = checks["smollm2-135m (converted copy)"]
    assert not bad.ok and bad.essential and "truncated" in bad.detail and "--rebuild-model" in bad.fix
    models.smollm2_checkpoint()
    assert len(conversions) == 2 and "converting it again" in capsys.readouterr().err

    (out / "model.safetensors").unlink()
    assert models.checkpoint_problem(out) == "is missing model.safetensors"
    models.smollm2_checkpoint()
    assert len(conversions) == 3 and models.checkpoint_problem(out) is None


# ---------------------------------------------------------------------------------------------- results
def test_ceilings_write_local_unless_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(env, "repo_root", lambda: tmp_path)
    monkeypatch.setattr(env, "measure_copy_bandwidth", lambda dev: 1e10)
    monkeypatch.setattr(env, "measure_matmul_rate", lambda dev, dtype: 1e11)
    slug = env.device_slug()  # "cpu" here, e.g. "nvidia-h200" on a GPU machine
    assert cli.main(["bench", "ceilings"]) == 0
    assert (tmp_path / "results" / "local" / slug / "ceilings.json").exists()
    assert not (tmp_path / "results" / slug).exists()
    assert cli.main(["bench", "ceilings", "--reference"]) == 0
    assert (tmp_path / "results" / slug / "ceilings.json").exists()


def test_report_leaves_reference_summary_alone(tmp_path, capsys):
    from labkit import bench

    root = tmp_path / "results"
    bench.write_results(root / "nvidia-h200" / "ceilings.json", [], {"copy_GBps": 4220.0})
    summary = root / "RESULTS.md"
    summary.write_text("committed summary\n")
    assert cli.main(["report", "--results", str(root)]) == 1  # no local runs yet: says what to run
    assert "labkit bench ceilings" in capsys.readouterr().err
    bench.write_results(root / "local" / "cpu" / "ceilings.json", [], {"copy_GBps": 12.5})
    assert cli.main(["report", "--results", str(root)]) == 0
    assert summary.read_text() == "committed summary\n"
    text = (root / "local" / "REPORT.md").read_text()
    assert "This machine: cpu / ceilings" in text and "12.5" in text and "4220" in text
    assert "| copy_GBps | 12.5 | 4220 |" in text
    assert cli.main(["report", "--results", str(root), "--reference"]) == 0
    new = summary.read_text()
    assert "## nvidia-h200 / ceilings" in new and "12.5" not in new and "local" not in new
