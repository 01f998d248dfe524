"""The Gluon FlashAttention forward for Hopper (labkit.kernels.flash_attn_hopper).

On a CPU it cannot run (the interpreter does not execute Gluon), so every configuration is compiled for sm_90
offline, in a subprocess where Triton is imported without the interpreter, and its PTX and cubin are checked for
what the kernel is built from: warpgroup MMAs, TMA copies, mbarriers, register reallocation in the warp-specialized
form, and no spills to local memory. On a Hopper GPU its outputs are checked against the fp32 reference.
"""
import os

import pytest
import torch

from labkit import attention as A
from labkit.env import LabkitError
from labkit.kernels import flash_attn_hopper as hop

pytestmark = pytest.mark.skipif(not hop.available(), reason="this Triton has no Gluon Hopper module")

@pytest.fixture(scope="module")
def compiled():
    """Every configuration non-causal, and the default one causal too (each ~1-4 s to compile)."""
    cases = [(c, False) for c in hop.CONFIGS] + [(hop.default_config(128, True), True)]
    return hop.offline_stats(cases)


def test_every_config_compiles_to_wgmma_tma_and_mbarriers(compiled):
    assert len(compiled) == len(hop.CONFIGS) + 1
    for rec in compiled:
        cfg = rec["config"]
        consumers = 2 if cfg["ws"] else 1                     # the warp-specialized form has two consumer bodies
        # one wgmma per 16 of head_dim (Q K^T) and per 16 keys (P V), in each consumer's loop (and prologue)
        assert rec["wgmma"] >= consumers * (128 // 16 + cfg["block_n"] // 16), rec
        assert rec["tma"] >= 3, rec                            # Q, K, V loads (and the O store)
        assert rec["mbarrier_wait"] >= 2, rec
        assert (rec["setmaxnreg"] > 0) == cfg["ws"], rec      # the loader gives registers to the consumers
        assert rec["shared"] <= 232448, rec                    # Hopper's largest shared memory per block
        if rec["local"] is not None:
            assert rec["local"] == 0, f"config {cfg} spills to local memory: {rec}"
        # the persistent form's descriptors span (batch, head, seq, dim): 4-D copies; the others' are per head, 2-D
        assert (rec["tma_4d"] >= 4) == bool(cfg.get("persistent")), rec
        # the overlapped orders wait for the scores with P V still running (one wait per consumer); the others wait
        # for everything (defer waits for both of its MMAs at once)
        assert (rec["wgmma_wait1"] >= 2) == bool(cfg.get("overlap") or cfg.get("pipe")), rec


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="need ws=True"):
        hop.check_config(dict(hop.CONFIGS[0], ws=False, block_m=128, num_warps=8, pipe=True))
    with pytest.raises(ValueError, match="block_m=128 and num_warps=4"):
        hop.check_config(dict(hop.CONFIGS[0], block_m=64))
    with pytest.raises(ValueError, match="choose one"):
        hop.check_config(dict(hop.CONFIGS[0], pipe=True, defer=True))
    with pytest.raises(ValueError, match="set defer=True"):
        hop.check_config(dict(hop.CONFIGS[0], pipe=False, defer=False, pingpong=True))
    with pytest.raises(ValueError, match="set defer=True or persistent=True, overlap=True"):
        hop.check_config(dict(hop.CONFIGS[11], pingpong=True))   # persistent turns need the overlap order
    with pytest.raises(ValueError, match="persistent form only"):
        hop.check_config(dict(hop.CONFIGS[0], overlap=True))
    with pytest.raises(ValueError, match="set persistent=True, overlap=True"):
        hop.check_config(dict(hop.CONFIGS[11], tree=True))
    with pytest.raises(ValueError, match="stages >= 3"):
        hop.check_config(dict(hop.CONFIGS[0], pipe=True, stages=2))
    with pytest.raises(ValueError, match="head_dim 128 only"):
        hop.check_config(hop.CONFIGS[0], head_dim=64)
    with pytest.raises(ValueError, match="needs ws=True"):
        hop.check_config(dict(hop.CONFIGS[9], persistent=True))
    with pytest.raises(ValueError, match="leave pipe and defer off"):
        hop.check_config(dict(hop.CONFIGS[2], persistent=True))
    with pytest.raises(ValueError, match="K/V ring of 2 only"):
        hop.check_config(dict(hop.CONFIGS[1], persistent=True))
    assert not hop.default_config(64, True)["ws"]             # head dim 64: the form without warp specialization
    assert all(hop.default_config(128, c)["persistent"] for c in (False, True))   # head dim 128: the persistent form
    hop.check_config(hop.default_config(64, False), head_dim=64)
    for cfg in hop.CONFIGS:                                    # the shipped ones are all valid
        hop.check_config(cfg)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        q = torch.randn(1, 2, 16, 64, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")
        if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("CPU tensors are refused earlier, by the shared input check")
        with pytest.raises(LabkitError, match="written for Hopper"):
            hop.flash_attention_hopper(q, q, q)
        # head dim 128 with the persistent form turned off: the default's overlap and turns go with it, so the
        # only refusal left is the missing Hopper GPU, not a config error
        q = torch.randn(1, 2, 16, 128, dtype=torch.bfloat16, device=q.device)
        for off in (dict(persistent=False), dict(ws=False, block_m=128, num_warps=8)):
            with pytest.raises(LabkitError, match="written for Hopper"):
                hop.flash_attention_hopper(q, q, q, **off)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bh,n_blocks,n_programs", [(128, 32, 132), (32, 128, 132), (3, 9, 4), (1, 1, 132),
                                                   (5, 7, 3)])
def test_persistent_schedule_runs_every_block_once_and_pairs_balance_causal_work(bh, n_blocks, n_programs, causal):
    progs = hop.persistent_schedule(bh, n_blocks, n_programs, causal)
    assert len(progs) == min(n_programs, bh * ((n_blocks + 1) // 2 if causal else n_blocks))
    runs = sorted(b for p in progs for b in p)
    assert runs == [(h, m) for h in range(bh) for m in range(n_blocks)]          # each block exactly once
    work = hop.schedule_work(progs, causal, n_blocks)
    assert sum(work) == bh * (n_blocks * (n_blocks + 1) // 2 if causal else n_blocks * n_blocks)
    if causal and n_blocks % 2 == 0:                             # pairs of equal work: n_blocks + 1 tiles per unit
        assert all(w % (n_blocks + 1) == 0 for w in work)
    if causal and (bh, n_blocks) in ((128, 32), (32, 128)):     # 4k and 16k on 132 SMs: pairs beat blocks one by one
        naive = hop.schedule_work(hop.persistent_schedule(bh, n_blocks, n_programs, True, paired=False), True,
                                  n_blocks)
        ideal = sum(work) / n_programs
        assert max(work) < max(naive) and max(work) <= 1.05 * ideal, (max(work), max(naive), ideal)


def test_persistent_descriptor_check_refuses_a_head_stride_tma_cannot_take():
    """The persistent form's descriptors span heads too: rows of 16-byte multiples are not enough (CPU: the check
    runs before any launch)."""
    from labkit.kernels import flash_attn_fast as fast

    ok = torch.randn(1, 2, 64, 128, dtype=torch.bfloat16)
    odd = torch.randn(2 * (64 * 128 + 1), dtype=torch.bfloat16).as_strided((1, 2, 64, 128), (0, 64 * 128 + 1, 128, 1))
    fast._check_descriptor_strides(odd, ok, ok, ok)                       # a per-head descriptor is fine with it
    with pytest.raises(ValueError, match=r"q has strides .*dims \[1\].*persistent form.*persistent=False"):
        fast._check_descriptor_strides(odd, ok, ok, ok, dims=(0, 1), why="the persistent form's descriptors",
                                       fix="or pass persistent=False")
    fast._check_descriptor_strides(ok, ok, ok, ok, dims=(0, 1))


def test_persistent_schedule_refuses_empty_sizes():
    with pytest.raises(ValueError, match="must be >= 1"):
        hop.persistent_schedule(0, 4, 132, True)


HOPPER = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                            reason="needs a Hopper GPU (compute capability 9.0)")


@HOPPER
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 4, 1, 1), (1, 9, 3, 1025, 1025), (2, 9, 3, 1, 1025), (1, 4, 2, 97, 1025),
                                   (1, 8, 8, 4096, 4096)])
@pytest.mark.parametrize("config", range(len(hop.CONFIGS)))
def test_matches_reference_on_gpu(config, shape, causal):
    b, h, h_kv, n_q, n_kv = shape
    g = torch.Generator(device="cuda").manual_seed(n_q + n_kv)
    q = torch.randn(b, h, n_q, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, h_kv, n_kv, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, h_kv, n_kv, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    r = A.compare_to_reference(lambda *a: hop.flash_attention_hopper(*a, **hop.CONFIGS[config]), q, k, v, causal)
    assert r["ok"], r
    assert r["lse_err"] < 1e-3, r


@HOPPER
@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_64_default_on_gpu(causal):
    g = torch.Generator(device="cuda").manual_seed(64)
    q = torch.randn(1, 9, 1025, 64, device="cuda", dtype=torch.float16, generator=g)
    k, v = (torch.randn(1, 3, 1025, 64, device="cuda", dtype=torch.float16, generator=g) for _ in "kv")
    r = A.compare_to_reference(hop.flash_attention_hopper, q, k, v, causal)
    assert r["ok"], r


@HOPPER
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1500, 2048])
@pytest.mark.parametrize("config", [i for i, c in enumerate(hop.CONFIGS) if c.get("persistent")])
def test_persistent_runs_many_blocks_per_program_on_gpu(config, n, causal):
    """More query blocks than SMs, so every program of the persistent form runs several: the K/V ring, the Q tiles
    and the O staging tiles change hands between blocks (an odd number of blocks per head at 1500: 12 and, causal,
    a middle block without a partner); with overlap, key and value slots change hands apart, and with pingpong
    the consumers' turns carry over from block to block."""
    cfg = hop.CONFIGS[config]
    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(3, 16, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(3, 4, n, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "kv")
    r = A.compare_to_reference(lambda *a: hop.flash_attention_hopper(*a, **cfg), q, k, v, causal)
    assert r["ok"], r
    assert r["lse_err"] < 1e-3, r
    o1, _ = hop.flash_attention_hopper(q, k, v, causal, **cfg)
    o2, _ = hop.flash_attention_hopper(q, k, v, causal, **cfg)
    assert torch.equal(o1, o2)                                 # the static schedule: the same bits every run


@HOPPER
def test_persistent_refuses_strides_its_descriptors_cannot_take():
    cfg = next(c for c in hop.CONFIGS if c.get("persistent"))
    q = torch.randn(1, 2, 64, 129, device="cuda", dtype=torch.bfloat16)[..., :128]   # rows of 129: not 16-byte
    with pytest.raises(ValueError, match="multiple of 16 bytes|multiples of 16 bytes"):
        hop.flash_attention_hopper(q, q, q, **cfg)


@HOPPER
@pytest.mark.parametrize("persistent", [False, True])
def test_hugging_face_layout_on_gpu(persistent):
    """A transformers model's (batch, seq, heads, dim) tensors, transposed views, not copies."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 300, hh, 128, device="cuda", dtype=torch.float16, generator=g).transpose(1, 2)
               for hh in (8, 2, 2))
    r = A.compare_to_reference(lambda *a: hop.flash_attention_hopper(*a, persistent=persistent), q, k, v, True)
    assert r["ok"], r
