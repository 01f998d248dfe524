"""The stored notebooks are exactly what the strip filter writes, so a fresh set-up (which installs the filter
named in .gitattributes) leaves `git status` clean. Fix a failure with `make strip` (or `python -m nbstripout FILE`)."""
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def _strip(*files: Path) -> bytes:
    """What git's clean filter writes for each file, concatenated (`nbstripout --install` sets the clean filter to
    `python -m nbstripout`; `-t` runs the same code on files and writes to stdout), in one process."""
    out = subprocess.run([sys.executable, "-m", "nbstripout", "-t", *map(str, files)], capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def test_notebooks_are_in_strip_filter_form():
    assert NOTEBOOKS
    if _strip(*NOTEBOOKS) != b"".join(p.read_bytes() for p in NOTEBOOKS):
        bad = [p.name for p in NOTEBOOKS if _strip(p) != p.read_bytes()]
        pytest.fail(f"not in the strip filter's form (outputs, execution counts or cell ids differ): {bad}; "
                    "run `make strip` (python -m nbstripout notebooks/*.ipynb) and commit")


def test_filter_catches_outputs(tmp_path):
    """The comparison above can fail: a notebook with an output is not in the filter's form."""
    import nbformat

    nb = nbformat.read(str(NOTEBOOKS[0]), 4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", text="hello\n")]
    code.execution_count = 3
    path = tmp_path / "with_output.ipynb"
    nbformat.write(nb, str(path))
    stripped = _strip(path)
    assert stripped != path.read_bytes() and b"hello" not in stripped
