"""The fast decode loop produces HF generate's greedy tokens; its fused Triton ops match the torch references."""
import pytest
import torch

from labkit import env, fastgen, models
from labkit.env import LabkitError
from labkit.kernels import wo_matmul as wo


@pytest.fixture(scope="module")
def tiny():
    model, _ = models.load("tiny-llama-shape", device="cpu", dtype=torch.float32)  # random weights, fp32
    return model


def test_tiny_random_model_matches_hf_generate(tiny):
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    fast = fastgen.FastLlama(tiny, max_seq_len=64, max_batch=2)
    res = fastgen.compare_with_hf(tiny, fast, ids, 16)
    assert res["all_equal"], res
    assert max(r["hf_len"] for r in res["rows"]) >= 8  # the check covered real decode steps, not an early EOS
    # fp32: our logits differ from HF's by no more than HF's incremental decode differs from its own prefill
    assert res["rel_logit_diff"] <= max(4 * res["hf_self_rel_logit_diff"], 1e-5), res


def test_quantized_formats_run_and_stay_close(tiny):
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    ref = fastgen.FastLlama(tiny, max_seq_len=32).prefill(ids)
    for fmt, tol in (("int8", 0.02), ("int4", 0.3)):
        out = fastgen.FastLlama(tiny, weights=fmt, max_seq_len=32, group=64).prefill(ids)
        rel = ((out - ref).abs().max() / ref.abs().max()).item()
        assert rel < tol, (fmt, rel)


def test_dequantized_copy_is_the_torch_path_in_another_dtype(tiny):
    """FastLlama.dequantized(fp32) of an fp32 int8 build: dense weights equal to what the torch path dequantizes on
    every call, so its logits are bit for bit the build's; its own cache (the build's stays untouched)."""
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(4))
    fast = fastgen.FastLlama(tiny, weights="int8", max_seq_len=16)
    ref = fast.dequantized(torch.float32)
    assert ref.k_cache is not fast.k_cache and isinstance(ref.layers[0].w2, torch.Tensor)
    ta, la = fast.generate(ids, 4, return_logits=True)
    tb, lb = ref.generate(ids, 4, return_logits=True)
    assert torch.equal(ta, tb) and all(torch.equal(a, b) for a, b in zip(la, lb))
    r64 = fast.dequantized(torch.float64)
    assert r64.dtype == torch.float64 and r64.layers[0].wqkv.dtype == torch.float64
    l64 = r64.prefill(ids)
    assert l64.dtype == torch.float64 and torch.allclose(l64.float(), la[0], rtol=1e-4, atol=1e-4)


def test_logit_agreement():
    ref = torch.tensor([[3.0, 1.0, 0.0], [2.0, 1.9, 0.0], [0.0, 5.0, 1.0]])
    out = torch.tensor([[3.0, 1.0, 0.5], [1.8, 2.0, 0.0], [0.0, 5.0, 1.0]])
    a = fastgen.logit_agreement(ref, out)
    assert a["flips"] == [1] and a["top1_agree"] == 2 and a["positions"] == 3
    assert a["flip_gaps"] == pytest.approx([0.1]) and a["min_gap"] == pytest.approx(0.1)
    assert a["max_abs"] == pytest.approx(0.5) and a["rms"] == pytest.approx(((0.25 + 0.04 + 0.01) / 9) ** 0.5)
    with pytest.raises(ValueError):
        fastgen.logit_agreement(ref, out[:2])


def test_pinned_gemv_configs(monkeypatch):
    """pin_gemv_configs sets the config of each of the step's five GEMVs (what capture() then keeps)."""
    monkeypatch.setattr(wo, "_TUNED", {})
    model, _ = models.load("tiny-llama-shape", dtype=torch.float16)  # on the GPU if there is one
    fast = fastgen.FastLlama(model, weights="int8", kernels="triton", max_seq_len=16)
    names = [c[0] for c in fast.gemv_calls()]
    assert names == ["wqkv", "wo", "w13", "w2", "lm_head"] and set(fast.gemv_configs()) == set(names)
    cfgs = {name: wo.GemvConfig(8, 1024, 4, split=i % 2 + 1) for i, name in enumerate(names)}
    fast.pin_gemv_configs(cfgs)
    assert fast.gemv_configs() == cfgs and 1 in fast._pinned
    with pytest.raises(LabkitError, match="missing"):
        fast.pin_gemv_configs({"wqkv": cfgs["wqkv"]})


def test_int8_layout_follows_max_batch(monkeypatch):
    """int8 for the Triton kernels: words (WordWeight) for a batch-1 model, row-major (Int8Weight) for a batch, or as
    fastgen.INT8_LAYOUT says; the torch path keeps the row-major codes; an unknown layout is an error."""
    model, _ = models.load("tiny-llama-shape", dtype=torch.float16)

    def layout(**kw):
        return type(fastgen.FastLlama(model, weights="int8", max_seq_len=16, **kw).layers[0].wqkv).__name__

    assert layout(kernels="triton") == "WordWeight" and layout(kernels="triton", max_batch=4) == "Int8Weight"
    assert layout(kernels="torch") == "Int8Weight"
    monkeypatch.setattr(fastgen, "INT8_LAYOUT", "rows")
    assert layout(kernels="triton") == "Int8Weight"
    monkeypatch.setattr(fastgen, "INT8_LAYOUT", "words")
    assert layout(kernels="triton", max_batch=4) == "WordWeight"
    monkeypatch.setattr(fastgen, "INT8_LAYOUT", "columns")
    with pytest.raises(LabkitError, match="INT8_LAYOUT"):
        layout(kernels="triton")


def test_errors(tiny):
    with pytest.raises(LabkitError):
        fastgen.FastLlama(tiny, weights="int3")
    fast = fastgen.FastLlama(tiny, max_seq_len=16)
    with pytest.raises(LabkitError):
        fast.generate(torch.ones(1, 10, dtype=torch.long), 8)  # 10 + 8 > 16


def test_fused_ops_match_references():
    """Triton add+RMSNorm and RoPE + cache write + decode attention vs the torch ops (fp16; interpreter on CPU)."""
    torch.manual_seed(0)
    dev = env.device()  # the kernels run compiled on a GPU, under the interpreter on a CPU
    B, nq, nkv, hd, S = 2, 6, 2, 32, 40
    cfg = fastgen.FastConfig(64, 128, 1, nq, nkv, hd, 10, 1e-5, 10000.0)
    cos, sin = fastgen.rope_tables(cfg, S, torch.float16, dev)
    kc, vc = torch.randn(B, nkv, S, hd, device=dev).half(), torch.randn(B, nkv, S, hd, device=dev).half()
    kc2, vc2 = kc.clone(), vc.clone()
    pos = torch.tensor([21], device=dev)
    qkv = torch.randn(B, (nq + 2 * nkv) * hd, device=dev).half()
    q1 = fastgen.rope_cache_ref(qkv, pos, cos, sin, kc, vc, nq, nkv)
    o = fastgen.rope_attention_triton(qkv, pos, cos, sin, kc2, vc2, nq, nkv)
    # every RoPE product rounded as torch rounds it (the kernel is compiled without FMA contraction): the cache
    # entries it writes are bit for bit the reference's
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert not torch.equal(kc[:, :, 21], torch.zeros_like(kc[:, :, 21]))
    o32 = fastgen.decode_attention_ref(q1.float(), kc.float(), vc.float(), pos, 22)
    err_torch = (fastgen.decode_attention_ref(q1, kc, vc, pos, 22).float() - o32).abs().max().item()
    err = (o.float() - o32).abs().max().item()
    assert err <= 2 * err_torch + 1e-4
    # the fused kernel attends to the position it has just written: with a changed key there, the output moves
    kc3, vc3 = kc.clone(), vc.clone()
    qkv2 = qkv.clone()
    qkv2[:, (nq + nkv) * hd:] += 1.0  # new values at pos only
    o2 = fastgen.rope_attention_triton(qkv2, pos, cos, sin, kc3, vc3, nq, nkv)
    ref2 = fastgen.rope_attention_ref(qkv2, pos, cos, sin, kc.clone(), vc.clone(), nq, nkv, 22)
    assert (o2.float() - ref2.float()).abs().max().item() <= 2 * err_torch + 1e-4
    assert (o2 - o).abs().max().item() > 0.01
    # the static-shape (graph) form of the reference equals the sliced form
    assert torch.equal(fastgen.decode_attention_ref(q1, kc, vc, pos, None), fastgen.decode_attention_ref(q1, kc, vc, pos, 22))
    x, d, w = (torch.randn(B, 64, device=dev).half(), torch.randn(B, 64, device=dev).half(),
               torch.randn(64, device=dev).half())
    x2 = x.clone()
    a = fastgen.add_rmsnorm_ref(x, d, w, 1e-5)
    b = fastgen.add_rmsnorm_triton(x2, d, w, 1e-5)
    assert torch.equal(x, x2)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("nq,nkv,pos,block_l", [(4, 4, 0, 64), (4, 4, 37, 64), (6, 2, 64, 64), (4, 4, 37, 16),
                                                (6, 2, 64, 16)])
def test_rope_attention_one_head_per_kv_head_and_qkv_partials(nq, nkv, pos, block_l, monkeypatch):
    """One query head per KV head (as the 7B shape) and several against the reference, at the first position (no
    cached keys), inside the first block of cache positions, at a block boundary, and (block_l 16) over several
    blocks, the next one in flight while one is used; qkv given as split-K partials gives bit for bit the output and
    cache of its reduced form."""
    monkeypatch.setattr(fastgen, "ATTN_BLOCK_L", block_l)
    torch.manual_seed(2)
    dev = env.device()
    B, hd, S = 2, 32, 80
    cfg = fastgen.FastConfig(64, 128, 1, nq, nkv, hd, 10, 1e-5, 10000.0)
    cos, sin = fastgen.rope_tables(cfg, S, torch.float16, dev)
    kc, vc = torch.randn(B, nkv, S, hd, device=dev).half(), torch.randn(B, nkv, S, hd, device=dev).half()
    p = torch.tensor([pos], device=dev)
    parts = torch.randn(3, B, (nq + 2 * nkv) * hd, device=dev)
    qkv = (parts[0] + parts[1] + parts[2]).half()
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    ref = fastgen.rope_attention_ref(qkv.float(), p, cos.float(), sin.float(), kc.float(), vc.float(), nq, nkv,
                                     pos + 1)
    err_torch = (fastgen.rope_attention_ref(qkv, p, cos, sin, kc.clone(), vc.clone(), nq, nkv, pos + 1).float()
                 - ref).abs().max().item()
    o = fastgen.rope_attention_triton(qkv, p, cos, sin, kc1, vc1, nq, nkv)
    assert (o.float() - ref).abs().max().item() <= 2 * err_torch + 1e-4
    o2 = fastgen.rope_attention_triton(parts, p, cos, sin, kc2, vc2, nq, nkv)
    assert o2.dtype == torch.float16 and torch.equal(o, o2) and torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    with pytest.raises(ValueError, match="qkv"):
        fastgen.rope_attention_triton(parts[:, :, :-1], p, cos, sin, kc2, vc2, nq, nkv)


def test_argmax_next_kernel():
    """The graph step's last kernel: the first index of each row's maximum (ties in one block and across blocks, a
    maximum in the last, ragged block) goes to tok and to out_tokens at pos + 1; nothing else changes."""
    dev = env.device()
    V = 40000  # three blocks of 16384, the last one ragged
    logits = torch.randn(3, V, device=dev).to(torch.bfloat16)
    logits[0, 5] = logits[0, 7] = 9.0  # tie inside one block: the first wins
    logits[1, 100] = logits[1, 20000] = 9.0  # tie across blocks
    logits[2, V - 1] = 9.0  # maximum in the ragged last block
    tok = torch.full((3,), -1, dtype=torch.long, device=dev)
    out = torch.full((3, 12), -1, dtype=torch.long, device=dev)
    pos = torch.tensor([4], device=dev)
    fastgen.argmax_next_triton(logits, tok, pos, out)
    want = logits.argmax(dim=-1)
    assert want.tolist() == [5, 100, V - 1] and torch.equal(tok, want)
    assert torch.equal(out[:, 5], want) and (out[:, :5] == -1).all() and (out[:, 6:] == -1).all()
    assert pos.item() == 4
    with pytest.raises(ValueError, match="long"):
        fastgen.argmax_next_triton(logits, tok.int(), pos, out)


def test_add_rmsnorm_sums_split_partials():
    """delta given as (split, B, H) fp32 partials: summed in split order and rounded, then as with a plain delta."""
    torch.manual_seed(1)
    dev = env.device()
    x = torch.randn(2, 96, device=dev).half()
    parts = torch.randn(3, 2, 96, device=dev)
    w = torch.randn(96, device=dev).half()
    d = (parts[0] + parts[1] + parts[2]).half()
    x1, x2 = x.clone(), x.clone()
    a = fastgen.add_rmsnorm_triton(x1, d, w, 1e-5)
    b = fastgen.add_rmsnorm_triton(x2, parts, w, 1e-5)
    assert torch.equal(x1, x2) and torch.equal(a, b)
    assert not torch.equal(x1, x)
    with pytest.raises(ValueError):
        fastgen.add_rmsnorm_triton(x.clone(), parts[:, :, :64], w, 1e-5)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_triton_loop_matches_torch_loop(weights):
    """The whole step with Triton kernels (interpreter, fp16; int8, int4 on both int4 GEMVs) gives the torch
    loop's tokens."""
    if weights == "int8":
        model, _ = models.load("tiny-llama-shape", dtype=torch.float16)
    else:  # int4 groups of 128 need layers at least 128 wide
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg).to(device=env.device(), dtype=torch.float16).eval()
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(3)).to(model.device)
    a = fastgen.FastLlama(model, weights=weights, kernels="torch", max_seq_len=16).generate(ids, 4)
    fast = fastgen.FastLlama(model, weights=weights, kernels="triton", max_seq_len=16)
    assert torch.equal(a, fast.generate(ids, 4))
    if weights == "int4":  # the same words through the tensor-core kernel (the choice for a batch)
        assert type(fast.layers[0].wqkv).__name__ == "WordWeight"
        fast._lin = lambda x, w, silu=False, use_kernel=False, partials=False: (
            wo.wo_matmul(x, w, silu, wo.GemvConfig(64, 128, 4, "tc")) if use_kernel and isinstance(w, wo.WordWeight)
            else wo.linear(x, w, silu_gate_up=silu, use_kernel=use_kernel))
        assert torch.equal(a, fast.generate(ids, 4))


@pytest.mark.slow
def test_smollm2_matches_hf_generate(smollm2):
    # real weights in fp32 on the CPU (the session's copy), where greedy tokens must agree exactly (bf16 on a GPU:
    # notebook 06)
    model, tok = smollm2
    ids = tok("The three primary colours are", return_tensors="pt").input_ids
    fast = fastgen.FastLlama(model, kernels="torch", max_seq_len=128)
    res = fastgen.compare_with_hf(model, fast, ids, 16)
    assert res["all_equal"] and res["rows"][0]["hf_len"] >= 8, res
    assert res["rel_logit_diff"] < 1e-4, res


@pytest.mark.gpu
def test_graph_replay_matches_eager_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, _ = models.load("smollm2-135m-shape", device="cuda")
    ids = torch.randint(3, 49152, (1, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    fast = fastgen.FastLlama(model, max_seq_len=64)
    _, la = fast.generate(ids, 8, use_graph=True, return_logits=True)
    _, lb = fast.generate(ids, 8, use_graph=False, return_logits=True)
    assert (la[1] - lb[1]).abs().max() == 0  # the same kernels, replayed from the graph or launched one by one


def test_pdl_needs_hopper():
    """Programmatic dependent launch is a Hopper feature: asking for it elsewhere is an error, not a no-op."""
    model, _ = models.load("tiny-llama-shape", dtype=torch.float16)
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        pytest.skip("this GPU supports PDL")
    with pytest.raises(LabkitError, match="compute capability 9.0"):
        fastgen.FastLlama(model, kernels="torch", pdl=True)
    with pytest.raises(LabkitError, match="compute capability 9.0"):
        wo.pdl_kwargs(True, "cpu")
    assert wo.pdl_kwargs(False, "cpu") == {}


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_pdl_graph_gives_the_same_logits(weights):
    """The step launched with programmatic dependent launch (each kernel may start before the previous one
    ends, and waits for its results) computes bit for bit what the serialized launches compute, given the same
    GEMV configs.

    The configs are chosen once (tuned with PDL) and pinned in both builds: left to itself, each build's capture()
    times the candidates again (PDL and non-PDL keys apart), and two timing runs can pick configs with another
    split-K or K step, i.e. another fp32 summation order, so the logits could differ with PDL playing no part. No
    kernel uses atomics, so with equal configs a difference in the bits can only come from PDL itself (a kernel
    reading memory before its wait). The configs the non-PDL build picks by itself are printed beside them."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a GPU of compute capability 9.0+")
    model, _ = models.load("smollm2-135m-shape", device="cuda")
    ids = torch.randint(3, 49152, (1, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    builds = {pdl: fastgen.FastLlama(model, weights=weights, max_seq_len=64, group=64, pdl=pdl) for pdl in (False, True)}
    builds[False].tune(1)
    builds[True].tune(1)
    configs = builds[True].gemv_configs(1)
    own = builds[False].gemv_configs(1)
    print(f"{weights}: tuned with PDL {configs}; tuned without {own}; "
          f"{sum(configs[k] != own[k] for k in configs)} of {len(configs)} GEMVs differ")
    runs = []
    for pdl, fast in builds.items():
        assert fast.pdl is pdl
        fast.pin_gemv_configs(configs, 1)
        runs.append(fast.generate(ids, 12, use_graph=True, return_logits=True))
        assert fast.gemv_configs(1) == configs  # capture() kept the pinned configs
    (ta, la), (tb, lb) = runs
    assert torch.equal(ta, tb)
    assert len(la) == 12 and all(torch.isfinite(a).all() for a in la)
    same = [torch.equal(a, b) for a, b in zip(la, lb)]
    assert all(same), (configs, same, [(a - b).abs().max().item() for a, b in zip(la, lb)])


def test_plot_decode_writes_the_batch1_rows(tmp_path):
    recs = [{"model": "m", "variant": "HF generate", "batch": 1, "decode_ms_per_token": 30.0, "floor_ms": 4.5, "fraction_of_floor": 0.15},
            {"model": "m", "variant": "ours", "batch": 1, "decode_ms_per_token": 4.9, "floor_ms": 4.5, "fraction_of_floor": 0.92},
            {"model": "m", "variant": "ours", "batch": 4, "decode_ms_per_token": 7.6, "floor_ms": 4.6, "fraction_of_floor": 0.6}]
    fastgen.plot_decode(recs, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fastgen.plot_decode(recs[2:], tmp_path / "none.png")  # no batch-1 row: nothing to draw
    assert not (tmp_path / "none.png").exists()


def test_torchao_peer_needs_package_and_gpu():
    """The torchao comparison fails with a one-line reason without torchao, a GPU or bf16, never silently."""
    import importlib.util

    w = torch.randn(256, 256)
    with pytest.raises(LabkitError, match="torchao|CUDA"):
        fastgen.torchao_weight(w, "int4")
    with pytest.raises(LabkitError, match="formats"):
        fastgen.torchao_weight(w, "int3")
    if importlib.util.find_spec("torchao") is not None and not torch.cuda.is_available():
        with pytest.raises(LabkitError, match="CUDA"):
            fastgen.torchao_weight(w, "int8")


def test_check_targets():
    summ = {"fraction_of_floor": {"bf16": 0.84, "int8": 0.58, "int4": 0.51}, "speedup_vs_hf_generate_bf16": 5.7}
    rows = {r["target"]: r for r in fastgen.check_targets(summ)}
    assert rows["bf16 fraction of the floor"]["met"] and not rows["int8 fraction of the floor"]["met"]
    assert rows["int4 fraction of the floor"]["met"] and rows["bf16 speed-up over HF generate"]["met"]
    missing = fastgen.check_targets({"fraction_of_floor": {"bf16": 0.9}})
    assert [r["met"] for r in missing] == [True, False, False, False] and missing[1]["measured"] is None
