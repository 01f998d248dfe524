import subprocess
import sys

import pytest
import torch

from labkit import data
from labkit.env import LabkitError


@pytest.mark.parametrize("corpus", ["pydoc", "lab"])
def test_splits_are_disjoint_and_deterministic(tokenizer, corpus):
    a = data.load_splits(tokenizer, corpus)
    b = data.load_splits(tokenizer, corpus)
    assert torch.equal(a.calib, b.calib) and torch.equal(a.eval, b.eval)
    assert a.calib_docs and a.eval_docs and not set(a.calib_docs) & set(a.eval_docs)
    assert len(a.calib_docs) + len(a.eval_docs) == len(data.documents(corpus))


def test_offline_eval_has_at_least_50k_tokens(tokenizer):
    s = data.load_splits(tokenizer, "pydoc")
    assert s.eval.numel() >= 50_000 and s.calib.numel() >= 10_000


def test_lab_corpus_is_prose():
    docs = data.documents("lab")
    assert len(docs) >= 20
    words = sum(len(d.text.split()) for d in docs)
    assert words > 10_000


def test_cuts_and_shortfall(tokenizer):
    s = data.load_splits(tokenizer, "lab", calib_tokens=100, eval_tokens=200)
    assert s.calib.numel() == 100 and s.eval.numel() == 200
    with pytest.raises(LabkitError, match="only"):
        data.load_splits(tokenizer, "lab", eval_tokens=10**7)
    with pytest.raises(LabkitError, match="Unknown corpus"):
        data.documents("nope")


def test_calibration_batches():
    ids = torch.arange(1000)
    x = data.calibration_batches(ids, 8, 64, seed=1)
    assert x.shape == (8, 64)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 63, dtype=torch.long))  # contiguous windows
    assert torch.equal(x, data.calibration_batches(ids, 8, 64, seed=1))
    with pytest.raises(LabkitError):
        data.calibration_batches(ids[:10], 1, 64)


def test_wikitext2_offline_error():
    code = ("from labkit import data\n"
            "from labkit.env import LabkitError\n"
            "try:\n    data.load_splits(None, 'wikitext2')\n"
            "except LabkitError as e:\n    print('OK', e)\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.startswith("OK") and "pydoc" in out.stdout, out.stderr[-2000:]
