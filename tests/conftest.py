"""Shared fixtures for the unit tests (the embedded model is loaded once per session), and the set-up of a run
split over several worker processes (``make test`` on a CPU: ``pytest -n 2``, see the Makefile)."""
import os

import pytest


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers and os.environ.get("PYTEST_XDIST_WORKER"):
        # each worker (and each notebook kernel it starts, which inherits this environment) gets its share of the
        # cores: two workers with torch's default of one thread per core would run four threads on two cores
        share = str(max(1, (os.cpu_count() or 1) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, share)
    elif getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        # the controller of a split run converts the embedded model once, before any worker needs it (two workers
        # converting into the same cache folder at once would each write the other's files)
        from labkit import models

        models.smollm2_checkpoint()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M on CPU in fp32."""
    from labkit import models

    return models.load("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]
