"""GPTQ weights (labkit.gptq) served by the fast decode loop: codes taken exactly, the Triton path (the interpreter on
a CPU, fp32) against dequantize-then-matmul on real SmolLM2 weights.

Under the interpreter a decode step of the whole SmolLM2 takes minutes, so these tests cut it: its first decoder
layer and the first 4096 rows of its (tied) embedding, every weight the real one. That is no longer a good language
model, but its logits are as peaked as real weights make them; on random weights they are nearly flat and any
rounding flips the argmax, which makes token checks meaningless.
"""
import pytest
import torch

from labkit import evaluate, fastgen, gptq, models
from labkit.env import LabkitError
from labkit.kernels import wo_matmul as wo

N_LAYERS, VOCAB = 1, 4096
TEXT = ("The cat sat on the mat. The dog ran in the park, and the children played with a red ball until the sun "
        "went down over the hills.")


@pytest.fixture(scope="module")
def smol(smollm2):
    """SmolLM2-135M cut to 1 layer and 4096 tokens (fp32, CPU), and a token stream of TEXT inside that vocabulary."""
    from transformers import LlamaForCausalLM

    full, tok = smollm2  # the session's copy: its weights are copied into the cut model below, never changed
    cfg = full.config.to_dict()
    cfg.update(num_hidden_layers=N_LAYERS, vocab_size=VOCAB)
    cfg.pop("layer_types", None)
    config = type(full.config).from_dict(cfg)
    model = LlamaForCausalLM(config).eval()
    sd = {k: v for k, v in full.state_dict().items() if not k.startswith("model.layers.")
          or int(k.split(".")[2]) < N_LAYERS}
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:VOCAB]
    sd["lm_head.weight"] = sd.get("lm_head.weight", full.lm_head.weight)[:VOCAB]
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    ids = ids[ids < VOCAB][:24]
    assert ids.numel() >= 20
    del full
    return model, ids


def _pin_big_blocks(fast):
    """Large-block GEMV configs for every weight shape of the step: a few interpreter programs per GEMV."""
    lw = fast.layers[0]
    for w, silu, part in ((lw.wqkv, False, False), (lw.wo, False, True), (lw.w13, False, False),
                          (lw.w2, True, True), (fast.lm_head, False, False)):
        cfg = wo.GemvConfig(1024, 2048, 4) if isinstance(w, wo.WordWeight) else wo.GemvConfig(1024, 1024, 4, "acc")
        wo.pin_config(w, cfg, M=1, dtype=fast.dtype, silu_gate_up=silu, partials=part)


def _gptq_model(model, ids, bits=4, groupsize=128, sym=False):
    import copy

    q = copy.deepcopy(model)
    calib = ids[None, :16].repeat(2, 1)
    gptq.gptq_quantize_model(q, calib, bits, groupsize, actorder=True, sym=sym, progress=False)
    return q


@pytest.fixture(scope="module")
def smol_gptq(smol):
    model, ids = smol
    return _gptq_model(model, ids), ids


def test_gptq_codes_are_served_exactly(smol_gptq):
    """Every stacked weight of FastLlama dequantizes to QuantLinear's weights bit for bit (K = 576 = 4 x 128 + 64:
    a ragged last group), in the int4 layout of each kernel set; the LM head stays unquantized."""
    qmodel, _ = smol_gptq
    ref = fastgen.FastLlama(qmodel, weights="int4", kernels="torch", max_seq_len=32)
    fast = fastgen.FastLlama(qmodel, weights="int4", kernels="triton", max_seq_len=32)
    assert ref.prequantized and isinstance(fast.layers[0].wqkv, wo.WordWeight)
    for li, layer in enumerate(qmodel.model.layers):
        a, m = layer.self_attn, layer.mlp
        groups = {"wqkv": (a.q_proj, a.k_proj, a.v_proj), "wo": (a.o_proj,), "w13": (m.gate_proj, m.up_proj),
                  "w2": (m.down_proj,)}
        for name, mods in groups.items():
            want = torch.cat([mod.dequantized_weight(torch.float32) for mod in mods])
            for fl in (ref, fast):
                got = wo.dequantize(getattr(fl.layers[li], name), torch.float32)
                assert torch.equal(got, want), (li, name)
    assert torch.equal(fast.lm_head, qmodel.lm_head.weight)
    with pytest.raises(LabkitError, match="already quantized"):
        fastgen.FastLlama(qmodel, weights="bf16")
    with pytest.raises(LabkitError, match="int8"):
        fastgen.FastLlama(qmodel, weights="int8")  # asymmetric 4-bit codes are not int8


def test_gptq_triton_perplexity_and_tokens(smol_gptq):
    """Perplexity of the Triton decode path over 8 tokens = the dequantize-then-matmul model's (HF forward with
    QuantLinear) within 1e-4 relative in fp32 (only the summation order differs); the argmax at every position and
    the greedy tokens are the same."""
    qmodel, ids = smol_gptq
    ids = ids[:8]
    fast = fastgen.FastLlama(qmodel, weights="int4", kernels="triton", max_seq_len=16)
    _pin_big_blocks(fast)
    ppl_ref = evaluate.perplexity(qmodel, ids, ctx_len=ids.numel(), stride=ids.numel() - 1)
    logits = fastgen.decode_logits(fast, ids[None])[0]  # (T, V)
    ppl_fast = torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).exp().item()
    assert abs(ppl_fast / ppl_ref - 1) < 1e-4, (ppl_fast, ppl_ref)
    with torch.no_grad():
        ref_logits = qmodel(ids[None]).logits[0].float()
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    prompt = ids[None, :6]
    ref = fastgen.FastLlama(qmodel, weights="int4", kernels="torch", max_seq_len=16).generate(prompt, 3)
    assert torch.equal(fast.generate(prompt, 3), ref)
    assert torch.equal(ref, fastgen.hf_greedy(qmodel, prompt, 3))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_own_quantization_triton_tokens_on_real_weights(smol, fmt):
    """FastLlama's own int8 (per channel) and int4 (group 128, ragged at K = 576) weights: the Triton step's greedy
    tokens equal those of the torch dequantize-then-matmul step on real weights."""
    model, ids = smol
    prompt = ids[None, :6]
    ref = fastgen.FastLlama(model, weights=fmt, kernels="torch", max_seq_len=16).generate(prompt, 3)
    fast = fastgen.FastLlama(model, weights=fmt, kernels="triton", max_seq_len=16)
    _pin_big_blocks(fast)
    assert torch.equal(fast.generate(prompt, 3), ref)


def test_symmetric_8bit_codes_map_to_int8(smol):
    """8-bit per-channel symmetric QuantLinear codes (zero point 128) become Int8Weight exactly."""
    import copy

    model, _ = smol
    q = copy.deepcopy(model)
    gptq.rtn_quantize_model(q, 8, None, sym=True)
    fast = fastgen.FastLlama(q, weights="int8", kernels="torch", max_seq_len=16)
    a = q.model.layers[0].mlp.down_proj
    assert isinstance(fast.layers[0].w2, wo.Int8Weight)
    assert torch.equal(wo.dequantize(fast.layers[0].w2, torch.float32), a.dequantized_weight(torch.float32))
    with pytest.raises(LabkitError, match="int4"):
        fastgen.FastLlama(q, weights="int4")
    asym = copy.deepcopy(model)
    gptq.rtn_quantize_model(asym, 8, None, sym=False)
    with pytest.raises(LabkitError, match="symmetric"):
        fastgen.FastLlama(asym, weights="int8")


def test_decode_perplexity_input_checks(smol):
    model, ids = smol
    fast = fastgen.FastLlama(model, kernels="torch", max_seq_len=8)
    with pytest.raises(ValueError):
        fastgen.decode_perplexity(fast, ids[:1])
    with pytest.raises(LabkitError, match="max_seq_len"):
        fastgen.decode_perplexity(fast, ids[:12])
