"""Exercises in notebooks: solutions live between ``# BEGIN SOLUTION`` and ``# END SOLUTION``.

``strip_solutions(source)`` replaces each marked block by a stub that raises ``NotImplementedError`` at the
block's indentation, so the check cell after an exercise fails until the learner writes the code.
``write_student_copy(path, out_dir)`` writes a notebook's student copy (outputs cleared).
"""
from __future__ import annotations

import re
from pathlib import Path

BEGIN = "# BEGIN SOLUTION"
END = "# END SOLUTION"
STUB = 'raise NotImplementedError("Exercise: replace this line with your solution, then run the check cell below it")'


def strip_solutions(source: str) -> tuple[str, int]:
    """Return (source with every solution block replaced by a stub, number of blocks)."""
    out, n, inside = [], 0, False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError("nested '# BEGIN SOLUTION'")
            inside, n = True, n + 1
            indent = re.match(r"\s*", line).group(0)
            out.append(f"{indent}# TODO: your code here")
            out.append(f"{indent}{STUB}")
        elif stripped == END:
            if not inside:
                raise ValueError("'# END SOLUTION' without '# BEGIN SOLUTION'")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError("'# BEGIN SOLUTION' without '# END SOLUTION'")
    return "\n".join(out), n


def write_student_copy(path: Path, out_dir: Path) -> tuple[Path, int]:
    """Write ``out_dir/<name>`` with solutions stubbed and outputs cleared; return (path, number of exercises)."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    total = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.source, n = strip_solutions(cell.source)
        total += n
        cell.outputs, cell.execution_count = [], None
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / Path(path).name
    nbformat.write(nb, str(out))
    return out, total
