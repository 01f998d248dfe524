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
