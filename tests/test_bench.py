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
    assert r["ttft_ms"] > 0 and r["decode_ms_per_token"] >= 0 and r["total_ms"] >= r["ttft_ms"] * 0.5
    with pytest.raises(ValueError):
        bench.time_generate(model, ids, new_tokens=1)


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
