"""labkit.quant: formats, quantize/dequantize pairs, NF4 against bitsandbytes, FP8 against torch, metrics."""
import math

import pytest
import torch

from labkit import quant as Q


def test_int_range():
    assert Q.int_range(8, symmetric=True) == (-127, 127)
    assert Q.int_range(4, symmetric=False) == (0, 15)
    with pytest.raises(ValueError):
        Q.int_range(1, True)


def test_absmax_hand_computed():
    x = torch.tensor([[0.5, -1.0, 0.26, 0.0]])
    q, scale = Q.absmax_quantize(x, bits=3)  # qmax = 3, scale = 1/3
    assert scale.shape == (1, 1) and math.isclose(float(scale), 1 / 3, rel_tol=1e-6)
    assert q.tolist() == [[2, -3, 1, 0]]  # 1.5 -> 2 (half to even), -3, 0.78 -> 1, 0
    assert torch.allclose(Q.absmax_dequantize(q, scale), torch.tensor([[2 / 3, -1.0, 1 / 3, 0.0]]))


def test_zeropoint_hand_computed():
    x = torch.tensor([[-1.0, 0.4, 1.6, 2.0]])
    q, scale, zero = Q.zeropoint_quantize(x, bits=2)  # range [-1, 2] in 3 steps: scale 1, zero round(1/1) = 1
    assert math.isclose(float(scale), 1.0) and float(zero) == 1.0
    assert q.tolist() == [[0, 1, 3, 3]]  # round(x) + 1
    assert Q.zeropoint_dequantize(q, scale, zero).tolist() == [[-1.0, 0.0, 2.0, 2.0]]


@pytest.mark.parametrize("gran,gs", [("tensor", None), ("channel", None), ("group", 32), ("group", 48)])
@pytest.mark.parametrize("scheme", ["absmax", "zeropoint"])
def test_round_trip_error_bound(gran, gs, scheme):
    torch.manual_seed(0)
    w = torch.randn(16, 80)
    fq = Q.fake_quant(w, 8, scheme, gran, gs)
    # a round trip moves each value by at most half a step: step = range / levels
    if scheme == "absmax":
        q, s = Q.absmax_quantize(w, 8, gran, gs)
        step = Q.expand_groups(s, 80, gs or 80) if gran != "tensor" else s
    else:
        q, s, z = Q.zeropoint_quantize(w, 8, gran, gs)
        step = Q.expand_groups(s, 80, gs or 80) if gran != "tensor" else s
    assert ((w - fq).abs() <= step / 2 + 1e-6).all()
    assert Q.sqnr_db(w, fq) > 35  # 8 bits: ~6 dB/bit minus the crest factor


def test_finer_granularity_is_better():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-2, 0, 64)[:, None]  # rows of very different scale
    s_tensor = Q.sqnr_db(w, Q.fake_quant(w, 4, "absmax", "tensor"))
    s_chan = Q.sqnr_db(w, Q.fake_quant(w, 4, "absmax", "channel"))
    s_group = Q.sqnr_db(w, Q.fake_quant(w, 4, "absmax", "group", 32))
    assert s_tensor < s_chan < s_group


def test_ragged_groups():
    torch.manual_seed(0)
    w = torch.randn(8, 576)  # 576 = 4 x 128 + 64
    q, s, z = Q.zeropoint_quantize(w, 4, "group", 128)
    assert s.shape == (8, 5)
    # the ragged last group has the scale of its own 64 values
    s_last, _ = Q.zeropoint_params(w[:, 512:], 4, "channel")
    assert torch.allclose(s[:, 4:], s_last)
    with pytest.raises(ValueError):
        Q.zeropoint_dequantize(q, s, z)  # ragged: group_size must be given
    assert torch.allclose(Q.zeropoint_dequantize(q, s, z, 128), Q.fake_quant(w, 4, "zeropoint", "group", 128))


def test_sqnr_grows_about_6db_per_bit():
    torch.manual_seed(0)
    w = torch.rand(256, 256) * 2 - 1  # uniform: the uniform grid's textbook case
    s = [Q.sqnr_db(w, Q.fake_quant(w, b, "absmax", "tensor")) for b in (4, 6, 8)]
    assert 5.0 < (s[1] - s[0]) / 2 < 7.0 and 5.0 < (s[2] - s[1]) / 2 < 7.0


def test_nf4_code_from_normal_quantiles():
    derived = Q.nf4_code_from_normal()
    assert torch.allclose(derived, Q.NF4_CODE, atol=2e-7, rtol=0)
    assert derived[7] == 0 and derived[0] == -1 and derived[-1] == 1


@pytest.mark.parametrize("shape", [(64, 128), (33, 65), (7,), (3, 1000)])
def test_nf4_matches_bitsandbytes_bit_for_bit(shape):
    F = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(1)
    x = torch.randn(shape) * 0.02
    x.view(-1)[0] = 0.3  # an outlier
    packed_ref, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    packed, absmax = Q.nf4_quantize(x, 64)
    assert torch.equal(packed.view(-1), packed_ref.view(-1))
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(Q.nf4_dequantize(packed, absmax, x.shape, 64),
                       F.dequantize_4bit(packed_ref, state, quant_type="nf4", blocksize=64))


def test_nf4_ties_go_low_like_bitsandbytes():
    mid = float((Q.NF4_CODE[8] + Q.NF4_CODE[9]) / 2)
    x = torch.tensor([1.0, mid, -1.0, 0.0])
    packed, _ = Q.nf4_quantize(x, 64)
    assert packed.view(-1).tolist() == [(15 << 4) | 8, (0 << 4) | 7]


def test_codebook_fast_equals_reference():
    torch.manual_seed(0)
    x = torch.rand(10000) * 2.2 - 1.1
    for code in (Q.NF4_CODE, Q.log_grid(4), Q.uniform_grid(3)):
        assert torch.equal(Q.codebook_quantize(x, code), Q.codebook_quantize_reference(x, code))


def test_log_grid():
    g = Q.log_grid(3)
    assert g.tolist() == [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]


def test_fp8_reference_rounding_equals_torch_cast():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(50000) * 50, torch.randn(50000) * 0.003, torch.tensor([0.0, 448.0, -448.0])])
    x = x.clamp(-448, 448)
    assert torch.equal(Q.round_to_e4m3_reference(x), x.to(torch.float8_e4m3fn).float())


def test_fp8_values_and_roundtrip():
    v = Q.fp8_e4m3_values()
    assert v.numel() == 254 and v.max() == 448 and v[v > 0].min() == 2.0 ** -9
    w = torch.randn(32, 64)
    q, s = Q.fp8_quantize(w, "channel")
    assert q.dtype == torch.float8_e4m3fn
    assert Q.sqnr_db(w, Q.fp8_dequantize(q, s)) > 25  # 3 mantissa bits: ~ 30 dB on Gaussian data


def test_static_vs_dynamic_activation_scales():
    torch.manual_seed(0)
    calib = torch.randn(64, 32)
    s = Q.static_act_scale(calib, 8)
    assert math.isclose(s, float(calib.abs().max()) / 127, rel_tol=1e-6)
    x = torch.randn(8, 32) * 4  # larger than anything calibrated: static clips, dynamic adapts
    err_static = Q.mse(x, Q.static_act_fake_quant(x, s))
    err_dynamic = Q.mse(x, Q.dynamic_act_fake_quant(x))
    assert err_dynamic < err_static


def test_quantlinear_and_replace_linear():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(5, 64)
    y = model(x)
    n = Q.replace_linear(model, lambda name, lin: Q.QuantLinear.from_linear(lin, 8, 16), skip=())
    assert n == 2 and isinstance(model[0], Q.QuantLinear)
    assert Q.sqnr_db(y, model(x)) > 30
    assert math.isclose(model[0].bits_per_weight, 8 + 24 / 16)
    with pytest.raises(ValueError):
        Q.replace_linear(model, lambda name, lin: lin)  # nothing left to replace


@pytest.mark.parametrize("cols, group", [(576, 128), (256, 64), (96, None), (70, 32)])
def test_quantlinear_weight_matches_reference_bit_for_bit(cols, group):
    # the fast dequantization (scale and zero broadcast over groups, ragged last group padded) against the reference
    torch.manual_seed(0)
    lin = torch.nn.Linear(cols, 48)
    ql = Q.QuantLinear.from_linear(lin, 4, group)
    ref = Q.zeropoint_dequantize(ql.q, ql.scale, ql.zero, ql.group_size)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(ql.dequantized_weight(dtype), ref.to(dtype))
    assert ql.dequantized_weight().shape == (48, cols)


def test_bad_granularity_raises():
    with pytest.raises(ValueError, match="granularity"):
        Q.absmax_quantize(torch.randn(4, 4), 8, "row")
    with pytest.raises(ValueError, match="2-D"):
        Q.absmax_quantize(torch.randn(4, 4, 4), 8, "channel")


def test_kv_quantize_round_trip_per_token():
    x = torch.randn(2, 3, 50, 64) * torch.logspace(-2, 2, 50)[None, None, :, None]   # tokens of very different size
    q, scale = Q.kv_quantize(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (2, 3, 50, 1)
    y = Q.kv_dequantize(q, scale)
    # per-token scales keep every token's relative error at int8 level, small tokens included
    rel = ((y - x).norm(dim=-1) / x.norm(dim=-1)).max().item()
    assert rel < 0.02
    assert Q.sqnr_db(x, y) > 35


@pytest.mark.parametrize("x, pos, code", [
    # a partial last block: bitsandbytes divides by the absmax there -> code 4 (multiplying gives 3)
    ([1.0] * 64 + [3.0, -1.019038200378418], 65, 4),
    # the same pair in a full block: bitsandbytes multiplies by 1/absmax -> code 3
    ([3.0, -1.019038200378418] + [1.0] * 62, 1, 3),
])
def test_nf4_near_tie_in_full_and_partial_blocks(x, pos, code):
    x = torch.tensor(x)
    packed, _ = Q.nf4_quantize(x, 64)
    byte = int(packed.reshape(-1)[pos // 2])
    assert (byte >> 4 if pos % 2 == 0 else byte & 15) == code
    F = pytest.importorskip("bitsandbytes.functional")
    ref, _ = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert torch.equal(packed.reshape(-1), ref.reshape(-1))  # the installed bitsandbytes, bit for bit
