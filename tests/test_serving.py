"""The serving engine: block manager, scheduler, paged attention (Triton vs PyTorch), and every request's greedy
answer equal to running it alone under every scheduler, with preemption and prefix caching on."""
import dataclasses

import pytest
import torch

from labkit import fastgen, models, serving as S
from labkit.env import LabkitError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against each other and run several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    model, _ = models.load("tiny-llama-shape", device="cpu", dtype=torch.float32)  # random weights
    return model


def _req(n_prompt, max_tokens, seed=0, arrival=0.0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(10, 256, (n_prompt - len(prefix),), generator=g).tolist()
    return S.Request(list(prefix) + body, max_tokens, arrival, ignore_eos=True)


# ---------------------------------------------------------------------------------------------- block manager
def test_block_manager_shares_prefix_blocks_and_frees_them():
    bm = S.BlockManager(num_blocks=10, block_size=4, prefix_caching=True)
    shared = list(range(100, 108))  # two full blocks
    a, b = S.Sequence(S.Request(shared + [1, 2, 3], 2)), S.Sequence(S.Request(shared + [7], 2))
    bm.allocate(a)
    assert (len(a.block_table), a.num_computed, bm.num_free) == (3, 0, 7)
    a.num_computed = a.n_tokens
    bm.register_full_blocks(a)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed == 8  # both full blocks hit
    assert bm.ref[a.block_table[0]] == 2 and bm.hit_rate == 2 / 4
    bm.free_seq(a)
    assert bm.num_free == 7  # a's own third block only (b holds its own third): the shared two are still b's
    bm.free_seq(b)
    assert bm.num_free == 10
    c = S.Sequence(S.Request(shared + [9, 9], 1))  # cached blocks survive on the free list until reused
    bm.allocate(c)
    assert c.num_computed == 8
    d = S.Sequence(S.Request(shared, 1))  # the block holding the last prompt token is always computed
    bm.allocate(d)
    assert d.num_computed == 4


def test_admission_refuses_what_can_never_fit(tiny):
    eng = S.Engine(tiny, S.EngineConfig(num_blocks=4, block_size=16, max_model_len=100))
    with pytest.raises(LabkitError, match="max_model_len"):
        eng.add(_req(90, 20))
    with pytest.raises(LabkitError, match="KV blocks"):
        eng.add(_req(60, 10))  # 70 tokens need 5 blocks of 16; the pool has 4
    with pytest.raises(LabkitError, match="at least 1"):
        eng.add(_req(5, 0))
    eng.add(_req(50, 14))  # 64 tokens: exactly 4 blocks
    assert eng.blocks.num_free == 4 and len(eng.scheduler.waiting) == 1
    with pytest.raises(LabkitError):
        S.EngineConfig(scheduler="round-robin")


def test_fcfs_no_starvation_and_every_block_freed(tiny):
    """A big request at the head waits for blocks; the small ones behind it never overtake it."""
    cfg = S.EngineConfig(max_batch=8, num_blocks=12, block_size=4, max_model_len=64)
    eng = S.Engine(tiny, cfg)
    reqs = [_req(20, 12, seed=0), _req(30, 10, seed=1)] + [_req(6, 3, seed=i) for i in range(2, 10)]
    seqs = [eng.add(r) for r in reqs]
    first_step = {}
    while eng.has_work():
        eng.step()
        for i, s in enumerate(seqs):
            if s.status != S.WAITING and i not in first_step:
                first_step[i] = eng.steps
        assert sum(eng.blocks.ref) == sum(len(s.block_table) for s in eng.scheduler.running)
    admitted = [first_step[i] for i in range(len(seqs))]
    assert admitted == sorted(admitted), admitted  # admission in arrival order
    assert all(s.status == S.FINISHED and len(s.output) == s.req.max_tokens for s in seqs)
    assert eng.blocks.num_free == cfg.num_blocks and not any(eng.blocks.ref)


def test_admit_batch_admits_in_groups_in_order(tiny):
    """admit_batch=3: while sequences run, new ones join three at a time (or all that wait, if fewer), in order."""
    cfg = S.EngineConfig(max_batch=4, num_blocks=64, block_size=4, max_model_len=64, admit_batch=3)
    eng = S.Engine(tiny, cfg)
    seqs = [eng.add(_req(5, 2 + (7 * i) % 9, seed=i)) for i in range(11)]
    order = []
    while eng.has_work():
        waiting_before = list(eng.scheduler.waiting)
        running_before = len(eng.scheduler.running)
        eng.step()
        joined = [s for s in waiting_before if s.status != S.WAITING]
        order += joined
        if joined and running_before:
            assert len(joined) >= min(3, len(waiting_before)), (len(joined), len(waiting_before))
    assert order == seqs  # first come, first served
    assert all(len(s.output) == s.req.max_tokens for s in seqs) and eng.blocks.num_free == cfg.num_blocks
    with pytest.raises(LabkitError, match="admit_batch"):
        S.EngineConfig(admit_batch=0)


def test_cancel_frees_blocks_waiting_and_running(tiny):
    cfg = S.EngineConfig(max_batch=2, num_blocks=16, block_size=4, max_model_len=64, prefix_caching=True)
    eng = S.Engine(tiny, cfg)
    seqs = [eng.add(_req(9, 20, seed=i, prefix=range(20, 28))) for i in range(4)]
    eng.step()
    eng.step()
    assert seqs[0].status == S.RUNNING and seqs[3].status == S.WAITING
    assert eng.blocks.num_free < cfg.num_blocks
    eng.cancel(seqs[0])
    eng.cancel(seqs[3])
    assert seqs[0].finish_reason == "cancelled" and seqs[3] not in eng.scheduler.waiting
    while eng.has_work():
        eng.step()
    assert eng.blocks.num_free == cfg.num_blocks and not any(eng.blocks.ref)


def test_preemption_recomputes_and_finishes_correctly(tiny):
    base = S.EngineConfig(max_batch=8, num_blocks=64, block_size=4, max_model_len=64)
    trace = [_req(8 + i, 16, seed=i) for i in range(6)]
    alone, gaps = S.run_alone(tiny, base, trace)
    eng = S.Engine(tiny, dataclasses.replace(base, num_blocks=14))  # 6 sequences need up to 6 x 7 blocks
    seqs = eng.replay(trace, progress=False)
    assert eng.scheduler.preemptions > 0
    rep = S.compare_outputs({"preempt": [s.output for s in seqs]}, alone, gaps)
    assert rep["all_ok"], rep
    assert eng.blocks.num_free == 14


def test_replay_together_equals_replays_one_after_the_other(tiny):
    """Stepping a static and a continuous engine in turn changes nothing but when each step runs: the same answers,
    steps and admissions as replaying each alone, each on its own clock."""
    base = S.EngineConfig(max_batch=4, num_blocks=64, block_size=4, max_model_len=64)
    trace = [_req(6 + i, 3 + (5 * i) % 7, seed=i) for i in range(9)]  # all at once: admissions do not depend on timing
    cfgs = [dataclasses.replace(base, scheduler="static"), base]
    apart = [S.Engine(tiny, c) for c in cfgs]
    want = [e.replay(trace, progress=False) for e in apart]
    together = [S.Engine(tiny, c) for c in cfgs]
    got = S.replay_together(together, trace, progress=False)
    for w, g, ea, et in zip(want, got, apart, together):
        assert [s.output for s in g] == [s.output for s in w] and et.steps == ea.steps
        assert et.step_log == ea.step_log
        times = [t for s in g for t in s.token_times]
        assert all(t >= 0 for t in times) and max(times) < 60  # its own clock: seconds of its steps, not of both
        # every replayed step timed, split into steps that computed prompt tokens and decode-only steps
        summary = S.summarize_run(g, et)
        assert summary["steps_mixed"] + summary["steps_decode"] == et.steps == len(et.step_times)
        assert summary["steps_mixed"] >= 1 and summary["steps_decode"] >= 1 and summary["step_ms_decode_p50"] > 0
        assert max(g[-1].token_times) <= sum(dt for _, dt in et.step_times) + 1e-9  # no idle gap: steps only



def test_engine_without_step_log_gives_the_same_answers(tiny):
    """A long-running server keeps no per-step record (it would grow without end); nothing else changes."""
    cfg = S.EngineConfig(max_batch=4, num_blocks=32, block_size=4, max_model_len=48)
    prompts = [_req(5 + i, 4, seed=i).prompt for i in range(5)]
    logged, quiet = S.Engine(tiny, cfg), S.Engine(tiny, cfg, log_steps=False)
    assert quiet.generate(prompts, 4) == logged.generate(prompts, 4)
    assert quiet.steps == logged.steps > 0 and quiet.step_log == [] and len(logged.step_log) == logged.steps

# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("block_n", [16, 64, 128])
def test_paged_decode_kernel_matches_reference(dtype, tol, block_n):
    """The Triton kernel (compiled on a GPU, interpreted on a CPU) against the PyTorch reference, SmolLM2's 9/3 heads,
    odd lengths; tiles of one, four and eight blocks, the last sequence over more than one tile of scattered blocks."""
    g = torch.Generator().manual_seed(0)
    nb, bs, nkv, nq, hd = 12, 16, 3, 9, 64
    kc = torch.randn(nb, bs, nkv, hd, generator=g).to(dtype)
    vc = torch.randn(nb, bs, nkv, hd, generator=g).to(dtype)
    q = torch.randn(4, nq, hd, generator=g).to(dtype)
    tables = torch.tensor([[5, 2, 9, 0, 0, 0, 0, 0, 0, 0], [1] + [0] * 9, [11, 3, 7, 4] + [0] * 6,
                           [8, 0, 10, 6, 2, 11, 1, 5, 3, 9]], dtype=torch.int32)
    lens = torch.tensor([37, 1, 64, 150], dtype=torch.int32)
    ref = S.paged_decode_attention_ref(q, kc, vc, tables, lens)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on a CPU
    out = S.paged_decode_attention(*(t.to(dev) for t in (q, kc, vc, tables, lens)), block_n=block_n).cpu()
    exact = S.paged_decode_attention_ref(q.double(), kc.double(), vc.double(), tables, lens)
    err, ref_err = (out.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
    assert err <= max(2 * ref_err, tol), (err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_write_kernel_equals_reference(dtype):
    """RoPE + the K/V slot writes in one Triton launch give the torch reference's queries and caches bit for bit
    (every product rounded where torch rounds it); GQA heads 9/3, slots scattered over blocks."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on a CPU
    g = torch.Generator().manual_seed(2)
    N, nq, nkv, hd, nb, bs = 7, 9, 3, 64, 6, 16
    qkv = torch.randn(N, (nq + 2 * nkv) * hd, generator=g).to(dtype).to(dev)
    pos = torch.tensor([0, 5, 17, 3, 40, 41, 9], device=dev)
    slots = torch.tensor([3, 20, 77, 16, 50, 51, 95], device=dev)
    cos, sin = fastgen.rope_tables(fastgen.FastConfig(hidden=nq * hd, n_layers=1, n_heads=nq, n_kv_heads=nkv,
                                                      head_dim=hd, intermediate=8, vocab=8, rms_eps=1e-5,
                                                      rope_theta=10000.0), 64, dtype, dev)
    caches = [torch.zeros(nb, bs, nkv, hd, dtype=dtype, device=dev) for _ in range(4)]
    want = S.rope_write_paged_ref(qkv, pos, slots, cos, sin, caches[0], caches[1], nq, nkv)
    got = S.rope_write_paged(qkv, pos, slots, cos, sin, caches[2], caches[3], nq, nkv)
    assert torch.equal(got, want)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    assert caches[0].view(-1, nkv, hd)[slots].abs().sum() > 0  # the slots were written


def test_paged_reference_equals_contiguous_attention():
    """Reading K/V through a shuffled block table gives fastgen's contiguous decode attention."""
    g = torch.Generator().manual_seed(1)
    nkv, nq, hd, L, bs = 2, 4, 16, 21, 4
    k = torch.randn(1, nkv, L, hd, generator=g)
    v = torch.randn(1, nkv, L, hd, generator=g)
    q = torch.randn(1, nq, hd, generator=g)
    table = [6, 1, 4, 0, 3, 7]
    kc, vc = torch.zeros(8, bs, nkv, hd), torch.zeros(8, bs, nkv, hd)
    for p in range(L):
        kc[table[p // bs], p % bs] = k[0, :, p]
        vc[table[p // bs], p % bs] = v[0, :, p]
    want = fastgen.decode_attention_ref(q, k, v, torch.tensor([L - 1]), length=L)
    got = S.paged_attention_ref(q, kc, vc, table, L - 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _prefill_case(dtype, dev, spans, tables, nb=14, bs=16, nkv=3, nq=9, hd=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(nb, bs, nkv, hd, generator=g).to(dtype).to(dev)
    vc = torch.randn(nb, bs, nkv, hd, generator=g).to(dtype).to(dev)
    rows = [sum(n for _, n in spans[:i]) for i in range(len(spans))]
    q = torch.randn(sum(n for _, n in spans), nq, hd, generator=g).to(dtype).to(dev)
    return q, kc, vc, rows


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_paged_prefill_kernel_matches_reference(dtype, tol):
    """Prompt chunks of several sequences in one launch against the one-sequence-at-a-time reference: a chunk that
    starts after cached blocks (prefix cache, chunked prefill), one longer than a tile, one of two tokens."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on a CPU
    spans = [(0, 37), (32, 9), (5, 70), (0, 2)]
    tables = [[5, 2, 9], [1, 13, 0], [11, 3, 7, 4, 6, 8], [12]]
    q, kc, vc, rows = _prefill_case(dtype, dev, spans, tables)
    bt = torch.tensor([t + [0] * (6 - len(t)) for t in tables], dtype=torch.int32, device=dev)
    out = S.paged_prefill_attention(q, kc, vc, bt, S.prefill_tiles(spans, rows, dev)).cpu()
    q, kc, vc = q.cpu(), kc.cpu(), vc.cpu()
    ref = S.paged_prefill_attention_ref(q, kc, vc, tables, spans, rows)
    exact = S.paged_prefill_attention_ref(q.double(), kc.double(), vc.double(), tables, spans, rows)
    err, ref_err = (out.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
    assert err <= max(2 * ref_err, tol), (err, ref_err)


def test_paged_prefill_rows_do_not_depend_on_the_batch():
    """A sequence's rows come out bit for bit the same alone, beside other sequences, and split into chunks at
    other positions (compiled on a GPU): what lets a batched engine give each request the answer it gets alone."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    tables = [[5, 2, 9, 4, 6], [1, 13, 0]]
    q, kc, vc, _ = _prefill_case(dtype, dev, [(0, 75), (0, 40)], tables, seed=4)
    bt = torch.tensor([t + [0] * (5 - len(t)) for t in tables], dtype=torch.int32, device=dev)
    qa = q[:75]

    def run(qs, spans, table_rows):
        rows = [sum(n for _, n in spans[:i]) for i in range(len(spans))]
        return S.paged_prefill_attention(qs, kc, vc, bt[table_rows], S.prefill_tiles(spans, rows, dev))

    alone = run(qa, [(0, 75)], [0])
    together = run(q, [(0, 75), (0, 40)], [0, 1])[:75]
    chunks = torch.cat([run(qa[:20], [(0, 20)], [0]), run(qa[20:], [(20, 55)], [0])])
    other_first = run(torch.cat([q[75:], qa[3:]]), [(0, 40), (3, 72)], [1, 0])[40:]
    assert torch.equal(together, alone)  # the same rows in the same tiles
    if dev == "cuda":  # compiled, each row's dot products add up in the same order wherever the row sits in its tile
        assert torch.equal(chunks, alone)
        assert torch.equal(other_first, alone[3:])
    else:  # interpreted, tl.dot is numpy's matmul: on some CPUs (OpenBLAS's Zen and Haswell sgemm kernels, not its
        # Sandybridge one) a row's rounding depends on its place in the micro-kernel's block, a few ulps
        torch.testing.assert_close(chunks, alone, rtol=0, atol=1e-6)
        torch.testing.assert_close(other_first, alone[3:], rtol=0, atol=1e-6)


def test_engine_with_triton_attention_matches_torch(tiny):
    """Mixed steps (prompt chunks + decodes): decode rows and prompt chunks through the Triton kernels."""
    cfg = S.EngineConfig(max_batch=4, num_blocks=24, block_size=16, max_model_len=64, chunk_size=8)
    trace = [_req(5 + 7 * i, 6, seed=i, arrival=0.0 if i < 2 else 1e-9) for i in range(4)]
    model = tiny  # interpreted on a CPU; on a GPU both engines run there, the kernel compiled
    if torch.cuda.is_available():
        model = models.load("tiny-llama-shape", device="cuda", dtype=torch.float32)[0]
    want = S.Engine(model, cfg)
    want_seqs = want.replay(trace, progress=False)
    got = S.Engine(model, dataclasses.replace(cfg, kernels="triton"))
    got_seqs = got.replay(trace, progress=False)
    rep = S.compare_outputs({"triton": [s.output for s in got_seqs]}, [s.output for s in want_seqs],
                            [s.gaps for s in want_seqs])
    assert rep["all_ok"], rep
    assert any(r["seqs"] > 1 and r["tokens"] > r["seqs"] for r in got.step_log)  # some steps mixed both kinds


def test_engine_replays_a_stand_in_runner_on_its_clock():
    """A runner with no model (a modelled step time): the scheduler runs as with a model, the replay reads its clock."""
    class Stand:
        device, now = torch.device("cpu"), 0.0

        def clock(self):
            return self.now

        def forward(self, work):
            self.now += 0.25  # every step a quarter of a second on the replay clock
            return torch.zeros(len(work), 2)

    eng = S.Engine(None, S.EngineConfig(max_batch=4, num_blocks=32, max_model_len=64), runner=Stand())
    seqs = eng.replay([_req(10, 3, seed=i) for i in range(6)], progress=False)
    assert [len(s.output) for s in seqs] == [3] * 6 and eng.blocks.num_free == 32
    assert all(t / 0.25 == round(t / 0.25) for s in seqs for t in s.token_times)  # the clock moves only in forward
    assert S.summarize_run(seqs, eng)["makespan_s"] == 0.25 * eng.steps


def test_step_inputs_equal_a_loop_over_every_token():
    """The step's inputs, built with array operations over the whole step, against a loop over every token: ids,
    positions and cache slots of prompt chunks, decode rows and static batching's padding rows; the padded tables."""
    g = torch.Generator().manual_seed(3)
    r = S.PagedRunner.__new__(S.PagedRunner)  # only the block size is needed to build the inputs
    r.block_size = bs = 16
    work = []
    for i in range(9):
        seq = S.Sequence(S.Request(torch.randint(10, 1000, (int(torch.randint(1, 90, (), generator=g)),),
                                                 generator=g).tolist(), 4))
        seq.block_table = torch.randperm(200, generator=g)[:-(-(seq.n_tokens + 1) // bs)].tolist()
        kind = i % 3  # a prompt chunk from some computed position, a decode row, a padding row
        seq.num_computed = int(torch.randint(0, seq.n_tokens, (), generator=g)) if kind == 0 else seq.n_tokens - 1
        seq.padding = kind == 2
        work.append((seq, seq.n_tokens - seq.num_computed if kind == 0 else 1))
    ids, pos, slots, spans = r._inputs(work)
    want_ids, want_pos, want_slots, want_spans = [], [], [], []
    for seq, n in work:
        start = seq.n_tokens - 1 if seq.padding else seq.num_computed
        for p in range(start, start + n):
            want_ids.append(seq.tokens[p])
            want_pos.append(p)
            want_slots.append(seq.block_table[p // bs] * bs + p % bs)
        want_spans.append((start, n))
    assert (ids.tolist(), pos.tolist(), slots.tolist(), spans) == (want_ids, want_pos, want_slots, want_spans)
    seqs = [seq for seq, _ in work]
    assert S.padded_tables(seqs, 12).tolist() == [s.block_table + [0] * (12 - len(s.block_table)) for s in seqs]
    work[0][0].block_table.pop()  # a table one block short would read the next sequence's blocks: refused instead
    with pytest.raises(AssertionError, match="fewer KV blocks"):
        r._inputs(work)


def test_a_step_at_a_fixed_shape_equals_the_eager_step(tiny):
    """The form a CUDA graph replays for steps with prompt tokens (token rows padded to a bucket, decode entries,
    tiles and logits rows padded to the batch limit; ``_mixed_run``) gives the eager step's logits and writes the same
    K/V to the same slots: checked at every step of a trace with prompt chunks among decodes (interpreted on a CPU)."""
    cfg = S.EngineConfig(max_batch=4, num_blocks=24, block_size=16, max_model_len=64, chunk_size=8, kernels="triton",
                         cuda_graphs=False)
    model = tiny  # on a GPU the same check runs compiled, without the graphs (test_cuda_graph_steps_equal_eager_steps)
    if torch.cuda.is_available():
        model = models.load("tiny-llama-shape", device="cuda", dtype=torch.float32)[0]
    eng = S.Engine(model, cfg)
    r, nb = eng.runner, cfg.num_blocks
    r.graph_rows, r.token_buckets = cfg.max_batch, r.token_buckets_for(cfg.max_step_tokens)
    assert r.token_buckets[0] == 64 and r.token_buckets[-1] >= cfg.max_step_tokens
    eager, checked = r.forward, []

    def both(work):
        ids, pos, slots, spans = r._inputs(work)
        Tb = r.token_bucket(len(ids), len(work))
        before = r.k_cache.clone(), r.v_cache.clone()
        want = eager(work)
        after = r.k_cache.clone(), r.v_cache.clone()
        r.k_cache.copy_(before[0]), r.v_cache.copy_(before[1])
        with torch.no_grad():
            got = r._mixed_run(r._mixed_host(work, ids, pos, slots, spans, Tb).to(r.device), Tb)[:len(work)]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        for cache, ref in zip((r.k_cache, r.v_cache), after):  # the scratch block (index nb) takes the padding
            torch.testing.assert_close(cache[:, :nb], ref[:, :nb], rtol=0, atol=1e-5)
        checked.append((len(work), len(ids), Tb))
        return want

    r.forward = both
    trace = [_req(5 + 7 * i, 5, seed=i, arrival=0.0 if i < 2 else 1e-9) for i in range(5)]
    seqs = eng.replay(trace, progress=False)
    assert all(len(s.output) == 5 for s in seqs)
    assert any(1 < n_seqs < n_tok for n_seqs, n_tok, _ in checked), checked  # prompt chunks beside decodes
    assert all(Tb == 64 for *_, Tb in checked)


# ---------------------------------------------------------------------------------------------- the must-hold check
def test_every_request_equals_running_it_alone_smollm2(smollm2):
    """≥ 32 requests of SmolLM2 (fp32, CPU) under every scheduler, with chunked prefill, preemption and prefix
    caching: each greedy answer equals the request run alone, or diverges only at a reported near-tie."""
    model, tok = smollm2
    system = tok("You are a helpful assistant. Answer briefly.")["input_ids"]
    trace = S.make_trace(32, rate=200.0, prompt_len=(6, 18), answer_len=(1, 4), shared_prefix=system,
                         shared_fraction=0.6, seed=3)
    base = S.EngineConfig(max_batch=16, num_blocks=64, block_size=8, max_model_len=64)
    alone, gaps = S.run_alone(model, base, trace)
    assert alone[0] == fastgen.FastLlama(model, max_seq_len=64).generate(
        torch.tensor([trace[0].prompt]), trace[0].max_tokens, use_graph=False)[0].tolist()
    configs = {"static": dataclasses.replace(base, scheduler="static", prefix_caching=True),
               "continuous": base,
               "continuous, admit 4 at once": dataclasses.replace(base, admit_batch=4),
               "chunked+prefix+preempt": dataclasses.replace(base, chunk_size=8, prefix_caching=True, block_size=4,
                                                             num_blocks=12)}
    runs, engines = {}, {}
    for name, cfg in configs.items():
        eng = S.Engine(model, cfg)
        seqs = eng.replay(trace, progress=False)
        runs[name] = [s.output for s in sorted(seqs, key=lambda s: int(s.id.split("-")[1]))]
        engines[name] = eng
        assert eng.blocks.num_free == cfg.num_blocks, name
    rep = S.compare_outputs(runs, alone, gaps)
    print(rep)
    assert rep["all_ok"], rep
    assert engines["chunked+prefix+preempt"].scheduler.preemptions > 0
    assert engines["chunked+prefix+preempt"].blocks.hit_rate > 0
    assert sum(len(o) for o in alone) >= 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_equal_eager_steps():
    """Steps replayed from captured graphs (decode-only steps by batch bucket, steps with prompt tokens by token
    bucket, padding rows in a scratch block) give the eager engine's tokens, and the padding never touches a real
    block."""
    model = models.load("tiny-llama-shape", device="cuda", dtype=torch.float32)[0]
    cfg = S.EngineConfig(max_batch=8, num_blocks=48, block_size=16, max_model_len=96, kernels="triton",
                         cuda_graphs=False)
    trace = [_req(5 + 3 * i, 12, seed=i, arrival=0.01 * i) for i in range(11)]  # batches of 1..8: several buckets
    want = S.Engine(model, cfg)
    want_seqs = want.replay(trace, progress=False)
    got = S.Engine(model, dataclasses.replace(cfg, cuda_graphs=True))
    replays = {"decode": 0, "prompt": 0}
    for kind, name in (("decode", "_graph_step"), ("prompt", "_mixed_graph_step")):
        def counted(*a, _f=getattr(got.runner, name), _k=kind):
            replays[_k] += 1
            return _f(*a)
        setattr(got.runner, name, counted)
    got_seqs = got.replay(trace, progress=False)
    assert len(got.runner.graphs) >= 2, got.runner.graphs.keys()
    assert replays["decode"] > 0 and replays["prompt"] > 0, replays  # both kinds of step replayed a graph
    rep = S.compare_outputs({"graphs": [s.output for s in got_seqs]}, [s.output for s in want_seqs],
                            [s.gaps for s in want_seqs])
    assert rep["all_ok"], rep
    assert got.blocks.num_free == cfg.num_blocks


def test_prefill_budget_sweep_on_smollm2(tmp_path):
    """``labkit bench serving --prefill-budgets``: static first, then one continuous run per budget on the same
    trace. A larger budget takes the prompts in fewer steps (the scheduler's arithmetic, whatever the clock), and the
    summary's best ratio is one of the budgets' ratios whose p99 time per token is not worse than static's."""
    from labkit import serving_bench as SB

    sizes = dataclasses.replace(SB.BenchSizes(), n_requests=10, prompt_len=(16, 48), answer_len=(1, 6), max_batch=4)
    doc = SB.run_prefill_budget_sweep("smollm2-135m", (64, 8), sizes, tmp_path, progress=False, log=lambda *a: None,
                                      tag="t")
    recs, summ = doc["records"], doc["summary"]
    assert [r["scheduler"] for r in recs] == ["static", "continuous, budget 8", "continuous, budget 64"]
    assert all(r["output_tokens"] == recs[0]["output_tokens"] > 0 for r in recs)  # every answer to its full length
    assert recs[1]["steps"] > recs[2]["steps"]  # 8 tokens a step, 4 of them decodes: the prompts take longer
    assert [b["max_step_tokens"] for b in summ["budgets"]] == [8, 64]
    ok = [b["throughput_vs_static"] for b in summ["budgets"] if b["tpot_p99_vs_static"] <= 1.0]
    assert summ["best_throughput_vs_static_at_equal_or_better_tpot_p99"] == (max(ok) if ok else None)
    assert (tmp_path / "serving-budgets-t.json").exists()
    with pytest.raises(LabkitError, match="must exceed max_batch=4"):
        SB.run_prefill_budget_sweep("smollm2-135m", (4, 64), sizes, tmp_path)
