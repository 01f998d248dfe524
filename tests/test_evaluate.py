import math
from types import SimpleNamespace

import pytest
import torch

from labkit import evaluate, models


class Uniform(torch.nn.Module):
    """Predicts every token with probability 1/V: its perplexity is exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, logits_to_keep=0):
        b, t = input_ids.shape
        t = logits_to_keep or t
        return SimpleNamespace(logits=torch.zeros(b, t, self.vocab) + self.p)


def test_windows_score_every_token_once():
    for n, ctx, stride in [(1000, 128, 64), (97, 32, 31), (64, 64, 16), (10, 128, 64)]:
        wins = evaluate._windows(n, ctx, stride)
        scored = []
        for b, e, k in wins:
            assert e - b <= ctx and k <= e - b - 1
            scored += list(range(e - k, e))
        assert scored == list(range(1, n))


def test_uniform_model_has_perplexity_vocab():
    ids = torch.randint(0, 50, (777,))
    assert evaluate.perplexity(Uniform(50), ids, ctx_len=64, stride=32) == pytest.approx(50.0)


def test_strided_nll_equals_full_context_loss(smollm2):
    model, tok = smollm2
    ids = tok("A small test sentence, then another one about rivers and hills. " * 6,
              return_tensors="pt").input_ids[0]
    with torch.no_grad():
        hf = model(ids[None], labels=ids[None]).loss.item()
    total, count = evaluate.nll_sum(model, ids, ctx_len=512)
    assert count == ids.numel() - 1 and total / count == pytest.approx(hf, rel=1e-4)
    # a shorter window loses context, so it can only be worse on average here
    assert evaluate.perplexity(model, ids, ctx_len=16, stride=8) > math.exp(hf)


def test_compare_to_reference():
    model, _ = models.load("tiny-llama-shape", device="cpu")
    other, _ = models.load("tiny-llama-shape", device="cpu")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 256, (256,))
    same = evaluate.compare_to_reference(model, model, ids, ctx_len=64)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0 and same["n_tokens"] == 256
    diff = evaluate.compare_to_reference(other, model, ids, ctx_len=64)
    assert diff["kl"] > 1e-4 and diff["top1"] < 1.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        evaluate.perplexity(Uniform(5), torch.zeros(100, dtype=torch.long), ctx_len=64, stride=64)
    with pytest.raises(ValueError):
        evaluate.perplexity(Uniform(5), torch.zeros(2, 5, dtype=torch.long))
