"""The fast decode loop produces HF generate's greedy tokens; its fused Triton ops match the torch references."""
import pytest
import torch

from labkit import env, fastgen, models, results
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


def test_prefetch_args_and_where_prefetch_is_off(tiny):
    """What the small kernels hand to the L2 prefetch: the weight's main buffer, at most the bytes asked for, whole
    16-byte units (the bulk request's unit); nothing for 0 bytes or no weight; a clear error for a buffer the
    request cannot take. On the torch path and under the interpreter every site prefetches nothing."""
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    buf, n = wo.prefetch_args(w, 1000)
    assert buf is w and n == 992  # 1000 rounded down to 16-byte units
    assert wo.prefetch_args(w, 1 << 30) == (w, 64 * 256 * 2)  # capped at the buffer
    assert wo.prefetch_args(w, 0) == (None, 0) and wo.prefetch_args(None, 1 << 20) == (None, 0)
    q = wo.quantize_int4(w.float(), 128)
    assert wo.prefetch_args(q, 1 << 20)[0] is q.packed
    assert wo.weight_buffer(wo.interleave(q)).dtype == torch.int32
    assert wo.weight_buffer(wo.quantize_int8(w.float())).dtype == torch.int8
    with pytest.raises(LabkitError, match="contiguous buffer aligned to 16 bytes"):
        wo.prefetch_args(w.t(), 1 << 20)
    with pytest.raises(LabkitError, match="contiguous buffer aligned to 16 bytes"):
        wo.prefetch_args(w.flatten()[1:], 1 << 20)
    assert not wo.l2_prefetch_supported("cpu")
    # triton on the CPU: the interpreter, which runs no PTX
    for kernels in ("torch",) + (() if torch.cuda.is_available() else ("triton",)):
        fast = fastgen.FastLlama(tiny, kernels=kernels, max_seq_len=16)
        assert fast.prefetch_l2 == fastgen.PREFETCH_L2 and set(fast.l2_prefetch()) == set(fastgen.PREFETCH_L2)
        assert fast.l2_prefetch()["norm"] == fast.l2_prefetch()["attention"] == 0, fast.l2_prefetch()
        fast.prefetch_l2["mode"] = "fast"
        with pytest.raises(LabkitError, match="prefetch mode 'fast' is not one of"):
            fast.l2_prefetch()


_PTX_OF_PREFETCH = """
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, "scripts")
from sass_gemv import compile_offline
from labkit import fastgen

def ptx(fn, sig, consts, warps):
    return compile_offline(fn, sig, consts, warps).asm["ptx"]

norm = {"x_ptr": "*bf16", "d_ptr": "*fp32", "w_ptr": "*bf16", "out_ptr": "*bf16", "H": "i32", "eps": "fp32",
        "stride_x": "i32", "stride_d": "i32", "stride_ds": "i32", "stride_o": "i32", "pf_ptr": "*i8", "pf_bytes": "i32",
        "ROWS": "i32", "HAS_DELTA": "constexpr", "SPLIT": "constexpr", "BLOCK_H": "constexpr", "PDL": "constexpr",
        "PREFETCH": "constexpr", "PF_THREADS": "constexpr"}
attn = {"qkv_ptr": "*bf16", "pos_ptr": "*i64", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "kc_ptr": "*bf16",
        "vc_ptr": "*bf16", "o_ptr": "*bf16", "scale": "fp32", "REP": "i32", "NQ": "i32", "NKV": "i32",
        "stride_qkv": "i32", "stride_qs": "i32", "stride_cb": "i32", "stride_ch": "i32", "stride_cs": "i32",
        "stride_ob": "i32", "pf_ptr": "*i8", "pf_bytes": "i32", "HD": "constexpr", "BLOCK_R": "constexpr",
        "BLOCK_L": "constexpr", "SPLIT": "constexpr", "PDL": "constexpr", "PREFETCH": "constexpr",
        "PF_THREADS": "constexpr"}
for pf, op in ((0, "prefetch"), (1, "cp.async.bulk.prefetch.L2.global"), (2, "prefetch.global.L2")):
    a = ptx(fastgen._add_rmsnorm_kernel, norm, dict(HAS_DELTA=True, SPLIT=2, BLOCK_H=4096, PDL=True, PREFETCH=pf,
                                                     PF_THREADS=256), 8)
    b = ptx(fastgen._rope_attn_kernel, attn, dict(HD=128, BLOCK_R=16, BLOCK_L=128, SPLIT=1, PDL=True, PREFETCH=pf,
                                                   PF_THREADS=256), 8)
    for name, text in (("norm", a), ("attention", b)):
        lines = [l for l in text.splitlines() if op in l]
        wait, first = text.find("griddepcontrol.wait"), text.find(op)
        print(name, pf, len(lines), first >= 0 and wait >= 0 and first < wait)
"""


def test_l2_prefetch_is_in_the_hopper_code_before_the_pdl_wait():
    """Compiled for sm_90 without a GPU (Triton's bundled ptxas): with PREFETCH the add+RMSNorm and RoPE+attention
    kernels issue the L2 prefetch of the mode asked for (bulk requests or one per line), the attention kernel before
    its PDL wait (so it overlaps the kernel before; in the norm kernel extra programs that never wait issue it);
    without PREFETCH there is no prefetch of any kind."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _PTX_OF_PREFETCH], capture_output=True, text=True, timeout=600,
                         cwd=env.repo_root())
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {(r.split()[0], r.split()[1]): r.split()[2:] for r in res.stdout.strip().splitlines()}
    for name in ("norm", "attention"):
        for mode in ("1", "2"):
            n, before_wait = rows[(name, mode)]
            assert int(n) >= 1 and (before_wait == "True" or name == "norm"), (name, mode, rows)
        assert rows[(name, "0")][0] == "0", (name, rows)


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_l2_prefetch_changes_no_result(weights):
    """The prefetch is a hint: with the same GEMV configs, tokens and logits of a graph-replayed run are bit for bit
    those without it, in either mode."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a GPU of compute capability 9.0+")
    model, _ = models.load("smollm2-135m-shape", device="cuda")
    ids = torch.randint(3, 49152, (1, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    fast = fastgen.FastLlama(model, weights=weights, max_seq_len=64, group=64)
    fast.tune(1)
    fast.pin_gemv_configs(fast.gemv_configs(1), 1)  # one summation order for every run
    runs = []
    on = {"norm": 1 << 20, "attention": 2 << 20, "mode": "lines", "norm_programs": 16}
    for pf in ({}, {"mode": "bulk"}, {"norm": 0, "attention": 0}):
        fast.prefetch_l2 = {**on, **pf}
        assert fast.l2_prefetch() == fast.prefetch_l2
        fast._graphs.clear()
        runs.append(fast.generate(ids, 12, use_graph=True, return_logits=True))
    (ta, la) = runs[-1]
    for tb, lb in runs[:-1]:
        assert torch.equal(ta, tb) and all(torch.equal(a, b) for a, b in zip(la, lb))


def test_plot_decode_writes_the_batch1_rows(tmp_path):
    recs = [{"model": "m", "variant": "HF generate", "batch": 1, "decode_ms_per_token": 30.0, "floor_ms": 4.5, "fraction_of_floor": 0.15},
            {"model": "m", "variant": "ours", "batch": 1, "decode_ms_per_token": 4.9, "floor_ms": 4.5, "fraction_of_floor": 0.92},
            {"model": "m", "variant": "ours", "batch": 4, "decode_ms_per_token": 7.6, "floor_ms": 4.6, "fraction_of_floor": 0.6}]
    fastgen.plot_decode(recs, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fastgen.plot_decode(recs[2:], tmp_path / "none.png")  # no batch-1 row: nothing to draw
    assert not (tmp_path / "none.png").exists()


def test_torchao_comparison_times_each_gemv_as_the_step_calls_it(tiny, monkeypatch):
    """Each of our GEMVs is timed with the flags the step calls it with (``gemv_calls``: split-K partials, the fused
    SiLU), hence with the launch config ``tune`` chose for the step: the qkv GEMV was once timed without its
    partials, i.e. with an untuned default config, and looked slower than torchao's."""
    from labkit import bench

    fast = fastgen.FastLlama(tiny, max_seq_len=16)
    timed = []
    monkeypatch.setattr(wo, "time_gemv", lambda x, w, silu, partials, pdl: timed.append((w, silu, partials)) or 1.0)
    monkeypatch.setattr(fastgen, "torchao_weight", lambda w, fmt: (w, "stub"))
    monkeypatch.setattr(bench, "graph_time_ms", lambda fns: 2.0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    recs = fastgen.compare_torchao_gemvs(fast, tiny, "int8", log=lambda *a: None)
    assert [r["gemv"] for r in recs] == ["qkv", "o", "gate_up", "down", "lm_head"]
    calls = {name: (w, silu, part) for name, w, silu, part in fast.gemv_calls()}
    expect = [calls[n] for n in ("wqkv", "wo", "w13", "w2", "lm_head")]
    assert len(timed) == 5 and all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(timed, expect)), timed
    assert all(r["ratio_vs_torchao"] == 2.0 for r in recs)


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


def test_gemv_cost_points_and_the_reference_fits():
    """On this machine: GEMVs of a few sizes, each read cold, bytes and seconds as fixed_plus_stream takes them; a
    format this device does not time is refused with the ones it does. From a committed reference run: one fit per
    weight format over its GEMVs of K = 4096, each run's bytes those the record says."""
    dev = env.device()
    fmt = "bf16" if dev.type == "cuda" else "fp32"
    pts = fastgen.gemv_cost_points(fmt, dev, K=256, Ns=(256, 512, 1024), cold_bytes=8 << 20)
    assert [p["N"] for p in pts] == [256, 512, 1024] and all(p["seconds"] > 0 for p in pts)
    assert [p["bytes"] for p in pts] == [n * 256 * (2 if dev.type == "cuda" else 4) for n in (256, 512, 1024)]
    with pytest.raises(env.LabkitError, match="fp32" if dev.type == "cpu" else "int4"):
        fastgen.gemv_cost_points("int3", dev)
    ref = results.reference("gemv", "nvidia-h200")
    if ref is None:
        pytest.skip("no committed H200 GEMV reference")
    fits = fastgen.reference_gemv_fits(ref)
    assert set(fits) >= {"bf16", "int8", "int4"}
    for fmt_, (fit, names) in fits.items():
        rs = {r["shape"]: r for r in ref.records if r["weights"] == fmt_ and r["K"] == 4096}
        assert sorted(names) == sorted(rs) and "down" not in names  # down's K is the intermediate size
        for name, res in zip(names, fit.rel_residuals):
            r = rs[name]
            assert abs(fit.seconds(r["weight_bytes"]) / (r["ms"] / 1e3) - 1 - res) < 1e-9
