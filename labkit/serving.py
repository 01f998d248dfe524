"""Serving many users: a paged KV cache, a block manager, a scheduler and an engine, small enough to read.

One request at a time leaves a GPU (or a CPU) mostly idle during decode: a step reads every weight to produce one
token. Serving engines batch many users' steps together so the weights are read once per step for all of them.
This module builds that in the shape of nano-vllm / vLLM, one job per class:

- ``Sequence``       a request's tokens, its block table and its timings;
- ``BlockManager``   the paged KV cache's bookkeeping: fixed-size blocks, a free list, reference counts and
                     hash-keyed full blocks for prefix caching (requests sharing a system prompt share blocks);
- ``Scheduler``      which sequences run in the next step: static batching (a batch runs until its longest member
                     ends), continuous batching (join and leave between steps), chunked prefill (a token budget per
                     step, so a long prompt no longer stalls everyone's next token), preemption by recompute when
                     blocks run out, FCFS admission that never skips the head of the queue;
- ``PagedRunner``    the Llama forward of ``labkit.fastgen`` (its weights, RoPE tables and RMSNorm) over a flat batch
                     of tokens from many sequences, reading and writing K/V through block tables;
- ``Engine``         add requests, ``step()``, ``replay(trace)`` on a clock that advances by each measured step.

The benchmark (``labkit bench serving``) lives in ``labkit.serving_bench``, the HTTP server in ``labkit.server``.
Pure tensor functions at the bottom: ``paged_attention_ref`` (PyTorch, the reference) and ``paged_decode_attention``
(a Triton kernel, one program per (sequence, KV head), walking the block table). KV layout per layer:
``(num_blocks, block_size, kv_heads, head_dim)``; a token's slot is ``block_table[pos // bs] * bs + pos % bs``.

References: Kwon et al., "Efficient Memory Management for LLM Serving with PagedAttention" (SOSP 2023);
Yu et al., "Orca: iteration-level scheduling" (OSDI 2022); Agrawal et al., "Sarathi-Serve: chunked prefill"
(OSDI 2024); nano-vllm (the engine / scheduler / block manager split).
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from labkit import fastgen, roofline
from labkit.env import LabkitError
from labkit.kernels import wo_matmul as wo

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

SCHEDULERS = ("static", "continuous")


# ---------------------------------------------------------------------------------------------- config, requests
@dataclass
class EngineConfig:
    """How the engine batches. ``chunk_size=None``: a prompt is prefilled in one step (no chunking)."""

    scheduler: str = "continuous"  # "static" | "continuous"
    max_batch: int = 16  # sequences running at once
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 256  # KV blocks in the pool (the KV memory budget / bytes per block)
    max_model_len: int = 512  # prompt + answer limit per sequence
    max_step_tokens: int = 4096  # tokens computed per step (prefill chunks + one per decoding sequence)
    chunk_size: int | None = None  # chunked prefill: at most this many prompt tokens of a sequence per step
    # continuous: while sequences run, admit only when this many waiting requests (or all of them, if fewer) can join
    # at once: fewer steps that mix prompts into the decodes, for a later first token (vLLM's scheduler delay)
    admit_batch: int = 1
    prefix_caching: bool = False
    kernels: str = "torch"  # decode attention: "torch" (reference) or "triton"
    cuda_graphs: bool = True  # with kernels="triton" on a GPU: steps replay CUDA graphs (batch or token buckets)

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise LabkitError(f"scheduler={self.scheduler!r}: use one of {SCHEDULERS}")
        for name in ("max_batch", "block_size", "num_blocks", "max_model_len", "max_step_tokens", "admit_batch"):
            if getattr(self, name) < 1:
                raise LabkitError(f"{name}={getattr(self, name)} must be at least 1")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise LabkitError(f"chunk_size={self.chunk_size} must be at least 1 (or None for no chunking)")
        if self.kernels not in ("torch", "triton"):
            raise LabkitError(f"kernels={self.kernels!r}: use 'torch' or 'triton'")


@dataclass
class Request:
    """One user's request: prompt token ids, answer length limit, arrival time (s, on the replay clock)."""

    prompt: list
    max_tokens: int
    arrival: float = 0.0
    ignore_eos: bool = False  # benchmarks fix the answer length, as vLLM's benchmarks do
    id: str = ""
    shared_prefix: int = 0  # tokens of a shared system prompt at its start (for reporting only)


WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Sequence:
    """A request inside the engine: all its tokens (prompt, then answer), its KV blocks and its timings."""

    def __init__(self, req: Request):
        self.req = req
        self.id = req.id
        self.tokens = list(req.prompt)
        self.n_prompt = len(req.prompt)
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.block_hashes: list = []  # hash of each full block (prefix caching), None where not hashed
        self.hashed = 0  # leading blocks whose hash is known (the others are None): where hashing resumes
        self.status = WAITING
        self.finish_reason: str | None = None
        self.gaps: list[float] = []  # top-1 minus top-2 logit at each generated token (near-tie evidence)
        self.token_times: list[float] = []
        self.cached_tokens = 0  # prompt tokens found in the prefix cache at the last admission
        self.preemptions = 0
        self.padding = False  # static batching: finished, but still computed until its batch ends

    @property
    def output(self) -> list:
        return self.tokens[self.n_prompt:]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.n_tokens - 1

    def __repr__(self):
        return f"Sequence({self.id!r}, {self.status}, prompt={self.n_prompt}, out={len(self.output)})"


# ---------------------------------------------------------------------------------------------- block manager
class BlockManager:
    """Fixed-size KV blocks: a free list, a reference count per block, and hash-keyed full blocks (prefix cache).

    A full block's hash covers its tokens and every token before it (the chain of hashes), so two sequences share
    a block only when their whole prefix up to that block is equal. A freed block keeps its hash while it sits in
    the free list (least recently freed is reused first), so a later request can still hit it.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.free = collections.OrderedDict((b, None) for b in range(num_blocks))  # insertion order = reuse order
        self.hash_of: dict[int, bytes] = {}  # block -> hash
        self.block_of: dict[bytes, int] = {}  # hash -> block
        self.hits = 0  # prompt blocks found in the cache
        self.queries = 0  # full prompt blocks looked up

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @staticmethod
    def chain_hash(prev: bytes | None, tokens) -> bytes:
        h = hashlib.sha256(prev or b"")
        h.update(",".join(map(str, tokens)).encode())
        return h.digest()

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hash_of.pop(block, None)  # its cached content is overwritten now
        if old is not None and self.block_of.get(old) == block:
            del self.block_of[old]
        self.ref[block] = 1
        return block

    def can_allocate(self, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) <= self.num_free

    def allocate(self, seq: Sequence, n_tokens: int | None = None) -> None:
        """Give ``seq`` blocks for its first ``n_tokens`` tokens (default all), reusing cached full prompt blocks.

        Sets ``seq.num_computed`` to the tokens whose K/V are already cached: whole blocks from the start, at most
        ``n_tokens - 1`` (the last token is always computed: its logits give the next token).
        """
        n_tokens = seq.n_tokens if n_tokens is None else n_tokens
        assert not seq.block_table
        bs = self.block_size
        prev, cached = None, 0
        for i in range(self.blocks_for(n_tokens)):
            chunk = seq.tokens[i * bs:(i + 1) * bs]
            h = self.chain_hash(prev, chunk) if (self.prefix_caching and len(chunk) == bs) else None
            if h is not None and (i + 1) * bs <= seq.n_prompt:
                self.queries += 1
            block = self.block_of.get(h) if h is not None else None
            # a hit only while every block before it hit, and never the block holding the last token
            if block is not None and cached == i * bs and (i + 1) * bs < seq.n_tokens:
                if self.ref[block] == 0:
                    del self.free[block]
                self.ref[block] += 1
                cached += bs
                self.hits += (i + 1) * bs <= seq.n_prompt
                seq.block_hashes.append(h)
            else:
                block = self._take()
                seq.block_hashes.append(None)  # hashed once its K/V are computed (``register_full_blocks``)
            seq.block_table.append(block)
            prev = h
        seq.num_computed = cached
        seq.cached_tokens = cached
        seq.hashed = cached // bs  # the hits are whole blocks from the start, their hashes known

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: hash every block of ``seq`` that is now full of computed K/V (prefix caching)."""
        if not self.prefix_caching:
            return
        bs, i = self.block_size, seq.hashed  # blocks before ``seq.hashed`` have their hash already
        prev = seq.block_hashes[i - 1] if i else None
        for i in range(i, min(len(seq.block_table), seq.num_computed // bs)):
            prev = seq.block_hashes[i] = self.chain_hash(prev, seq.tokens[i * bs:(i + 1) * bs])
            if prev not in self.block_of:
                self.block_of[prev] = seq.block_table[i]
                self.hash_of[seq.block_table[i]] = prev
            seq.hashed = i + 1

    def needs_block(self, seq: Sequence) -> bool:
        """Does the next token of ``seq`` (written at position n_tokens - 1) need a new block?"""
        return seq.n_tokens > len(seq.block_table) * self.block_size

    def append_block(self, seq: Sequence) -> None:
        seq.block_table.append(self._take())
        seq.block_hashes.append(None)

    def free_seq(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (shared blocks only when their last user lets go)."""
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            assert self.ref[block] >= 0, "block freed twice"
            if self.ref[block] == 0:
                self.free[block] = None
        seq.block_table, seq.block_hashes, seq.hashed = [], [], 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


# ---------------------------------------------------------------------------------------------- scheduler
class Scheduler:
    """Picks each step's work: a list of ``(sequence, n_tokens)`` to compute (a prefill chunk or one decode token)."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.prefix_caching)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def check_fits(self, req: Request) -> None:
        """Refuse, up front, a request that could never run: the limits it breaks and what to change."""
        n = len(req.prompt) + req.max_tokens
        if not req.prompt:
            raise LabkitError("the prompt is empty: send at least one token")
        if req.max_tokens < 1:
            raise LabkitError(f"max_tokens={req.max_tokens}: ask for at least 1 token")
        if n > self.cfg.max_model_len:
            raise LabkitError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.max_tokens}) = {n} exceeds the "
                              f"context limit max_model_len={self.cfg.max_model_len}; shorten the prompt or lower "
                              "max_tokens")
        if self.blocks.blocks_for(n) > self.cfg.num_blocks:
            raise LabkitError(f"prompt + max_tokens = {n} tokens needs {self.blocks.blocks_for(n)} KV blocks but the "
                              f"cache has {self.cfg.num_blocks}; shorten the request or give the engine more blocks")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.req)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence, reason: str) -> None:
        """Finish or cancel ``seq`` wherever it is; its blocks go back to the pool."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.status, seq.finish_reason = FINISHED, reason

    def preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop its K/V, put it first in line; it re-prefills prompt + answer so far."""
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.num_computed = 0
        seq.status = WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        return self._static() if self.cfg.scheduler == "static" else self._continuous()

    # ------------------------------------------------------------------ static batching
    def _static(self):
        if not self.running:  # a new batch: as many waiting requests as fit with their whole answer reserved
            while self.waiting and len(self.running) < self.cfg.max_batch:
                seq = self.waiting[0]
                if not self.blocks.can_allocate(seq.n_prompt + seq.req.max_tokens):
                    break
                self.waiting.popleft()
                self.blocks.allocate(seq, seq.n_prompt + seq.req.max_tokens)
                seq.status = RUNNING
                self.running.append(seq)
            return [(s, s.n_tokens - s.num_computed) for s in self.running]
        # every member decodes, finished ones as padding, until the longest is done
        return [(s, 1) for s in self.running]

    # ------------------------------------------------------------------ continuous batching
    def _continuous(self):
        cfg, bm = self.cfg, self.blocks
        budget = cfg.max_step_tokens
        work: list[tuple[Sequence, int]] = []
        # 1. decodes first: every running sequence past its prompt gets one token, a block when it needs one
        for seq in list(self.running):
            if seq not in self.running or seq.in_prefill:
                continue
            while bm.needs_block(seq) and bm.num_free == 0:
                victim = self.running[-1]  # the latest admitted gives way (recompute later)
                self.preempt(victim)
                work = [(s, n) for s, n in work if s is not victim]
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            if bm.needs_block(seq):
                bm.append_block(seq)
            work.append((seq, 1))
            budget -= 1
        # 2. running sequences still in their prompt (chunked prefill) continue
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                n = self._chunk(seq, budget)
                work.append((seq, n))
                budget -= n
        # 3. admit from the head of the queue only (FCFS: a request is never overtaken, so none starves); with
        # admit_batch, only once that many can join together (running sequences end, so the room always comes)
        group = min(cfg.admit_batch, cfg.max_batch, len(self.waiting))
        if self.running and cfg.max_batch - len(self.running) < group:
            return work
        while self.waiting and len(self.running) < cfg.max_batch and budget > 0:
            seq = self.waiting[0]
            if not bm.can_allocate(seq.n_tokens):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = RUNNING
            self.running.append(seq)
            n = self._chunk(seq, budget)
            if cfg.chunk_size is None and n < seq.n_tokens - seq.num_computed and work:
                # without chunking a prompt goes in one piece: wait for a step with room for it
                self.running.remove(seq)
                bm.free_seq(seq)
                seq.status = WAITING
                self.waiting.appendleft(seq)
                break
            work.append((seq, n))
            budget -= n
        return work

    def _chunk(self, seq: Sequence, budget: int) -> int:
        left = seq.n_tokens - seq.num_computed
        if self.cfg.chunk_size is None:
            return left if left <= budget else max(budget, 0)
        return max(1, min(left, self.cfg.chunk_size, budget))


# ---------------------------------------------------------------------------------------------- model runner
class PagedRunner:
    """fastgen's Llama forward over a flat batch of tokens from many sequences, K/V in a paged cache.

    The linear layers see all the step's tokens at once (that is what batching buys: the weights are read once per
    step); attention reads each sequence's own blocks. With ``kernels="triton"``, the decode rows' attention is one
    launch and every prompt chunk's another (the reference loops over sequences: on an H200, SmolLM2's steps that
    admitted a few dozen prompts then took ~200 ms, its decode steps ~3 ms); RMSNorm and RoPE + the K/V writes are
    one kernel each, and a decode-only step replays a CUDA graph captured for its batch bucket (launching a 7B step's
    ~1,200 kernels one by one from Python costs more than the GPU's work); a step with prompt tokens replays the graph
    of its token bucket (``TOKEN_BUCKETS``), up to ``graph_rows`` sequences.
    """

    def __init__(self, hf_model, num_blocks: int, block_size: int, max_model_len: int, kernels: str = "torch",
                 weights: str = "bf16", device=None, cuda_graphs: bool = False):
        if isinstance(hf_model, fastgen.FastLlama):  # weights already converted: engines can share them
            self.fast = hf_model
            if hf_model.max_seq_len < max_model_len:
                raise LabkitError(f"the FastLlama was built for {hf_model.max_seq_len} positions, the engine needs "
                                  f"max_model_len={max_model_len}; build it with max_seq_len >= that")
        else:
            self.fast = shared_weights(hf_model, max_model_len, weights, device)
        c = self.cfg = self.fast.cfg
        self.device, self.dtype, self.kernels = self.fast.device, self.fast.dtype, kernels
        if kernels == "triton" and self.device.type != "cuda" and not fastgen._interpreting():
            raise LabkitError("kernels='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for tiny tests); "
                              "use kernels='torch' on a CPU.")
        self.block_size, self.num_blocks = block_size, num_blocks
        # one block more than the pool: the scratch block that the padding rows of a captured step write to
        shape = (c.n_layers, num_blocks + 1, block_size, c.n_kv_heads, c.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)  # (L, NB + 1, bs, nkv, hd)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        # on a GPU the Triton kernels also fuse RMSNorm and RoPE + the K/V writes (each equal to its reference, tested
        # on its own); under the CPU interpreter only the attention kernel runs there, the rest would just be slow
        fused = kernels == "triton" and self.device.type == "cuda"
        self.norm = fastgen.add_rmsnorm_triton if fused else fastgen.add_rmsnorm_ref
        self.rope_write = rope_write_paged if fused else rope_write_paged_ref
        # decode-only steps through CUDA graphs: one graph per batch bucket (``capture_graphs``, as an engine starts)
        self.cuda_graphs = cuda_graphs and kernels == "triton" and self.device.type == "cuda"
        self.table_width = -(-max_model_len // block_size) + 1
        self.graphs: dict[int, tuple] = {}
        # steps with prompt tokens: one graph per token bucket, for at most ``graph_rows`` sequences a step
        self.mixed_graphs: dict[int, tuple] = {}
        self.graph_rows = 0
        self.token_buckets: tuple = ()
        self._pool = None

    def kv_cache_bytes(self) -> int:
        """Bytes of the pool's K and V blocks (the scratch block is not counted)."""
        per_block = self.k_cache[:, 0].numel() * self.k_cache.element_size()
        return 2 * self.num_blocks * per_block

    def _inputs(self, work: list[tuple[Sequence, int]]):
        """The step's flat batch: token ids, positions, cache slots (int64 arrays, one row per token) and each
        sequence's (start, n). Built with array operations over the whole step: a step of a few thousand prompt tokens
        costs the host as little as one of 64 decode rows."""
        bs, seqs = self.block_size, [seq for seq, _ in work]
        # static batching's finished rows recompute their last token (the result is discarded)
        spans = [(seq.n_tokens - 1, 1) if seq.padding else (seq.num_computed, n) for seq, n in work]
        counts = np.fromiter((n for _, n in spans), np.int64, len(spans))
        first = np.fromiter((start for start, _ in spans), np.int64, len(spans))
        total = int(counts.sum())
        ids = np.fromiter(itertools.chain.from_iterable(seq.tokens[a:a + n] for seq, (a, n) in zip(seqs, spans)),
                          np.int64, total)
        pos = np.arange(total) + np.repeat(first - (np.cumsum(counts) - counts), counts)  # row -> its position
        flat, table_start, lens = flat_tables(seqs)
        assert (pos // bs < np.repeat(lens, counts)).all(), "a sequence has fewer KV blocks than its tokens need"
        slots = flat[np.repeat(table_start, counts) + pos // bs] * bs + pos % bs
        return ids, pos, slots, spans

    @torch.no_grad()
    def forward(self, work: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute ``n`` tokens of each sequence from its ``num_computed``; logits (len(work), V) of each last token."""
        c, dev = self.cfg, self.device
        ids, pos, slots, spans = self._inputs(work)
        if self.cuda_graphs and all(len(seq.block_table) <= self.table_width for seq, _ in work):
            if len(ids) == len(work) and len(work) <= GRAPH_BATCHES[-1]:
                return self._graph_step(work, ids, pos, slots, spans)
            Tb = self.token_bucket(len(ids), len(work))
            if Tb is not None:
                return self._mixed_graph_step(work, ids, pos, slots, spans, Tb)
        ids_t, pos_t, slot_t = (torch.from_numpy(a).to(dev) for a in (ids, pos, slots))
        # with kernels="triton": the rows of single-token (decode) sequences go through the decode kernel in one
        # launch, every prompt chunk through the prefill kernel in another; with "torch", the references
        fused = self.kernels == "triton"
        starts, dec, pre = split_rows(spans)
        if not fused:
            dec, pre = [], list(range(len(work)))
        if dec:
            dec_rows = torch.tensor([starts[i] for i in dec], device=dev)
            tables = block_tables_tensor([work[i][0] for i in dec], dev)
            lens = torch.tensor([spans[i][0] + 1 for i in dec], device=dev)
        if fused and pre:  # every prompt chunk of the step in one launch, built once for all layers
            pre_tables = block_tables_tensor([work[i][0] for i in pre], dev)
            pre_tiles = prefill_tiles([spans[i] for i in pre], [starts[i] for i in pre], dev)
        others = [] if fused else [(i, torch.tensor(work[i][0].block_table, device=dev)) for i in pre]
        nq, hd = c.n_heads, c.head_dim

        def attend(q, kc, vc):
            o = torch.empty(q.shape[0], nq, hd, device=dev, dtype=self.dtype)
            if dec:
                o[dec_rows] = paged_decode_attention(q[dec_rows], kc, vc, tables, lens)
            if fused and pre:  # each row computed as when its sequence runs alone (see _paged_prefill_kernel)
                paged_prefill_attention(q, kc, vc, pre_tables, pre_tiles, out=o)
            for i, table in others:  # the reference: one sequence at a time
                start, n = spans[i]
                o[starts[i]:starts[i] + n] = paged_attention_ref(q[starts[i]:starts[i] + n], kc, vc, table,
                                                                 start).view(n, nq, hd)
            return o.view(q.shape[0], nq * hd)

        last = torch.tensor(starts[1:], device=dev) - 1
        return self._layers(ids_t, pos_t, slot_t, attend, last)

    def _layers(self, ids_t, pos_t, slot_t, attend, last=None) -> torch.Tensor:
        """Embedding, every decoder layer, final norm and LM head over the step's N tokens; RoPE, and K/V of each token
        written to its slot (``rope_write_paged``); ``attend(q (N, nq, hd), k_cache, v_cache) -> (N, nq * hd)``.
        Logits of the rows ``last`` (all rows when None), fp32. No host synchronisation and no tensor built from
        Python values: capturable."""
        c = self.cfg
        cos, sin = self.fast.cos, self.fast.sin  # (positions, hd)
        nq, nkv = c.n_heads, c.n_kv_heads
        x = F.embedding(ids_t, self.fast.embed)  # (N, H): the residual stream of every token of the step
        delta = None
        for li, lw in enumerate(self.fast.layers):
            h = self.norm(x, delta, lw.attn_norm, c.rms_eps)
            qkv = wo.linear(h, lw.wqkv, use_kernel=False)
            kc, vc = self.k_cache[li], self.v_cache[li]  # (NB + 1, bs, nkv, hd)
            q = self.rope_write(qkv, pos_t, slot_t, cos, sin, kc, vc, nq, nkv)  # (N, nq, hd); K, V in their slots
            delta = wo.linear(attend(q, kc, vc), lw.wo, use_kernel=False)
            h = self.norm(x, delta, lw.mlp_norm, c.rms_eps)
            delta = wo.linear(wo.linear(h, lw.w13, use_kernel=False), lw.w2, silu_gate_up=True, use_kernel=False)
        if last is not None:
            x, delta = x[last], delta[last]
        h = self.norm(x, delta, self.fast.norm, c.rms_eps)
        return wo.linear(h, self.fast.lm_head, use_kernel=False).float()  # (rows, V)

    # ------------------------------------------------------------------------------------------ CUDA graphs
    def capture_graphs(self, max_batch: int, max_step_tokens: int = 0) -> None:
        """Capture the graph of every batch bucket up to the one that holds ``max_batch``, and of every token bucket up
        to the one that holds ``max_step_tokens`` (steps with prompt tokens), before any request runs (a capture
        costs a few forwards: taken on first use, it would stall the step that needs it)."""
        for G in GRAPH_BATCHES:
            if G not in self.graphs:
                self._capture(G)
            if G >= max_batch:
                break
        self.graph_rows = max_batch
        self.token_buckets = self.token_buckets_for(max_step_tokens)
        for Tb in self.token_buckets:
            if Tb not in self.mixed_graphs:
                self._capture_mixed(Tb)

    @staticmethod
    def token_buckets_for(max_step_tokens: int) -> tuple:
        """The token buckets a step of at most ``max_step_tokens`` tokens can need: up to the first that holds it."""
        if max_step_tokens <= 0:
            return ()
        n = next((i for i, Tb in enumerate(TOKEN_BUCKETS) if Tb >= max_step_tokens), len(TOKEN_BUCKETS) - 1)
        return TOKEN_BUCKETS[:n + 1]

    def token_bucket(self, n_tokens: int, n_seqs: int) -> int | None:
        """The token bucket whose graph runs a step of ``n_tokens`` tokens from ``n_seqs`` sequences (None: eager)."""
        if n_seqs > self.graph_rows:
            return None
        return next((Tb for Tb in self.token_buckets if Tb >= n_tokens), None)

    def _graph_step(self, work, ids, pos, slots, spans) -> torch.Tensor:
        """A decode-only step (one token per sequence) as the replay of the graph of the smallest batch bucket that
        holds it; the rows past the batch are padding: token 0 at position 0 in the scratch block, length 1."""
        B, W = len(work), self.table_width
        G = next(g for g in GRAPH_BATCHES if g >= B)
        graph, buf, out = self.graphs.get(G) or self._capture(G)
        host = self._padding(G)  # (4G + G*W,) int64: ids | positions | slots | lengths | block tables
        host[:B], host[G:G + B], host[2 * G:2 * G + B] = ids, pos, slots
        host[3 * G:3 * G + B] = pos + 1  # a decode row's position + 1 is its sequence's length
        host[4 * G:4 * G + B * W] = padded_tables([seq for seq, _ in work], W).reshape(-1)
        buf.copy_(torch.from_numpy(host))  # one host-to-device copy per step
        graph.replay()
        return out[:B]

    def _padding(self, G: int) -> np.ndarray:
        """Every row a padding row (token 0, position 0, the scratch slot, length 1, the scratch block's table)."""
        W, scratch = self.table_width, self.num_blocks
        host = np.zeros(4 * G + G * W, dtype=np.int64)
        host[2 * G:3 * G] = scratch * self.block_size
        host[3 * G:4 * G] = 1
        host[4 * G:] = scratch
        return host

    def _capture(self, G: int) -> tuple:
        """Capture the decode forward of G rows into a CUDA graph (warm-up on a side stream first, as torch asks)."""
        W = self.table_width
        buf = torch.from_numpy(self._padding(G)).to(self.device)  # capture and warm-up see padding rows only
        ids, pos, slot, lens = (buf[i * G:(i + 1) * G] for i in range(4))
        tables = buf[4 * G:].view(G, W)
        nqhd = self.cfg.n_heads * self.cfg.head_dim
        graph, out = self._capture_fn(lambda: self._layers(ids, pos, slot, lambda q, kc, vc: paged_decode_attention(
            q, kc, vc, tables, lens).reshape(G, nqhd)))
        self.graphs[G] = (graph, buf, out)
        return self.graphs[G]

    def _capture_fn(self, run) -> tuple:
        """A CUDA graph of ``run()`` in the runner's shared pool and its output (warm-up on a side stream first, as
        torch asks). Graphs share the pool: a step's logits must be read before the next replay."""
        dev = self.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool):
            out = run()
        return graph, out

    # a step with prompt tokens, at a fixed shape: Tb token rows (the real ones first, then padding rows: token 0 at
    # position 0 writing the scratch slot), graph_rows decode entries and graph_rows logits rows, each padded too, and
    # Tb // PREFILL_BLOCK_M + graph_rows prefill tiles (padding tiles have 0 rows: their programs write nothing)
    def _mixed_sizes(self, Tb: int) -> list[int]:
        D, W = self.graph_rows, self.table_width
        return [Tb, Tb, Tb, D, D, D, D * W, D * W, (Tb // PREFILL_BLOCK_M + D) * 4]

    def _mixed_host(self, work, ids, pos, slots, spans, Tb: int) -> torch.Tensor:
        """The step's inputs as one int64 host tensor in the layout of ``_mixed_run`` (one host-to-device copy)."""
        W, T, sizes = self.table_width, len(ids), self._mixed_sizes(Tb)
        host = np.zeros(sum(sizes), dtype=np.int64)
        ids_h, pos_h, slot_h, dec_h, len_h, last_h, dtab_h, ptab_h, tile_h = np.split(host, np.cumsum(sizes)[:-1])
        ids_h[:T], pos_h[:T] = ids, pos
        slot_h[:] = self.num_blocks * self.block_size
        slot_h[:T] = slots
        starts, dec, pre = split_rows(spans)
        dec_h[:] = Tb  # padding entries write the attention output's extra row, which nothing reads
        len_h[:] = 1
        dtab_h[:] = self.num_blocks
        dec_h[:len(dec)] = [starts[i] for i in dec]
        len_h[:len(dec)] = [spans[i][0] + 1 for i in dec]
        last_h[:len(work)] = np.asarray(starts[1:], dtype=np.int64) - 1
        if dec:
            dtab_h[:len(dec) * W] = padded_tables([work[i][0] for i in dec], W).reshape(-1)
        if pre:
            ptab_h[:len(pre) * W] = padded_tables([work[i][0] for i in pre], W).reshape(-1)
            t = prefill_tiles([spans[i] for i in pre], [starts[i] for i in pre], "cpu").view(-1).numpy()
            tile_h[:len(t)] = t
        return torch.from_numpy(host)

    def _mixed_run(self, buf: torch.Tensor, Tb: int) -> torch.Tensor:
        """The forward of a step with prompt tokens from ``buf`` (``_mixed_host``'s layout, on the device): decode rows
        through the decode kernel, prompt chunks through the prefill kernel, as ``forward`` runs them; capturable."""
        D, W = self.graph_rows, self.table_width
        ids, pos, slots, dec, lens, last, dtab, ptab, tiles = torch.split(buf, self._mixed_sizes(Tb))
        dtab, ptab = dtab.view(D, W).to(torch.int32), ptab.view(D, W).to(torch.int32)
        lens, tiles = lens.to(torch.int32), tiles.view(-1, 4).to(torch.int32)
        src = dec.clamp(max=Tb - 1)  # padding entries read some row; their result goes to the extra row
        nq, hd = self.cfg.n_heads, self.cfg.head_dim

        def attend(q, kc, vc):
            o = torch.empty(Tb + 1, nq, hd, device=q.device, dtype=self.dtype)
            o.index_copy_(0, dec, paged_decode_attention(q.index_select(0, src), kc, vc, dtab, lens))
            paged_prefill_attention(q, kc, vc, ptab, tiles, out=o[:Tb])
            return o[:Tb].view(Tb, nq * hd)

        return self._layers(ids, pos, slots, attend, last)

    def _mixed_graph_step(self, work, ids, pos, slots, spans, Tb: int) -> torch.Tensor:
        """A step with prompt tokens as the replay of the graph of token bucket ``Tb``."""
        graph, buf, out = self.mixed_graphs.get(Tb) or self._capture_mixed(Tb)
        buf.copy_(self._mixed_host(work, ids, pos, slots, spans, Tb))
        graph.replay()
        return out[:len(work)]

    def _capture_mixed(self, Tb: int) -> tuple:
        """Capture ``_mixed_run`` for token bucket Tb on padding inputs (no real block is written)."""
        host = self._mixed_host([], [], [], [], [], Tb)
        buf = host.to(self.device)
        graph, out = self._capture_fn(lambda: self._mixed_run(buf, Tb))
        self.mixed_graphs[Tb] = (graph, buf, out)
        return self.mixed_graphs[Tb]


# a decode-only step of B sequences replays the graph of the smallest bucket >= B (larger batches run eagerly)
GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
# a step with prompt tokens replays the graph of the smallest token bucket that holds its tokens: about 1.5x apart,
# so padding costs at most half a step's compute where compute is what a step costs (a 7B step of thousands of tokens)
TOKEN_BUCKETS = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def default_kernels(device) -> str:
    """The engine's attention for ``device``: the Triton kernels (and CUDA graphs) on a GPU, the PyTorch reference on
    a CPU, where Triton would run under its interpreter, far too slowly to serve."""
    return "triton" if torch.device(device).type == "cuda" else "torch"


def shared_weights(hf_model, max_model_len: int, weights: str = "bf16", device=None) -> fastgen.FastLlama:
    """fastgen's converted weights and RoPE tables for the engine (no contiguous cache): build once, pass to engines."""
    fast = fastgen.FastLlama(hf_model, weights=weights, kernels="torch", max_seq_len=1, max_batch=1, device=device)
    fast.k_cache = fast.v_cache = None  # FastLlama's contiguous cache is not used here
    fast.max_seq_len = max_model_len
    fast.cos, fast.sin = fastgen.rope_tables(fast.cfg, max_model_len, fast.dtype, fast.device)
    return fast


def split_rows(spans: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int]]:
    """For a step's ``spans`` (start, n) per sequence: each sequence's first row in the flat batch (and one past the
    last row), the sequences with one token (their attention goes through the decode kernel) and the others (prompt
    chunks, through the prefill kernel)."""
    starts = [0]
    for _, n in spans:
        starts.append(starts[-1] + n)
    dec = [i for i, (_, n) in enumerate(spans) if n == 1]
    pre = [i for i, (_, n) in enumerate(spans) if n > 1]
    return starts, dec, pre


def flat_tables(seqs: list[Sequence]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every sequence's block table end to end (int64), where each one starts in it, and each one's length."""
    lens = np.fromiter((len(s.block_table) for s in seqs), np.int64, len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(s.block_table for s in seqs), np.int64, int(lens.sum()))
    return flat, np.cumsum(lens) - lens, lens


def padded_tables(seqs: list[Sequence], width: int) -> np.ndarray:
    """(len(seqs), width) int64 block tables, padded with 0 (never read: the lengths bound every walk)."""
    flat, start, lens = flat_tables(seqs)
    out = np.zeros((len(seqs), width), dtype=np.int64)
    out[np.repeat(np.arange(len(seqs)), lens), np.arange(len(flat)) - np.repeat(start, lens)] = flat
    return out


def block_tables_tensor(seqs: list[Sequence], device) -> torch.Tensor:
    """(B, max blocks) int32 block tables on ``device``, padded with 0."""
    return torch.from_numpy(padded_tables(seqs, max(len(s.block_table) for s in seqs))).to(device, torch.int32)


# ---------------------------------------------------------------------------------------------- engine
class Engine:
    """Requests in, tokens out: ``add`` requests, call ``step()`` until ``has_work()`` is False.

    ``hf_model``: a transformers LlamaForCausalLM, or the ``shared_weights(...)`` of one (engines then share them).
    ``log_steps``: keep a record of every step in ``step_log`` (what the benchmarks summarize); a server that runs
    for days passes False, or the log grows without end.
    ``runner``: instead of a model, anything with ``device`` and ``forward(work) -> logits (len(work), >= 2)``, and
    optionally ``clock`` (what ``replay`` reads): a stand-in with a modelled step time studies the scheduler alone.
    """

    def __init__(self, hf_model, cfg: EngineConfig | None = None, eos_token_id=None, weights: str = "bf16",
                 device=None, log_steps: bool = True, runner=None):
        self.cfg = cfg or EngineConfig()
        self.runner = runner or PagedRunner(hf_model, self.cfg.num_blocks, self.cfg.block_size,
                                            self.cfg.max_model_len, self.cfg.kernels, weights, device,
                                            cuda_graphs=self.cfg.cuda_graphs)
        if getattr(self.runner, "cuda_graphs", False):
            self.runner.capture_graphs(self.cfg.max_batch, self.cfg.max_step_tokens)
        self.scheduler = Scheduler(self.cfg)
        gen_cfg = getattr(hf_model, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        self.steps = 0
        self.tokens_served = 0
        self.log_steps = log_steps
        self.step_log: list[dict] = []  # per step: tokens computed, sequences, KV slots used / reserved
        self.step_times: list[tuple[int, float]] = []  # replays: (index in step_log, seconds on the replay clock)
        self._n = 0

    @property
    def blocks(self) -> BlockManager:
        return self.scheduler.blocks

    def add(self, req: Request) -> Sequence:
        """Queue a request (raises LabkitError at once if it could never fit)."""
        if not req.id:
            self._n += 1
            req.id = f"req-{self._n}"
        seq = Sequence(req)
        self.scheduler.add(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        if seq.status != FINISHED:
            self.scheduler.remove(seq, "cancelled")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self, now: float | None = None) -> list[tuple[Sequence, int | None]]:
        """One iteration: schedule, run the forward, append tokens. Returns (sequence, new token) for each sequence
        that produced one; finished sequences have ``status == FINISHED`` and their blocks are already free."""
        sch, bm = self.scheduler, self.blocks
        work = sch.schedule()
        if not work:
            return []
        logits = self.runner.forward(work)
        now = time.perf_counter() if now is None else now
        top2 = torch.topk(logits, 2, dim=-1)
        best, values = top2.indices[:, 0].tolist(), top2.values.tolist()  # one transfer each, not two per row
        events = []
        used = reserved = 0
        for i, (seq, n) in enumerate(work):
            if seq.padding:
                continue
            seq.num_computed += n
            if seq.num_computed < seq.n_tokens:  # a prompt chunk that did not reach the last token yet
                bm.register_full_blocks(seq)
                continue
            tok = best[i]
            seq.gaps.append(values[i][0] - values[i][1])
            seq.tokens.append(tok)
            seq.token_times.append(now)
            self.tokens_served += 1
            bm.register_full_blocks(seq)
            done = len(seq.output) >= seq.req.max_tokens or (tok in self.eos and not seq.req.ignore_eos)
            if done:
                reason = "length" if len(seq.output) >= seq.req.max_tokens else "stop"
                if self.cfg.scheduler == "static":
                    seq.padding, seq.finish_reason, seq.status = True, reason, FINISHED
                else:
                    sch.remove(seq, reason)
            events.append((seq, tok))
        if self.cfg.scheduler == "static" and all(s.padding for s in sch.running):
            for s in list(sch.running):  # the batch is over: every block back to the pool
                reason = s.finish_reason
                sch.remove(s, reason)
        self.steps += 1
        if self.log_steps:
            for s in sch.running:
                used += s.num_computed
                reserved += len(s.block_table) * self.cfg.block_size
            self.step_log.append({"tokens": sum(n for _, n in work), "seqs": len(work), "kv_used": used,
                                  "kv_reserved": reserved, "running": len(sch.running)})
        return events

    def generate(self, prompts: list[list[int]], max_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
        """Offline greedy generation of every prompt together; answers in prompt order."""
        seqs = [self.add(Request(list(p), max_tokens, ignore_eos=ignore_eos)) for p in prompts]
        while self.has_work():
            self.step()
        return [s.output for s in seqs]

    def replay(self, trace: list[Request], progress: bool = True, desc: str = "") -> list[Sequence]:
        """Serve a trace on a clock that advances by each step's measured time and jumps over idle gaps.

        Requests join when the clock passes their arrival; TTFT and per-token times are read on that clock, so a
        replay measures the engine, not the sleeping in between. The step time is wall time on a GPU and this
        process's CPU time on a CPU (``step_clock``). To compare engines, ``replay_together`` steps them in turn.
        """
        return replay_together([self], trace, progress, [desc or self.cfg.scheduler])[0]

    def _replay_steps(self, trace: list[Request], bar):
        """``replay`` one step per ``next()``; the sequences are the generator's return value."""
        tick = getattr(self.runner, "clock", None) or step_clock(self.runner.device)
        pending = collections.deque(sorted(trace, key=lambda r: r.arrival))
        seqs, clock = [], 0.0
        while pending or self.has_work():
            while pending and pending[0].arrival <= clock:
                r = pending.popleft()
                seqs.append(self.add(Request(list(r.prompt), r.max_tokens, r.arrival, r.ignore_eos, r.id,
                                             r.shared_prefix)))
            if not self.has_work():
                clock = pending[0].arrival
                continue
            t0, n = tick(), len(self.step_log)
            events = self.step(now=0.0)
            dt = tick() - t0
            clock += dt
            if len(self.step_log) > n:
                self.step_times.append((n, dt))
            for seq, _ in events:
                seq.token_times[-1] = clock
            bar.update(len(events))
            yield
        return seqs


def replay_together(engines: list[Engine], trace: list[Request], progress: bool = True,
                    descs: list[str] | None = None) -> list[list[Sequence]]:
    """Replay one trace through several engines, a step of each in turn, each on its own clock (``Engine.replay``).

    Run one after the other, two engines meet whatever else the machine does at different times, and on a shared
    machine that alone can move their ratio by a third; stepped in turn, a load that comes and goes falls on them
    alike. Returns each engine's sequences.
    """
    from tqdm.auto import tqdm

    descs = descs or [e.cfg.scheduler for e in engines]
    bars = [tqdm(total=sum(r.max_tokens for r in trace), desc=d, unit="tok", disable=not progress, leave=False)
            for d in descs]
    steps = [e._replay_steps(trace, bar) for e, bar in zip(engines, bars)]
    out: list = [None] * len(engines)
    live = list(range(len(engines)))
    while live:
        for i in list(live):
            try:
                next(steps[i])
            except StopIteration as done:
                out[i] = done.value
                live.remove(i)
    for bar in bars:
        bar.close()
    return out


def step_clock(device):
    """The clock a replay reads: ``time.perf_counter`` on a GPU (a step ends with a device sync: the token ids are
    read back), ``time.process_time`` on a CPU (the work this process did, whatever else shares the cores)."""
    return time.process_time if torch.device(device).type == "cpu" else time.perf_counter


# ---------------------------------------------------------------------------------------------- workloads, metrics
def make_trace(n: int, rate: float, prompt_len=(16, 64), answer_len=(2, 24), shared_prefix: list | None = None,
               shared_fraction: float = 0.5, vocab: int = 49152, seed: int = 0, long_prompts: int = 0,
               long_len: int = 256) -> list[Request]:
    """A seeded trace: Poisson arrivals at ``rate``/s; prompt lengths uniform in ``prompt_len``; answer lengths
    log-uniform in ``answer_len`` (many short answers, a few long ones: what makes static batching wait);
    ``shared_fraction`` of the requests start with ``shared_prefix`` (a system prompt); ``long_prompts`` requests
    of ``long_len`` tokens spread through the trace (what chunked prefill is for). Token ids avoid 0..9."""
    g = torch.Generator().manual_seed(seed)

    def u():
        return torch.rand((), generator=g).item()

    t, trace = 0.0, []
    long_at = set(range(n // (long_prompts + 1), n, n // (long_prompts + 1))[:long_prompts]) if long_prompts else set()
    for i in range(n):
        t += -math.log(1 - u()) / rate if rate else 0.0
        plen = long_len if i in long_at else int(prompt_len[0] + u() * (prompt_len[1] - prompt_len[0] + 1))
        alen = int(round(math.exp(math.log(answer_len[0]) + u() * (math.log(answer_len[1]) - math.log(answer_len[0])))))
        prefix = list(shared_prefix) if (shared_prefix and u() < shared_fraction) else []
        body = torch.randint(10, vocab, (max(plen - len(prefix), 1),), generator=g).tolist()
        trace.append(Request(prefix + body, alen, t, True, f"req-{i}", len(prefix)))
    return trace


def make_long_prompt_trace(n_short: int, n_long: int, short_len=(8, 24), answer_len=(12, 16), long_len: int = 192,
                           vocab: int = 49152, seed: int = 1) -> list[Request]:
    """What chunked prefill is for: ``n_short`` requests arrive at once and start decoding; right after the first
    step, ``n_long`` prompts of ``long_len`` tokens arrive (2-token answers). Without chunking their prefill lands in
    one step and every decoding request waits for it."""
    g = torch.Generator().manual_seed(seed)
    trace = []
    for i in range(n_short + n_long):
        long = i >= n_short
        plen = long_len if long else int(torch.randint(short_len[0], short_len[1] + 1, (), generator=g))
        alen = 2 if long else int(torch.randint(answer_len[0], answer_len[1] + 1, (), generator=g))
        ids = torch.randint(10, vocab, (plen,), generator=g).tolist()
        trace.append(Request(ids, alen, 1e-9 if long else 0.0, True, f"req-{i}"))  # 1e-9: joins at step 2
    return trace


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return float(torch.quantile(torch.tensor(xs, dtype=torch.float64), q / 100).item())


def summarize_run(seqs: list[Sequence], engine: Engine, tpot_target_s: float | None = None) -> dict:
    """Throughput, TTFT and time per output token (p50/p90/p99), goodput under a TPOT target, KV waste."""
    done = [s for s in seqs if s.token_times]
    start = min(s.req.arrival for s in seqs)
    end = max(s.token_times[-1] for s in done)
    ttft = [s.token_times[0] - s.req.arrival for s in done]
    itl = [b - a for s in done for a, b in zip(s.token_times, s.token_times[1:])]  # every inter-token interval
    tpot = [(s.token_times[-1] - s.token_times[0]) / (len(s.token_times) - 1) for s in done if len(s.token_times) > 1]
    n_tok = sum(len(s.output) for s in done)
    log = [r for r in engine.step_log if r["kv_reserved"]]
    out = {"requests": len(seqs), "output_tokens": n_tok, "makespan_s": end - start,
           "throughput_tok_s": n_tok / (end - start), "steps": engine.steps, "preemptions": engine.scheduler.preemptions,
           "prefix_cache_hit_rate": engine.blocks.hit_rate,
           "kv_waste_paged": 1 - sum(r["kv_used"] for r in log) / max(sum(r["kv_reserved"] for r in log), 1)}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = percentile(xs, q) * 1e3
    # what sets the time per token: steps that mix prompt tokens into the decodes against decode-only steps
    for kind, pick in (("mixed", lambda r: r["tokens"] > r["seqs"]), ("decode", lambda r: r["tokens"] == r["seqs"])):
        ts = [dt for i, dt in engine.step_times if pick(engine.step_log[i])]
        out[f"steps_{kind}"] = len(ts)
        out[f"step_ms_{kind}_p50"] = percentile(ts, 50) * 1e3 if ts else None
    if tpot_target_s is not None:
        good = [s for s in done if len(s.token_times) < 2 or
                (s.token_times[-1] - s.token_times[0]) / (len(s.token_times) - 1) <= tpot_target_s]
        out["goodput_tok_s"] = sum(len(s.output) for s in good) / (end - start)
        out["tpot_target_ms"] = tpot_target_s * 1e3
    return out


def kv_waste_contiguous(seqs: list[Sequence], engine: Engine) -> float:
    """KV waste if every running sequence had reserved ``max_model_len`` slots up front (contiguous allocation).

    Uses the same per-step occupancy as the paged figure: used slots over reserved slots, summed over steps.
    """
    log = [r for r in engine.step_log if r["kv_reserved"]]
    used = sum(r["kv_used"] for r in log)
    return 1 - used / max(sum(r["running"] * engine.cfg.max_model_len for r in log), 1)


def compare_outputs(runs: dict[str, list[list[int]]], alone: list[list[int]], alone_gaps: list[list[float]],
                    tie: float = 1e-4) -> dict:
    """Each run's answers against the answers computed alone: equal, or diverging only at a near-tie of the alone
    run (top-2 logit gap < ``tie`` at the first differing token). Returns counts and every divergence."""
    report = {"requests": len(alone), "runs": {}, "all_ok": True}
    for name, outs in runs.items():
        equal, ties, bad = 0, [], []
        for i, (a, b) in enumerate(zip(alone, outs)):
            if a == b:
                equal += 1
                continue
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            gap = alone_gaps[i][k] if k < len(alone_gaps[i]) else float("inf")
            (ties if gap < tie else bad).append({"request": i, "position": k, "top2_gap": gap})
        report["runs"][name] = {"equal": equal, "near_ties": ties, "mismatches": bad}
        report["all_ok"] &= not bad and len(outs) == len(alone)
    return report


def run_alone(hf_model, cfg: EngineConfig, trace: list[Request], progress: bool = False, eos_token_id=None):
    """Every request of the trace on its own (batch of one, no prefix cache): answers and logit gaps."""
    from dataclasses import replace
    from tqdm.auto import tqdm

    outs, gaps = [], []
    eng = Engine(hf_model, replace(cfg, scheduler="continuous", prefix_caching=False, chunk_size=None, max_batch=1),
                 eos_token_id)
    for r in tqdm(trace, desc="alone", disable=not progress, leave=False):
        seq = eng.add(Request(list(r.prompt), r.max_tokens, ignore_eos=r.ignore_eos))
        while eng.has_work():
            eng.step()
        outs.append(seq.output)
        gaps.append(seq.gaps)
    return outs, gaps


def kv_capacity(shape, weight_bytes: float, memory_bytes: float, context_len: int, bytes_per_element: float = 2,
                reserve_fraction: float = 0.1) -> dict:
    """How many sequences of ``context_len`` tokens fit beside the weights: (memory × (1 - reserve) - weights) / KV.

    ``shape``: anything with num_hidden_layers, num_key_value_heads, head_dim (a ModelShape or an HF config).
    """
    per_tok = roofline.kv_bytes_per_token(shape, bytes_per_element)
    budget = memory_bytes * (1 - reserve_fraction) - weight_bytes
    return {"kv_bytes_per_token": per_tok, "kv_budget_bytes": budget, "tokens": max(budget, 0) / per_tok,
            "sequences": int(max(budget, 0) // (per_tok * context_len))}


# ---------------------------------------------------------------------------------------------- attention (pure)
def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: list,
                        start: int) -> torch.Tensor:
    """Causal attention of one sequence's n new queries at positions start..start+n-1 over its paged K/V.

    q: (n, nq, hd), already rotated; k_cache, v_cache: (num_blocks, block_size, nkv, hd) with the new K/V written;
    block_table: the sequence's block ids (a list or a 1-D tensor). Returns (n, nq * hd). Computed like fastgen's decode_attention_ref:
    scores in the dtype, softmax in fp32, rounded back, then times V.
    """
    n, nq, hd = q.shape
    bs, nkv = k_cache.shape[1], k_cache.shape[2]
    ctx = start + n
    nblk = -(-ctx // bs)
    idx = torch.as_tensor(block_table[:nblk], device=q.device)
    k = k_cache[idx].reshape(nblk * bs, nkv, hd)[:ctx]  # (ctx, nkv, hd): the sequence's keys, in order
    v = v_cache[idx].reshape(nblk * bs, nkv, hd)[:ctx]
    qg = q.view(n, nkv, nq // nkv, hd).permute(1, 2, 0, 3)  # (nkv, rep, n, hd)
    scores = (qg @ k.permute(1, 2, 0)[:, None]) * hd**-0.5  # (nkv, rep, n, ctx)
    if n > 1:
        live = torch.arange(ctx, device=q.device)[None, :] <= torch.arange(start, ctx, device=q.device)[:, None]
        scores = scores.masked_fill(~live, float("-inf"))  # (n, ctx): query i sees keys up to start + i
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    o = p @ v.permute(1, 0, 2)[:, None]  # (nkv, rep, n, hd)
    return o.permute(2, 0, 1, 3).reshape(n, nq * hd)


def rope_write_paged_ref(qkv: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int,
                         n_kv_heads: int) -> torch.Tensor:
    """RoPE for a flat batch of tokens, K and V written to each token's slot of a paged cache.

    qkv: (N, (nq + 2 nkv) * hd); pos, slots: (N,) long; cos, sin: (positions, hd); k_cache, v_cache: (num_blocks,
    block_size, nkv, hd), written in place. Returns the rotated queries (N, nq, hd). Rounded as HF's Llama rounds.
    """
    N, hd = qkv.shape[0], cos.shape[-1]
    q, k, v = qkv.split([n_heads * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)
    q, k, v = q.view(N, n_heads, hd), k.view(N, n_kv_heads, hd), v.view(N, n_kv_heads, hd)
    c, s = cos[pos][:, None], sin[pos][:, None]  # (N, 1, hd)
    q = q * c + fastgen._rotate_half(q) * s
    k = k * c + fastgen._rotate_half(k) * s
    k_cache.view(-1, n_kv_heads, hd)[slots] = k
    v_cache.view(-1, n_kv_heads, hd)[slots] = v
    return q


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """One query per sequence: q (B, nq, hd) over context_lens[b] cached tokens through block_tables (B, max_blocks).

    Returns (B, nq, hd). The reference for ``paged_decode_attention``.
    """
    B, nq, hd = q.shape
    out = torch.empty_like(q)
    for b in range(B):
        L = int(context_lens[b])
        table = block_tables[b].tolist()
        out[b] = paged_attention_ref(q[b:b + 1], k_cache, v_cache, table, L - 1).view(nq, hd)
    return out


if triton is not None:

    @triton.jit
    def _rope_write_kernel(qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, q_ptr, NQ, NKV,
                           stride_qkv, stride_ks, stride_kh, stride_qn, stride_qh, HD: tl.constexpr,
                           BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr):
        """Program n (one token): rotate its NQ query heads into q, rotate its NKV key heads and write them, and its
        value heads, into the token's cache slot. Every product rounded to the dtype as torch rounds it."""
        n = tl.program_id(0)
        pos = tl.load(pos_ptr + n)
        slot = tl.load(slot_ptr + n).to(tl.int64)
        HALF: tl.constexpr = HD // 2
        offs_d = tl.arange(0, HD)
        rot = (offs_d + HALF) % HD  # rotate_half(x)[d] = -x[d + HALF] for d < HALF, x[d - HALF] after
        sign = tl.where(offs_d < HALF, -1.0, 1.0)[None, :]
        c = tl.load(cos_ptr + pos * HD + offs_d).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + pos * HD + offs_d).to(tl.float32)[None, :]
        dt = q_ptr.dtype.element_ty
        row = qkv_ptr + n * stride_qkv
        hq = tl.arange(0, BLOCK_Q)[:, None]
        mq = hq < NQ
        x = tl.load(row + hq * HD + offs_d[None, :], mask=mq, other=0.0).to(tl.float32)
        xr = tl.load(row + hq * HD + rot[None, :], mask=mq, other=0.0).to(tl.float32)
        y = ((x * c).to(dt).to(tl.float32) + (sign * xr * s).to(dt).to(tl.float32)).to(dt)
        tl.store(q_ptr + n * stride_qn + hq * stride_qh + offs_d[None, :], y, mask=mq)
        hk = tl.arange(0, BLOCK_KV)[:, None]
        mk = hk < NKV
        kx = tl.load(row + (NQ + hk) * HD + offs_d[None, :], mask=mk, other=0.0).to(tl.float32)
        kr = tl.load(row + (NQ + hk) * HD + rot[None, :], mask=mk, other=0.0).to(tl.float32)
        ky = ((kx * c).to(dt).to(tl.float32) + (sign * kr * s).to(dt).to(tl.float32)).to(dt)
        dst = slot * stride_ks + hk * stride_kh + offs_d[None, :]
        tl.store(kc_ptr + dst, ky, mask=mk)
        tl.store(vc_ptr + dst, tl.load(row + (NQ + NKV + hk) * HD + offs_d[None, :], mask=mk, other=0.0), mask=mk)


def rope_write_paged(qkv: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Same contract as ``rope_write_paged_ref``: one Triton launch, a program per token (instead of about a dozen
    torch kernels per layer)."""
    if triton is None:
        raise LabkitError("rope_write_paged needs triton (pip install triton); use rope_write_paged_ref")
    N, hd = qkv.shape[0], cos.shape[-1]
    nb, bs, nkv, hd2 = k_cache.shape
    if hd2 != hd or nkv != n_kv_heads or qkv.shape[1] != (n_heads + 2 * n_kv_heads) * hd or hd & (hd - 1) \
            or not (k_cache.is_contiguous() and v_cache.is_contiguous() and qkv.stride(1) == 1):
        raise LabkitError(f"rope_write_paged: qkv {tuple(qkv.shape)}, cache {tuple(k_cache.shape)}, head_dim {hd}: "
                          "need contiguous caches, qkv rows of (nq + 2 nkv) * head_dim, head_dim a power of two")
    q = torch.empty(N, n_heads, hd, device=qkv.device, dtype=qkv.dtype)
    if N:
        _rope_write_kernel[(N,)](qkv, pos, slots, cos, sin, k_cache, v_cache, q, n_heads, n_kv_heads, qkv.stride(0),
                                 k_cache.stride(1), k_cache.stride(2), q.stride(0), q.stride(1), HD=hd,
                                 BLOCK_Q=triton.next_power_of_2(n_heads), BLOCK_KV=triton.next_power_of_2(n_kv_heads),
                                 num_warps=4, enable_fp_fusion=False)  # no FMA: rounded where torch rounds
    return q


# key positions per iteration of the decode kernel (several blocks of the table at once). On an H200 (batch 64,
# 512 tokens) SmolLM2's engine decode step took 3.50 / 3.05 / 2.88 / 2.71 ms with 16 / 32 / 64 / 128, the kernel
# alone on the 7B shape's heads 279 / 235 / 205 / 171 us (scripts/gpu_serving_decode.py)
DECODE_BLOCK_N = 128

if triton is not None:

    @triton.jit
    def _online_softmax_step(q, k, v, keep, m_i, l_i, acc, scale, FP32: tl.constexpr):
        """One key tile of an online softmax: scores of q against k (masked to ``keep``), the running max ``m_i`` and
        sum ``l_i`` rescaled, ``acc`` += P V. fp32 inputs take full-precision products (the GPU default is TF32)."""
        if FP32:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            sc = tl.dot(q, tl.trans(k)) * scale
        sc = tl.where(keep, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit(do_not_specialize=["stride_bt"])  # eager steps' table widths vary: one compile, not one per width
    def _paged_decode_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, len_ptr, o_ptr, scale, REP,
                             stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ob, stride_oh,
                             HD: tl.constexpr, BS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                             FP32: tl.constexpr):
        """Program (b, j): the REP query heads of sequence b that share KV head j, over its positions in tiles of
        BLOCK_N (gathered through the block table: several blocks a tile), online softmax."""
        b = tl.program_id(0)
        j = tl.program_id(1)
        L = tl.load(len_ptr + b)
        offs_d = tl.arange(0, HD)
        offs_r = tl.arange(0, BLOCK_R)
        offs_n = tl.arange(0, BLOCK_N)
        mask_r = offs_r < REP
        q = tl.load(q_ptr + b * stride_qb + (j * REP + offs_r)[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_r[:, None], other=0.0)  # (BLOCK_R, HD)
        m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_R,), tl.float32)
        acc = tl.zeros((BLOCK_R, HD), tl.float32)
        for start in range(0, L, BLOCK_N):  # BLOCK_N positions a tile, each read from the block that holds it
            kpos = start + offs_n
            mask_n = kpos < L
            blk = tl.load(bt_ptr + b * stride_bt + kpos // BS, mask=mask_n, other=0).to(tl.int64)
            kv_off = blk[:, None] * stride_kb + (kpos % BS)[:, None] * stride_ks + j * stride_kh + offs_d[None, :]
            k = tl.load(kc_ptr + kv_off, mask=mask_n[:, None], other=0.0)  # (BLOCK_N, HD)
            v = tl.load(vc_ptr + kv_off, mask=mask_n[:, None], other=0.0)
            m_i, l_i, acc = _online_softmax_step(q, k, v, mask_n[None, :], m_i, l_i, acc, scale, FP32)
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * stride_ob + (j * REP + offs_r)[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=mask_r[:, None])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           block_n: int = DECODE_BLOCK_N) -> torch.Tensor:
    """Same contract as ``paged_decode_attention_ref``, one Triton program per (sequence, KV head).

    q: (B, nq, hd); k_cache, v_cache: (num_blocks, block_size, nkv, hd); block_tables: (B, max_blocks) int32;
    context_lens: (B,) int32. head_dim and block_size must be powers of two, block_size >= 16 (tl.dot's minimum).
    ``block_n``: key positions per loop iteration (a power of two >= 16); each program walks its sequence's
    positions one tile after the other, so a tile of one 16-token block makes a 512-token context 32 dependent trips
    to memory, a tile of 128 positions 4.
    """
    if triton is None:
        raise LabkitError("paged_decode_attention needs triton (pip install triton); use paged_decode_attention_ref")
    if q.device.type != "cuda" and not fastgen._interpreting():
        raise LabkitError("the Triton paged attention needs a CUDA GPU (or TRITON_INTERPRET=1 on a CPU)")
    B, nq, hd = q.shape
    nb, bs, nkv, hd2 = k_cache.shape
    if hd != hd2 or nq % nkv or bs < 16 or bs & (bs - 1) or hd & (hd - 1) or block_n < 16 or block_n & (block_n - 1):
        raise LabkitError(f"paged_decode_attention: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}, "
                          f"block_n={block_n}: need equal head_dim (a power of two), nq divisible by nkv, block_size "
                          "and block_n powers of two >= 16")
    rep = nq // nkv
    out = torch.empty_like(q)
    kc, vc = k_cache.contiguous(), v_cache.contiguous()
    bt = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(device=q.device, dtype=torch.int32).contiguous()
    _paged_decode_kernel[(B, nkv)](q, kc, vc, bt, lens, out, hd**-0.5, rep, q.stride(0), q.stride(1), kc.stride(0),
                                   kc.stride(1), kc.stride(2), bt.stride(0), out.stride(0), out.stride(1),
                                   HD=hd, BS=bs, BLOCK_R=max(16, triton.next_power_of_2(rep)), BLOCK_N=block_n,
                                   FP32=q.dtype == torch.float32, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------- prefill attention
PREFILL_BLOCK_M = 64  # query rows per program: fixed, so a row's result never depends on which rows share its tile
PREFILL_BLOCK_N = 64  # key positions per iteration, in tiles aligned to position 0 (the same tiles for every row)


def prefill_tiles(spans: list[tuple[int, int]], rows: list[int], device) -> torch.Tensor:
    """(T, 4) int32 work list of ``paged_prefill_attention``: for each sequence i (``spans[i] = (start, n)``: n new
    tokens at positions start.., their first row of q at ``rows[i]``), tiles of PREFILL_BLOCK_M rows as
    (first row, first position, rows in the tile, sequence index)."""
    bm = PREFILL_BLOCK_M
    tiles = [(r + t, s + t, min(bm, n - t), i) for i, ((s, n), r) in enumerate(zip(spans, rows))
             for t in range(0, n, bm)]
    return torch.tensor(tiles, dtype=torch.int32, device=device).view(-1, 4)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: list,
                                spans: list[tuple[int, int]], rows: list[int]) -> torch.Tensor:
    """Causal attention of several sequences' new tokens (prompt chunks) over their paged K/V, one sequence at a time.

    q: (N, nq, hd) rotated queries of a flat batch; sequence i has ``spans[i] = (start, n)``: n queries at positions
    start..start+n-1 in rows ``rows[i]``.. of q; ``block_tables[i]`` its block ids. Returns (N, nq, hd) with those
    rows filled (the others zero). The reference for ``paged_prefill_attention``.
    """
    N, nq, hd = q.shape
    out = torch.zeros_like(q)
    for table, (start, n), r in zip(block_tables, spans, rows):
        out[r:r + n] = paged_attention_ref(q[r:r + n], k_cache, v_cache, table, start).view(n, nq, hd)
    return out


if triton is not None:

    @triton.jit(do_not_specialize=["stride_bt"])  # the table width changes from step to step: one compile
    def _paged_prefill_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, tile_ptr, o_ptr, scale, REP,
                              stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_on, stride_oh,
                              HD: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              FP32: tl.constexpr):
        """Program (t, h): query head h of the rows of tile t (one sequence's consecutive new tokens) over the keys
        at positions 0..(last row's position), read through the block table, causal mask, online softmax.

        A row's keys are walked in the same position-aligned tiles whatever tile the row is in; tiles past its own
        position are fully masked and add exact zeros, so its result does not depend on the rest of the batch."""
        t = tl.program_id(0)
        h = tl.program_id(1)
        row0 = tl.load(tile_ptr + t * 4)
        pos0 = tl.load(tile_ptr + t * 4 + 1)
        nrows = tl.load(tile_ptr + t * 4 + 2)
        s = tl.load(tile_ptr + t * 4 + 3)
        j = h // REP  # the KV head this query head reads
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HD)
        mask_m = offs_m < nrows
        rows = (row0 + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qn + h * stride_qh + offs_d[None, :], mask=mask_m[:, None],
                    other=0.0)  # (BLOCK_M, HD)
        qpos = pos0 + offs_m
        last = pos0 + nrows  # keys 0..last-1 exist for this tile
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HD), tl.float32)
        for start in range(0, last, BLOCK_N):
            kpos = start + offs_n
            mask_n = kpos < last
            blk = tl.load(bt_ptr + s * stride_bt + kpos // BS, mask=mask_n, other=0).to(tl.int64)
            off = blk[:, None] * stride_kb + (kpos % BS)[:, None] * stride_ks + j * stride_kh + offs_d[None, :]
            k = tl.load(kc_ptr + off, mask=mask_n[:, None], other=0.0)  # (BLOCK_N, HD)
            v = tl.load(vc_ptr + off, mask=mask_n[:, None], other=0.0)
            m_i, l_i, acc = _online_softmax_step(q, k, v, kpos[None, :] <= qpos[:, None], m_i, l_i, acc, scale, FP32)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i is 0 only in a padding tile (no rows, nothing stored)
        tl.store(o_ptr + rows[:, None] * stride_on + h * stride_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=mask_m[:, None])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, tiles: torch.Tensor, out: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Same contract as ``paged_prefill_attention_ref``, every sequence of the step in one Triton launch.

    block_tables: (S, max_blocks) int32 on q's device; tiles: ``prefill_tiles(spans, rows, device)``. Writes the
    sequences' rows of ``out`` (N, nq, hd), a new zero tensor when None, and returns it.
    """
    if triton is None:
        raise LabkitError("paged_prefill_attention needs triton (pip install triton); use paged_prefill_attention_ref")
    if q.device.type != "cuda" and not fastgen._interpreting():
        raise LabkitError("the Triton paged attention needs a CUDA GPU (or TRITON_INTERPRET=1 on a CPU)")
    N, nq, hd = q.shape
    nb, bs, nkv, hd2 = k_cache.shape
    out = torch.zeros_like(q) if out is None else out
    if hd != hd2 or nq % nkv or hd < 16 or hd & (hd - 1) or not (k_cache.is_contiguous() and v_cache.is_contiguous()) \
            or q.stride(2) != 1 or out.shape != q.shape or out.stride(2) != 1:
        raise LabkitError(f"paged_prefill_attention: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}: need equal "
                          "head_dim (a power of two, at least 16), nq divisible by nkv, contiguous caches and rows")
    if len(tiles):
        bt = block_tables.to(torch.int32).contiguous()
        _paged_prefill_kernel[(len(tiles), nq)](
            q, k_cache, v_cache, bt, tiles, out, hd**-0.5, nq // nkv, q.stride(0), q.stride(1), k_cache.stride(0),
            k_cache.stride(1), k_cache.stride(2), bt.stride(0), out.stride(0), out.stride(1), HD=hd, BS=bs,
            BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, FP32=q.dtype == torch.float32, num_warps=4)
    return out
