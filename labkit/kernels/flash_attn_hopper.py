"""The FlashAttention forward written for Hopper in Gluon, Triton's lower-level language: the third kernel of the
attention notebook, beside the teaching kernel (``flash_attn.py``) and the TMA one (``flash_attn_fast.py``).

``tl.dot`` leaves to the compiler how tiles reach the tensor cores and when a program waits for them. Gluon hands
those choices to the kernel: the layout of every tile in registers and shared memory, each warpgroup matrix-multiply
(``wgmma``) issued asynchronously and waited for explicitly, every TMA copy with the ``mbarrier`` that says it has
landed. This module uses them the way FlashAttention-3 does on an H100/H200, in its default (warp-specialized) form:

1. **A loader warp and a ring of K/V tiles.** One warp issues the TMA copies of K and V into ``STAGES`` shared-memory
   slots, each copy signalling its slot's "ready" barrier; it refills a slot once its "empty" barrier says both
   consumers are done with it.
2. **Two consumer warpgroups, each with 64 query rows**, sharing the K/V tiles and never waiting for each other:
   S = Q K^T (both operands in shared memory), the online softmax in registers, then O += P V with P passed from
   registers (FlashAttention-3's "RS" form: P never touches shared memory). While one consumer computes its
   exponentials, the other's wgmmas keep the tensor cores busy.
3. **Registers moved to where they are needed** (``setmaxnreg``): the loader keeps 24 per thread, each consumer gets
   240, enough for a 64 x 128 fp32 score tile and a 64 x 128 fp32 accumulator without spilling.
4. **Persistent** (``persistent``): one program per SM runs query block after block with the same partitions, so
   the loader fills the ring for the next block, and each consumer's next Q tile, while the consumers finish the
   last one (its final P V, the division by the row sums, the O store), which a program per block leaves exposed at
   every block's start and end. Causal blocks go in pairs of equal work (a head's heaviest block with its lightest),
   dealt out in turn, so the programs finish together.
5. **FlashAttention-3's in-warpgroup order** (``overlap``, in the persistent form): each consumer issues the next
   tile's scores Q K_j^T and this tile's P_{j-1} V_{j-1} back to back, waits for the scores only, and computes their
   softmax while P V still runs on the tensor cores; one score tile lives in registers (P waits as bf16). Key and
   value slots are released apart, a key slot as soon as its scores are done. With ``pingpong`` the two consumers
   take turns issuing those pairs (an mbarrier per consumer), so one's softmax falls under the other's products.

Variants the configurations select (``CONFIGS``; each measured, see the comment there): a deeper ring; ``defer``
(P V waited for only after the next Q K^T is issued, the two back to back on the tensor cores); ``pingpong`` (with
``defer``, the consumers take turns issuing); ``pipe`` (an earlier take on the in-warpgroup overlap for a program
per block: the next tile's scores issued before this tile's softmax, at the cost of a second score tile in
registers); the persistent form in the plain order (``overlap`` off); and a form without warp
specialization (``ws=False``: all warps of the program on one query tile, refilling the ring after a barrier).

Same signature, layout, result ``(o, lse)`` and references as the other two kernels. Needs compute capability 9.0 (an
H100/H200): the interpreter cannot run Gluon, so on a CPU it is compiled for sm_90 offline (``offline_stats``),
which is what CI checks.
"""
from __future__ import annotations

import math

import torch

from labkit.env import LabkitError
from labkit.kernels import flash_attn as _fa

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_init, warpgroup_mma_wait)
    # the TMA copies were renamed after Triton 3.6 (async_copy_global_to_shared -> async_load, and the store;
    # thread_barrier -> barrier)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # every warp of the program (bar.sync)
except ImportError:  # no triton, or one without Gluon's Hopper module
    gluon = None


def _cfg(block_m, block_n, num_warps, stages, pipe, ws=False, defer=False, pingpong=False, persistent=False,
         overlap=False, tree=False) -> dict:
    return dict(block_m=block_m, block_n=block_n, num_warps=num_warps, stages=stages, pipe=pipe, ws=ws, defer=defer,
                pingpong=pingpong, persistent=persistent, overlap=overlap, tree=tree)


# the configurations; CONFIGS[DEFAULT] (persistent, FlashAttention-3's in-warpgroup order, the consumers taking
# turns) is the default for head_dim 128 (the sync 128 x 128 one for head_dim 64, where the warp-specialized form is
# not offered). Every one was checked on an NVIDIA H200 (16 cases each: ragged lengths, decode, grouped-query
# attention, a transformers layout; bf16, head dim 128) and timed there, at 4k and 16k, causal and not, beside
# SDPA's cuDNN backend, flash-attn-4 and the TMA kernel. The program-per-block ones, all in one run
# (results/nvidia-h200/attention_hopper_configs.json, 27651f6): the warp-specialized 128 x 128 ring of 2 (the first)
# gave 373 / 500 / 492 / 518 TFLOP/s at causal 4k / 16k, non-causal 4k / 16k; a ring of 3 came within 1% at 16k; the
# others were 3-20% slower at 16k (deferring the P V wait, the consumers taking turns, ``pipe``'s overlap with two
# score tiles in registers, 64-key tiles, no warp specialization), while at causal 4k, where blocks are short,
# several beat it. The persistent forms (attention_hopper.json, 67a5aa1, one run): the default 449 / 571 / 590 / 612,
# overlap without turns 450 / 563 / 599 / 604, the persistent form in the plain order 474 / 505 / 518 / 535, the first
# config 374 / 500 / 467 / 524, beside cuDNN 566 / 569 / 575 / 607 and flash-attn-4 564 / 567 / 609 / 649. The new
# order gained 13-18% at 16k and non-causal 4k in both of its runs; causal 4k varies from run to run (the default:
# 552 in the first run, d4e5318, 449 here). ``tree`` (the last: row maxima and sums folded pairwise) against the
# default, three rounds in one process (attention_spread_tree.json, b8ce103): medians 475 / 565 / 552 / 594 against
# 464 / 572 / 556 / 603, +2.4% at causal 4k and 0.7-1.5% slower elsewhere: not adopted.
CONFIGS = (
    _cfg(128, 128, 4, 2, False, True), _cfg(128, 128, 4, 3, False, True),
    _cfg(128, 128, 4, 2, False, True, defer=True), _cfg(128, 128, 4, 2, False, True, defer=True, pingpong=True),
    _cfg(128, 128, 4, 3, False, True, defer=True), _cfg(128, 128, 4, 3, False, True, defer=True, pingpong=True),
    _cfg(128, 64, 4, 3, False, True), _cfg(128, 128, 4, 3, True, True), _cfg(128, 64, 4, 4, True, True),
    _cfg(128, 128, 8, 2, False), _cfg(64, 64, 4, 2, False),
    _cfg(128, 128, 4, 2, False, True, persistent=True),
    _cfg(128, 128, 4, 2, False, True, persistent=True, overlap=True),
    _cfg(128, 128, 4, 2, False, True, persistent=True, overlap=True, pingpong=True),
    _cfg(128, 128, 4, 2, False, True, persistent=True, overlap=True, pingpong=True, tree=True),
)
DEFAULT = 13  # the index in CONFIGS of the head-dim-128 default
# the warp-specialized form runs 9 warps, allocated as 3 warpgroups: at most 168 registers per thread on average
# keeps them within the SM's 64K; the loader warp gives back all but 24, and each consumer warpgroup takes 240
WS_MAXNREG, WS_CONSUMER_REGS = 168, 240


if gluon is not None:

    @gluon.constexpr_function
    def _warpgroup_acc(n):
        """The register layout of a 64 x n wgmma accumulator held by one warpgroup (16 rows per warp)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])

    @gluon.jit
    def _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, tile, n_tiles, STAGES: gl.constexpr,
                  BLOCK_N: gl.constexpr):
        """Start the TMA copies of key/value tile ``tile`` into its slot (nothing past the last tile)."""
        slot = tile % STAGES
        pred = tile < n_tiles
        mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes, pred)
        _tma_load(k_desc, [tile * BLOCK_N, 0], k_bar.index(slot), k_smem.index(slot), pred)
        mbarrier.expect(v_bar.index(slot), v_desc.block_type.nbytes, pred)
        _tma_load(v_desc, [tile * BLOCK_N, 0], v_bar.index(slot), v_smem.index(slot), pred)

    @gluon.jit
    def _fold(x, IS_MAX: gl.constexpr):
        """(R, N) -> (R, N / 2): column c combined with column c + N / 2 (maximum or sum), one independent
        operation per pair, where a row reduction chains them one after another."""
        R: gl.constexpr = x.shape[0]
        N: gl.constexpr = x.shape[1]
        a, b = gl.split(gl.permute(gl.reshape(x, [R, 2, N // 2]), [0, 2, 1]))
        if IS_MAX:
            return gl.maximum(a, b)
        return a + b

    @gluon.jit
    def _row_max(x, rows: gl.constexpr, TREE: gl.constexpr):
        if TREE:  # three folds, then a chain of 4 per row: dependency depth 7 instead of 32
            return gl.convert_layout(gl.max(_fold(_fold(_fold(x, True), True), True), 1), rows)
        return gl.max(x, 1)

    @gluon.jit
    def _row_sum(x, rows: gl.constexpr, TREE: gl.constexpr):
        if TREE:
            return gl.convert_layout(gl.sum(_fold(_fold(_fold(x, False), False), False), 1), rows)
        return gl.sum(x, 1)

    @gluon.jit
    def _softmax_step(s, m_i, l_i, start_n, hi_full, offs_m, seqlen_kv, causal_shift, qk_scale,
                      s_layout: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, TREE: gl.constexpr = False):
        """The online-softmax statistics for one score tile (the teaching kernel's update): returns P~ (fp32),
        the factor that rescales the old statistics, and the new row sums and maxima. Tiles at or past
        ``hi_full`` get the bounds and causal masks. TREE: the row maxima and sums folded pairwise first
        (``_fold``), so each thread's 32 values per row no longer form one chain of dependent operations."""
        rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        if start_n >= hi_full:
            cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            keep = gl.expand_dims(cols, 0) < seqlen_kv
            if CAUSAL:
                keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(offs_m, 1) + causal_shift)
            s = gl.where(keep, s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, _row_max(s, rows, TREE))
            s = s - gl.expand_dims(m_new, 1)
        else:
            m_new = gl.maximum(m_i, _row_max(s, rows, TREE) * qk_scale)
            s = s * qk_scale - gl.expand_dims(m_new, 1)
        p = gl.exp2(s)
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + _row_sum(p, rows, TREE)
        return p, alpha, l_i, m_new

    @gluon.jit
    def _tile_step(q_smem, k_smem, v_smem, k_bar, v_bar, j, r, acc, m_i, l_i, s_zero, hi_full, offs_m, seqlen_kv,
                   causal_shift, qk_scale, s_layout: gl.constexpr, p_layout: gl.constexpr, rows_o: gl.constexpr,
                   STAGES: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, q_free=None, last=False,
                   RELEASE_Q: gl.constexpr = False):
        """Key tile j, held in the ring's r-th fill (r = j unless a program runs several blocks), in order and
        waiting for each wgmma: S = Q K^T, the softmax update, O = alpha O + P V. With RELEASE_Q, the Q tile is
        handed back on ``q_free`` as soon as the ``last`` tile's scores are done."""
        cur = r % STAGES
        phase = (r // STAGES) & 1
        mbarrier.wait(k_bar.index(cur), phase)
        s = warpgroup_mma(q_smem, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, q_smem, k_smem.index(cur)))[0]
        if RELEASE_Q:
            mbarrier.arrive(q_free, count=1, pred=last)
        p, alpha, l_i, m_i = _softmax_step(s, m_i, l_i, j * BLOCK_N, hi_full, offs_m, seqlen_kv, causal_shift,
                                           qk_scale, s_layout, BLOCK_N, CAUSAL)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
        mbarrier.wait(v_bar.index(cur), phase)
        acc = warpgroup_mma(gl.convert_layout(p.to(q_smem.dtype), p_layout), v_smem.index(cur), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, v_smem.index(cur)))[0]
        return acc, m_i, l_i

    @gluon.jit
    def _key_range(m0, rows, causal_shift, seqlen_kv, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """Key tiles of the query rows [m0, m0 + rows): [0, hi_full) need no mask (causal: keys [0, m0 + shift] are
        visible to every row; past that, the diagonal), n_tiles in all (at least one: rows that see no key still run
        one masked tile)."""
        if CAUSAL:
            hi_full = (gl.minimum(m0 + causal_shift + 1, seqlen_kv) // BLOCK_N) * BLOCK_N
            hi = gl.minimum(m0 + rows + causal_shift, seqlen_kv)
        else:
            hi_full = (seqlen_kv // BLOCK_N) * BLOCK_N
            hi = seqlen_kv
        return hi_full, gl.maximum(gl.cdiv(hi, BLOCK_N), 1)

    @gluon.jit
    def _block_setup(Q, K, V, O,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                     n_heads, group, seqlen_q, seqlen_kv,
                     HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, Q_ROWS: gl.constexpr,
                     CAUSAL: gl.constexpr, HEAVY_FIRST: gl.constexpr, Q_SMEM: gl.constexpr, KV_SMEM: gl.constexpr):
        """This program's query block (heaviest first when asked), one TMA descriptor per tensor for its
        (batch, head) -- bounded by that head's sequence: zeros past it on load, nothing written past it on store;
        Q and O in tiles of Q_ROWS -- and its key range: tiles [0, hi_full) need no mask, n_tiles in all."""
        pid_m = gl.program_id(0)
        if HEAVY_FIRST:
            pid_m = gl.num_programs(0) - 1 - pid_m
        pid_bh = gl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        h_kv = h // group                                                     # grouped-query attention
        q_desc = tma.make_tensor_descriptor(Q + b.to(gl.int64) * stride_qb + h.to(gl.int64) * stride_qh,
                                            shape=[seqlen_q, HEAD_DIM], strides=[stride_qm, 1],
                                            block_shape=[Q_ROWS, HEAD_DIM], layout=Q_SMEM)
        k_desc = tma.make_tensor_descriptor(K + b.to(gl.int64) * stride_kb + h_kv.to(gl.int64) * stride_kh,
                                            shape=[seqlen_kv, HEAD_DIM], strides=[stride_kn, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM], layout=KV_SMEM)
        v_desc = tma.make_tensor_descriptor(V + b.to(gl.int64) * stride_vb + h_kv.to(gl.int64) * stride_vh,
                                            shape=[seqlen_kv, HEAD_DIM], strides=[stride_vn, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM], layout=KV_SMEM)
        o_desc = tma.make_tensor_descriptor(O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh,
                                            shape=[seqlen_q, HEAD_DIM], strides=[stride_om, 1],
                                            block_shape=[Q_ROWS, HEAD_DIM], layout=Q_SMEM)
        m0 = pid_m * BLOCK_M
        causal_shift = seqlen_kv - seqlen_q
        hi_full, n_tiles = _key_range(m0, BLOCK_M, causal_shift, seqlen_kv, BLOCK_N, CAUSAL)
        return pid_bh, m0, causal_shift, hi_full, n_tiles, q_desc, k_desc, v_desc, o_desc

    @gluon.jit
    def _attn_fwd_hopper(Q, K, V, O, LSE,
                         stride_qb, stride_qh, stride_qm,
                         stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn,
                         stride_ob, stride_oh, stride_om,
                         n_heads, group, seqlen_q, seqlen_kv, qk_scale,
                         HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         STAGES: gl.constexpr, CAUSAL: gl.constexpr, HEAVY_FIRST: gl.constexpr,
                         Q_SMEM: gl.constexpr, KV_SMEM: gl.constexpr, num_warps: gl.constexpr):
        # registers: wgmma accumulators (16 rows per warp, all warps stacked along the rows), P as the A operand
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = Q.dtype.element_ty

        pid_bh, m0, causal_shift, hi_full, n_tiles, q_desc, k_desc, v_desc, o_desc = _block_setup(
            Q, K, V, O, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
            stride_vn, stride_ob, stride_oh, stride_om, n_heads, group, seqlen_q, seqlen_kv, HEAD_DIM, BLOCK_M,
            BLOCK_N, BLOCK_M, CAUSAL, HEAVY_FIRST, Q_SMEM, KV_SMEM)

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], Q_SMEM)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], KV_SMEM)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], KV_SMEM)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bar.index(i), count=1)
            mbarrier.init(v_bar.index(i), count=1)
        fence_async_shared()

        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        _tma_load(q_desc, [m0, 0], q_bar, q_smem)
        for i in gl.static_range(STAGES):                                    # the ring's first STAGES tiles
            _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, i, n_tiles, STAGES, BLOCK_N)

        offs_m = m0 + gl.arange(0, BLOCK_M, layout=rows_s)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_s)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar, 0)

        for j in range(0, n_tiles):
            acc, m_i, l_i = _tile_step(q_smem, k_smem, v_smem, k_bar, v_bar, j, j, acc, m_i, l_i, s_zero, hi_full,
                                       offs_m, seqlen_kv, causal_shift, qk_scale, s_layout, p_layout, rows_o, STAGES,
                                       BLOCK_N, CAUSAL)
            _cta_barrier()                                                # both warpgroups done with slot j
            _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, j + STAGES, n_tiles, STAGES, BLOCK_N)

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bar.index(i))
            mbarrier.invalidate(v_bar.index(i))
        out = acc / gl.expand_dims(gl.convert_layout(l_i, rows_o), 1)
        q_smem.store(out.to(dtype))                                           # Q's tile is free: stage O there
        fence_async_shared()
        _tma_store(o_desc, [m0, 0], q_smem)             # rows past the end are dropped
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(LSE + pid_bh.to(gl.int64) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)
        tma.store_wait(0)


    # ---- the warp-specialized form: one loader warp and two independent consumer warpgroups (FlashAttention-3's
    # producer/consumer split). Each consumer owns 64 query rows; they share the K/V ring and release a slot by
    # arriving on its "empty" barrier (count 2), so neither waits for the other: the warp schedulers interleave one
    # consumer's softmax with the other's wgmmas.

    @gluon.jit
    def _ws_loader(descs, bufs, bars, scalars, STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
        """Every key/value tile of the block into the ring, each slot once both consumers have released it."""
        k_desc, v_desc = descs[1], descs[2]
        k_smem, v_smem = bufs[1], bufs[2]
        k_bar, v_bar, empty_bar = bars[1], bars[2], bars[3]
        n_tiles = scalars[1]
        for j in range(n_tiles):
            slot = j % STAGES
            mbarrier.wait(empty_bar.index(slot), ((j // STAGES) & 1) ^ 1)  # first pass: free from the start
            mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes)
            _tma_load(k_desc, [j * BLOCK_N, 0], k_bar.index(slot), k_smem.index(slot))
            mbarrier.expect(v_bar.index(slot), v_desc.block_type.nbytes)
            _tma_load(v_desc, [j * BLOCK_N, 0], v_bar.index(slot), v_smem.index(slot))

    @gluon.jit
    def _ws_consumer(descs, bufs, bars, scalars, LSE, HALF: gl.constexpr, STAGES: gl.constexpr,
                     BLOCK_N: gl.constexpr, PIPE: gl.constexpr, CAUSAL: gl.constexpr, DEFER: gl.constexpr,
                     PINGPONG: gl.constexpr):
        """One warpgroup's 64 query rows (HALF 0 or 1 of the block) through every key tile of the block."""
        q_desc, k_desc, v_desc, o_desc = descs
        q_smem, k_smem, v_smem = bufs
        q_bar, k_bar, v_bar, empty_bar, turn_bar = bars
        m0, n_tiles, hi_full_block, lse_base, seqlen_q, seqlen_kv, causal_shift, qk_scale = scalars
        ROWS: gl.constexpr = q_desc.block_type.shape[0]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
        s_layout: gl.constexpr = _warpgroup_acc(BLOCK_N)
        o_layout: gl.constexpr = _warpgroup_acc(HEAD_DIM)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = q_desc.dtype
        mq = m0 + HALF * ROWS
        if CAUSAL:  # this half's own unmasked range; its last tiles may be all masked (p = 0 there)
            hi_full = _key_range(mq, ROWS, causal_shift, seqlen_kv, BLOCK_N, CAUSAL)[0]
        else:
            hi_full = hi_full_block
        my_q = q_smem.index(HALF)
        mbarrier.expect(q_bar.index(HALF), q_desc.block_type.nbytes)
        _tma_load(q_desc, [mq, 0], q_bar.index(HALF), my_q)
        offs_m = mq + gl.arange(0, ROWS, layout=rows_s)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=rows_s)
        l_i = gl.zeros([ROWS], gl.float32, layout=rows_s)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bar.index(HALF), 0)
        if PIPE:
            gl.static_assert(STAGES >= 3, "PIPE needs STAGES >= 3")
            mbarrier.wait(k_bar.index(0), 0)
            s = warpgroup_mma(my_q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s, my_q, k_smem.index(0)))[0]
            acc = warpgroup_mma_init(acc)
            for j in range(0, n_tiles - 1):
                nxt = (j + 1) % STAGES
                mbarrier.wait(k_bar.index(nxt), ((j + 1) // STAGES) & 1)
                s_next = warpgroup_mma(my_q, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False,
                                       is_async=True)
                p, alpha, l_i, m_i = _softmax_step(s, m_i, l_i, j * BLOCK_N, hi_full, offs_m, seqlen_kv,
                                                   causal_shift, qk_scale, s_layout, BLOCK_N, CAUSAL)
                acc = warpgroup_mma_wait(1, deps=(acc, ))                     # P_{j-1} V_{j-1} done
                if j > 0:
                    mbarrier.arrive(empty_bar.index((j - 1) % STAGES), count=1)  # tile j - 1: this half is done
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
                cur = j % STAGES
                mbarrier.wait(v_bar.index(cur), (j // STAGES) & 1)
                acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(cur), acc,
                                    is_async=True)
                s = warpgroup_mma_wait(1, deps=(s_next, my_q, k_smem.index(nxt)))[0]
            last = n_tiles - 1
            p, alpha, l_i, m_i = _softmax_step(s, m_i, l_i, last * BLOCK_N, hi_full, offs_m, seqlen_kv,
                                               causal_shift, qk_scale, s_layout, BLOCK_N, CAUSAL)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            if last > 0:
                mbarrier.arrive(empty_bar.index((last - 1) % STAGES), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
            mbarrier.wait(v_bar.index(last % STAGES), (last // STAGES) & 1)
            acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(last % STAGES), acc,
                                is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
        elif DEFER:
            # P_j V_j is waited for only after Q K_{j+1}^T has been issued: the two run back to back on the tensor
            # cores, and slot j is released once both are done
            acc = warpgroup_mma_init(acc)
            for j in range(0, n_tiles):
                cur = j % STAGES
                phase = (j // STAGES) & 1
                mbarrier.wait(k_bar.index(cur), phase)
                if PINGPONG:  # the consumers take turns issuing their scores: their softmaxes fall half a step apart
                    mbarrier.wait(turn_bar.index(HALF), (j & 1) ^ (1 - HALF))
                s = warpgroup_mma(my_q, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                if PINGPONG:
                    mbarrier.arrive(turn_bar.index(1 - HALF), count=1)
                acc, s = warpgroup_mma_wait(0, deps=(acc, s, my_q, k_smem.index(cur)))[:2]
                if j > 0:
                    mbarrier.arrive(empty_bar.index((j - 1) % STAGES), count=1)
                p, alpha, l_i, m_i = _softmax_step(s, m_i, l_i, j * BLOCK_N, hi_full, offs_m, seqlen_kv,
                                                   causal_shift, qk_scale, s_layout, BLOCK_N, CAUSAL)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
                mbarrier.wait(v_bar.index(cur), phase)
                acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(cur), acc,
                                    is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(empty_bar.index((n_tiles - 1) % STAGES), count=1)
        else:
            for j in range(0, n_tiles):
                acc, m_i, l_i = _tile_step(my_q, k_smem, v_smem, k_bar, v_bar, j, j, acc, m_i, l_i, s_zero, hi_full,
                                           offs_m, seqlen_kv, causal_shift, qk_scale, s_layout, p_layout, rows_o,
                                           STAGES, BLOCK_N, CAUSAL)
                mbarrier.arrive(empty_bar.index(j % STAGES), count=1)           # this half is done with tile j
        out = acc / gl.expand_dims(gl.convert_layout(l_i, rows_o), 1)
        my_q.store(out.to(dtype))                                             # this half's Q tile stages its O
        fence_async_shared()
        _tma_store(o_desc, [mq, 0], my_q)
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(LSE + lse_base + offs_m, lse, mask=offs_m < seqlen_q)
        tma.store_wait(0)

    @gluon.jit
    def _ws_consumer_1(descs, bufs, bars, scalars, LSE, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                       PIPE: gl.constexpr, CAUSAL: gl.constexpr, DEFER: gl.constexpr,
                     PINGPONG: gl.constexpr):
        _ws_consumer(descs, bufs, bars, scalars, LSE, 1, STAGES, BLOCK_N, PIPE, CAUSAL, DEFER, PINGPONG)

    @gluon.jit
    def _ws_loader_w(descs, bufs, bars, scalars, LSE, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                     PIPE: gl.constexpr, CAUSAL: gl.constexpr, DEFER: gl.constexpr,
                     PINGPONG: gl.constexpr):
        _ws_loader(descs, bufs, bars, scalars, STAGES, BLOCK_N)

    @gluon.jit
    def _attn_fwd_hopper_ws(Q, K, V, O, LSE,
                            stride_qb, stride_qh, stride_qm,
                            stride_kb, stride_kh, stride_kn,
                            stride_vb, stride_vh, stride_vn,
                            stride_ob, stride_oh, stride_om,
                            n_heads, group, seqlen_q, seqlen_kv, qk_scale,
                            HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                            STAGES: gl.constexpr, CAUSAL: gl.constexpr, HEAVY_FIRST: gl.constexpr,
                            PIPE: gl.constexpr, Q_SMEM: gl.constexpr, KV_SMEM: gl.constexpr,
                            DEFER: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                            num_warps: gl.constexpr):
        gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
        HALF_M: gl.constexpr = BLOCK_M // 2
        pid_bh, m0, causal_shift, hi_full, n_tiles, q_desc, k_desc, v_desc, o_desc = _block_setup(
            Q, K, V, O, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
            stride_vn, stride_ob, stride_oh, stride_om, n_heads, group, seqlen_q, seqlen_kv, HEAD_DIM, BLOCK_M,
            BLOCK_N, HALF_M, CAUSAL, HEAVY_FIRST, Q_SMEM, KV_SMEM)
        dtype: gl.constexpr = Q.dtype.element_ty
        q_smem = gl.allocate_shared_memory(dtype, [2, HALF_M, HEAD_DIM], Q_SMEM)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], KV_SMEM)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], KV_SMEM)
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bar.index(i), count=1)
            mbarrier.init(turn_bar.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bar.index(i), count=1)
            mbarrier.init(v_bar.index(i), count=1)
            mbarrier.init(empty_bar.index(i), count=2)                        # one arrival per consumer
        fence_async_shared()
        descs = (q_desc, k_desc, v_desc, o_desc)
        bufs = (q_smem, k_smem, v_smem)
        bars = (q_bar, k_bar, v_bar, empty_bar, turn_bar)
        scalars = (m0, n_tiles, hi_full, pid_bh.to(gl.int64) * seqlen_q, seqlen_q, seqlen_kv, causal_shift,
                   qk_scale)
        gl.warp_specialize([
            (_ws_consumer, (descs, bufs, bars, scalars, LSE, 0, STAGES, BLOCK_N, PIPE, CAUSAL, DEFER, PINGPONG)),
            (_ws_consumer_1, (descs, bufs, bars, scalars, LSE, STAGES, BLOCK_N, PIPE, CAUSAL, DEFER, PINGPONG)),
            (_ws_loader_w, (descs, bufs, bars, scalars, LSE, STAGES, BLOCK_N, PIPE, CAUSAL, DEFER, PINGPONG)),
        ], [4, 1], [CONSUMER_REGS, 24])

    # ---- the persistent form: one program per SM, each running query blocks one after another with the same
    # partitions (a loader warp, two consumer warpgroups). The loader fills the K/V ring for the next block while the
    # consumers finish the last one (its final P V, the division by the row sums, the O store), which a program per
    # block leaves exposed at every block's start and end. Descriptors span the whole (batch, head, seq, dim)
    # tensors, bounded per head along seq; blocks are dealt out statically (block u to program u mod #programs).
    # Causal blocks go in pairs of equal total work: the heaviest query block of a head with its lightest, the
    # second heaviest with the second lightest, and so on.

    @gluon.jit
    def _p_block(u, s, n_m, n_pairs, CAUSAL: gl.constexpr):
        """The (batch * head, query block) of the s-th block of unit u, and how many blocks unit u has."""
        if CAUSAL:
            bh = u // n_pairs
            i = u % n_pairs
            n_sub = 1 + ((2 * i + 1) < n_m).to(gl.int32)                   # the middle block of an odd count: alone
            mb = (n_m - 1 - i) * (1 - s) + i * s
        else:
            bh = u // n_m
            mb = u % n_m
            n_sub = 1
        return bh, mb, n_sub

    @gluon.jit
    def _p_load_q(q_desc, q_smem, q_bar, q_empty, t, b, h, m0, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
        """The two consumers' Q tiles of the program's t-th block, each once its consumer handed the last one back."""
        for half in gl.static_range(2):
            mbarrier.wait(q_empty.index(half), (t & 1) ^ 1)
            mbarrier.expect(q_bar.index(half), q_desc.block_type.nbytes)
            _tma_load(q_desc, [b, h, m0 + half * ROWS, 0], q_bar.index(half),
                      q_smem.index(half).reshape([1, 1, ROWS, HEAD_DIM]))

    @gluon.jit
    def _p_load_tile(desc, smem, bar, empty_bar, r, b, h_kv, j, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                     HEAD_DIM: gl.constexpr, EMPTY0: gl.constexpr = 0):
        """Key or value tile j of head (b, h_kv), the ring's r-th fill, into its slot once both consumers released
        it (its "empty" barrier: EMPTY0 + slot)."""
        slot = r % STAGES
        mbarrier.wait(empty_bar.index(EMPTY0 + slot), ((r // STAGES) & 1) ^ 1)
        mbarrier.expect(bar.index(slot), desc.block_type.nbytes)
        _tma_load(desc, [b, h_kv, j * BLOCK_N, 0], bar.index(slot), smem.index(slot).reshape([1, 1, BLOCK_N, HEAD_DIM]))

    @gluon.jit
    def _p_loader(descs, bufs, bars, scalars, LSE, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                  CAUSAL: gl.constexpr, OVERLAP: gl.constexpr):
        """Every block of this program in turn: its key/value tiles into the ring (a slot once both consumers
        released it) and, after its first tile, each consumer's Q tile (once that consumer is done with the last).
        OVERLAP: keys and values are released apart (a key tile as soon as its scores are done), and loaded in the
        order the consumers use them."""
        q_desc, k_desc, v_desc = descs[0], descs[1], descs[2]
        q_smem, k_smem, v_smem = bufs[0], bufs[1], bufs[2]
        q_bar, k_bar, v_bar, empty_bar, q_empty = bars[0], bars[1], bars[2], bars[3], bars[4]
        n_heads, group, seqlen_q, seqlen_kv, causal_shift, qk_scale, n_m, n_pairs, n_units = scalars
        ROWS: gl.constexpr = q_desc.block_type.shape[2]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
        r = 0
        t = 0
        for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
            _, _, n_sub = _p_block(u, 0, n_m, n_pairs, CAUSAL)
            for s in range(n_sub):
                bh, mb, _ = _p_block(u, s, n_m, n_pairs, CAUSAL)
                b = bh // n_heads
                h = bh % n_heads
                h_kv = h // group
                m0 = mb * (2 * ROWS)
                n_tiles = _key_range(m0, 2 * ROWS, causal_shift, seqlen_kv, BLOCK_N, CAUSAL)[1]
                if OVERLAP:  # K and V have slots of their own: K_j, then V_{j-1} (the consumers' order), V_last
                    for j in range(n_tiles):
                        _p_load_tile(k_desc, k_smem, k_bar, empty_bar, r + j, b, h_kv, j, STAGES, BLOCK_N, HEAD_DIM)
                        if j == 0:
                            _p_load_q(q_desc, q_smem, q_bar, q_empty, t, b, h, m0, ROWS, HEAD_DIM)
                        else:
                            _p_load_tile(v_desc, v_smem, v_bar, empty_bar, r + j - 1, b, h_kv, j - 1, STAGES,
                                         BLOCK_N, HEAD_DIM, STAGES)
                    _p_load_tile(v_desc, v_smem, v_bar, empty_bar, r + n_tiles - 1, b, h_kv, n_tiles - 1, STAGES,
                                 BLOCK_N, HEAD_DIM, STAGES)
                    r += n_tiles
                else:
                    for j in range(n_tiles):
                        slot = r % STAGES
                        mbarrier.wait(empty_bar.index(slot), ((r // STAGES) & 1) ^ 1)
                        mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes)
                        _tma_load(k_desc, [b, h_kv, j * BLOCK_N, 0], k_bar.index(slot),
                                  k_smem.index(slot).reshape([1, 1, BLOCK_N, HEAD_DIM]))
                        mbarrier.expect(v_bar.index(slot), v_desc.block_type.nbytes)
                        _tma_load(v_desc, [b, h_kv, j * BLOCK_N, 0], v_bar.index(slot),
                                  v_smem.index(slot).reshape([1, 1, BLOCK_N, HEAD_DIM]))
                        if j == 0:
                            _p_load_q(q_desc, q_smem, q_bar, q_empty, t, b, h, m0, ROWS, HEAD_DIM)
                        r += 1
                t += 1

    @gluon.jit
    def _overlap_keys(my_q, k_smem, v_smem, k_bar, v_bar, empty_bar, q_free, turn_bar, r, it, n_tiles, acc, m_i, l_i,
                      s_zero, hi_full, offs_m, seqlen_kv, causal_shift, qk_scale, s_layout: gl.constexpr,
                      p_layout: gl.constexpr, rows_o: gl.constexpr, HALF: gl.constexpr, STAGES: gl.constexpr,
                      BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, TREE: gl.constexpr):
        """One block's key tiles in FlashAttention-3's in-warpgroup order, one score tile in registers: the first
        tile's scores and softmax alone; then for each next tile j, Q K_j^T and P_{j-1} V_{j-1} issued back to back,
        the wait for the scores only (P V still running), the softmax of tile j under P_{j-1} V_{j-1}, then the wait
        for it and O rescaled; the last P V alone. Key tile j is released (empty_bar slot) as soon as its scores are
        done, value tile j (empty_bar STAGES + slot) after its P V; Q on ``q_free`` after the last scores. PINGPONG:
        the two consumers take turns issuing their pair of wgmmas (``turn_bar``, ``it`` counts the turns), so one's
        softmax runs while the other's matrix products do. In the offline sm_90 SASS (Triton 3.6's ptxas) the row
        maxima and the scaled scores come before the wait for P V but the wait itself sits after the first of the
        64 exponentials, so the rest of the softmax does not run under P V. Threading P and the row sums through
        the wait's deps puts the exponentials before the wait in the PTX, but the SASS comes out identical: ptxas
        reorders them past it. So does packing P and releasing the value slot at the next tile's start instead (no
        instruction of the tile then needs the wait): the wait still comes right after the first exponential. Two P
        buffers taking turns (the next P packed while P V reads the other) need 32 registers more than a consumer's
        240, and ptxas then serializes every wgmma (its C7512 notice); with 64-key tiles they fit, and the wait still
        comes right after the first exponential."""
        dtype: gl.constexpr = my_q.dtype
        slot = r % STAGES
        mbarrier.wait(k_bar.index(slot), (r // STAGES) & 1)
        s = warpgroup_mma(my_q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, my_q, k_smem.index(slot)))[0]
        mbarrier.arrive(empty_bar.index(slot), count=1)
        mbarrier.arrive(q_free, count=1, pred=n_tiles == 1)
        p, alpha, l_i, m_i = _softmax_step(s, m_i, l_i, 0, hi_full, offs_m, seqlen_kv, causal_shift, qk_scale,
                                           s_layout, BLOCK_N, CAUSAL, TREE)
        pb = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(1, n_tiles):
            cur = (r + j) % STAGES
            prev = (r + j - 1) % STAGES
            mbarrier.wait(k_bar.index(cur), ((r + j) // STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(turn_bar.index(HALF), (it & 1) ^ (1 - HALF))
            s = warpgroup_mma(my_q, k_smem.index(cur).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_bar.index(prev), ((r + j - 1) // STAGES) & 1)
            acc = warpgroup_mma(pb, v_smem.index(prev), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn_bar.index(1 - HALF), count=1)
                it += 1
            s = warpgroup_mma_wait(1, deps=(s, my_q, k_smem.index(cur)))[0]    # the scores; P V still running
            mbarrier.arrive(empty_bar.index(cur), count=1)
            mbarrier.arrive(q_free, count=1, pred=j == n_tiles - 1)
            p, alpha, l_i, m_i = _softmax_step(s, m_i, l_i, j * BLOCK_N, hi_full, offs_m, seqlen_kv, causal_shift,
                                               qk_scale, s_layout, BLOCK_N, CAUSAL, TREE)
            acc = warpgroup_mma_wait(0, deps=(acc, v_smem.index(prev)))[0]
            mbarrier.arrive(empty_bar.index(STAGES + prev), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)
            pb = gl.convert_layout(p.to(dtype), p_layout)
        last = (r + n_tiles - 1) % STAGES
        mbarrier.wait(v_bar.index(last), ((r + n_tiles - 1) // STAGES) & 1)
        acc = warpgroup_mma(pb, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, v_smem.index(last)))[0]
        mbarrier.arrive(empty_bar.index(STAGES + last), count=1)
        return acc, m_i, l_i, it

    @gluon.jit
    def _p_consumer(descs, bufs, bars, scalars, LSE, HALF: gl.constexpr, STAGES: gl.constexpr,
                    BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr,
                    TREE: gl.constexpr):
        """One warpgroup's 64 query rows of every block of this program: the default form's key loop (or with
        OVERLAP, FlashAttention-3's in-warpgroup order, ``_overlap_keys``), then the epilogue through a staging tile
        of its own while the loader already fills the ring for the next block."""
        q_desc, k_desc, v_desc, o_desc = descs
        q_smem, k_smem, v_smem, o_smem = bufs
        q_bar, k_bar, v_bar, empty_bar, q_empty = bars[0], bars[1], bars[2], bars[3], bars[4]
        n_heads, group, seqlen_q, seqlen_kv, causal_shift, qk_scale, n_m, n_pairs, n_units = scalars
        ROWS: gl.constexpr = q_desc.block_type.shape[2]
        HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
        s_layout: gl.constexpr = _warpgroup_acc(BLOCK_N)
        o_layout: gl.constexpr = _warpgroup_acc(HEAD_DIM)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = q_desc.dtype
        my_q = q_smem.index(HALF)
        my_o = o_smem.index(HALF)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        r = 0
        t = 0
        it = 0
        for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
            _, _, n_sub = _p_block(u, 0, n_m, n_pairs, CAUSAL)
            for s in range(n_sub):
                bh, mb, _ = _p_block(u, s, n_m, n_pairs, CAUSAL)
                m0 = mb * (2 * ROWS)
                mq = m0 + HALF * ROWS
                n_tiles = _key_range(m0, 2 * ROWS, causal_shift, seqlen_kv, BLOCK_N, CAUSAL)[1]
                hi_full = _key_range(mq, ROWS, causal_shift, seqlen_kv, BLOCK_N, CAUSAL)[0]   # this half's
                offs_m = mq + gl.arange(0, ROWS, layout=rows_s)
                m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=rows_s)
                l_i = gl.zeros([ROWS], gl.float32, layout=rows_s)
                acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
                mbarrier.wait(q_bar.index(HALF), t & 1)
                if OVERLAP:
                    acc, m_i, l_i, it = _overlap_keys(my_q, k_smem, v_smem, k_bar, v_bar, empty_bar,
                                                      q_empty.index(HALF), bars[5], r, it, n_tiles, acc, m_i, l_i,
                                                      s_zero, hi_full, offs_m, seqlen_kv, causal_shift, qk_scale,
                                                      s_layout, p_layout, rows_o, HALF, STAGES, BLOCK_N, CAUSAL,
                                                      PINGPONG, TREE)
                else:
                    for j in range(n_tiles):
                        # Q of this half is free for the next block once the last tile's scores are done
                        acc, m_i, l_i = _tile_step(my_q, k_smem, v_smem, k_bar, v_bar, j, r + j, acc, m_i, l_i,
                                                   s_zero, hi_full, offs_m, seqlen_kv, causal_shift, qk_scale,
                                                   s_layout, p_layout, rows_o, STAGES, BLOCK_N, CAUSAL,
                                                   q_empty.index(HALF), j == n_tiles - 1, True)
                        mbarrier.arrive(empty_bar.index((r + j) % STAGES), count=1)
                r += n_tiles
                t += 1
                out = acc / gl.expand_dims(gl.convert_layout(l_i, rows_o), 1)
                tma.store_wait(0)                                              # the last block's O has left my_o
                _cta_barrier()
                my_o.store(out.to(dtype))
                fence_async_shared()
                # rows past the end of the head are dropped
                _tma_store(o_desc, [bh // n_heads, bh % n_heads, mq, 0], my_o.reshape([1, 1, ROWS, HEAD_DIM]))
                lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
                gl.store(LSE + bh.to(gl.int64) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)
        tma.store_wait(0)

    @gluon.jit
    def _p_consumer_1(descs, bufs, bars, scalars, LSE, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                      CAUSAL: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, TREE: gl.constexpr):
        _p_consumer(descs, bufs, bars, scalars, LSE, 1, STAGES, BLOCK_N, CAUSAL, OVERLAP, PINGPONG, TREE)

    @gluon.jit
    def _p_loader_w(descs, bufs, bars, scalars, LSE, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                    CAUSAL: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, TREE: gl.constexpr):
        _p_loader(descs, bufs, bars, scalars, LSE, STAGES, BLOCK_N, CAUSAL, OVERLAP)

    @gluon.jit
    def _attn_fwd_hopper_persistent(Q, K, V, O, LSE,
                                    stride_qb, stride_qh, stride_qm,
                                    stride_kb, stride_kh, stride_kn,
                                    stride_vb, stride_vh, stride_vn,
                                    stride_ob, stride_oh, stride_om,
                                    batch, n_heads, group, seqlen_q, seqlen_kv, qk_scale,
                                    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                    STAGES: gl.constexpr, CAUSAL: gl.constexpr, Q_SMEM: gl.constexpr,
                                    KV_SMEM: gl.constexpr, Q_SMEM4: gl.constexpr, KV_SMEM4: gl.constexpr,
                                    CONSUMER_REGS: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr,
                                    TREE: gl.constexpr, num_warps: gl.constexpr):
        gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
        HALF_M: gl.constexpr = BLOCK_M // 2
        n_kv_heads = n_heads // group
        q_desc = tma.make_tensor_descriptor(Q, shape=[batch, n_heads, seqlen_q, HEAD_DIM],
                                            strides=[stride_qb, stride_qh, stride_qm, 1],
                                            block_shape=[1, 1, HALF_M, HEAD_DIM], layout=Q_SMEM4)
        k_desc = tma.make_tensor_descriptor(K, shape=[batch, n_kv_heads, seqlen_kv, HEAD_DIM],
                                            strides=[stride_kb, stride_kh, stride_kn, 1],
                                            block_shape=[1, 1, BLOCK_N, HEAD_DIM], layout=KV_SMEM4)
        v_desc = tma.make_tensor_descriptor(V, shape=[batch, n_kv_heads, seqlen_kv, HEAD_DIM],
                                            strides=[stride_vb, stride_vh, stride_vn, 1],
                                            block_shape=[1, 1, BLOCK_N, HEAD_DIM], layout=KV_SMEM4)
        o_desc = tma.make_tensor_descriptor(O, shape=[batch, n_heads, seqlen_q, HEAD_DIM],
                                            strides=[stride_ob, stride_oh, stride_om, 1],
                                            block_shape=[1, 1, HALF_M, HEAD_DIM], layout=Q_SMEM4)
        n_m = gl.cdiv(seqlen_q, BLOCK_M)
        n_pairs = (n_m + 1) // 2
        if CAUSAL:
            n_units = batch * n_heads * n_pairs
        else:
            n_units = batch * n_heads * n_m
        dtype: gl.constexpr = Q.dtype.element_ty
        q_smem = gl.allocate_shared_memory(dtype, [2, HALF_M, HEAD_DIM], Q_SMEM)
        o_smem = gl.allocate_shared_memory(dtype, [2, HALF_M, HEAD_DIM], Q_SMEM)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], KV_SMEM)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], KV_SMEM)
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        # OVERLAP: a key slot and a value slot are released apart (keys 0..STAGES-1, values STAGES..2 STAGES-1)
        N_EMPTY: gl.constexpr = 2 * STAGES if OVERLAP else STAGES
        empty_bar = gl.allocate_shared_memory(gl.int64, [N_EMPTY, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bar.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bar.index(i), count=1)
            mbarrier.init(v_bar.index(i), count=1)
            mbarrier.init(empty_bar.index(i), count=2)                        # one arrival per consumer
            if OVERLAP:
                mbarrier.init(empty_bar.index(STAGES + i), count=2)
        if PINGPONG:
            turn_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(2):
                mbarrier.init(turn_bar.index(i), count=1)
            bars = (q_bar, k_bar, v_bar, empty_bar, q_empty, turn_bar)
        else:
            bars = (q_bar, k_bar, v_bar, empty_bar, q_empty, q_empty)        # (no turns: a placeholder)
        fence_async_shared()
        descs = (q_desc, k_desc, v_desc, o_desc)
        bufs = (q_smem, k_smem, v_smem, o_smem)
        scalars = (n_heads, group, seqlen_q, seqlen_kv, seqlen_kv - seqlen_q, qk_scale, n_m, n_pairs, n_units)
        gl.warp_specialize([
            (_p_consumer, (descs, bufs, bars, scalars, LSE, 0, STAGES, BLOCK_N, CAUSAL, OVERLAP, PINGPONG, TREE)),
            (_p_consumer_1, (descs, bufs, bars, scalars, LSE, STAGES, BLOCK_N, CAUSAL, OVERLAP, PINGPONG, TREE)),
            (_p_loader_w, (descs, bufs, bars, scalars, LSE, STAGES, BLOCK_N, CAUSAL, OVERLAP, PINGPONG, TREE)),
        ], [4, 1], [CONSUMER_REGS, 24])


def persistent_schedule(batch_heads: int, n_blocks: int, n_programs: int, causal: bool,
                        paired: bool = True) -> list[list[tuple[int, int]]]:
    """The persistent form's schedule, in Python: for each program, the (batch * head, query block) it runs, in
    order (the Gluon kernel's ``_p_block`` loop, mirrored). Units of work are dealt out in turn, unit u to program
    u mod n_programs; with ``causal`` and ``paired`` a unit is a head's i-th heaviest block followed by its i-th
    lightest (the middle block of an odd count alone), otherwise one block. ``paired=False`` shows what the pairing
    is for: blocks one by one, heaviest first within each head."""
    if min(batch_heads, n_blocks, n_programs) < 1:
        raise ValueError(f"batch_heads, n_blocks and n_programs must be >= 1, got {batch_heads}, {n_blocks}, "
                         f"{n_programs}")
    if causal and paired:
        n_pairs = (n_blocks + 1) // 2
        units = [[(bh, n_blocks - 1 - i)] + ([(bh, i)] if 2 * i + 1 < n_blocks else [])
                 for bh in range(batch_heads) for i in range(n_pairs)]
    else:
        order = range(n_blocks - 1, -1, -1) if causal else range(n_blocks)
        units = [[(bh, mb)] for bh in range(batch_heads) for mb in order]
    programs = [[] for _ in range(min(n_programs, len(units)))]
    for u, blocks in enumerate(units):
        programs[u % len(programs)].extend(blocks)
    return programs


def schedule_work(programs: list[list[tuple[int, int]]], causal: bool, n_blocks: int) -> list[int]:
    """Key tiles each program runs (square attention, block_m = block_n): a causal query block mb sees mb + 1
    tiles, a non-causal one all n_blocks."""
    return [sum(mb + 1 if causal else n_blocks for _, mb in blocks) for blocks in programs]


def available() -> bool:
    """Gluon's Hopper module imports (the kernel can be compiled; running it needs compute capability 9.0)."""
    return gluon is not None


def smem_layouts(head_dim: int, block_m: int, block_n: int, dtype=torch.bfloat16, rank: int = 2):
    """The NVMMA shared-memory layouts (swizzled for wgmma and TMA) of the Q/O tile and of a K/V tile; rank 4 for
    the persistent form's (batch, head, seq, dim) descriptors, whose tiles carry two unit dims in front."""
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    lead = [1] * (rank - 2)
    return (gl.NVMMASharedLayout.get_default_for(lead + [block_m, head_dim], gdt),
            gl.NVMMASharedLayout.get_default_for(lead + [block_n, head_dim], gdt))


def compile_offline(cfg: dict, causal: bool = False, head_dim: int = 128, dtype=torch.bfloat16):
    """The kernel of configuration ``cfg`` compiled for sm_90 without a GPU (Triton's bundled ptxas), as it would be
    launched on bf16/fp16 tensors whose strides are multiples of 16 elements: ``.asm`` holds its PTX and cubin.
    Needs a process where Triton was imported without TRITON_INTERPRET=1."""
    from labkit.kernels import offline

    check_config(cfg, head_dim)
    ws, persistent = bool(cfg.get("ws")), bool(cfg.get("persistent"))
    fn = _attn_fwd_hopper_persistent if persistent else _attn_fwd_hopper_ws if ws else _attn_fwd_hopper
    q_sl, kv_sl = smem_layouts(head_dim, cfg["block_m"] // 2 if ws else cfg["block_m"], cfg["block_n"], dtype)
    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    sig = dict(Q=ptr, K=ptr, V=ptr, O=ptr, LSE="*fp32", qk_scale="fp32")
    sig.update({n: "i32" for n in fn.arg_names if n.startswith("stride") or n in ("batch", "n_heads", "group",
                                                                                 "seqlen_q", "seqlen_kv")})
    consts = dict(HEAD_DIM=head_dim, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], STAGES=cfg["stages"],
                  CAUSAL=bool(causal), Q_SMEM=q_sl, KV_SMEM=kv_sl, num_warps=cfg["num_warps"])
    options = {"num_warps": cfg["num_warps"]}
    if persistent:
        q_sl4, kv_sl4 = smem_layouts(head_dim, cfg["block_m"] // 2, cfg["block_n"], dtype, rank=4)
        consts.update(CONSUMER_REGS=WS_CONSUMER_REGS, Q_SMEM4=q_sl4, KV_SMEM4=kv_sl4)
        consts.update(OVERLAP=bool(cfg.get("overlap")), PINGPONG=bool(cfg.get("pingpong")), TREE=bool(cfg.get("tree")))
        options["maxnreg"] = WS_MAXNREG
    elif ws:
        consts.update(PIPE=bool(cfg["pipe"]), DEFER=bool(cfg.get("defer")), PINGPONG=bool(cfg.get("pingpong")),
                      CONSUMER_REGS=WS_CONSUMER_REGS)
        options["maxnreg"] = WS_MAXNREG
    if not persistent:
        consts["HEAVY_FIRST"] = bool(causal)
    sig.update({name: "constexpr" for name in consts})
    # pointers and strides are multiples of 16, as Triton marks them at launch for such tensors
    divisible = [n for n, t in sig.items() if t.startswith("*") or n.startswith("stride")]
    return offline.compile_kernel(fn, sig, consts, options, divisible)


def config_label(cfg: dict) -> str:
    """A configuration in a few words, e.g. ``ws 128x128 ring 2 defer pingpong``."""
    words = ["ws" if cfg.get("ws") else f"{cfg['num_warps']} warps", f"{cfg['block_m']}x{cfg['block_n']}",
             f"ring {cfg['stages']}"]
    return " ".join(words + [k for k in ("pipe", "defer", "pingpong", "persistent", "overlap", "tree")
                             if cfg.get(k)])


def check_config(cfg: dict, head_dim: int = 128) -> None:
    """Refuse a configuration the kernels cannot run, saying which knob to change."""
    ws = bool(cfg.get("ws"))
    if ws and (cfg["block_m"] != 128 or cfg["num_warps"] != 4):
        raise ValueError("ws=True splits a 128-row query block between two consumer warpgroups: it needs "
                         f"block_m=128 and num_warps=4 (the first consumer), got {cfg['block_m']} and "
                         f"{cfg['num_warps']}")
    if not ws and (cfg.get("pipe") or cfg.get("defer") or cfg.get("pingpong")):
        raise ValueError("pipe, defer and pingpong order the work of the two consumer warpgroups: they need ws=True")
    if cfg.get("pipe") and cfg.get("defer"):
        raise ValueError("pipe and defer are two orders of the same loop: choose one")
    if cfg.get("pingpong") and not (cfg.get("defer") or cfg.get("overlap")):
        raise ValueError("pingpong takes turns between the blocks of tensor-core work that defer (or, in the "
                         "persistent form, overlap) issues: set defer=True or persistent=True, overlap=True")
    if cfg.get("tree") and not cfg.get("overlap"):
        raise ValueError("tree (row maxima and sums folded pairwise) is built into the overlap order of the persistent "
                         "form: set persistent=True, overlap=True")
    if cfg.get("overlap") and not cfg.get("persistent"):
        raise ValueError("overlap (FlashAttention-3's in-warpgroup order) is built into the persistent form only: "
                         "set persistent=True, or use pipe=True for the program-per-block kernel")
    if cfg.get("pipe") and cfg["stages"] < 3:
        raise ValueError(f"pipe=True waits for tile j + 1 while tile j - 1 still holds its slot: it needs stages >= 3, "
                         f"got {cfg['stages']}")
    if cfg.get("persistent") and not ws:
        raise ValueError("persistent=True runs the warp-specialized form's partitions over many blocks: it needs "
                         "ws=True")
    if cfg.get("persistent") and (cfg.get("pipe") or cfg.get("defer")):
        raise ValueError("the persistent form runs the default key loop or overlap (with or without pingpong): leave "
                         "pipe and defer off")
    if cfg.get("persistent") and cfg["stages"] != 2:
        raise ValueError(f"the persistent form keeps a staging tile for O beside Q, which leaves shared memory for a "
                         f"K/V ring of 2 only, got stages={cfg['stages']}")
    if ws and head_dim != 128:
        raise ValueError(f"the warp-specialized form is built and checked for head_dim 128 only, got {head_dim}: "
                         f"pass ws=False (the default for head_dim {head_dim})")
    if cfg["stages"] < 2:
        raise ValueError(f"stages={cfg['stages']}: the K/V ring needs at least 2 slots")


_OFFLINE_STATS = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
from labkit.kernels import flash_attn_hopper as hop, offline

out = []
for cfg, causal in json.loads(sys.argv[1]):
    k = hop.compile_offline(cfg, causal=causal)
    ptx = k.asm["ptx"]
    out.append(dict(config=cfg, causal=causal, wgmma=ptx.count("wgmma.mma_async"),
                    tma=ptx.count("cp.async.bulk.tensor"), tma_4d=ptx.count("cp.async.bulk.tensor.4d"),
                    mbarrier_wait=ptx.count("mbarrier.try_wait"),
                    wgmma_wait1=ptx.count("wgmma.wait_group.sync.aligned 1;"),
                    setmaxnreg=ptx.count("setmaxnreg"), shared=k.metadata.shared,
                    **offline.resource_usage(k.asm["cubin"])))
print(json.dumps(out))
"""


def offline_stats(cases: list[tuple[dict, bool]], timeout: float = 900) -> list[dict]:
    """Compile each (config, causal) for sm_90 without a GPU, in a fresh Python process (Triton imported without the
    interpreter), and count what the PTX is built from: ``wgmma`` (warpgroup MMAs), ``tma`` (bulk tensor copies;
    ``tma_4d`` those over (batch, head, seq, dim)), ``mbarrier_wait``, ``wgmma_wait1`` (waits that leave one group
    of MMAs running: the overlapped orders wait for the scores while P V goes on), ``setmaxnreg`` (register handover
    between partitions); with ``shared`` memory bytes and, where Triton ships cuobjdump, ``registers`` per thread and
    ``local`` (spill) bytes."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _OFFLINE_STATS, json.dumps([[dict(c), bool(k)] for c, k in cases])],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"offline compile failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def default_config(head_dim: int, causal: bool) -> dict:
    """For head_dim 128 the persistent form of the warp-specialized kernel in FlashAttention-3's order with the
    consumers taking turns (``CONFIGS[DEFAULT]``, causal or not); for head_dim 64, the 128 x 128 tile without warp
    specialization."""
    if head_dim != 128:
        return dict(next(c for c in CONFIGS if not c["ws"]))
    return dict(CONFIGS[DEFAULT])


def _require_hopper(q: torch.Tensor) -> None:
    if gluon is None:
        raise LabkitError("flash_attention_hopper needs Triton with Gluon's Hopper module "
                              "(triton.experimental.gluon.language.nvidia.hopper, Triton 3.5 or newer): "
                              "pip install -U triton, or use labkit.kernels.flash_attn_fast")
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        where = torch.cuda.get_device_name(q.device) if q.is_cuda else f"a {q.device.type} tensor"
        raise LabkitError(f"flash_attention_hopper is written for Hopper (compute capability 9.0: H100, H200) "
                              f"and got {where}; use labkit.kernels.flash_attn_fast.flash_attention_fast (any "
                              f"GPU with TMA) or flash_attn.flash_attention (any GPU, or the CPU interpreter)")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise LabkitError(f"flash_attention_hopper computes in bf16 or fp16, got {q.dtype}: cast q, k, v first")


def flash_attention_hopper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                           scale: float | None = None, *, out: torch.Tensor | None = None, block_m: int | None = None,
                           block_n: int | None = None, num_warps: int | None = None, stages: int | None = None,
                           pipe: bool | None = None, ws: bool | None = None, defer: bool | None = None,
                           pingpong: bool | None = None, persistent: bool | None = None,
                           overlap: bool | None = None, tree: bool | None = None, heavy_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``flash_attn.flash_attention`` as a Gluon kernel for Hopper: same arguments, layout and result ``(o, lse)``.

    Row strides (dim 2) and base addresses must be multiples of 16 bytes, as for ``flash_attention_fast``.
    Knobs (default: ``default_config``): ``stages``, the depth of the K/V ring; ``ws``, the warp-specialized form
    (a loader warp and two consumer warpgroups); with it, ``pipe`` (the next tile's scores issued before this
    tile's softmax, two score tiles in registers) or ``defer`` (P V waited for only after the next scores are
    issued), and ``pingpong`` (the two consumers issue those blocks in turns); ``persistent``, the warp-specialized
    form with one program per SM running block after block (causal blocks in pairs of equal work, so
    ``heavy_first`` does not apply to it); with it, ``overlap`` (FlashAttention-3's in-warpgroup order with one
    score tile: the next scores and this tile's P V issued back to back, the next softmax under P V) and
    ``pingpong`` (the two consumers issue those pairs in turns). ``persistent=False`` or ``ws=False`` alone turns
    the default's persistent form, overlap and turns off.
    """
    from labkit.kernels import flash_attn_fast as _fast

    _fa._check_inputs(q, k, v, causal)
    b, h, n_q, d = q.shape
    h_kv, n_kv = k.shape[1], k.shape[2]
    if d not in (64, 128):
        raise LabkitError(f"flash_attention_hopper takes head_dim 64 or 128 (its wgmma tiles), got {d}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cfg = default_config(d, causal)
    if persistent is False or ws is False:  # the default's persistent form (and its overlap and turns) gives way
        cfg.update(overlap=False, pingpong=False, persistent=False, tree=False)
    cfg.update({key: val for key, val in dict(block_m=block_m, block_n=block_n, num_warps=num_warps, stages=stages,
                                               pipe=pipe, ws=ws, defer=defer, pingpong=pingpong,
                                               persistent=persistent, overlap=overlap, tree=tree).items()
                if val is not None})
    check_config(cfg, d)
    _require_hopper(q)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must have q's shape {tuple(q.shape)} and dtype {q.dtype} with a contiguous last dim")
    _fast._check_descriptor_strides(q, k, v, out)
    _fast._ensure_allocator()
    ws = bool(cfg.get("ws"))
    q_sl, kv_sl = smem_layouts(d, cfg["block_m"] // 2 if ws else cfg["block_m"], cfg["block_n"], q.dtype)
    lse = torch.empty((b, h, n_q), device=q.device, dtype=torch.float32)
    if cfg.get("persistent"):
        _persistent(q, k, v, out, lse, causal, scale, cfg, q_sl, kv_sl)
        return out, lse
    grid = (_fa.triton_cdiv(n_q, cfg["block_m"]), b * h)
    extra = dict(CONSUMER_REGS=WS_CONSUMER_REGS, PIPE=bool(cfg["pipe"]), DEFER=bool(cfg.get("defer")),
                 PINGPONG=bool(cfg.get("pingpong")), maxnreg=WS_MAXNREG) if ws else {}
    (_attn_fwd_hopper_ws if ws else _attn_fwd_hopper)[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, h // h_kv, n_q, n_kv, scale * _fa.LOG2E,
        HEAD_DIM=d, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], STAGES=cfg["stages"], CAUSAL=bool(causal),
        HEAVY_FIRST=bool(causal and heavy_first), Q_SMEM=q_sl, KV_SMEM=kv_sl,
        num_warps=cfg["num_warps"], **extra,
    )
    return out, lse


def _persistent(q, k, v, out, lse, causal, scale, cfg, q_sl, kv_sl) -> None:
    """Launch the persistent form: one program per SM (fewer if there are fewer units of work), its descriptors over
    the whole (batch, head, seq, dim) tensors, so every stride but the last must be a multiple of 16 bytes."""
    from labkit.kernels import flash_attn_fast as _fast

    _fast._check_descriptor_strides(q, k, v, out, dims=(0, 1), why="the persistent form's descriptors span "
                                    "(batch, head, seq, dim)", fix="or pass persistent=False")
    b, h, n_q, d = q.shape
    n_m = _fa.triton_cdiv(n_q, cfg["block_m"])
    units = b * h * ((n_m + 1) // 2 if causal else n_m)
    q_sl4, kv_sl4 = smem_layouts(d, cfg["block_m"] // 2, cfg["block_n"], q.dtype, rank=4)
    grid = (min(units, torch.cuda.get_device_properties(q.device).multi_processor_count),)
    _attn_fwd_hopper_persistent[grid](
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        b, h, h // k.shape[1], n_q, k.shape[2], scale * _fa.LOG2E,
        HEAD_DIM=d, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], STAGES=cfg["stages"], CAUSAL=bool(causal),
        Q_SMEM=q_sl, KV_SMEM=kv_sl, Q_SMEM4=q_sl4, KV_SMEM4=kv_sl4, CONSUMER_REGS=WS_CONSUMER_REGS,
        num_warps=cfg["num_warps"], maxnreg=WS_MAXNREG,
        OVERLAP=bool(cfg.get("overlap")), PINGPONG=bool(cfg.get("pingpong")), TREE=bool(cfg.get("tree")),
    )
