"""labkit.planner: the capacity plan against a case worked by hand, bad input, and reading decode records."""
import pytest

from labkit import models, planner as pl, roofline
from labkit.env import LabkitError


def hand_record(**kw):
    # measured: 10 ms per step at batch 1, 16 ms at batch 4 (so 2 ms per extra sequence); floors far below
    base = dict(label="hand case", weights="bf16", step_ms={1: 10.0, 4: 16.0}, weight_bytes=1e9, kv_bytes_per_token=0.0,
                matmul_params=1.0, read_bandwidth=1e15, matmul_flops=1e18, prefill_tokens_per_s=10_000, memory_bytes=1e12)
    base.update(kw)
    return pl.Record(**base)


def test_plan_matches_the_hand_computed_case():
    # traffic: 864,000 messages/day = 10/s on average, x3 at the peak = 30 messages/s;
    # 100-token prompts, 200-token answers, 40 ms between tokens, $2 per GPU-hour.
    # batch: 10 + 2 (B - 1) <= 40  ->  B = 16, step exactly 40 ms  ->  16 / 0.040 s = 400 tokens/s per GPU
    # GPU-seconds per message: prefill 100 / 10,000 = 0.01 s + decode 200 / 400 = 0.5 s  ->  0.51 s
    # GPUs at the peak: 30 x 0.51 = 15.3  ->  16 GPUs, each busy 15.3 / 16 = 95.6 %
    # cost: 16 GPUs x 24 h x $2 = $768 a day for 864,000 x 200 = 172.8 M answer tokens  ->  $4.444 per million
    p = pl.plan(pl.Traffic(864_000, 3.0, 100, 200, 40.0), hand_record(), 2.0)
    assert p.batch == 16 and p.batch_limit == "latency"
    assert p.step_ms == pytest.approx(40.0)
    assert p.tokens_per_s_per_gpu == pytest.approx(400.0)
    assert p.gpu_seconds_per_message == pytest.approx(0.51)
    assert p.gpus == 16
    assert p.utilisation_at_peak == pytest.approx(15.3 / 16)
    assert p.cost_per_million_tokens == pytest.approx(768 / 172.8)


def test_memory_limits_the_batch():
    # each sequence of 300 tokens holds 300 x 1 MB = 0.3 GB of KV; 2 GB free after 1 GB of weights -> 6 sequences
    rec = hand_record(kv_bytes_per_token=1e6, memory_bytes=3e9)
    b, limit = pl.max_batch(pl.Traffic(1000, 1.0, 100, 200, 40.0), rec)
    assert (b, limit) == (6, "memory")


@pytest.mark.parametrize("field,value", [("messages_per_day", 0), ("messages_per_day", -5), ("answer_tokens", 0),
                                         ("prompt_tokens", -1), ("latency_ms", 0)])
def test_bad_traffic_is_refused_clearly(field, value):
    kw = dict(messages_per_day=1000, latency_ms=40.0)
    kw[field] = value
    with pytest.raises(LabkitError, match=field):
        pl.plan(pl.Traffic(**kw), hand_record(), 2.0)


def test_peak_below_average_is_refused():
    with pytest.raises(LabkitError, match="peak_to_average"):
        pl.plan(pl.Traffic(1000, peak_to_average=0.5), hand_record(), 2.0)


def test_target_below_the_floor_says_why():
    # 1 GB read per step at 1 TB/s: 1 ms floor; a 0.5 ms target cannot be met by any number of GPUs
    rec = hand_record(read_bandwidth=1e12, step_ms={1: 1.5, 4: 2.0})
    with pytest.raises(LabkitError, match="floor of 1.00 ms"):
        pl.plan(pl.Traffic(1000, latency_ms=0.5), rec, 2.0)
    # above the floor but below the measured batch-1 step: a different message, naming the measured step
    with pytest.raises(LabkitError, match="measured step at batch 1 is 1.50 ms"):
        pl.plan(pl.Traffic(1000, latency_ms=1.2), rec, 2.0)


def test_step_never_below_the_roofline():
    rec = hand_record(read_bandwidth=1e12, step_ms={1: 1.0})  # measured exactly at the 1 ms floor
    assert rec.step(1, 100) == pytest.approx(1.0)
    assert rec.step(64, 100) >= rec.floor_ms(64, 100)


def synthetic_decode_doc():
    shape = models.PRESETS["tiny-llama-shape"]
    kv = roofline.kv_bytes_per_token(shape)
    rows = [{"variant": "prefill 512 tokens (bf16, cuBLAS)", "weights": "bf16", "batch": 1, "tokens_per_s": 5000.0}]
    for fmt, t1, t4 in (("bf16", 2.0, 3.0), ("int4", 1.0, 2.5)):
        for b, t in ((1, t1), (4, t4)):
            rows.append({"variant": f"our loop, Triton GEMV + CUDA graph ({fmt})", "weights": fmt, "batch": b,
                         "decode_ms_per_token": t, "weight_bytes": 1e9 / (1 if fmt == "bf16" else 4),
                         "kv_bytes": kv * 100 * b})
    rows.append({"variant": "our loop, torch ops, no graph (bf16)", "weights": "bf16", "batch": 1,
                 "decode_ms_per_token": 50.0})
    doc = {"meta": {"device": "Test GPU"}, "records": rows,
           "summary": {"ceilings": {"read_bandwidth_Bps": 1e12, "bf16_matmul_flops": 1e14}}}
    return doc, shape


def test_records_from_a_decode_document():
    doc, shape = synthetic_decode_doc()
    recs = pl.from_decode_doc(doc, shape, "test", memory_bytes=8e9)
    assert set(recs) == {"bf16", "int4"}
    assert recs["bf16"].step_ms == {1: 2.0, 4: 3.0}  # the no-graph row is not the loop's measurement
    assert recs["int4"].context_measured == pytest.approx(100)
    with pytest.raises(LabkitError, match="memory"):
        pl.from_decode_doc(doc, shape, "test")  # unknown device and no memory given


def test_projection_onto_the_same_shape_and_device_changes_nothing():
    doc, shape = synthetic_decode_doc()
    rec = pl.from_decode_doc(doc, shape, "test", memory_bytes=8e9)["int4"]
    same = pl.project(rec, shape, "same")
    # weight bytes are recomputed from the shape (int4 g128), so compare fractions of the floor, not times
    for b, t in rec.step_ms.items():
        assert rec.floor_ms(b, 100) / t == pytest.approx(same.floor_ms(b, 100) / same.step_ms[b])
    bigger = pl.project(rec, models.PRESETS["llama2-7b-shape"], "7B")
    assert bigger.step_ms[1] > rec.step_ms[1]
