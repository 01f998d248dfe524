"""labkit.profiling: categories from a synthetic Chrome trace, then a real (tiny, random-weight) model's trace."""
import json

import pytest
import torch

from labkit import profiling as P


def X(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "args": args}


def synthetic_trace():
    """One prefill step [0, 100) on thread 1, with a GPU side; one decode step [200, 240)."""
    return [
        X("user_annotation", "labkit::prefill", 0, 100),
        X("user_annotation", "labkit::norm", 2, 6),
        X("user_annotation", "labkit::attention", 10, 30),
        X("user_annotation", "labkit::mlp", 50, 30),
        X("cpu_op", "aten::mul", 3, 4),                         # norm: 4
        X("cpu_op", "aten::linear", 12, 20),                    # attention: 20 ...
        X("cpu_op", "aten::addmm", 13, 18),                     # ... nested, not counted again
        X("cuda_runtime", "cudaLaunchKernel", 14, 2, correlation=7),
        X("cpu_op", "aten::linear", 55, 20),                    # mlp: 20
        X("cuda_runtime", "cudaLaunchKernel", 60, 2, correlation=8),
        X("cuda_driver", "cuLaunchKernel", 70, 2, correlation=9),             # Triton launches through the driver
        X("cpu_op", "aten::argmax", 90, 5),                     # other: 5
        X("kernel", "gemm_attn", 20, 10, tid=7, correlation=7),   # device: attention 10
        X("kernel", "gemm_mlp", 40, 10, tid=7, correlation=8),    # device: mlp 10 + 7, overlapping
        X("kernel", "gemm_mlp2", 45, 7, tid=7, correlation=9),
        X("cpu_op", "aten::outside", 150, 10),                  # outside every step: ignored
        X("cpu_op", "aten::other_thread", 20, 50, tid=2),       # another thread: ignored
        X("user_annotation", "labkit::decode", 200, 40),
        X("user_annotation", "labkit::mlp", 205, 20),
        X("cpu_op", "aten::mm", 206, 10),
        {"ph": "i", "name": "instant", "ts": 1},               # not a complete event
    ]


def test_host_breakdown_by_category_and_overhead():
    b = P.breakdown([e for e in synthetic_trace() if e.get("ph") == "X"], "prefill")
    assert b.steps == 1 and b.wall_us == 100
    assert b.host["norm"] == 4 and b.host["attention"] == 20 and b.host["mlp"] == 20 and b.host["other"] == 5
    assert b.host["overhead"] == pytest.approx(100 - 49)
    assert sum(b.shares().values()) == pytest.approx(1.0)
    assert b.top() == ("overhead", pytest.approx(0.51))


def test_device_breakdown_kernels_by_launch_site_and_idle():
    b = P.breakdown(synthetic_trace(), "prefill")
    assert b.device["attention"] == 10 and b.device["mlp"] == 17
    # device span 20..52 = 32 us; kernels cover [20,30) and [40,52) = 22 us -> 10 us idle
    assert b.device_span_us == 32 and b.device["idle"] == pytest.approx(10)
    assert b.top("device") == ("mlp", pytest.approx(17 / 37))
    assert "mlp" in P.advice(b) and "device" in P.advice(b)


def test_decode_step_without_kernels_has_no_device_side():
    b = P.breakdown(synthetic_trace(), "decode")
    assert b.device is None and b.host["mlp"] == 10 and b.host["overhead"] == 30
    with pytest.raises(ValueError, match="GPU trace"):
        b.shares("device")
    with pytest.raises(ValueError, match="labkit::verify"):
        P.breakdown(synthetic_trace(), "verify")


def test_top_level_and_union():
    ops = [X("cpu_op", "a", 0, 10), X("cpu_op", "b", 2, 3), X("cpu_op", "c", 10, 5)]
    assert [e["name"] for e in P.top_level(ops)] == ["a", "c"]
    assert P.union_length([(0, 5), (3, 8), (10, 12)]) == 10
    assert P.union_length([]) == 0


def test_module_category_names():
    cases = {"model.layers.3.self_attn": "attention", "model.layers.3.mlp": "mlp",
             "model.layers.3.input_layernorm": "norm", "model.norm": "norm", "lm_head": "lm_head",
             "model.embed_tokens": "embedding", "model.layers.3.self_attn.q_proj": None,
             "model.rotary_emb": None, "transformer.h.0.attn": "attention", "transformer.h.0.ln_1": None}
    for name, cat in cases.items():
        assert P.module_category(name) == cat, name


def test_real_trace_of_tiny_model(tmp_path):
    from labkit import models

    model, _ = models.load("tiny-llama-shape", device="cpu")
    ids = torch.randint(0, 256, (1, 16))
    with P.label_modules(model) as n:
        assert n == 2 * 4 + 3   # per layer: attention, mlp, 2 norms; then final norm, lm_head, embedding
    path = tmp_path / "trace.json"
    events = P.profile_prefill_decode(model, ids, decode_steps=2, trace_path=path)
    assert json.loads(path.read_text())["traceEvents"]
    pre, dec = P.breakdown(events, "prefill"), P.breakdown(events, "decode")
    assert pre.steps == 1 and dec.steps == 2
    for b in (pre, dec):
        assert b.host["attention"] > 0 and b.host["mlp"] > 0 and b.host["norm"] > 0 and b.host["lm_head"] > 0
    # hooks are gone afterwards
    assert not any(m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="decode_steps"):
        P.profile_prefill_decode(model, ids, decode_steps=0)
    with pytest.raises(ValueError, match="prompt_len"):
        P.profile_prefill_decode(model, ids[0])
