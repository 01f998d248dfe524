"""pytest configuration shared by the unit tests and the notebooks (run with ``--nbval-lax``).

Notebook cells tagged ``gpu`` are skipped when no CUDA GPU is visible, so the CPU run executes every other
cell of every notebook. Nothing that can run on a CPU is tagged ``gpu`` (see the notebook contract).
"""
import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    cuda = _has_cuda()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        cell = getattr(item, "cell", None)  # nbval's notebook-cell items carry the cell
        if cell is not None:
            # nbval waits output_timeout (5 s by default) for a cell to report back; a loaded 2-core machine can be
            # slower to flush a large cell's outputs, and a full-profile GPU cell (the LLM.int8 matrix) runs minutes
            if hasattr(item, "output_timeout"):
                item.output_timeout = 900
            if "gpu" in cell.get("metadata", {}).get("tags", []) and not cuda:
                item.options["skip"] = True  # nbval reports it as skipped
        elif "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
