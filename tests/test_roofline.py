import pytest

from labkit import models, roofline

LLAMA7B = models.PRESETS["llama2-7b-shape"]
SMOL = models.PRESETS["smollm2-135m-shape"]


def test_7b_hand_numbers():
    # 32 layers x (4 * 4096^2 + 3 * 4096 * 11008) + 4096 * 32000 (head) = 6.607e9 matmul parameters
    assert roofline.linear_params(LLAMA7B) == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    # fp16 weights: 2 bytes each of 6.74e9 parameters = 13.5 GB
    assert roofline.weight_bytes(LLAMA7B.n_params(), 16) == pytest.approx(13.48e9, rel=1e-3)
    # K and V, 32 layers, 32 heads x 128 dims, fp16: 2*32*4096*2 = 512 KiB per token
    assert roofline.kv_bytes_per_token(LLAMA7B) == 2 * 32 * 4096 * 2 == 524288


def test_smollm2_kv_and_group_bits():
    assert roofline.kv_bytes_per_token(SMOL, 2) == 2 * 30 * 3 * 64 * 2
    assert roofline.bits_per_weight(4, 128) == pytest.approx(4.125)
    assert roofline.bits_per_weight(4, 64, 16, 16) == pytest.approx(4.5)
    assert roofline.weight_bytes(1024, 4, group_size=128) == 1024 / 2 + 8 * 2


def test_prefill_flops_causal_halves_attention():
    full = roofline.prefill_flops(SMOL, 1000, causal=False)
    causal = roofline.prefill_flops(SMOL, 1000, causal=True)
    attn = 4 * 30 * 9 * 64 * 1000**2
    assert full - causal == pytest.approx(attn / 2)
    assert causal == pytest.approx(2 * roofline.linear_params(SMOL) * 1000 + attn / 2)


def test_decode_floor():
    f = roofline.decode_floor(13.48e9, 1.555e12, kv_bytes_per_tok=524288, context=1000, batch=2)
    assert f.bytes_per_step == pytest.approx(13.48e9 + 2 * 1000 * 524288)
    assert f.ms == pytest.approx(f.bytes_per_step / 1.555e12 * 1e3)
    assert roofline.implied_bandwidth(14e9, 0.012) == pytest.approx(1.1667e12, rel=1e-3)


def test_one_kv_formula_everywhere():
    """pipeline and fastgen count the KV bytes with roofline.kv_bytes: same numbers for the same shape."""
    import torch

    from labkit import fastgen, pipeline

    cfg = models.PRESETS["tiny-llama-shape"].to_config()
    model, _ = models.load("tiny-llama-shape", device="cpu")
    fast = fastgen.FastLlama(model, max_seq_len=64)
    want = roofline.kv_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, roofline.head_dim(cfg), 40, 3, 4)
    assert pipeline.kv_bytes_per_step(cfg, 40, 3, 4) == want
    assert fast.kv_bytes_per_step(40, 3) == want and model.dtype == torch.float32
    assert roofline.kv_bytes_per_token(cfg, 4) * 40 * 3 == want
    assert pipeline.decode_floor_ms(3e9, 1e9, 4e12) == roofline.decode_floor(3e9, 4e12, 1e9, 1).ms == pytest.approx(1.0)


def test_embedding_rule():
    """An untied table is stored but not read by a decode step; a tied one is the LM head and is read."""
    emb = LLAMA7B.vocab_size * LLAMA7B.hidden_size * 2
    stored = roofline.weight_bytes(LLAMA7B.n_params(), 16)
    read = roofline.step_weight_bytes(stored, emb, tied=False)
    assert read == stored - emb
    assert roofline.step_weight_bytes(stored, emb, tied=True) == stored
    # what a step reads is the matmul weights (LM head included) and the norms
    norms = (2 * LLAMA7B.num_hidden_layers + 1) * LLAMA7B.hidden_size * 2
    assert read == pytest.approx(roofline.weight_bytes(roofline.linear_params(LLAMA7B), 16) + norms)


def test_pipeline_floor_leaves_out_an_untied_table():
    from labkit import pipeline

    model, _ = models.load("tiny-llama-shape", device="cpu")
    emb = model.get_input_embeddings().weight
    tied = emb.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    expect = models.weight_bytes(model) - (0 if tied else emb.numel() * emb.element_size())
    assert pipeline.step_weight_bytes(model) == expect


def test_fixed_plus_stream_recovers_a_known_cost_and_refuses_what_it_cannot_fit():
    """Runs made from 4 us + bytes at 2 TB/s give back 4 us and 2 TB/s; 1% of noise on one run moves the fit a little
    and shows as that run's residual; too few runs, one size only, or times that do not grow with the bytes are
    refused with the reason."""
    sizes = [8e6, 27e6, 48e6, 70e6]
    exact = [4e-6 + b / 2e12 for b in sizes]
    fit = roofline.fixed_plus_stream(sizes, exact)
    assert abs(fit.fixed_s - 4e-6) < 1e-12 and abs(fit.rate_Bps / 2e12 - 1) < 1e-9 and fit.max_rel_residual < 1e-9
    assert abs(fit.seconds(100e6) - (4e-6 + 50e-6)) < 1e-12
    noisy = list(exact)
    noisy[1] *= 1.01
    fit = roofline.fixed_plus_stream(sizes, noisy)
    assert 0.002 < fit.max_rel_residual < 0.01 and abs(fit.rate_Bps / 2e12 - 1) < 0.02
    assert max(range(4), key=lambda i: abs(fit.rel_residuals[i])) == 1
    with pytest.raises(ValueError, match="three runs"):
        roofline.fixed_plus_stream(sizes[:2], exact[:2])
    with pytest.raises(ValueError, match="two different"):
        roofline.fixed_plus_stream([8e6] * 3, exact[:3])
    with pytest.raises(ValueError, match="do not grow"):
        roofline.fixed_plus_stream(sizes, exact[::-1])
    with pytest.raises(ValueError, match="positive"):
        roofline.fixed_plus_stream(sizes, [0.0] + exact[1:])
