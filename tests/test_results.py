"""Committed reference results are read only through labkit.results, and no notebook asserts on them.

The scan parses every notebook's code cells: a path built to ``results/`` or a JSON read outside
``labkit.results`` fails; so does an ``assert`` whose expression depends (through assignments, in cell order)
on what ``results.reference``/``results.references`` returned.
"""
import ast
import json
import re
from pathlib import Path

import pytest

from labkit import results

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
HELPERS = {"reference", "references"}  # labkit.results functions that return committed data
SOURCES = HELPERS | {"read_results"}  # ... and the old direct reader, flagged by both tests

# ways of reaching results/ other than the helper
DIRECT = [
    (re.compile(r"""["']results["']"""), "a path to results/ built by hand"),
    (re.compile(r"""["']results/"""), "a path into results/ written out"),
    (re.compile(r"\bread_results\s*\("), "bench.read_results (use labkit.results.reference)"),
    (re.compile(r"""glob\(\s*["'][^"']*\.json"""), "a glob for JSON files"),
]


def code_cells(path: Path) -> list[str]:
    doc = json.loads(path.read_text())
    return ["".join(c["source"]) for c in doc["cells"] if c["cell_type"] == "code"]


def _python(src: str) -> str:
    """The cell without IPython magics / shell lines, which ``ast`` cannot parse."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in src.splitlines())


def direct_reads(cells: list[str]) -> list[str]:
    found = []
    for i, src in enumerate(cells):
        code = "\n".join(line.split("#", 1)[0] for line in src.splitlines())  # comments may name results/
        for pattern, what in DIRECT:
            if pattern.search(code):
                found.append(f"code cell {i}: {what}")
    return found


class _Taint(ast.NodeVisitor):
    """Which names hold data read from committed results, statement by statement, across cells in order."""

    def __init__(self):
        self.tainted: set[str] = set()
        self.bad: list[str] = []
        self.cell = 0

    def _is_helper_call(self, node) -> bool:
        if not isinstance(node, ast.Call):
            return False
        f = node.func
        return (isinstance(f, ast.Attribute) and f.attr in SOURCES) or (isinstance(f, ast.Name) and f.id in SOURCES)

    def dirty(self, node) -> bool:
        if node is None:
            return False
        return any((isinstance(n, ast.Name) and n.id in self.tainted) or self._is_helper_call(n)
                   for n in ast.walk(node))

    def _set(self, target, dirty: bool):
        for n in ast.walk(target):
            if isinstance(n, ast.Name):
                (self.tainted.add if dirty else self.tainted.discard)(n.id)

    def visit_Assign(self, node):
        d = self.dirty(node.value)
        for t in node.targets:
            self._set(t, d)

    def visit_AnnAssign(self, node):
        self._set(node.target, self.dirty(node.value))

    def visit_AugAssign(self, node):
        if self.dirty(node.value):
            self._set(node.target, True)

    def visit_NamedExpr(self, node):
        self._set(node.target, self.dirty(node.value))

    def visit_For(self, node):
        self._set(node.target, self.dirty(node.iter))
        for stmt in node.body + node.orelse:
            self.visit(stmt)

    def visit_Expr(self, node):  # d.update(ref.summary), rows.append(ref.records[0]) taint the container
        call = node.value
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name):
            if any(self.dirty(a) for a in [*call.args, *[k.value for k in call.keywords]]):
                self.tainted.add(call.func.value.id)

    def visit_Assert(self, node):
        if self.dirty(node.test):
            self.bad.append(f"code cell {self.cell}, line {node.lineno}: assert on committed results: "
                            f"{ast.unparse(node.test)[:80]}")

    def visit_FunctionDef(self, node):  # a function body runs later, with its own arguments
        pass


def asserts_on_references(cells: list[str]) -> list[str]:
    v = _Taint()
    for i, src in enumerate(cells):
        v.cell = i
        for stmt in ast.parse(_python(src)).body:
            v.visit(stmt)
    return v.bad


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_read_results_only_through_the_helper(path):
    found = direct_reads(code_cells(path))
    assert not found, f"{path.name} reads results/ without labkit.results: {found}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_notebook_asserts_on_committed_results(path):
    bad = asserts_on_references(code_cells(path))
    assert not bad, f"{path.name}: {bad} (assert on this run's measurements; show references, labelled)"


def test_the_scan_catches_what_it_should():
    assert direct_reads(['doc = bench.read_results(env.repo_root() / "results" / "x" / "a.json")'])
    assert direct_reads(['p = sorted(root.glob("*/decode.json"))'])
    assert not direct_reads(['ref = results.reference("decode")  # reads results/<device>/decode.json'])
    cells = ['ref = results.reference("decode")\nfrac = ref.summary["fraction_of_floor"]',
             'x = 3\nfor k, v in frac.items():\n    y = v * 2\n    assert y <= 2',
             'assert x == 3']
    bad = asserts_on_references(cells)
    assert len(bad) == 1 and "cell 1" in bad[0]
    # a name re-assigned from this run's data is clean again
    assert not asserts_on_references(['m = results.reference("a").summary', 'm = measure()\nassert m > 0'])
    assert asserts_on_references(['rows = []\nrows.extend(r for r in results.references("a"))', 'assert rows'])


def test_reference_heading_and_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(results.env, "repo_root", lambda: tmp_path)
    (tmp_path / "results" / "gpu-x").mkdir(parents=True)
    (tmp_path / "results" / "local" / "gpu-x").mkdir(parents=True)
    doc = {"meta": {"device": "GPU X", "git_commit": "abc1234", "utc": "2026-11-21T10:00:00Z"}, "summary": {"k": 1}}
    (tmp_path / "results" / "gpu-x" / "thing.json").write_text(json.dumps(doc))
    (tmp_path / "results" / "local" / "gpu-x" / "thing.json").write_text(json.dumps(doc))
    refs = results.references("thing")
    assert len(refs) == 1  # the local folder is never a reference
    h = refs[0].heading()
    assert "not this run" in h and "GPU X" in h and "abc1234" in h and "2026-11-21" in h
    assert results.reference("missing") is None
    assert "commit not recorded" in results.Reference(tmp_path / "x.json", {"meta": {"device": "GPU X"}}).heading()
    assert results.output_dir(False, "gpu-x") == tmp_path / "results" / "local" / "gpu-x"
    assert results.output_dir(True, "gpu-x") == tmp_path / "results" / "gpu-x"


def test_bench_attention_writes_local_unless_reference(tmp_path, monkeypatch, capsys):
    """`labkit bench attention` writes results/local/<device>/ by default, results/<device>/ with --reference."""
    from labkit import attention

    monkeypatch.setattr(results.env, "repo_root", lambda: tmp_path)
    args = ["--seqlens", "32", "--variants", "naive", "--tokens", "32", "--heads", "1", "--head-dim", "64",
            "--dtype", "fp32"]
    slug = results.env.device_slug()
    assert attention.cli_main(args) == 0
    assert (tmp_path / "results" / "local" / slug / "attention.json").exists()
    assert not (tmp_path / "results" / slug / "attention.json").exists()
    assert attention.cli_main(args + ["--reference"]) == 0
    assert (tmp_path / "results" / slug / "attention.json").exists()
