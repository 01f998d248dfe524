"""The 05 benchmark matrix: floors, records, unavailable cells, quoted-figure scaling."""
import pytest
import torch

from labkit import models, pipeline


def test_kv_bytes_and_floor():
    cfg = models.PRESETS["llama2-7b-shape"].to_config()
    # 7B: K and V, 32 layers, 32 KV heads x 128 dims, bf16 -> 512 KiB per cached token
    assert pipeline.kv_bytes_per_step(cfg, 1, 1, 2) == 2 * 32 * 32 * 128 * 2
    assert pipeline.kv_bytes_per_step(cfg, 100, 4, 2) == 400 * 2 * 32 * 32 * 128 * 2
    assert pipeline.decode_floor_ms(13_000_000_000, 0, 4e12) == pytest.approx(3.25)


def test_matrix_records_and_unavailable_cells():
    recs = pipeline.run_matrix("tiny-llama-shape", quants=("none",), attns=("sdpa", "flash_attention_2"),
                               prompt_len=16, new_tokens=12, read_bw=1e11, iters=2, log=lambda *a: None)
    assert len(recs) == 2
    sdpa, flash = recs
    model, _ = models.load("tiny-llama-shape")
    assert sdpa["weight_bytes"] == models.weight_bytes(model)
    kv = pipeline.kv_bytes_per_step(model.config, 16 + 6, 1, model.dtype.itemsize)  # fp32 on CPU, bf16 on GPU
    assert sdpa["kv_bytes_per_step"] == kv
    assert sdpa["weight_bytes_read"] == pipeline.step_weight_bytes(model) <= sdpa["weight_bytes"]
    assert sdpa["floor_ms"] == pytest.approx((sdpa["weight_bytes_read"] + kv) / 1e11 * 1e3)
    assert sdpa["ttft_ms"] > 0
    if sdpa["status"] == "ok":
        assert sdpa["fraction_of_floor"] == pytest.approx(sdpa["floor_ms"] / sdpa["decode_ms_per_token"])
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in flash["status"]  # the real LabkitError from labkit.models
    assert "tiny-llama-shape" in pipeline.table(recs)


def test_quoted_comparison_scales_by_bandwidth():
    rec = {"model": "llama2-7b-shape", "quant": "none", "attn": "sdpa", "batch": 1, "status": "ok",
           "random_weights": True, "weight_bytes": 13.5e9, "decode_ms_per_token": 20.0, "tokens_per_s": 50.0,
           "floor_ms": 3.2}
    rows = pipeline.quoted_comparison([rec], read_bw=2 * pipeline.A100_40GB_BW)
    fp16 = rows[0]
    assert fp16["predicted_ms_here"] == pytest.approx(12.4 / 2)
    assert fp16["ratio_ours_to_predicted"] == pytest.approx(20.0 / 6.2)
    assert fp16["quoted_fraction_of_a100_floor"] == pytest.approx(14.2e9 / pipeline.A100_40GB_BW * 1e3 / 12.4)
    assert "ours_ms_per_token" not in rows[1]  # no int8 record given


def test_skipped_cells_carry_their_reason():
    recs = pipeline.run_matrix("tiny-llama-shape", quants=("none",), attns=("eager",), read_bw=1e11,
                               skip={("none", "eager"): "not run: reason"}, log=lambda *a: None)
    assert recs == [{**{k: recs[0][k] for k in ("model", "label", "random_weights", "quant", "dtype", "attn", "batch")},
                     "status": "not run: reason"}]
    assert "ttft_ms" not in recs[0]


def test_matrix_loads_each_model_once_and_releases_it(monkeypatch):
    """The flash-attention cell checks the request on the model in hand (no second load), and the model of one
    quantization is freed before the next one is loaded."""
    import weakref

    loads, alive_at_load, alive = [], [], []
    real_load = models.load

    def counting_load(*a, **k):
        loads.append(k.get("attn"))
        alive_at_load.append(sum(r() is not None for r in alive))
        m, t = real_load(*a, **k)
        alive.append(weakref.ref(m))
        return m, t

    monkeypatch.setattr(models, "load", counting_load)
    recs = pipeline.run_matrix("tiny-llama-shape", quants=("none", "none"), attns=("sdpa", "flash_attention_2"),
                               prompt_len=8, new_tokens=3, read_bw=1e11, iters=1, log=lambda *a: None)
    assert len(recs) == 4 and loads == ["sdpa", "sdpa"], loads
    assert alive_at_load == [0, 0], "the previous model was still alive when the next one was loaded"
    assert all(r() is None for r in alive)
