import json

import pytest
import torch

from labkit import bench, models


def test_summarize_quantiles():
    m = bench.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (m.median_s, m.min_s, m.n) == (3.0, 1.0, 5)
    assert m.p10_s == pytest.approx(1.4) and m.p90_s == pytest.approx(4.6)
    assert m.spread == pytest.approx((4.6 - 1.4) / 3.0)
    with pytest.raises(ValueError):
        bench.summarize([])


def test_measure_calls_warmup_plus_iters():
    calls = []
    m = bench.measure(lambda: calls.append(1), warmup=2, iters=7, device="cpu")
    assert len(calls) == 9 and m.n == 7 and m.median_s >= 0


def test_units():
    m = bench.summarize([0.5])
    assert bench.tflops(1e12, m) == pytest.approx(2.0)
    assert bench.gbps(1e9, m) == pytest.approx(2.0)


def test_time_generate_on_tiny_model():
    model, _ = models.load("tiny-llama-shape", device="cpu")
    ids = torch.randint(3, 200, (2, 16))
    r = bench.time_generate(model, ids, new_tokens=4, iters=2)
    assert r["batch"] == 2 and r["prompt_len"] == 16
    # a gap between two stamped tokens is one measured step: never zero, never a difference of medians
    assert r["ttft_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["total_ms"] > r["ttft_ms"]
    assert r["tokens_per_s"] == pytest.approx(2 / (r["decode_ms_per_token"] / 1e3))
    assert 0 < r["decode_min_ms"] <= r["decode_p10_ms"] <= r["decode_ms_per_token"] <= r["decode_p90_ms"]
    with pytest.raises(ValueError):
        bench.time_generate(model, ids, new_tokens=1)


def test_token_clock_counts_generated_tokens_only():
    model, _ = models.load("tiny-llama-shape", device="cpu")
    ids = torch.randint(3, 200, (1, 8))
    clock = bench.TokenClock("cpu")
    clock.start()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                   pad_token_id=0, streamer=clock)
    assert len(clock.stamps) == 5 and len(clock.gaps_s) == 4  # the prompt's put() is not a token
    assert clock.ttft_s > 0 and all(g > 0 for g in clock.gaps_s)


class _SleepyModel:
    """A stand-in for an HF model: prefill sleeps ``prefill_s``, each further token ``step_s``; EOS after ``stop_at``."""

    def __init__(self, prefill_s, step_s, stop_at=None, cold_s=0.0):
        self.prefill_s, self.step_s, self.stop_at, self.cold_s = prefill_s, step_s, stop_at, cold_s
        self.device = torch.device("cpu")
        self.calls = 0

    def generate(self, input_ids, max_new_tokens, streamer=None, **kw):
        import time

        self.calls += 1
        if self.calls == 1:
            time.sleep(self.cold_s)  # a first call pays for set-up (allocations, kernel selection)
        n = min(max_new_tokens, self.stop_at or max_new_tokens)
        if streamer is not None:
            streamer.put(input_ids)
        out = [input_ids]
        for i in range(n):
            time.sleep(self.prefill_s if i == 0 else self.step_s)
            tok = torch.full((input_ids.shape[0], 1), 5)
            out.append(tok)
            if streamer is not None:
                streamer.put(tok[:, 0])
        if streamer is not None:
            streamer.end()
        return torch.cat(out, dim=1)


def test_time_generate_separates_prefill_from_steps():
    """Sleeps are lower bounds however loaded the machine: a step can only take longer than its sleep."""
    m = _SleepyModel(prefill_s=0.05, step_s=0.004)
    r = bench.time_generate(m, torch.ones(1, 4, dtype=torch.long), new_tokens=6, warmup=0, iters=3)
    assert r["decode_ms_per_token"] >= 4.0 and r["ttft_ms"] >= 50.0
    assert r["ttft_ms"] > 2 * r["decode_ms_per_token"], r  # prefill is not smeared over the steps
    with pytest.raises(RuntimeError, match="expected 6"):  # an early stop is an error, not a faster token
        bench.time_generate(_SleepyModel(0.0, 0.0, stop_at=3), torch.ones(1, 4, dtype=torch.long), new_tokens=6,
                            warmup=0, iters=1)


class _CharTokenizer:
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, return_tensors=None):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([[3 + (ord(c) % 50) for c in text]]))

    def decode(self, ids, **kw):
        return "".join("x" for _ in ids)


def test_article_streamer_benchmark_folds_what_it_should_not():
    import io

    m = _SleepyModel(prefill_s=0.02, step_s=0.002, stop_at=4, cold_s=0.1)
    out = io.StringIO()
    r = bench.article_streamer_benchmark(m, _CharTokenizer(), "abc", max_new_tokens=8, repeats=3, stream=out)
    assert "xxxx" in out.getvalue()  # the streamer printed inside the timed region
    assert r["tokens_made"] == [4, 4, 4]  # EOS came early, yet throughput counts max_new_tokens
    assert r["tokens_per_s"] == pytest.approx(8 / (sum(r["timings_s"]) / 3))
    assert r["timings_s"][0] > r["timings_s"][1] + 0.05  # no warm-up: the cold first run sits in the mean
    # the per-token figure carries the prefill: it is above the 2 ms steps by at least the prefill's share
    assert r["ms_per_token"] >= (20 + 3 * 2) / 8


def test_results_round_trip(tmp_path):
    path = bench.write_results(tmp_path / "x.json", [{"a": 1, "m": bench.summarize([1.0, 2.0])}], {"k": 2.5})
    doc = json.loads(path.read_text())
    assert doc["summary"] == {"k": 2.5}
    assert doc["records"][0]["m"]["median_s"] == 1.5
    for key in ("device", "versions", "git_commit", "utc", "profile"):
        assert key in doc["meta"]


def test_graph_time_ms():
    """CUDA-graph timing: a clear error without a GPU; on a GPU, a longer kernel takes longer."""
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="CUDA"):
            bench.graph_time_ms([lambda: None])
        return
    a = torch.randn(1 << 20, device="cuda")
    b = torch.randn(16 << 20, device="cuda")
    t_small = bench.graph_time_ms([lambda: a.mul_(1.0)])
    t_big = bench.graph_time_ms([lambda: b.mul_(1.0)])
    assert 0 < t_small < t_big
