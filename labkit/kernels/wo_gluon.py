"""The int4 tensor-core GEMV at one row (``wo_matmul`` variant "mma") with its weight words staged in shared memory:
GemvConfig(..., "mma", tma=True, stages=S), written in Gluon.

The Triton kernel of variant "mma" keeps the weight words it has asked for in registers, one K step ahead, so the
registers bound the loads an SM keeps in flight: asking for them earlier cost registers and warps and made it slower
(results/nvidia-h200/gemv_mma_early_sweep.json). Here the tensor memory accelerator copies each K
step's words (two chunks of 128 columns for BLOCK_N rows) into a ring of ``STAGES`` shared-memory slots, each copy
signalling its slot's mbarrier; the copies are issued ``STAGES`` steps ahead, before the PDL wait for the first ones,
and cost no registers. Each warp then reads its lanes' words from the slot with one 128-bit load per row and chunk
(the slot is 128-byte swizzled, as TMA writes it, so the eight rows a quarter-warp reads fall in different banks).

Gluon fixes every register layout, so each lane holds exactly its MMA fragment: the slot is read in the layout
``BlockedLayout([1, 4], [8, 4], [NW, 1])`` (lane 4 g + c: words 4c..4c+3 of a row, eight rows per warp, rows repeating
every 8 NW), then reshaped, permuted and split into the sixteen (NW, 8, 4) word tensors of the step, checked to be
the same registers (``convert_layout(..., assert_trivial=True)``). Of a 16 NW-row slot, warp w's MMA takes rows
8 w + g and 8 NW + 8 w + g for g = 0..7 (its "g" and "g + 8"). The arithmetic per chunk is the Triton kernel's
(``_wo_gemv_mma_kernel``): codes as ``BIAS + q`` by one lop3 per two, mma.sync m16n8k16 with the activations as the
B operand, the bias taken out per group through the activations' sum (MMAs against an all-ones A).

A K step is ``SUB`` blocks of two chunks (block_k = 256 SUB), each its own TMA box of (BLOCK_N, 32) words on the
slot's barrier; a warp takes one or two 16-row MMA slots (block_n = 16 or 32 x warps), the second sharing the
activations' registers and their sum (2.2 instructions per weight in the offline sm_90 SASS against 2.9 with one).
With the silu(gate) * up prologue (the down GEMV), each program first computes it for its columns into shared memory
(once, not once per warp as the register form must), and the lanes read the activations' registers from there;
checked on an H200, not yet timed.

Measured on an NVIDIA H200 (results/nvidia-h200/gemv_mma_tma_sweep.json, decode_mma_tma.json; wo_matmul's comment at
CANDIDATES_MMA_TMA has the figures): level with the best CUDA-core kernel when timed alone, ahead of it in the PDL
step (qkv and gate_up), where the int4 token took about 6% less time. Rings deeper than two slots and K steps longer
than 256 columns were slower in every GEMV of the sweep.

Needs a Hopper GPU (TMA); the interpreter cannot run Gluon, so on a CPU it is compiled for sm_90 offline
(``compile_offline``), which is what CI checks; the GPU suite checks its sums.
"""
from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
except ImportError:  # no triton, or one without Gluon's Hopper module
    gluon = None

WORDS_PER_STEP = 32  # two chunks of 128 columns: 16 words each


def _ptx():
    from labkit.kernels import wo_matmul as wo

    return {"codes_bf16": wo._ptx_codes("0x43004300"), "codes_f16": wo._ptx_codes("0x64006400"),
            "mma_bf16": wo._ptx_mma("bf16"), "mma_f16": wo._ptx_mma("f16"), "ld2": wo._PTX_LD2,
            "prmt_lo": wo._PTX_PRMT_LO, "prmt_hi": wo._PTX_PRMT_HI}


if gluon is not None:
    _P = _ptx()
    # a shared-memory view with another shape or layout: reinterpret since Triton 3.7, _reinterpret before
    _NEW_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))
    _CODES_BF16 = gl.constexpr(_P["codes_bf16"])
    _CODES_F16 = gl.constexpr(_P["codes_f16"])
    _MMA_BF16 = gl.constexpr(_P["mma_bf16"])
    _MMA_F16 = gl.constexpr(_P["mma_f16"])
    _LD2 = gl.constexpr(_P["ld2"])
    _PRMT_LO = gl.constexpr(_P["prmt_lo"])
    _PRMT_HI = gl.constexpr(_P["prmt_hi"])

    @gluon.jit
    def _codes(wd, BF16: gl.constexpr):
        """A word's eight nibbles as four registers of two 16-bit floats BIAS + q (as ``wo._mma_codes``)."""
        return gl.inline_asm_elementwise(_CODES_BF16 if BF16 else _CODES_F16, "=r,=r,=r,=r,r", [wd],
                                         dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)

    @gluon.jit
    def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, BF16: gl.constexpr):
        """D = A B + C, one m16n8k16 per element (each lane hands its fragment registers, as ``wo._mma16816``)."""
        return gl.inline_asm_elementwise(_MMA_BF16 if BF16 else _MMA_F16, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                                         [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
                                         dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True, pack=1)

    @gluon.jit
    def _ld2(ptr, live):
        """Four consecutive 16-bit values at ptr as two int32 (as ``wo._mma_ld2``): zeros where live is False."""
        return gl.inline_asm_elementwise(_LD2, "=r,=r,l,r", [ptr.to(gl.int64), live.to(gl.int32)],
                                         dtype=(gl.int32, gl.int32), is_pure=True, pack=1)

    @gluon.jit
    def _prmt(a, b, HI: gl.constexpr):
        """(low half of a, low half of b) or, HI, the high halves: one prmt."""
        return gl.inline_asm_elementwise(_PRMT_HI if HI else _PRMT_LO, "=r,r,r", [a, b], dtype=gl.int32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _ldx(x_ptr, kcol, K, live):
        """The B registers of one nibble pair for the lane's four words: (x[k + i], x[k + 64 + i]), k = kcol."""
        lo0, lo1 = _ld2(x_ptr + kcol, live & (kcol < K))
        hi0, hi1 = _ld2(x_ptr + kcol + 64, live & (kcol + 64 < K))
        return _prmt(lo0, hi0, False), _prmt(lo0, hi0, True), _prmt(lo1, hi1, False), _prmt(lo1, hi1, True)

    @gluon.jit
    def _fill_silu(x_ptr, xsm, K, k_lo, k_hi, XS: gl.constexpr, NW: gl.constexpr, BF16: gl.constexpr):
        """xsm <- silu(gate) * up for columns k_lo .. k_lo + XS of [gate | up] (zeros from k_hi on), each step rounded
        to the activations' dtype as torch rounds it, two values to an int32 (the first in the low half)."""
        LF: gl.constexpr = gl.BlockedLayout([1, 1, 2], [4, 4, 2], [NW, 1, 1], [2, 1, 0])  # (block, group, pair)
        b_i = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, LF)))[:, None, None]
        c_i = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LF)))[None, :, None]
        p_i = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, LF)))[None, None, :]
        col = b_i * 16 + c_i * 4 + p_i * 2                        # the first of each pair, (16, 4, 2)
        for off in gl.static_range(0, XS, 256):
            k = k_lo + off + col
            lo = _silu_mul(x_ptr, k, K, k_hi, BF16)
            hi = _silu_mul(x_ptr, k + 1, K, k_hi, BF16)
            xsm.slice(off // 16, 16, dim=0).store(lo | (hi << 16))

    @gluon.jit
    def _silu_mul(x_ptr, k, K, k_hi, BF16: gl.constexpr):
        """silu(gate[k]) * up[k] rounded as torch rounds each step, as the low 16 bits of an int32 (0 from k_hi on)."""
        dt: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        live = k < k_hi
        g = gl.load(x_ptr + k, mask=live, other=0.0).to(gl.float32)
        u = gl.load(x_ptr + K + k, mask=live, other=0.0).to(gl.float32)
        sg = (g / (1.0 + gl.exp(-g))).to(dt).to(gl.float32)
        return (sg * u).to(dt).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF

    @gluon.jit
    def _ldx_smem(xsm, blk, ones, L3: gl.constexpr, NW: gl.constexpr):
        """``_ldx`` from shared memory: the B registers of one nibble pair for the lane's four words, from 16-column
        block blk (its four values at 4 c) and blk + 4 (64 columns on)."""
        LB: gl.constexpr = gl.BlockedLayout([1, 2], [4, 8], [1, NW], [0, 1])  # lane 4 g + c: group c's two pairs
        lo0, lo1 = gl.split(xsm.index(blk).load(LB))
        hi0, hi1 = gl.split(xsm.index(blk + 4).load(LB))
        return (_prmt(_lanes(lo0, ones, L3), _lanes(hi0, ones, L3), False),
                _prmt(_lanes(lo0, ones, L3), _lanes(hi0, ones, L3), True),
                _prmt(_lanes(lo1, ones, L3), _lanes(hi1, ones, L3), False),
                _prmt(_lanes(lo1, ones, L3), _lanes(hi1, ones, L3), True))

    @gluon.jit
    def _lanes(v, ones, L3: gl.constexpr):
        """A (4,) tensor held by lanes c (the same in every g and warp) -> (NW, 8, 4) in L3, the same registers."""
        v = gl.convert_layout(v, gl.SliceLayout(0, gl.SliceLayout(0, L3)), assert_trivial=True)
        return gl.broadcast(gl.expand_dims(gl.expand_dims(v, 0), 0), ones)[0]

    @gluon.jit
    def _xsum(c0, c1, c2, c3, ones, bp0, bp1, bp2, bp3, BF16: gl.constexpr):
        """c0 += the sum of the activations in one word position's four B registers (two MMAs, all-ones A)."""
        c0, c1, c2, c3 = _mma(ones, ones, ones, ones, bp0, bp1, c0, c1, c2, c3, BF16)
        return _mma(ones, ones, ones, ones, bp2, bp3, c0, c1, c2, c3, BF16)

    @gluon.jit
    def _word(c0, c1, c2, c3, wg, wh, bp0, bp1, bp2, bp3, BF16: gl.constexpr):
        """One word position: the codes of rows g and g + 8 (wg, wh) against its four nibble pairs, two MMAs."""
        ga0, ga1, ga2, ga3 = _codes(wg, BF16)
        ha0, ha1, ha2, ha3 = _codes(wh, BF16)
        c0, c1, c2, c3 = _mma(ga0, ha0, ga1, ha1, bp0, bp1, c0, c1, c2, c3, BF16)
        return _mma(ga2, ha2, ga3, ha3, bp2, bp3, c0, c1, c2, c3, BF16)

    @gluon.jit
    def _pieces(t, L3: gl.constexpr, NW: gl.constexpr):
        """A (16 NW, 32) tile in the slot-read layout -> its 16 (NW, 8, 4) pieces [h][cc][i] (row h * 8 NW + 8 w + g,
        word 16 cc + 4 c + i), each the same registers in layout L3 (no data moves)."""
        t = gl.reshape(t, [2, NW, 8, 2, 4, 4])                    # (h, w, g, cc, c, i)
        t = gl.permute(t, [1, 2, 4, 0, 3, 5])                     # (w, g, c, h, cc, i)
        t = gl.reshape(t, [NW, 8, 4, 2, 2, 2, 2])                 # ..., h, cc, i1, i0
        e, o = gl.split(t)                                        # i0
        e0, e1 = gl.split(e)                                      # i1: words i = 0 and 2
        o0, o1 = gl.split(o)                                      # words i = 1 and 3
        a0, a1, a2, a3 = _cc_h(e0, L3)
        b0, b1, b2, b3 = _cc_h(o0, L3)
        c0, c1, c2, c3 = _cc_h(e1, L3)
        d0, d1, d2, d3 = _cc_h(o1, L3)
        return a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3  # [4 i + 2 cc + h]

    @gluon.jit
    def _cc_h(v, L3: gl.constexpr):
        """(w, g, c, h, cc) -> its four (w, g, c) pieces in the order (cc, h), each converted to L3 (a no-op)."""
        x0, x1 = gl.split(v)                                      # cc
        p0, p1 = gl.split(x0)                                     # h
        q0, q1 = gl.split(x1)
        return (gl.convert_layout(p0, L3, assert_trivial=True), gl.convert_layout(p1, L3, assert_trivial=True),
                gl.convert_layout(q0, L3, assert_trivial=True), gl.convert_layout(q1, L3, assert_trivial=True))

    @gluon.jit
    def _wo_gemv_mma_tma_kernel(x_ptr, w_desc, s_ptr, z_ptr, y_ptr, N, K, stride_sn, stride_ys, K_CHUNK,
                                BLOCK_N: gl.constexpr, SUB: gl.constexpr, STAGES: gl.constexpr, BF16: gl.constexpr,
                                PDL: gl.constexpr, num_warps: gl.constexpr, PRO_SILU: gl.constexpr = False,
                                XS: gl.constexpr = 0, XSB: gl.constexpr = 1):
        """y[n] (or its split-K part) = sum_k x[k] W[n, k] for BLOCK_N rows: K steps of SUB blocks of two chunks
        (256 SUB columns), each step SUB TMA copies of (BLOCK_N, 32) words into a slot of the ring. PRO_SILU: x is
        [gate | up]; silu(gate) * up of the program's XS (= K_CHUNK) columns is computed once, into shared memory, and
        the activations' registers are read from there (XSB: its 16-column blocks rounded up to a power of two)."""
        NW: gl.constexpr = num_warps
        W: gl.constexpr = 32                                      # words per row and K step (two chunks)
        BIAS: gl.constexpr = 128.0 if BF16 else 1024.0
        LT: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [NW, 1], [1, 0])           # the slot as read
        L3: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 8, 4], [NW, 1, 1], [2, 1, 0])  # (w, g, c): one per lane
        pid_k = gl.program_id(1)
        n0 = gl.program_id(0) * BLOCK_N
        ch_lo = pid_k * (K_CHUNK // 128)
        c_end = gl.minimum((K + 127) // 128, ch_lo + K_CHUNK // 128)
        n_steps = (c_end - ch_lo + 2 * SUB - 1) // (2 * SUB)
        tiles = gl.allocate_shared_memory(gl.int32, [STAGES * SUB, BLOCK_N, W], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()
        # the weights depend on no earlier kernel: the first STAGES steps are on their way before the PDL wait
        for i in gl.static_range(STAGES):
            _issue(w_desc, tiles, bars, i, i, ch_lo, n0, i < n_steps, SUB)
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents;\ngriddepcontrol.wait;\nmov.u32 $0, 0;",
                                      "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        if PRO_SILU:  # (blocks of 16 columns, 4 groups of 4, 2 pairs): each pair two bf16 in an int32
            xsm = gl.allocate_shared_memory(gl.int32, [XSB, 4, 2], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
            _fill_silu(x_ptr, xsm, K, ch_lo * 128, gl.minimum(K, ch_lo * 128 + K_CHUNK), XS, NW, BF16)
            _cta_barrier()
            # the same bytes with a layout of one rank less, so that .index() takes a run-time block
            if _NEW_REINTERPRET:
                xsm = xsm.reinterpret(gl.int32, [XSB, 4, 2], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
            else:
                xsm = xsm._reinterpret(gl.int32, [XSB, 4, 2], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        else:
            xsm = tiles  # unused
        w_i = gl.arange(0, NW, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))[:, None, None]
        g_i = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))[None, :, None]
        c_i = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))[None, None, :]
        rows_g = n0 + w_i * 8 + g_i + c_i * 0                     # (NW, 8, 4): MMA row g of warp w
        rows_h = rows_g + 8 * NW                                  # its row g + 8
        mask_g = rows_g < N
        mask_h = rows_h < N
        c4 = c_i * 4 + w_i * 0 + g_i * 0                          # the lane's first word of a chunk
        ones = gl.full([NW, 8, 4], 0x3F803F80 if BF16 else 0x3C003C00, gl.int32, layout=L3)
        zero = gl.zeros([NW, 8, 4], gl.float32, layout=L3)
        R: gl.constexpr = BLOCK_N // (16 * NW)                   # 16-row MMA slots per warp: 1 or 2
        rows_g2 = rows_g + 16 * NW                                # the second slot's rows (R = 2)
        rows_h2 = rows_h + 16 * NW
        mask_g2 = rows_g2 < N
        mask_h2 = rows_h2 < N
        acc_g = gl.zeros([NW, 8, 4], gl.float32, layout=L3)
        acc_h = gl.zeros([NW, 8, 4], gl.float32, layout=L3)
        acc_g2 = gl.zeros([NW, 8, 4], gl.float32, layout=L3)
        acc_h2 = gl.zeros([NW, 8, 4], gl.float32, layout=L3)
        for s in range(n_steps):
            slot = s % STAGES
            mbarrier.wait(bars.index(slot), (s // STAGES) & 1)
            for j in gl.static_range(SUB):
                tile = tiles.index(slot * SUB + j)
                acc_g, acc_h, acc_g2, acc_h2 = _block(
                    tile, ch_lo + 2 * (SUB * s + j), c_end, K, x_ptr, s_ptr, z_ptr, stride_sn, rows_g, rows_h, mask_g,
                    mask_h, rows_g2, rows_h2, mask_g2, mask_h2, c4, ones, zero, acc_g, acc_h, acc_g2, acc_h2, LT, L3,
                    NW, R, BIAS, BF16, xsm, ch_lo, PRO_SILU)
            _cta_barrier()                                        # every warp is done with the slot: refill it
            _issue(w_desc, tiles, bars, slot, s + STAGES, ch_lo, n0, s + STAGES < n_steps, SUB)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        first = c_i == 0                                          # the four lanes of a row hold the same sums
        out = y_ptr + pid_k * stride_ys
        gl.store(out + rows_g, acc_g.to(y_ptr.dtype.element_ty), mask=mask_g & first)
        gl.store(out + rows_h, acc_h.to(y_ptr.dtype.element_ty), mask=mask_h & first)
        if R == 2:
            gl.store(out + rows_g2, acc_g2.to(y_ptr.dtype.element_ty), mask=mask_g2 & first)
            gl.store(out + rows_h2, acc_h2.to(y_ptr.dtype.element_ty), mask=mask_h2 & first)

    @gluon.jit
    def _issue(w_desc, tiles, bars, slot, step, ch_lo, n0, live, SUB: gl.constexpr):
        """Start the TMA copies of K step ``step`` into ring slot ``slot``: SUB boxes of (BLOCK_N, 32) words, back to
        back along each row, all on the slot's barrier (nothing when not live; words past the row read as zeros)."""
        mbarrier.expect(bars.index(slot), SUB * w_desc.block_type.nbytes, live)
        for j in gl.static_range(SUB):
            _tma_load(w_desc, [n0, (ch_lo + 2 * (SUB * step + j)) * 16], bars.index(slot), tiles.index(slot * SUB + j),
                      live)

    @gluon.jit
    def _block(tile, ch0, c_end, K, x_ptr, s_ptr, z_ptr, stride_sn, rows_g, rows_h, mask_g, mask_h, rows_g2, rows_h2,
               mask_g2, mask_h2, c4, ones, zero, acc_g, acc_h, acc_g2, acc_h2, LT: gl.constexpr, L3: gl.constexpr,
               NW: gl.constexpr, R: gl.constexpr, BIAS: gl.constexpr, BF16: gl.constexpr, xsm, ch_lo,
               PRO_SILU: gl.constexpr):
        """Chunks ch0 and ch0 + 1 (nothing for a chunk at or past c_end) of the (BLOCK_N, 32) words in shared memory
        ``tile``: R slots of 16 NW rows, which share the activations' registers and sum."""
        wp = _pieces(tile.slice(0, 16 * NW, dim=0).load(LT), L3, NW)
        if R == 2:
            wq = _pieces(tile.slice(16 * NW, 16 * NW, dim=0).load(LT), L3, NW)
        for cc in gl.static_range(2):
            ch = ch0 + cc
            live_c = (ch + rows_g * 0) < c_end
            if PRO_SILU:  # from the program's silu(gate) * up in shared memory (16-column blocks from its first)
                blk = (ch - ch_lo) * 8
                b00, b01, b02, b03 = _ldx_smem(xsm, blk, ones, L3, NW)
                b10, b11, b12, b13 = _ldx_smem(xsm, blk + 1, ones, L3, NW)
                b20, b21, b22, b23 = _ldx_smem(xsm, blk + 2, ones, L3, NW)
                b30, b31, b32, b33 = _ldx_smem(xsm, blk + 3, ones, L3, NW)
            else:
                kc = ch * 128 + c4
                b00, b01, b02, b03 = _ldx(x_ptr, kc, K, live_c)     # pair t = 0 for words i = 0..3
                b10, b11, b12, b13 = _ldx(x_ptr, kc + 16, K, live_c)
                b20, b21, b22, b23 = _ldx(x_ptr, kc + 32, K, live_c)
                b30, b31, b32, b33 = _ldx(x_ptr, kc + 48, K, live_c)
            xa, u1, u2, u3 = _xsum(zero, zero, zero, zero, ones, b00, b10, b20, b30, BF16)
            xa, u1, u2, u3 = _xsum(xa, u1, u2, u3, ones, b02, b12, b22, b32, BF16)
            xb, v1, v2, v3 = _xsum(zero, zero, zero, zero, ones, b01, b11, b21, b31, BF16)
            xb, v1, v2, v3 = _xsum(xb, v1, v2, v3, ones, b03, b13, b23, b33, BF16)
            xs = xa + xb
            acc_g, acc_h = _slot(wp, cc, ch, live_c, xs, b00, b01, b02, b03, b10, b11, b12, b13, b20, b21, b22, b23,
                                 b30, b31, b32, b33, s_ptr, z_ptr, stride_sn, rows_g, rows_h, mask_g, mask_h, zero,
                                 acc_g, acc_h, BIAS, BF16)
            if R == 2:
                acc_g2, acc_h2 = _slot(wq, cc, ch, live_c, xs, b00, b01, b02, b03, b10, b11, b12, b13, b20, b21, b22,
                                       b23, b30, b31, b32, b33, s_ptr, z_ptr, stride_sn, rows_g2, rows_h2, mask_g2,
                                       mask_h2, zero, acc_g2, acc_h2, BIAS, BF16)
        return acc_g, acc_h, acc_g2, acc_h2

    @gluon.jit
    def _slot(wp, cc: gl.constexpr, ch, live_c, xs, b00, b01, b02, b03, b10, b11, b12, b13, b20, b21, b22, b23, b30,
              b31, b32, b33, s_ptr, z_ptr, stride_sn, rows_g, rows_h, mask_g, mask_h, zero, acc_g, acc_h,
              BIAS: gl.constexpr, BF16: gl.constexpr):
        """One 16-row slot and chunk: acc += s (sum (BIAS + q) x - (BIAS + z) X) for its rows g and g + 8."""
        p0, p1, p2, p3 = _word(zero, zero, zero, zero, wp[2 * cc], wp[2 * cc + 1], b00, b10, b20, b30, BF16)
        q0, q1, q2, q3 = _word(zero, zero, zero, zero, wp[4 + 2 * cc], wp[5 + 2 * cc], b01, b11, b21, b31, BF16)
        p0, p1, p2, p3 = _word(p0, p1, p2, p3, wp[8 + 2 * cc], wp[9 + 2 * cc], b02, b12, b22, b32, BF16)
        q0, q1, q2, q3 = _word(q0, q1, q2, q3, wp[12 + 2 * cc], wp[13 + 2 * cc], b03, b13, b23, b33, BF16)
        sg = gl.load(s_ptr + rows_g * stride_sn + ch, mask=mask_g & live_c, other=0.0).to(gl.float32)
        zg = gl.load(z_ptr + rows_g * stride_sn + ch, mask=mask_g & live_c, other=0.0).to(gl.float32)
        sh = gl.load(s_ptr + rows_h * stride_sn + ch, mask=mask_h & live_c, other=0.0).to(gl.float32)
        zh = gl.load(z_ptr + rows_h * stride_sn + ch, mask=mask_h & live_c, other=0.0).to(gl.float32)
        acc_g += sg * ((p0 + q0) - (BIAS + zg) * xs)
        acc_h += sh * ((p2 + q2) - (BIAS + zh) * xs)
        return acc_g, acc_h


def silu_blocks(k_chunk: int) -> int:
    """The 16-column blocks of shared memory the silu prologue keeps for a program's k_chunk columns (a power of two)."""
    return 1 << max(0, (k_chunk // 16 - 1).bit_length()) if k_chunk else 1


def words_layout():
    """The shared-memory layout of a (BLOCK_N, 32) box of words: 128-byte swizzle over rows of 32 words."""
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)


def descriptor(words: torch.Tensor, block_n: int):
    """A TMA descriptor over int4 WordWeight words (N, nw), boxes of (block_n, 32): two chunks of block_n rows."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    N, nw = words.shape
    return TensorDescriptor(words, [N, nw], [nw, 1], [block_n, WORDS_PER_STEP], words_layout())


def compile_offline(block_n: int = 64, num_warps: int = 4, stages: int = 4, pdl: bool = False,
                    y_dtype: str = "fp32", sub: int = 1, silu_k_chunk: int = 0):
    """The kernel compiled for sm_90 without a GPU (Triton's bundled ptxas): ``.asm`` holds its TTGIR, PTX and cubin.
    Needs a process where Triton was imported without TRITON_INTERPRET=1."""
    from labkit.kernels import offline

    sig = {"x_ptr": "*bf16", "w_desc": f"tensordesc<i32[{block_n}, {WORDS_PER_STEP}],{words_layout()!r}>",
           "s_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": f"*{y_dtype}", "N": "i32", "K": "i32", "stride_sn": "i32",
           "stride_ys": "i32", "K_CHUNK": "i32"}
    consts = dict(BLOCK_N=block_n, SUB=sub, STAGES=stages, BF16=True, PDL=pdl, num_warps=num_warps,
                  PRO_SILU=silu_k_chunk > 0, XS=silu_k_chunk, XSB=silu_blocks(silu_k_chunk))
    sig.update({k: "constexpr" for k in consts})
    return offline.compile_kernel(_wo_gemv_mma_tma_kernel, sig, consts, {"num_warps": num_warps},
                                  divisible=["x_ptr", "s_ptr", "z_ptr", "y_ptr", "stride_sn"])


_OFFLINE_STATS = """
import json, sys
from labkit.kernels import offline, wo_gluon
rows = []
for case in json.loads(sys.argv[1]):
    bn, warps, stages, sub, silu = (case + [0])[:5]
    k = wo_gluon.compile_offline(block_n=bn, num_warps=warps, stages=stages, pdl=True, sub=sub, silu_k_chunk=silu)
    ptx = k.asm["ptx"]
    rows.append({"block_n": bn, "num_warps": warps, "stages": stages, "sub": sub, "silu_k_chunk": silu,
                 "mma": ptx.count("mma.sync"),
                 "shared_loads_128": ptx.count("ld.shared.v4.b32"), "shared_stores": ptx.count("st.shared"),
                 "tma": ptx.count("cp.async.bulk.tensor"), "mbarrier_wait": ptx.count("mbarrier.try_wait"),
                 "pdl_wait": "griddepcontrol.wait" in ptx, **offline.resource_usage(k.asm["cubin"])})
print(json.dumps(rows))
"""


def offline_stats(cases, timeout: float = 600) -> list[dict]:
    """Compile each (block_n, num_warps, stages, sub[, silu_k_chunk]) for sm_90 without a GPU, in a fresh Python
    process (Triton
    imported without the interpreter; silu_k_chunk > 0: with the silu prologue for that many columns per program), and
    count what its PTX is built from: ``mma`` (mma.sync), ``shared_loads_128``
    (the lanes' 128-bit reads of their words), ``shared_stores`` (a layout conversion through shared memory would add
    them), ``tma`` (bulk tensor copies), ``mbarrier_wait``, ``pdl_wait``; with ``registers`` per thread and ``local``
    (spill) bytes where Triton ships cuobjdump."""
    import json
    import os
    import subprocess
    import sys

    from labkit import env

    run_env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        filter(None, [str(env.repo_root()), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-c", _OFFLINE_STATS, json.dumps([list(c) for c in cases])],
                         capture_output=True, text=True, env=run_env, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"offline compile failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])

