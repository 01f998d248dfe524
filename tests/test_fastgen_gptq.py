"""GPTQ weights (labkit.gptq) served by the fast decode loop: codes taken exactly, the Triton path (the interpreter on
a CPU, fp32) against dequantize-then-matmul on real SmolLM2 weights; on a GPU, the compiled Triton path in bf16
against an fp32 dequantization of the same codes.

Under the interpreter a decode step of the whole SmolLM2 takes minutes, so these tests cut it: its first decoder
layer and the first 4096 rows of its (tied) embedding, every weight the real one. That is no longer a good language
model, but its logits are as peaked as real weights make them; on random weights they are nearly flat and any
rounding flips the argmax, which makes token checks meaningless. The interpreter runs only where no GPU is visible
(``labkit.kernels`` sets TRITON_INTERPRET=1 before Triton is imported), so those tests skip on a GPU.
"""
import pytest
import torch

from labkit import env, evaluate, fastgen, gptq, models
from labkit.env import LabkitError
from labkit.kernels import wo_matmul as wo

N_LAYERS, VOCAB = 1, 4096
# bf16 against an fp32 dequantization of the same codes (test_own_quantization_on_gpu_against_fp32_dequant): the
# Triton path's RMS logit error may be this many times the torch reference's, and either may change the argmax only
# where fp32's top-2 gap is below NEAR_TIE_RMS times the reference's RMS error. In a CPU emulation of the two GEMVs
# (the fused attention and RMSNorm kernels not emulated) the ratio was 0.88 (int8) and 1.23 (int4); emulated kernel
# bugs (a 64-column chunk of K skipped, the scale of the next row, the ragged group's zero point taken from the group
# before) gave 31x to 69x; argmax changes of the correct paths came at fp32 gaps of 0.005 to 0.08 logits, with
# RMS errors of 0.13 to 0.17
TRITON_RMS_FACTOR, NEAR_TIE_RMS = 3.0, 3.0
TEXT = ("The cat sat on the mat. The dog ran in the park, and the children played with a red ball until the sun "
        "went down over the hills.")


# labkit.kernels (imported above) has set TRITON_INTERPRET=1 by now if no GPU is visible
interpreter_only = pytest.mark.skipif(
    not fastgen._interpreting(), reason="Triton kernels on CPU tensors need the interpreter (TRITON_INTERPRET=1, set "
    "only without a GPU); on a GPU test_own_quantization_on_gpu_against_fp32_dequant checks the compiled kernels")


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


@interpreter_only
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


@interpreter_only
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


@interpreter_only
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_own_quantization_triton_tokens_on_real_weights(smol, fmt):
    """FastLlama's own int8 (per channel) and int4 (group 128, ragged at K = 576) weights: the Triton step's greedy
    tokens equal those of the torch dequantize-then-matmul step on real weights. In fp32 the reference's
    dequantized weights are the codes times the scales to 24 bits, so it is the fp32 dequantization the GPU test
    compares against; in bf16 it is not (see test_own_quantization_on_gpu_against_fp32_dequant)."""
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
        fastgen.FastLlama(q, weights="int4", kernels="torch")
    asym = copy.deepcopy(model)
    gptq.rtn_quantize_model(asym, 8, None, sym=False)
    with pytest.raises(LabkitError, match="symmetric"):
        fastgen.FastLlama(asym, weights="int8", kernels="torch")


def test_decode_perplexity_input_checks(smol):
    model, ids = smol
    fast = fastgen.FastLlama(model, kernels="torch", max_seq_len=8)
    with pytest.raises(ValueError):
        fastgen.decode_perplexity(fast, ids[:1])
    with pytest.raises(LabkitError, match="max_seq_len"):
        fastgen.decode_perplexity(fast, ids[:12])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_own_quantization_on_gpu_against_fp32_dequant(fmt):
    """The compiled Triton step in bf16 on the whole real SmolLM2, and the torch dequantize-then-matmul step, both
    against an fp32 dequantization of the same codes (``FastLlama.dequantized``), teacher-forced along the fp32
    model's greedy continuation.

    The two bf16 paths need not agree token for token (int8 on an H200 parted after 7 of 32 greedy tokens): the
    torch path rounds every dequantized weight ``code * scale`` to bf16's 8 significant bits (most int8 products
    need more, fewer int4 ones), the Triton GEMV multiplies the exact codes in fp32 and scales the sum, and both
    round every activation to bf16. Each is one bf16 rounding of the fp32 computation, and the activation
    rounding, which they share in kind, moves the logits about as much as the weight rounding does (a CPU
    emulation of both paths: RMS 0.13 to 0.17 logits against fp32, either one closer), so which path lands
    nearer fp32 is chance, and a greedy continuation parts at the first near-tie. What can be demanded:

    - the Triton logits are within TRITON_RMS_FACTOR x the reference's RMS distance from fp32 (a wrong scale,
      zero point, sign or K range moves them by whole logits);
    - wherever either path's argmax differs from fp32's, fp32's top-2 gap there is below NEAR_TIE_RMS x the
      reference's RMS distance: a near-tie that a rounding-sized difference can turn.
    """
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, tok = models.load("smollm2-135m", device="cuda", dtype=torch.bfloat16)
    prompt = tok("The three primary colours are", return_tensors="pt").input_ids.cuda()
    P, n = prompt.shape[1], 32
    ref = fastgen.FastLlama(model, weights=fmt, kernels="torch", max_seq_len=P + n + 1)
    fast = fastgen.FastLlama(model, weights=fmt, kernels="triton", max_seq_len=P + n + 1)
    pairs = [(getattr(a, k), getattr(b, k)) for a, b in zip(ref.layers, fast.layers) for k in ("wqkv", "wo", "w13", "w2")]
    for a, b in pairs + [(ref.lm_head, fast.lm_head)]:  # the same codes in both layouts
        assert torch.equal(wo.dequantize(a, torch.float32), wo.dequantize(b, torch.float32))
    exact = ref.dequantized(torch.float32)
    seq = torch.cat([prompt, exact.generate(prompt, n, use_graph=False)], dim=1)  # (1, P + n)
    logits = {name: fastgen.decode_logits(fl, seq[:, :-1])[0, P - 1:]  # (n, V): predictions of the n new tokens
              for name, fl in (("fp32", exact), ("torch_bf16", ref), ("triton", fast))}
    r = fastgen.logit_agreement(logits["fp32"], logits["torch_bf16"])
    t = fastgen.logit_agreement(logits["fp32"], logits["triton"])
    greedy = {"torch_bf16": ref.generate(prompt, n, use_graph=False), "triton": fast.generate(prompt, n)}

    def prefix(a, b):
        return int((a == b).long().cumprod(dim=1).sum())

    print(f"{fmt}: fp32 top-2 gap min {r['min_gap']:.4f}, median {r['median_gap']:.3f} over {n} positions; "
          f"against fp32, torch bf16: rms {r['rms']:.4f} max {r['max_abs']:.3f} flips {r['flips']} at gaps "
          f"{[round(g, 4) for g in r['flip_gaps']]}; triton: rms {t['rms']:.4f} max {t['max_abs']:.3f} flips "
          f"{t['flips']} at gaps {[round(g, 4) for g in t['flip_gaps']]}; greedy prefixes of {n}: triton vs torch bf16 "
          f"{prefix(greedy['triton'], greedy['torch_bf16'])}, triton vs fp32 {prefix(greedy['triton'], seq[:, P:])}, "
          f"torch bf16 vs fp32 {prefix(greedy['torch_bf16'], seq[:, P:])}")
    assert r["rms"] > 0 and t["rms"] > 0  # bf16 paths: the rounding must show, or the comparison compared nothing
    assert t["rms"] <= TRITON_RMS_FACTOR * r["rms"], (fmt, t, r)
    for res in (t, r):
        assert all(g < NEAR_TIE_RMS * r["rms"] for g in res["flip_gaps"]), (fmt, res, r["rms"])


def test_gpu_issue14_gptq_json_is_checked(tmp_path):
    """scripts/gpu_issue14.py --gptq-json: decode.json takes the GPTQ figures of an earlier gptq step only at the same
    commit, only into a run with a decode step and no gptq step of its own; anything else ends the run with one line
    (before any GPU is asked for)."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    script = env.repo_root() / "scripts" / "gpu_issue14.py"
    spec = importlib.util.spec_from_file_location("gpu_issue14", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    good = tmp_path / "gptq.json"
    good.write_text(json.dumps({"meta": {"git_commit": "abc1234", "utc": "2026-12-04T20:00:00Z", "device": "X"},
                                "summary": {"gptq_int4_ppl_vs_reference": 1.003}, "records": []}))
    summary, meta = mod._read_gptq(good, "abc1234", "decode")
    assert summary["gptq_int4_ppl_vs_reference"] == 1.003 and meta["git_commit"] == "abc1234"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"meta": {"git_commit": "abc1234"}, "summary": {"fraction_of_floor": {}}}))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cases = [(good, "abc1234", "gptq,decode", "no gptq step of this run"),
             (good, "abc1234", "attention", "goes with a decode step"),
             (good, "fff0000", "decode", "measured at commit 'abc1234'"),
             (good, None, "decode", "pass --commit"),
             (other, "abc1234", "decode", "not a gptq step's output"),
             (bad, "abc1234", "decode", "cannot read it as JSON"),
             (tmp_path / "missing.json", "abc1234", "decode", "cannot read it as JSON")]
    for path, commit, steps, message in cases:
        with pytest.raises(ValueError, match=message):
            mod._read_gptq(path, commit, steps)
    args = [sys.executable, str(script), "--out", str(tmp_path / "o"),
            "--steps", "decode", "--commit", "fff0000", "--gptq-json", str(good)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(env.repo_root())))
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --gptq-json") and "abc1234" in lines[0], res.stdout
