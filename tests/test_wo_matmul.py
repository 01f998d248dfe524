"""Weight-only int8 / int4 GEMV kernels against dequantize-then-matmul (Triton interpreter on CPU, fp16)."""
import pytest
import torch

from labkit import env
from labkit.kernels import flash_attn
from labkit.kernels import rounding
from labkit.kernels import wo_matmul as wo


def _sqnr_db(ref, approx):
    return 10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean()).item()


def test_pack_unpack_roundtrip():
    q = torch.randint(0, 16, (5, 12))
    packed = wo.pack_int4(q)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(wo.unpack_int4(packed).long(), q)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # even k in the low nibble


def test_quantize_roundtrip_sqnr():
    w = torch.randn(64, 256)
    # int8 per channel on Gaussian rows: about 6 dB per bit minus the absmax headroom -> well above 35 dB
    assert _sqnr_db(w, wo.dequantize_int8(wo.quantize_int8(w), torch.float32)) > 35
    # int4, group 128, asymmetric: about 20 dB
    s4 = _sqnr_db(w, wo.dequantize_int4(wo.quantize_int4(w, 128), torch.float32))
    assert 15 < s4 < 30


def test_bad_input():
    with pytest.raises(ValueError):
        wo.int4_from_codes(torch.zeros(4, 100, dtype=torch.uint8), torch.ones(4, 2), torch.zeros(4, 2), 128)  # 1 group, not 2
    with pytest.raises(ValueError):
        wo.int4_from_codes(torch.zeros(4, 100, dtype=torch.uint8), torch.ones(4, 1), torch.full((4, 1), 0.5), 100)
    with pytest.raises(ValueError):
        wo.pack_int4(torch.full((2, 4), 16))
    w = wo.quantize_int8(torch.randn(8, 64))
    with pytest.raises(ValueError):
        wo.wo_matmul(torch.randn(17, 64).half(), w)  # a GEMM, not a GEMV
    with pytest.raises(ValueError):
        wo.wo_matmul(torch.randn(1, 32).half(), w)  # wrong K
    with pytest.raises(TypeError):
        wo.dequantize("not a weight")
    for bad in (wo.GemvConfig(16, 64, 4, "tc", stages=3), wo.GemvConfig(8, 64, 4, stages=0)):
        with pytest.raises(ValueError, match="stages"):  # pipelining is for the CUDA-core kernels, n >= 1
            wo.wo_matmul(torch.randn(2, 64).half(), w, config=bad)
    with pytest.raises(ValueError, match="stages"):  # the fp32 word kernels have no pipelined loop
        wo.wo_matmul(torch.randn(1, 64).half(), wo.interleave(w), config=wo.GemvConfig(8, 64, 4, "acc", stages=2))


CONFIGS = [wo.GemvConfig(8, 128, 4, "tile"), wo.GemvConfig(16, 256, 4, "acc"), wo.GemvConfig(16, 128, 4, "tile", 3),
           wo.GemvConfig(8, 128, 4, "acc", 2), wo.GemvConfig(8, 128, 4, "tile", stages=3),
           wo.GemvConfig(16, 128, 4, "acc", 2, stages=2)]
IL_CONFIGS = [wo.GemvConfig(8, 128, 1), wo.GemvConfig(16, 256, 2, split=2), wo.GemvConfig(4, 512, 4),
              wo.GemvConfig(8, 128, 1, "acc"), wo.GemvConfig(16, 256, 2, "acc", split=2),
              wo.GemvConfig(4, 512, 4, "acc"), wo.GemvConfig(8, 128, 1, "pf"), wo.GemvConfig(16, 128, 2, "pf", split=2)]
TC_CONFIGS = [wo.GemvConfig(16, 128, 4, "tc"), wo.GemvConfig(32, 256, 4, "tc", split=2), wo.GemvConfig(16, 384, 4, "tc")]
TC8_CONFIGS = [wo.GemvConfig(16, 128, 4, "tc"), wo.GemvConfig(32, 256, 4, "tc", split=2), wo.GemvConfig(16, 64, 4, "tc", 3)]
H2_CONFIGS = [wo.GemvConfig(8, 128, 1, "h2"), wo.GemvConfig(16, 256, 2, "h2", split=2), wo.GemvConfig(4, 512, 4, "h2"),
              wo.GemvConfig(16, 128, 2, "h2", stages=3)]
# the tensor-core batch-1 kernel: one warp of one slot, a split whose last step has a chunk past K, two warps of two
# slots each (N = 40: the last row blocks partly or wholly past N)
MMA_CONFIGS = [wo.GemvConfig(16, 256, 1, "mma"), wo.GemvConfig(32, 256, 2, "mma", split=2),
               wo.GemvConfig(64, 256, 2, "mma")]


def test_interleave_roundtrip_and_errors():
    torch.manual_seed(3)
    w = torch.randn(24, 256).half()
    for q in (wo.quantize_int8(w), wo.quantize_int4(w, 128)):
        ww = wo.interleave(q)
        assert ww.shape == q.shape and ww.nbytes() == q.nbytes() and ww.words.dtype == torch.int32
        back = wo.deinterleave(ww)
        assert type(back) is type(q)
        for a, b in zip(vars(q).values(), vars(back).values()):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
        torch.testing.assert_close(wo.dequantize(ww, torch.float32), wo.dequantize(q, torch.float32), rtol=0, atol=0)
    # int4: nibble i of word j holds column 16 i + j of its group of 128
    q4 = wo.quantize_int4(w, 128)
    codes = wo.unpack_int4(q4.packed).long()
    word = wo.interleave(q4).words[0, 1].item() & 0xFFFFFFFF
    assert all((word >> (4 * i)) & 0xF == codes[0, 16 * i + 1] for i in range(8))
    with pytest.raises(ValueError):
        wo.interleave(wo.quantize_int4(torch.randn(4, 128), 64))  # groups of 64
    with pytest.raises(ValueError):
        wo.interleave(wo.quantize_int8(torch.randn(4, 96)))  # K not a multiple of 64
    with pytest.raises(TypeError):
        wo.interleave(w)


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4", "int8-il", "int4-il", "int4-tc", "int4-il-tc", "int4-il-h2",
                                 "int8-il-h2", "int8-tc", "int4-il-mma"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("silu", [False, True])
def test_kernel_matches_dequantize_then_matmul(fmt, M, silu):
    """Kernel error against an fp32 reference is at most twice torch's own fp16 error (+ a hair)."""
    torch.manual_seed(M + 10 * silu)
    dev = env.device()  # compiled on a GPU, the Triton interpreter on a CPU
    N, K = 40, 384  # N not a multiple of the row block, K not a multiple of 256
    w = (torch.randn(N, K, device=dev) * 0.05).half()
    qw = {"fp16": lambda: w, "int8": lambda: wo.quantize_int8(w), "int4": lambda: wo.quantize_int4(w, 128),
          "int4-tc": lambda: wo.quantize_int4(w, 128), "int8-il": lambda: wo.interleave(wo.quantize_int8(w)),
          "int4-il": lambda: wo.interleave(wo.quantize_int4(w, 128)),
          "int4-il-tc": lambda: wo.interleave(wo.quantize_int4(w, 128)),
          "int4-il-h2": lambda: wo.interleave(wo.quantize_int4(w, 128)),
          "int4-il-mma": lambda: wo.interleave(wo.quantize_int4(w, 128)),
          "int8-il-h2": lambda: wo.interleave(wo.quantize_int8(w)), "int8-tc": lambda: wo.quantize_int8(w)}[fmt]()
    x = torch.randn(M, K * (2 if silu else 1), device=dev).half()
    ref32 = wo.matmul_reference(x.float(), wo.dequantize(qw, torch.float32), silu_gate_up=silu)
    err_torch = (wo.matmul_reference(x, qw, silu_gate_up=silu).float() - ref32).abs().max().item()
    for cfg in {"il": IL_CONFIGS, "tc": TC8_CONFIGS if fmt == "int8-tc" else TC_CONFIGS,
                "h2": H2_CONFIGS, "mma": MMA_CONFIGS}.get(fmt.split("-")[-1], CONFIGS):
        if cfg.variant in ("acc", "h2", "mma") and M != 1:
            continue
        y = wo.wo_matmul(x, qw, silu_gate_up=silu, config=cfg)
        assert y.shape == (M, N) and y.dtype == torch.float16
        err = (y.float() - ref32).abs().max().item()
        assert err <= 2 * err_torch + 1e-3 * ref32.abs().max().item(), (cfg, err, err_torch)


TMA_CONFIGS = [wo.GemvConfig(16, 512, 2, "h2", stages=2, tma=True), wo.GemvConfig(8, 256, 1, "h2", split=2, stages=3,
                                                                                 tma=True),
               # persistent: under the interpreter 3 programs per split take the 5 row blocks of 8 (2, 2 and 1)
               wo.GemvConfig(8, 256, 1, "h2", split=2, stages=2, tma=True, persist=1),
               wo.GemvConfig(16, 512, 2, "h2", stages=3, tma=True, persist=2)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("silu", [False, True])
def test_h2_tma_matches_h2(bits, silu):
    """GemvConfig.tma changes how the words reach the registers (a TMA copy into shared memory, pipelined), not the
    arithmetic of a word: rows past N and a K step past the weight (zero-filled by the copy) included, the outputs
    are the pointer-load kernel's of the same tile. Under the interpreter (which models the descriptor loads) bit for
    bit. Compiled, the loaded tile gets another register layout, so the fp32 sums across words and chunks are added
    in another order: on an H200 the 7B shape's int4 gate_up differed in the last bits (int8 did not), hence one bf16
    rounding of room there. Its persistent form (persist), where a program takes several row blocks in one flat
    loop, the same. Skipped on a GPU older than Hopper."""
    dev = env.device()
    if dev.type == "cuda" and not wo.tma_supported(dev):
        pytest.skip("TMA needs a GPU of compute capability 9.0+")
    torch.manual_seed(bits + silu)
    N, K = 40, 1152  # 40 rows: the last row block is partial; 9 chunks: the last K step of 512 is mostly outside
    w = (torch.randn(N, K, device=dev) * 0.05).bfloat16()
    qw = wo.interleave(wo.quantize_int4(w, 128) if bits == 4 else wo.quantize_int8(w))
    x = torch.randn(1, K * (2 if silu else 1), device=dev).bfloat16()
    for cfg in TMA_CONFIGS:
        plain = wo.wo_matmul(x, qw, silu_gate_up=silu, config=wo.GemvConfig(cfg.block_n, cfg.block_k, cfg.num_warps,
                                                                             "h2", cfg.split))
        y = wo.wo_matmul(x, qw, silu_gate_up=silu, config=cfg)
        if dev.type == "cpu":
            assert torch.equal(y, plain), (cfg, (y.float() - plain.float()).abs().max().item())
        else:  # one bf16 unit in the last place (2^-7 relative at most), and fp32 reordering against the largest
            torch.testing.assert_close(y.float(), plain.float(), rtol=2.0**-7,
                                       atol=1e-5 * plain.float().abs().max().item(), msg=str(cfg))


def test_h2_tma_refusals():
    """tma=True runs only the word-layout kernels of a WordWeight (packed fp16, and the tensor cores: see
    test_mma_refusals), pipelined at least two deep; anything else is
    refused with the reason (never silently run another way); tune() offers its configs only where TMA exists."""
    qw = wo.interleave(wo.quantize_int4(torch.randn(16, 256).bfloat16(), 128))
    x = torch.randn(1, 256).bfloat16()
    with pytest.raises(ValueError, match="stages >= 2"):
        wo.wo_matmul(x, qw, config=wo.GemvConfig(16, 256, 4, "h2", tma=True))
    with pytest.raises(ValueError, match="with a WordWeight"):
        wo.wo_matmul(x, qw, config=wo.GemvConfig(16, 256, 4, "tile", stages=2, tma=True))
    with pytest.raises(ValueError, match="with a WordWeight"):
        wo.wo_matmul(x, wo.quantize_int8(torch.randn(16, 256)), config=wo.GemvConfig(16, 256, 4, "h2", stages=2,
                                                                                         tma=True))
    with pytest.raises(ValueError, match="give tma=True"):
        wo.wo_matmul(x, qw, config=wo.GemvConfig(16, 256, 4, "h2", stages=2, persist=2))
    assert not wo.tma_supported("cpu")
    # SmolLM2's 576 columns: int8 words end in half a 128-column chunk, which the TMA form refuses and tune() skips;
    # int4 rows are stored padded to whole groups and fit
    odd8 = wo.interleave(wo.quantize_int8(torch.randn(16, 576)))
    odd4 = wo.interleave(wo.quantize_int4(torch.randn(16, 576), 128))
    assert not wo.tma_fits(odd8) and wo.tma_fits(odd4)
    dev = env.device()
    if dev.type == "cpu" or wo.tma_supported(dev):  # the padded group reads as zero weights either way
        x576, odd4d = torch.randn(1, 576).bfloat16().to(dev), odd4.to(dev)
        y_tma = wo.wo_matmul(x576, odd4d, config=wo.GemvConfig(16, 256, 4, "h2", stages=2, tma=True))
        y = wo.wo_matmul(x576, odd4d, config=wo.GemvConfig(16, 256, 4, "h2"))
        if dev.type == "cpu":
            assert torch.equal(y_tma, y)
        else:  # compiled, the fp32 sums run in another order (test_h2_tma_matches_h2)
            torch.testing.assert_close(y_tma.float(), y.float(), rtol=2.0**-7, atol=1e-5 * y.float().abs().max().item())
    with pytest.raises(ValueError, match="whole chunks of 128 columns"):
        wo.wo_matmul(torch.randn(1, 576).bfloat16(), odd8, config=wo.GemvConfig(16, 256, 4, "h2", stages=2, tma=True))
    for kind, lst in ((4, wo.CANDIDATES_H2_TMA), (3, wo.CANDIDATES_H2_INT8_TMA)):
        assert lst and all(c.tma and c.variant == "h2" and c.stages >= 2 for c in lst)
        assert not any(c.tma for c in wo.candidates_for(kind, 1))
        assert [c for c in wo.candidates_for(kind, 1, tma=True) if c.tma] == lst
        assert not any(c.tma for c in wo.candidates_for(kind, 2, tma=True))


@pytest.mark.parametrize("K", [1152, 576])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("early", [False, True])
def test_mma_kernel_sums_products_exactly(K, silu, early, monkeypatch):
    """The tensor-core kernel (variant 'mma') multiplies exact codes by the bf16 activations (exact products) and sums
    in fp32, the codes' bias of 128 taken out per group as 128 x (the group's activation sum): against the fp64
    product of the same bf16 activations its error stays within a few fp32 roundings of the magnitudes it adds,
    (128 + q) |x| s per term. 576 columns: a last group of 64 (the rows padded with zero weights); with silu, the
    prologue's silu(gate) * up rounded to bf16 first, as a Triton cast rounds on this machine. Under the interpreter the sums are fp32 in
    numpy's order; on a GPU the tensor cores' accumulation (not IEEE round-to-nearest: products aligned to the
    largest exponent and truncated) gets 16 times the room. ``early``: wo.MMA_EARLY_LOADS, the next step's words loaded
    in a branch of their own (the same sums)."""
    monkeypatch.setattr(wo, "MMA_EARLY_LOADS", early)
    dev = env.device()
    if dev.type == "cuda" and not wo.mma_supported(dev):
        pytest.skip("mma.sync with bf16 inputs needs compute capability 8.0+")
    torch.manual_seed(K + silu)
    N = 72  # 4 row blocks of 16 and a partial one
    qp = _h2_weight(4, N, K)
    qw = wo.interleave(qp)
    x = torch.randn(1, K * (2 if silu else 1)).bfloat16()
    xe = x
    if silu:  # what the kernel multiplies: silu(gate) * up in bf16, each step rounded as a Triton cast rounds here
        g = x[:, :K].float().to(dev)
        s = rounding.triton_cast(g / (1.0 + torch.exp(-g)), torch.bfloat16).float()
        xe = rounding.triton_cast(s * x[:, K:].float().to(dev), torch.bfloat16).cpu()
    w64 = wo.dequantize(qp, torch.float64)
    ref = xe.double() @ w64.t()
    mag = (128 + 16) * (xe.double().abs() @ qp.scale.double().repeat_interleave(128, dim=1)[:, :K].t())
    units = 64 if dev.type == "cpu" else 1024
    # compiled, the kernel's exp is not torch's: a product that lands near a bf16 rounding boundary may round the
    # other way, one bf16 unit (2^-8 relative) of that activation
    slack = (2.0**-8 * (xe.double().abs() @ w64.abs().t())) if silu and dev.type == "cuda" else 0.0
    for cfg in (wo.GemvConfig(16, 256, 1, "mma"), wo.GemvConfig(64, 256, 2, "mma", split=2),
                wo.GemvConfig(64, 256, 4, "mma")):
        y = wo.wo_matmul(x.to(dev), qw.to(dev), silu_gate_up=silu, config=cfg,
                         out=torch.empty(1, N, device=dev)).cpu().double()
        err = ((y - ref).abs() - slack).clamp(min=0)
        assert _fp32_units(err, mag) <= units, (cfg, _fp32_units(err, mag))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Gluon kernel runs on a Hopper GPU only (CI compiles it: "
                    "test_mma_tma_kernel_compiles_to_a_ring_and_lane_exact_reads)")
@pytest.mark.parametrize("K,silu", [(1152, False), (4096, False), (1152, True), (2816, True)])
def test_mma_tma_sums_like_the_register_form(K, silu):
    """The tensor-core GEMV with its words staged by TMA (tma=True, wo_gluon) against the fp64 product, with the bound of
    test_mma_kernel_sums_products_exactly on a GPU: a partial row block (72 rows), 9 chunks (a last block of one),
    K steps of 1, 2 and 4 blocks of two chunks (block_k 256, 512, 1024: the last step partly past K or past the
    program's split, masked), one or two 16-row MMA slots per warp, rings of 2-4 slots, split-K partial sums, and
    PDL. With silu, x is [gate | up] and each program first writes silu(gate) * up of its columns to shared memory
    (compared as in test_mma_kernel_sums_products_exactly: one bf16 unit of slack for the GPU's exp)."""
    dev = env.device()
    if not wo.tma_supported(dev):
        pytest.skip("TMA needs a Hopper (sm_90) GPU")
    torch.manual_seed(K + silu)
    N = 72
    qp = _h2_weight(4, N, K)
    qw = wo.interleave(qp).to(dev)
    x = torch.randn(1, K * (2 if silu else 1)).bfloat16()
    xe = x
    if silu:  # what the kernel multiplies: silu(gate) * up, each step rounded to bf16
        g = x[:, :K].float()
        xe = (torch.nn.functional.silu(g).bfloat16().float() * x[:, K:].float()).bfloat16()
    w64 = wo.dequantize(qp, torch.float64)
    ref = xe.double() @ w64.t()
    mag = (128 + 16) * (xe.double().abs() @ qp.scale.double().repeat_interleave(128, dim=1)[:, :K].t())
    slack = (2.0**-8 * (xe.double().abs() @ w64.abs().t())) if silu else 0.0
    for cfg, pdl in ((wo.GemvConfig(64, 256, 4, "mma", stages=3, tma=True), False),
                     (wo.GemvConfig(32, 512, 2, "mma", stages=2, tma=True), True),
                     (wo.GemvConfig(128, 1024, 8, "mma", stages=2, tma=True), False),
                     (wo.GemvConfig(32, 256, 2, "mma", split=2, stages=4, tma=True), True),
                     (wo.GemvConfig(64, 512, 4, "mma", split=4, stages=2, tma=True), False),
                     (wo.GemvConfig(64, 256, 2, "mma", stages=2, tma=True), True),  # two 16-row slots per warp
                     (wo.GemvConfig(128, 512, 4, "mma", split=2, stages=3, tma=True), False)):
        y = wo.wo_matmul(x.to(dev), qw, silu_gate_up=silu, config=cfg, out=torch.empty(1, N, device=dev),
                         pdl=pdl).cpu().double()
        err = ((y - ref).abs() - slack).clamp(min=0)
        assert _fp32_units(err, mag) <= 1024, (cfg, _fp32_units(err, mag))
        part = wo.wo_matmul(x.to(dev), qw, silu_gate_up=silu, config=cfg, partials=True, pdl=pdl)
        if cfg.split > 1:  # the split-K partial sums, summed here, are the same sums
            assert part.shape[0] > 1 and torch.allclose(part.sum(0).cpu().double(), y, rtol=1e-6, atol=1e-6)


def test_mma_refusals():
    """The tensor-core GEMV takes an int4 WordWeight, one row of bf16/fp16 activations and whole MMAs per warp;
    anything else is refused with what to do instead."""
    qw = wo.interleave(wo.quantize_int4(torch.randn(32, 256).bfloat16(), 128))
    x = torch.randn(1, 256).bfloat16()
    with pytest.raises(ValueError, match="int4 WordWeight"):
        wo.wo_matmul(x, wo.interleave(wo.quantize_int8(torch.randn(32, 256))), config=wo.GemvConfig(16, 128, 1, "mma"))
    with pytest.raises(ValueError, match="one row of x"):
        wo.wo_matmul(torch.randn(2, 256).bfloat16(), qw, config=wo.GemvConfig(16, 128, 1, "mma"))
    with pytest.raises(TypeError, match="bf16 or fp16"):
        wo.wo_matmul(x.float(), qw, config=wo.GemvConfig(16, 128, 1, "mma"))
    with pytest.raises(ValueError, match="multiple of 16 x num_warps"):
        wo.wo_matmul(x, qw, config=wo.GemvConfig(16, 256, 2, "mma"))
    with pytest.raises(ValueError, match="block_k=256"):
        wo.wo_matmul(x, qw, config=wo.GemvConfig(16, 512, 1, "mma"))
    with pytest.raises(ValueError, match="leave it None"):
        wo.wo_matmul(x, qw, config=wo.GemvConfig(16, 256, 1, "mma", stages=2))
    assert not wo.mma_supported("cpu")
    # the TMA form (wo_gluon): one or two 16-row MMAs per warp, a ring of two slots or more, a Hopper GPU
    with pytest.raises(ValueError, match="block_n = 16 or 32 x num_warps"):
        wo.wo_matmul(x, qw, config=wo.GemvConfig(192, 256, 4, "mma", stages=3, tma=True))
    with pytest.raises(ValueError, match="stages >= 2"):
        wo.wo_matmul(x, qw, config=wo.GemvConfig(64, 256, 4, "mma", tma=True))
    if not torch.cuda.is_available():
        with pytest.raises(env.LabkitError, match="Hopper"):
            wo.wo_matmul(x, qw, config=wo.GemvConfig(64, 256, 4, "mma", stages=3, tma=True))
    with pytest.raises(ValueError, match="'h2' \\(packed fp16\\) and 'mma'"):
        wo.wo_matmul(x, qw, config=wo.GemvConfig(64, 256, 4, "tile", tma=True))


def test_mma_configs_are_offered_only_when_asked(monkeypatch):
    """The tensor-core configs are among tune()'s candidates (TUNE_MMA: the int4 qkv GEMV of the 7B step is fastest
    there on an H200) only for int4 words at one row on a GPU that runs mma.sync, and not at all with TUNE_MMA off."""
    assert wo.TUNE_MMA
    assert [c for c in wo.candidates_for(4, 1, mma=True) if c.variant == "mma"] == wo.CANDIDATES_MMA
    monkeypatch.setattr(wo, "TUNE_MMA", False)
    assert not any(c.variant == "mma" for c in wo.candidates_for(4, 1, mma=True))
    monkeypatch.setattr(wo, "TUNE_MMA", True)
    assert not any(c.variant == "mma" for c in wo.candidates_for(4, 1, mma=False))
    assert not any(c.variant == "mma" for c in wo.candidates_for(3, 1, mma=True) + wo.candidates_for(4, 2, mma=True))
    qw = wo.interleave(wo.quantize_int4(torch.randn(32, 256), 128))
    assert all(c.block_k == 256 and c.block_n % (16 * c.num_warps) == 0 and c.stages is None
               for c in wo.CANDIDATES_MMA)
    assert wo.kernel_name(qw, wo.CANDIDATES_MMA[0]) == "int4 tensor-core GEMV, one row (mma.sync) + split-K"


def test_mma_layout_check_reads_the_compiled_layout():
    """mma_layout_ok accepts a kernel whose mma.sync operands keep a warp's 32 lanes on the last dimension, one
    element per lane, and names the layout otherwise (the one Triton 3.6 gave tl.load-based operands)."""
    good = ("#blocked = #ttg.blocked<{sizePerThread = [1, 1, 1], threadsPerWarp = [1, 1, 32], warpsPerCTA = [1, 2, 1], "
            "order = [2, 1, 0]}>\n"
            "%0:4 = tt.elementwise_inline_asm \"mma.sync.aligned.m16n8k16\" {} %a : tensor<2x2x32xi32, #blocked> -> "
            "tensor<2x2x32xf32, #blocked>\n")
    assert wo.mma_layout_ok(good) == (True, "")
    bad = good.replace("threadsPerWarp = [1, 1, 32]", "threadsPerWarp = [1, 2, 16]")
    ok, why = wo.mma_layout_ok(bad)
    assert not ok and "[1, 2, 16]" in why
    assert wo.mma_layout_ok(good.replace("mma.sync", "fma.rn")) == (False, "no mma.sync in the kernel")


def _h2_weight(bits: int, N: int, K: int):
    """A (N, K) Int4Weight (groups of 128) or Int8Weight of small random bf16 weights, made on the CPU."""
    w = (torch.randn(N, K) * 0.05).bfloat16()
    return wo.quantize_int4(w, 128) if bits == 4 else wo.quantize_int8(w)


def _h2_sums(x: torch.Tensor, qp) -> tuple:
    """For x (1, K) against an Int4Weight or Int8Weight: the fp64 product, sum_k s |q| |x| (the codes the 'h2' kernel
    multiplies: unsigned for int4, signed for int8) and that plus the int4 zero-point term's magnitudes (what its
    fp32 sums add up)."""
    K = x.shape[1]
    ref = x.double() @ wo.dequantize(qp, torch.float64).t()
    if isinstance(qp, wo.Int8Weight):
        sq = qp.scale.double()[:, None] * qp.q.double().abs()
        return ref, x.double().abs() @ sq.t(), x.double().abs() @ sq.t()
    sq = (qp.scale.double().repeat_interleave(128, dim=1) * wo.unpack_int4(qp.packed).double())[:, :K]
    sz = (qp.scale.double() * qp.zero.double()).repeat_interleave(128, dim=1)[:, :K]
    return ref, x.double().abs() @ sq.t(), x.double().abs() @ (sq + sz).t()


def _gemv(x: torch.Tensor, qw, variant: str = "h2") -> torch.Tensor:
    """One-row GEMV of x (CPU) with config variant ``variant`` on this machine's device, fp32 out -> CPU fp64."""
    dev = env.device()
    return wo.wo_matmul(x.to(dev), qw.to(dev), config=wo.GemvConfig(16, 512, 4, variant),
                        out=torch.empty(1, qw.shape[0], device=dev)).cpu().double()


def _fp32_units(err: torch.Tensor, mag: torch.Tensor) -> float:
    """An error as a multiple of fp32's unit roundoff times the sum of magnitudes, the largest over the outputs."""
    return (err.abs() / mag).max().item() * 2 ** 24


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_fp16_kernel_does_the_arithmetic_it_documents(bits):
    """The 'h2' kernel against a model of its arithmetic (fp16 activations, eight products per word position summed
    in fp16 as two halves of four, then fp32): they agree to within fp32's roundoff of the remaining sums, while the
    fp16 part's own error (model against an fp64 reference) is some 100x the fp32 word kernel's. So a kernel that
    pairs codes with the wrong activations, or rounds more or less often than documented, fails. Also: that error
    stays inside the worst-case bound of 5 fp16 roundings (u = 2^-11) times sum_k s |q| |x|. The data (bf16, an
    outlier of 300 among the activations) is made on the CPU, the same on every device; the output is fp32, so y's
    own rounding does not hide anything. int4 (groups of 128) and int8 (per row, signed codes)."""
    torch.manual_seed(7)
    N, K = 64, 1024
    qp = _h2_weight(bits, N, K)
    x = torch.randn(1, K).bfloat16() * 3
    x[0, 5] = 300.0
    ref, mag_q, mag = _h2_sums(x, qp)
    model = wo.matmul_h2_reference(x, qp)  # the same arithmetic written out in numpy
    qw = wo.interleave(qp)
    y_h2, y_fp32 = _gemv(x, qw, "h2"), _gemv(x, qw, "acc")
    # fp32 sums a few dozen roundings deep at most (here: the fp32 word kernel about 8, the h2 kernel against its
    # model under 1); the fp16 part's own error is hundreds of these units
    assert _fp32_units(y_fp32 - ref, mag) <= 32 and _fp32_units(y_h2 - model, mag) <= 32, (
        _fp32_units(y_fp32 - ref, mag), _fp32_units(y_h2 - model, mag))
    assert _fp32_units(model - ref, mag) > 10 * 32, _fp32_units(model - ref, mag)
    assert ((model - ref).abs() <= 5 * 2.0 ** -11 * mag_q).all(), ((model - ref).abs() / mag_q).max() * 2 ** 11
    with pytest.raises(ValueError, match="h2"):
        dev = env.device()
        wo.wo_matmul(x.expand(2, K).to(dev), qw.to(dev), config=wo.GemvConfig(16, 512, 4, "h2"))  # M = 2


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_fp16_kernel_has_no_range_limit(bits):
    """Each 128-column chunk of activations is scaled by its own power of two before it becomes fp16, so an
    activation of 1e5 (fp16 holds at most 65504; a fixed scale of 1/16 overflowed above about 16000) gives a finite
    result, and a chunk of activations near 1e-4 keeps fp16's 11 bits (a fixed 1/256 put them among its subnormals):
    both stay inside the bound of five fp16 roundings, and the kernel equals matmul_h2_reference. For int8 the
    codes reach -127 and 127 (every row's largest weight), where four products of a code and an activation in
    [512, 1024) would overflow fp16: its chunks are scaled to [32, 64)."""
    torch.manual_seed(5)
    N, K = 32, 512
    qp = _h2_weight(bits, N, K)
    qw = wo.interleave(qp)
    x = torch.randn(1, K).bfloat16()
    x[0, 3] = 1e5  # chunk 0
    x[0, 128:256] *= 1e-4  # chunk 1: tiny
    if bits == 8:  # chunk 2: the largest activation of the chunk at four columns that meet one row's codes of +-127
        r = (qp.q[:, 256:384].abs() == 127).any(dim=1).nonzero().flatten()[0]  # a row whose largest code is here
        cols = (qp.q[r, 256:384].abs() >= 100).nonzero().flatten()[:4] + 256
        x[0, cols] = (1000.0 * qp.q[r, cols].sign().float()).bfloat16()
    y = _gemv(x, qw)
    assert torch.isfinite(y).all()
    for part in (slice(0, 128), slice(128, 256), slice(256, 384)):  # each chunk alone: its own bound
        xp = torch.zeros_like(x)
        xp[:, part] = x[:, part]
        refp, mag_qp, _ = _h2_sums(xp, qp)
        assert ((_gemv(xp, qw) - refp).abs() <= 5 * 2.0 ** -11 * mag_qp).all(), part
    ref, mag_q, mag = _h2_sums(x, qp)
    assert _fp32_units(y - wo.matmul_h2_reference(x, qp), mag) <= 32
    assert ((y - ref).abs() <= 5 * 2.0 ** -11 * mag_q).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_fp16_reference_at_a_ragged_k_with_silu(bits):
    """SmolLM2's K of 576 (four chunks of 128 and one of 64): the 'h2' kernel does what matmul_h2_reference writes out
    (to fp32's roundoff), which takes the word layout too; the reference's silu(gate) * up is torch's, rounded to
    the activations' dtype. (The kernel's own silu is left to the tests above: on a GPU its exp is an approximation,
    and the Triton interpreter (3.9) rounds fp32 to bf16 toward zero where a GPU rounds to nearest, so neither
    gives torch's product bit for bit.)"""
    torch.manual_seed(11)
    N, K = 48, 576
    qp = _h2_weight(bits, N, K)
    x = torch.randn(1, 2 * K).bfloat16() * 2
    xa = torch.nn.functional.silu(x[:, :K]) * x[:, K:]  # bf16 in, bf16 out: rounded twice, as the kernels round
    qw = wo.interleave(qp)
    model = wo.matmul_h2_reference(xa, qw)
    assert torch.equal(model, wo.matmul_h2_reference(x, qp, silu_gate_up=True))
    _, _, mag = _h2_sums(xa, qp)
    assert _fp32_units(_gemv(xa, qw) - model, mag) <= 32
    with pytest.raises(TypeError, match="groups of 128"):
        wo.matmul_h2_reference(xa, wo.quantize_int4(torch.randn(N, K), 64))
    with pytest.raises(ValueError, match=r"shape \(M, K\)"):
        wo.matmul_h2_reference(xa[None], qw)


def test_packed_fp16_kernel_is_tuned_for_words_at_one_row(monkeypatch):
    """The tuner times the 'h2' kernel for int4 and int8 words at one row of bf16/fp16 only, and not at all when
    TUNE_H2 is unset; every int8 config covers whole chunks of 128 columns."""
    assert wo.TUNE_H2
    assert [c for c in wo.candidates_for(4, 1) if c.variant == "h2"] == wo.CANDIDATES_H2
    assert [c for c in wo.candidates_for(3, 1, torch.float16) if c.variant == "h2"] == wo.CANDIDATES_H2_INT8
    assert all(c.block_k % 128 == 0 for c in wo.CANDIDATES_H2 + wo.CANDIDATES_H2_INT8)
    assert not any(c.variant == "h2" for kind in range(5) for M in (1, 4) if (kind, M) not in ((3, 1), (4, 1))
                   for c in wo.candidates_for(kind, M))
    assert not any(c.variant == "h2" for kind in (3, 4) for c in wo.candidates_for(kind, 1, torch.float32))
    monkeypatch.setattr(wo, "TUNE_H2", False)
    assert not any(c.variant == "h2" for kind in (3, 4) for c in wo.candidates_for(kind, 1))
    dev = env.device()
    qw = wo.interleave(wo.quantize_int8(torch.randn(16, 256, device=dev)))
    with pytest.raises(ValueError, match="chunks of 128"):
        wo.wo_matmul(torch.randn(1, 256, device=dev).half(), qw, config=wo.GemvConfig(16, 64, 4, "h2"))
    with pytest.raises(ValueError, match="int4 or int8 WordWeight"):
        wo.wo_matmul(torch.randn(1, 256, device=dev).half(), wo.quantize_int8(torch.randn(16, 256, device=dev)),
                     config=wo.GemvConfig(16, 128, 4, "h2"))


def test_int8_tensor_core_gemv_for_a_batch():
    """Int8Weight on the tensor cores (variant 'tc', any M up to 16): codes become fp16 (or bf16) exactly and every
    product of such an activation and a code is exact in the fp32 accumulator, so the fp32 output equals the fp64
    product up to fp32's roundoff of the sums (and the scale's one multiplication). The tuner offers it for a batch
    of bf16/fp16 rows only. fp16 activations: the Triton interpreter (3.9) multiplies the raw bit patterns of bf16
    operands in tl.dot (labkit.kernels.rounding.dot_matches_torch), so bf16 is checked on a GPU only."""
    torch.manual_seed(2)
    dev = env.device()
    N, K, M = 48, 256, 16
    q8 = wo.quantize_int8((torch.randn(N, K) * 0.05).bfloat16())
    x = torch.randn(M, K).half()
    ref = x.double() @ wo.dequantize(q8, torch.float64).t()
    mag = x.double().abs() @ (q8.scale.double()[:, None] * q8.q.double().abs()).t()
    for cfg in (wo.GemvConfig(16, 128, 4, "tc"), wo.GemvConfig(64, 64, 4, "tc", 2)):
        y = wo.wo_matmul(x.to(dev), q8.to(dev), config=cfg, out=torch.empty(M, N, device=dev)).cpu().double()
        assert _fp32_units(y - ref, mag) <= 32, (cfg, _fp32_units(y - ref, mag))
    assert wo.candidates_for(1, 4)[:len(wo.CANDIDATES_TC8)] == wo.CANDIDATES_TC8
    assert not any(c.variant == "tc" for c in wo.candidates_for(1, 1) + wo.candidates_for(1, 4, torch.float32))
    with pytest.raises(ValueError, match="power of two"):
        wo.wo_matmul(x.to(dev), q8.to(dev), config=wo.GemvConfig(16, 384, 4, "tc"))
    with pytest.raises(ValueError, match="bf16/fp16"):
        wo.wo_matmul(x.float().to(dev), q8.to(dev), config=wo.GemvConfig(16, 128, 4, "tc"))


def test_ragged_last_group_from_codes():
    """K = 320 = 2 x 128 + 64 (SmolLM2's 576 is 4 x 128 + 64): codes taken as given, padding dequantizes to 0."""
    torch.manual_seed(4)
    N, K = 8, 320
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    scale, zero = torch.rand(N, 3) + 0.1, torch.randint(0, 16, (N, 3)).float()
    w = wo.int4_from_codes(q, scale, zero, 128)
    assert w.shape == (N, K) and w.in_features == K and w.packed.shape == (N, 192)
    ref = (q.float() - zero.repeat_interleave(128, 1)[:, :K]) * scale.repeat_interleave(128, 1)[:, :K]
    assert torch.equal(wo.dequantize(w, torch.float32), ref)  # exact: the same fp32 arithmetic
    assert torch.equal(wo.unpack_int4(w.packed)[:, K:], zero[:, 2:].to(torch.uint8).expand(N, 64))
    ww = wo.interleave(w)
    assert ww.shape == (N, K) and torch.equal(wo.dequantize(ww, torch.float32), ref)
    assert wo.deinterleave(ww).in_features == K
    # quantize_int4 pads the same way: a short last group, min/max of its real values
    wq = wo.quantize_int4(torch.randn(N, K), 128)
    assert wq.shape == (N, K) and wo.dequantize(wq).shape == (N, K)


@pytest.mark.parametrize("fmt", ["int4", "int4-il", "int4-tc", "int4-il-tc", "int4-il-h2"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("silu", [True])  # the harder case: past K, x holds the ``up`` half
def test_kernel_ragged_k(fmt, M, silu):
    """Every int4 kernel with K not a multiple of the group (stored padded): it reads activations only below K,
    so with silu_gate_up it never mixes the ``up`` half into the ``gate`` columns."""
    torch.manual_seed(M + 10 * silu + 100)
    dev = env.device()
    N, K = 40, 320
    w = (torch.randn(N, K, device=dev) * 0.05).half()
    q4 = wo.quantize_int4(w, 128)
    qw = wo.interleave(q4) if "il" in fmt else q4
    x = torch.randn(M, K * (2 if silu else 1), device=dev).half()
    ref32 = wo.matmul_reference(x.float(), wo.dequantize(qw, torch.float32), silu_gate_up=silu)
    err_torch = (wo.matmul_reference(x, qw, silu_gate_up=silu).float() - ref32).abs().max().item()
    configs = (TC_CONFIGS if fmt.endswith("tc") else H2_CONFIGS if fmt.endswith("h2") else IL_CONFIGS if "il" in fmt
               else CONFIGS)
    for cfg in configs:
        if cfg.variant in ("acc", "h2") and M != 1:
            continue
        y = wo.wo_matmul(x, qw, silu_gate_up=silu, config=cfg)
        err = (y.float() - ref32).abs().max().item()
        assert err <= 2 * err_torch + 1e-3 * ref32.abs().max().item(), (cfg, err, err_torch)


def test_linear_dispatch_large_m_uses_dequantize():
    w = wo.quantize_int4(torch.randn(24, 256).half(), 128)
    x = torch.randn(2, 10, 256).half()  # 20 rows > MAX_M: dequantize + matmul
    y = wo.linear(x, w)
    assert y.shape == (2, 10, 24)
    torch.testing.assert_close(y, wo.matmul_reference(x.reshape(20, 256), w).reshape(2, 10, 24))


@pytest.mark.gpu
def test_bf16_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    w = (torch.randn(4096, 4096, device="cuda") * 0.02).bfloat16()
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    for qw in (w, wo.quantize_int8(w), wo.quantize_int4(w), wo.interleave(wo.quantize_int4(w)),
               wo.interleave(wo.quantize_int8(w))):
        ref32 = wo.matmul_reference(x.float(), wo.dequantize(qw, torch.float32))
        err_torch = (wo.matmul_reference(x, qw).float() - ref32).abs().max().item()
        err = (wo.wo_matmul(x, qw).float() - ref32).abs().max().item()
        assert err <= 2 * err_torch + 1e-3 * ref32.abs().max().item()


_ROW_PF_PTX = """
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, "scripts")
import sass_gemv
for name, _, fn, sig, c, warps, _ in sass_gemv.kernels():
    if "ROW_PF" in c and not c.get("TMA"):  # the TMA form has no row prefetch (its copies are already ahead)
        for pdl, pf in ((True, 0), (True, 4), (False, 4)):
            ptx = sass_gemv.compile_offline(fn, sig, dict(c, PDL=pdl, ROW_PF=pf), warps).asm["ptx"]
            first, wait = ptx.find("prefetch.global.L2"), ptx.find("griddepcontrol.wait")
            print(name, pdl, pf, ptx.count("prefetch.global.L2"), 0 <= first < wait)
"""


def test_row_prefetch_goes_out_before_the_pdl_wait():
    """wo.ROW_PREFETCH: compiled for sm_90 without a GPU, the word kernel and the packed-fp16 kernel (int4 and int8)
    ask L2 for their next rows before the PDL wait when ROW_PF > 0 and the launch uses PDL, and never otherwise;
    the launch passes it only with PDL on a compiled (not interpreted) kernel."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _ROW_PF_PTX], capture_output=True, text=True, timeout=600,
                         cwd=env.repo_root())
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [r.split() for r in res.stdout.strip().splitlines()]
    assert {r[0] for r in rows} == {"int4", "int8", "int4-h2", "int8-h2"}, rows
    for name, pdl, pf, n, before in rows:
        on = pdl == "True" and pf == "4"
        assert (int(n) > 0 and before == "True") if on else int(n) == 0, (name, pdl, pf, n, before)
    old = wo.ROW_PREFETCH
    try:
        wo.ROW_PREFETCH = 4
        assert wo._row_pf(False) == 0
        assert wo._row_pf(True) == (0 if flash_attn.interpreted() else 4)
    finally:
        wo.ROW_PREFETCH = old


@pytest.mark.gpu
def test_row_prefetch_changes_no_result_on_gpu():
    """The row prefetch is a hint: with PDL and the same config, outputs are bit for bit those without it."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a GPU of compute capability 9.0+")
    w = (torch.randn(4096, 4096, device="cuda") * 0.02).bfloat16()
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    old = wo.ROW_PREFETCH
    try:
        for qw, cfg in ((wo.interleave(wo.quantize_int4(w)), wo.GemvConfig(32, 1024, 4, "h2")),
                        (wo.interleave(wo.quantize_int8(w)), wo.GemvConfig(16, 1024, 4, "h2")),
                        (wo.interleave(wo.quantize_int4(w)), wo.GemvConfig(16, 2048, 4)),
                        (wo.interleave(wo.quantize_int8(w)), wo.GemvConfig(16, 2048, 8, split=4))):
            outs = []
            for n in (0, 2, 64):
                wo.ROW_PREFETCH = n
                outs.append(wo.wo_matmul(x, qw, config=cfg, pdl=True))
            assert all(torch.equal(outs[0], o) for o in outs[1:]), cfg
    finally:
        wo.ROW_PREFETCH = old


def test_partials_are_the_split_k_sums():
    """partials=True returns the (split, M, N) fp32 partial sums; summed in split order they give the usual output."""
    torch.manual_seed(5)
    dev = env.device()
    w = wo.interleave(wo.quantize_int4((torch.randn(24, 512, device=dev) * 0.05).half(), 128))
    x = torch.randn(1, 512, device=dev).half()
    cfg = wo.GemvConfig(8, 128, 1, split=2)
    p = wo.wo_matmul(x, w, config=cfg, partials=True)
    assert p.shape == (2, 1, 24) and p.dtype == torch.float32
    assert torch.equal((p[0] + p[1]).half(), wo.wo_matmul(x, w, config=cfg))
    assert wo.linear(x, w, partials=True).dim() in (2, 3)
    one = wo.wo_matmul(x, w, config=wo.GemvConfig(8, 128, 1), partials=True)  # no split: the plain output
    assert one.shape == (1, 24) and one.dtype == torch.float16


def test_tune_records_failing_configs(monkeypatch):
    """tune() keeps going past a config that fails, but records it with its config, and warns unless it is a
    resource limit (registers / shared memory); with every config failing, the error names the failures."""
    w = wo.quantize_int8(torch.randn(32, 256))
    cands = wo.candidates_for(1, 1, torch.float16)[:3]
    assert len(cands) >= 2

    class OutOfResources(Exception):
        pass

    def fake_time(x, w_, silu, cfg, partials=False, pdl=False):
        if cfg is cands[0]:
            raise OutOfResources("out of resource: shared memory")
        if cfg is cands[1]:
            raise ValueError("bad pointer arithmetic")
        return 1.0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(wo, "pdl_kwargs", lambda pdl, dev: {})
    monkeypatch.setattr(wo, "time_gemv", fake_time)
    monkeypatch.setattr(wo, "TUNE_FAILURES", [])
    monkeypatch.setattr(wo, "_TUNED", {})
    with pytest.warns(RuntimeWarning, match="bad pointer arithmetic"):
        best = wo.tune(w, 1, torch.float16, candidates=cands)
    assert best is cands[2]
    fails = wo.TUNE_FAILURES
    assert [f["config"] for f in fails] == cands[:2]
    assert fails[0]["resources"] and not fails[1]["resources"] and "ValueError" in fails[1]["error"]
    monkeypatch.setattr(wo, "time_gemv", lambda *a, **k: (_ for _ in ()).throw(OutOfResources("out of resource")))
    with pytest.raises(env.LabkitError, match="no GEMV config ran"):
        wo.tune(w, 1, torch.float16, candidates=cands)


def test_tune_never_chooses_a_config_with_wrong_sums(monkeypatch):
    """A config whose output is off (here one made to return its sums slightly scaled, one NaN, one a split-K whose
    partials do not add up) is checked against the fp32 product before it is timed: left out, recorded with the reason
    and warned about, even when it would be the fastest; the right ones are timed and the fastest of them kept. The
    kernels really run (the interpreter on a CPU); only the timings are made up."""
    torch.manual_seed(3)
    w = wo.interleave(wo.quantize_int4(torch.randn(48, 256) * 0.05, 128))
    cands = [wo.GemvConfig(16, 256, 2, "tile"), wo.GemvConfig(8, 256, 1, "tile"), wo.GemvConfig(16, 256, 2, "h2"),
             wo.GemvConfig(16, 128, 2, "tile", split=2), wo.GemvConfig(8, 128, 1, "tile", split=2)]
    real = wo.wo_matmul
    speed = {id(c): t for c, t in zip(cands, [1.0, 2.0, 0.5, 0.4, 3.0])}

    def broken(x, w_, silu=False, cfg=None, out=None, partials=False, pdl=False):
        y = real(x, w_, silu, cfg, out, partials, pdl)
        if cfg is cands[0]:
            return y * 1.02  # 2% off: beyond twice bf16's rounding
        if cfg is cands[2]:
            y = y.clone()
            y.view(-1)[5] = float("nan")
        if cfg is cands[3]:
            assert y.dim() == 3  # the split-K partials, as the step takes them
            y = y.clone()
            y[1] = 0  # the second split lost
        return y

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(wo, "pdl_kwargs", lambda pdl, dev: {})
    monkeypatch.setattr(wo, "wo_matmul", broken)
    monkeypatch.setattr(wo, "time_gemv", lambda x, w_, silu, cfg, partials=False, pdl=False: speed[id(cfg)])
    monkeypatch.setattr(wo, "TUNE_FAILURES", [])
    monkeypatch.setattr(wo, "_TUNED", {})
    monkeypatch.setattr(wo, "_TUNE_TIMES", {})
    with pytest.warns(RuntimeWarning, match="wrong result"):
        best = wo.tune(w, 1, torch.bfloat16, candidates=cands, partials=True)
    assert best is cands[1]
    assert [f["config"] for f in wo.TUNE_FAILURES] == [cands[0], cands[2], cands[3]]
    assert all(f["wrong_result"] and not f["resources"] for f in wo.TUNE_FAILURES)
    assert [c for c, _ in wo._TUNE_TIMES[next(iter(wo._TUNE_TIMES))]] == [cands[1], cands[4]]
    # the same configs, unbroken, all pass the check
    monkeypatch.setattr(wo, "wo_matmul", real)
    x = torch.randn(1, 256).bfloat16()
    ref = wo.reference_check(x, w)
    assert all(wo.check_config(x, w, c, ref, partials=True) is None for c in cands)


def test_offline_sass_of_the_gemv_loops(tmp_path):
    """scripts/sass_gemv.py compiles the batch-1 GEMVs for sm_90 without a GPU (Triton's bundled ptxas) and counts
    their K loops. The word kernel's design holds in the machine code: its codes become floats by mask-and-or
    (LOP3) with no int-to-float conversion instruction, and in the tuned word kernel a word of eight int4 codes
    costs fewer instructions per weight than one of four int8 codes."""
    import json
    import subprocess
    import sys

    out = tmp_path / "sass.json"
    res = subprocess.run([sys.executable, str(env.repo_root() / "scripts" / "sass_gemv.py"), "--json", str(out),
                          "--silu"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"int4-acc", "int4", "int8-acc", "int8", "bf16", "int8-rows", "int4-h2", "int8-h2",
                         "int4-h2-tma", "int8-h2-tma", "int4-mma", "int4-mma-early"}
    # the tensor-core kernel: MMAs, no int-to-float conversion, no layout conversion through shared memory (no
    # barrier, no shared-memory traffic), every MMA operand one element per lane, and fewer instructions per weight
    # than the packed-fp16 kernel (Triton 3.9: 2.2 against 2.8; 3.6: 2.3 against 3.0)
    mma = rows["int4-mma"]
    assert mma["opcodes"].get("HMMA", 0) > 0 and not any(op.startswith("I2F") for op in mma["opcodes"]), mma["opcodes"]
    assert mma["barriers"] == 0 and not {"LDS", "STS", "LDSM", "STSM"} & set(mma["opcodes"]), mma["opcodes"]
    assert mma["mma_layout_ok"] == [True, ""], mma["mma_layout_ok"]
    assert mma["per_weight"] < rows["int4-h2"]["per_weight"], (mma["per_weight"], rows["int4-h2"]["per_weight"])
    # where ptxas puts the next step's weight words: written at the top of the loop body, they go out after the
    # step's first MMA (Triton 3.6 and 3.9: all 8 after, at the end of the body); loaded in a branch of their own
    # (wo.MMA_EARLY_LOADS), all before it, the same MMAs and layout, more registers
    early = rows["int4-mma-early"]
    assert mma["word_loads"] == early["word_loads"] > 0, (mma, early)
    assert early["word_loads_before_first_mma"] == early["word_loads"], early
    assert mma["word_loads_before_first_mma"] < mma["word_loads"], mma
    assert early["mma_layout_ok"] == [True, ""] and early["opcodes"]["HMMA"] == mma["opcodes"]["HMMA"], early
    # the TMA form: one bulk copy per K step for the words of the whole tile (UTMALDG, issued by one thread), so the
    # loop's per-thread global loads are the activations' and scales' only, fewer than the pointer kernel's; the same
    # packed arithmetic (Triton 3.6: 12 LDG against 20 for int4, 9 against 16 for int8; 3.9 the same)
    for bits in ("int4", "int8"):
        tma, h2 = rows[bits + "-h2-tma"], rows[bits + "-h2"]
        assert tma["opcodes"].get("UTMALDG", 0) == 1 and "UTMALDG" not in h2["opcodes"], (tma["opcodes"], h2["opcodes"])
        assert tma["opcodes"].get("LDG", 0) < h2["opcodes"].get("LDG", 0), (tma["opcodes"], h2["opcodes"])
        assert tma["opcodes"].get("HFMA2", 0) > 0 and not any(op.startswith("I2F") for op in tma["opcodes"]), tma
    # packed fp16 arithmetic: two codes per masked OR and per FMA, fewer instructions per weight than either fp32 word
    # kernel (and for int8 than the row-major GEMV: 3.1-3.25 against 5.6-5.75), and no conversion instruction per code
    for bits in ("int4", "int8"):
        h2 = rows[bits + "-h2"]
        assert h2["opcodes"].get("HFMA2", 0) > 0 and not any(op.startswith("I2F") for op in h2["opcodes"]), h2
        assert h2["per_weight"] < min(rows[bits]["per_weight"], rows[bits + "-acc"]["per_weight"]), h2
    assert rows["int8-h2"]["per_weight"] < rows["int8-rows"]["per_weight"], (rows["int8-h2"], rows["int8-rows"])
    # the row-major int8 GEMV of the decode path: codes become floats by integer add and float subtract, no I2F
    assert not any(op.startswith("I2F") for op in rows["int8-rows"]["opcodes"]), rows["int8-rows"]["opcodes"]
    assert rows["int8-rows"]["opcodes"].get("FADD", 0) >= rows["int8-rows"]["weights_per_thread"]
    for name in ("int4-acc", "int4", "int8-acc", "int8"):
        ops = rows[name]["opcodes"]
        assert ops.get("LOP3", 0) > 0 and ops.get("LDG", 0) > 0, (name, ops)
        assert not any(op.startswith("I2F") for op in ops), (name, ops)  # no int-to-float conversions
    # the word kernel the tuner times (reducing each step): int4 cheaper per weight than int8 (Triton 3.9: 3.84 vs
    # 5.18, Triton 3.6: 4.06 vs 5.31). Not asserted for the per-word-accumulator kernels, which the tuner leaves out:
    # Triton 3.6 compiles the int4 one to 6.07 instructions per weight, above int8's 5.77 (3.9: 3.47 vs 3.94)
    assert 0 < rows["int4"]["per_weight"] < rows["int8"]["per_weight"], (rows["int4"], rows["int8"])
    # the per-word-accumulator kernel moves the per-step reductions out of the loop: far fewer shuffles and adds
    # (whether that makes the whole loop shorter depends on the Triton version: with 3.9 it does, with 3.6 not)
    for bits in ("int4", "int8"):
        acc, step = rows[bits + "-acc"], rows[bits]

        def reduce_ops(r):
            return (r["opcodes"].get("SHFL", 0) + r["opcodes"].get("FADD", 0)) / r["weights_per_thread"]

        assert reduce_ops(acc) < 0.5 * reduce_ops(step), (bits, reduce_ops(acc), reduce_ops(step))
        assert all(r["registers"] is None or 0 < r["registers"] <= 255 for r in (acc, step)), (acc, step)
    assert "at 4.22 TB/s the budget is" in res.stdout
    # the down GEMV's form (--silu): silu(gate) * up in every program's prologue costs exponentials and reciprocals
    # (MUFU) the plain loop has none of, and instructions per weight on top of the weight's own
    for name, r in rows.items():
        assert r["silu_opcodes"].get("MUFU", 0) > r["opcodes"].get("MUFU", 0), (name, r["silu_opcodes"])
        assert r["silu_per_weight"] > r["per_weight"], (name, r["silu_per_weight"], r["per_weight"])
    assert "with silu(gate) * up in the prologue" in res.stdout
    bad = subprocess.run([sys.executable, str(env.repo_root() / "scripts" / "sass_gemv.py"), "--bandwidth", "fast"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "error: --bandwidth" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal a machine without a GPU gets")
@pytest.mark.parametrize("args,env_extra,message", [
    (["silu"], {}, "needs a CUDA GPU"),
    (["silu"], {"GEMV_FORMATS": "int3"}, "GEMV_FORMATS takes"),
    (["sweep"], {"GEMV_PARTIALS": "yes"}, "GEMV_PARTIALS takes 0 or 1"),
    (["sweep"], {"GEMV_MMA_EARLY": "on"}, "GEMV_MMA_EARLY takes 0 or 1"),
    (["nonsense"], {}, "name parts to run from"),
])
def test_gpu_decode_refuses_in_one_line(tmp_path, args, env_extra, message):
    """scripts/gpu_decode.py: an unknown part, a bad GEMV_FORMATS or no GPU end the run with one line, before any
    log is written."""
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, str(env.repo_root() / "scripts" / "gpu_decode.py"), *args],
                         env=dict(os.environ, PYTHONPATH=str(env.repo_root()), LABKIT_OUT=str(tmp_path), **env_extra),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not list(tmp_path.iterdir())                                   # no log opened


def test_mma_tma_kernel_compiles_to_a_ring_and_lane_exact_reads():
    """The Gluon form of the tensor-core GEMV (wo_gluon; GemvConfig(..., "mma", stages=S, tma=True)), compiled for sm_90
    without a GPU: its words arrive by TMA copies into shared memory, each checked by an mbarrier wait; each thread
    reads its 16 words of a K step with four 128-bit shared loads, and nothing is written back to shared memory (no
    layout conversion: every MMA operand is the register it was loaded into); two chunks of 128 columns per step,
    8 MMAs per chunk for the activations' sum and 8 per chunk and 16-row slot for the weights; no spills."""
    from labkit.kernels import wo_gluon

    for r in wo_gluon.offline_stats([(64, 4, 3, 1), (128, 8, 2, 1), (64, 2, 2, 2), (64, 2, 2, 1, 2816)]):
        slots = r["block_n"] // (16 * r["num_warps"])
        assert r["mma"] == r["sub"] * (16 + 16 * slots) and r["shared_loads_128"] == 4 * r["sub"] * slots, r
        assert r["tma"] >= 2 and r["mbarrier_wait"] >= 1 and r["pdl_wait"], r
        # with the silu prologue (k_chunk 2816, as the 7B down GEMV split in four) the program's silu(gate) * up goes to
        # shared memory once, before the loop; otherwise nothing is stored there
        assert (r["shared_stores"] > 0) == bool(r["silu_k_chunk"]), r
        assert r["local"] == 0 and 0 < r["registers"] <= 192, r
