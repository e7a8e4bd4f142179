"""Hopper (sm_90) attention forward and backward in Gluon (Triton's lower-level dialect):
warp-specialised, asynchronous wgmma, TMA loads.

Why a second forward: Triton's `tl.dot` waits for every non-accumulating wgmma right after issuing
it, so a tile's softmax work (exp2 on the MUFU pipe, max / sum / scale on the FP32 pipes) does not
overlap the tensor cores inside a program (docs/kernel_notes.md). This kernel follows
FlashAttention-3's forward: a tile is 128 query rows of one (batch, head), run by three
warp-specialised partitions that hand shared-memory buffers to each other through mbarriers only:

    loader (1 warp):          per tile Q (double buffered), then K_j and V_j by TMA into a
                              STAGES-deep ring, each as soon as both consumers released the buffer
    consumer 0, 1 (4 warps):  64 query rows each; per key block j
                                issue S_j = Q K_j^T, issue O += P_{j-1} V_{j-1} (asynchronous)
                                wait for S_j only; release K_j
                                P_j, alpha_j = exp2(...) of S_j      <- overlaps P_{j-1} V_{j-1}
                                wait for O; release V_{j-1}; O *= alpha_j
                              then O += P_last V_last, O / l, LSE = m + log2(l); O leaves through
                              the tile's Q buffer and a TMA store, then the buffer is released

No CTA-wide barrier sits in the loop, so the two consumer warpgroups drift apart and one's softmax
runs under the other's products. P goes to the second product as a register operand. Every wgmma
result is read after `wait_group` with no branch between issue and wait, the pattern ptxas keeps
asynchronous (docs/kernel_notes.md Version 5). TMA reads through host descriptors of the whole
(B, N, H, D) tensors; rows past a head's end read as 0 and are masked, and stores past it are dropped.

Persistent (Version 15): up to PERSISTENT_MAX_KEYS keys one program per SM runs work units in turn,
so the next tile's Q and first K / V blocks load while the consumers finish the current one (a
program's start and end cost up to a third of a 1k-key tile). A causal unit is the pair of query
blocks r and n_m - 1 - r of one head (`_fwd_tile_coords`): every unit has the same work, so the
programs stay in step on the same few heads, whose K / V stay in L2 (single tiles in heavy-first
order made the programs drift apart over many heads: 0.84x at causal 16k).

Same contract as `flash._fwd_kernel` (bottom-right causal alignment; rows that see no key give 0
and LSE = +inf; LSE in base 2 of the scaled scores), so `flash._flash_bwd` runs on its output.
`flash._flash_fwd` launches it for fp16/bf16 attention on sm_90 where the launch table's
"fwd_gluon" row says so (head dim 128 everywhere; head dim 64 from 2048 keys causal, 1024
non-causal; docs/benchmarks.md 1j) and the inputs suit TMA; everything else runs the Triton kernel.
Block-sparse (SPARSE): a tile runs its mask row's list of kept key blocks (mask blocks of a multiple
of 128 query rows by a multiple of 128 keys), the element mask only past the list's `full` prefix;
units are single tiles, always on the persistent grid (rows of a few blocks gain most from it). Rows
that keep fewer than 6 blocks of 128 keys on average run 64-key blocks (BLOCK_N = 64, a 3-deep ring):
with 128-key blocks a tile's start and end (first product, O store) were not hidden at 2 blocks per row
(0.78x the Triton forward), with 64 it is 1.14-1.17x there (docs/benchmarks.md 2c, 2f, 2g).

The backward (`gluon_bwd`, head dims 64 and 128) has the same partition structure, FlashAttention-3's backward
schedule as far as 240 registers per consumer thread allow:

    loader (1 warp):          K and V of the program's 128 keys once, then Q_i and dO_i (64 query
                              rows) by TMA into a 2-deep ring, each once both consumers released it
    consumer 0, 1 (4 warps):  64 keys each; per query block i, with S_i^T = K Q_i^T and
                              dP_i^T = V dO_i^T already issued by the previous step:
                                wait S_i^T, dP_i^T; P^T = exp2(S^T scale - LSE)
                                issue dV += P^T dO_i; dS^T = P^T (dP^T - delta)   <- dV running
                                dS^T -> its half of the block's [128 keys, 64] dS^T slot
                                issue dK += dS^T Q_i
                                block owner only (consumer i % 2): wait for the other half's dS^T,
                                  issue dQ_i = dS K over all 128 keys (one K = 128 product)
                                wait; release the buffer; issue S_{i+1}^T, dP_{i+1}^T
                                owner: dQ_i -> shared memory -> TMA reduce-add    <- those two running
                              then dK (times the softmax scale) and dV stored once

Head dim 128 (DQ_SPLIT) runs query-major, FlashAttention-3's orientation: per consumer S = Q K^T and
dP = dO V^T are [64 queries, 64 keys], so LSE and delta are one value per accumulator row (2 registers
per thread; 32 in the key-major S^T). A consumer's dK and dV accumulators ([64, 128] fp32 each) take
128 of its 240 registers, so no consumer can also hold a [64, 128] dQ. There is no owner: both
consumers, every block, form 64 of dQ's 128 columns over all 128 keys (dS from both consumers' [64, 64]
halves in shared memory, K loaded once more as two [128, 64] column halves, `kc_smem`), reduce them,
and only then issue the next block's S and dP. P and dS go through shared memory (P^T and dS^T are the
A operands of dV += P^T dO and dK += dS^T Q); P shares the consumer's dQ buffer. Both consumers run
every query block: the one whose keys block 0 does not see runs it fully masked, since forming its
dQ columns apart before the loop made ptxas serialise every wgmma of the kernel (its warning C7514,
which the build test checks for). 1.05-1.09x the key-major kernel at causal 1k-16k
(docs/kernel_notes.md Version 18).

The owner alternates with the block's parity, so each consumer reduces every other block's dQ and
the program sends one reduction per 128 keys, not one per 64 (half the L2 reduction traffic; 1.11-1.19x
the backward that reduced each half's dQ, docs/kernel_notes.md Version 9). The dS^T slots are double
buffered: `ds_ready` (two arrivals) tells the owner both halves are in, `ds_free` (the owner's
arrival once its product is done) lets the next writer of the slot, two blocks later, overwrite it.
The loads use host TMA descriptors of the whole (B, N, H, D) inputs (`gluon_bwd`), so no program
builds descriptors on the device before its first load (1.13x at causal 1k, Version 12).
Block-sparse (SPARSE): a program's query blocks are those of the mask row blocks its key column
keeps (the column lists of `BlockMask.lists`, MASK_BN a multiple of 128, MASK_BM of 64), looked up
one step ahead; both halves run every block, and only blocks of the list's leading mask blocks that
cross the causal diagonal get the element mask (Version 13).

Issuing the next block's products before this block's dQ reductions is what made it faster than the
Triton fused backward (docs/kernel_notes.md Version 7); every wait is `wait_group 0`, so the loop's
back edge between an issue and its wait does not make ptxas serialise the wgmma. dQ goes out as
cuDNN's does (Version 17): the wgmma result is stored to one fp32 shared buffer per consumer and one
thread issues a TMA reduce-add of the whole tile into the accumulator (`_tma_add`), in place of
per-thread `red.global.add.v4.f32` after a layout conversion through shared memory: 1.06-1.10x at head
dim 64, 1.11-1.17x at 128, and fewer spilled registers at 128. Same contract as
`flash._bwd_dkdv_kernel` with the fused dQ: dK, dV written, dQ / scale added into the zeroed fp32
accumulator that `flash._convert_dq` turns into dQ.
"""
from __future__ import annotations

import functools

import torch

try:  # Gluon with the Hopper pieces: Triton >= 3.5 (the GPU image has 3.6)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # 3.9 renamed them
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    if not hasattr(gl.shared_memory_descriptor, "reinterpret"):  # 3.6 has it as _reinterpret
        gl.shared_memory_descriptor.reinterpret = gl.shared_memory_descriptor._reinterpret
    _tma_add = getattr(tma, "async_atomic_add", None)
    if _tma_add is None:  # Triton 3.6: its Gluon builder has the TMA reduction, without a wrapper
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        @_builtin
        def _tma_add(tensor_desc, coord, src, _semantic=None):
            """global[tile at coord] += src (shared memory) through a TMA reduction (sm_90)."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle,
                                                      coord, src.handle)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

HEAD_DIMS = (64, 128)  # the head dims the forward is built for (one warpgroup's wgmma N = head_dim)
BWD_HEAD_DIMS = (64, 128)  # the backward's (at 128 each consumer forms half of dQ's columns)
# The forward runs on one program per SM (persistent) up to this many keys: 1.03-1.16x one program per
# work unit at 1k-4k keys (the next tile's Q and first K / V load while the consumers finish a tile);
# at 16k keys one program per unit (the hardware's dynamic assignment) measured level (head dim 128)
# to 1.04x faster (64) (docs/benchmarks.md 1j)
PERSISTENT_MAX_KEYS = 8192
# The swizzle (bytes) of the backward's fp32 dQ buffers and of the TMA reduce-add that reads them, per (head
# dim, causal): 64-byte rows (four TMA boxes per [64, 64] tile) measured 1.034x the 128-byte ones (two boxes)
# at head dim 128 non-causal (16k, 64k; level at 4k), 0.99-1.00x at 128 causal, 0.97-0.98x at 64 non-causal,
# 1.01x at 64 causal dense but 0.99-1.00x on block masks (docs/benchmarks.md 1l)
DQ_SWIZZLE_BYTES = {(64, True): 128, (64, False): 128, (128, True): 128, (128, False): 64}


if HAVE_GLUON:
    # a compact layout for a vector of a query block's 64 rows (LSE, delta), one warpgroup
    _ROW_L = gl.constexpr(gl.BlockedLayout([1], [32], [4], [0]))

    @gluon.jit
    def _softmax_step(s, m_i, l_i, offs_m, offs_n, start_n, Nk, causal_off, qk_scale,
                      MASK: gl.constexpr, CAUSAL: gl.constexpr):
        """Online-softmax update for one score tile: returns P (fp32), alpha, new m and l."""
        if MASK:
            cols = start_n + offs_n
            keep = cols[None, :] < Nk
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + causal_off)
            s = gl.where(keep, s, float("-inf"))
        # m_i starts at -1e30 (finite): a fully masked tile gives p = 0 and alpha = 1, never NaN
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _fwd_unit_tiles(u, n_m, CAUSAL: gl.constexpr, SPARSE: gl.constexpr):
        """How many query blocks work unit u holds (see _fwd_tile_coords)."""
        if CAUSAL and not SPARSE:
            return 1 + (2 * (u % ((n_m + 1) // 2)) + 1 != n_m).to(gl.int32)
        else:
            return 1

    @gluon.jit
    def _fwd_tile_coords(u, i, n_m, H, Nq, Nk, ROW_COUNT, ROW_FULL, ROW_IDX, stride_mh, stride_mrow,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                         SPARSE: gl.constexpr, MASK_BM: gl.constexpr, MASK_BN: gl.constexpr):
        """Query block i of work unit u: (b, h, bh, m0, key blocks to run, key blocks that need no mask,
        the block-mask row's list of key blocks (SPARSE), the key count the element mask keeps).
        Units run in order of (batch * head, query block), so the programs running at one time share
        a few heads' K / V in L2. Non-causal and block-sparse: a unit is one query block. Causal: a
        unit is the pair of query blocks r and n_m - 1 - r (heaviest first, the middle one alone when
        n_m is odd), so every unit has the same work and the persistent programs stay in step."""
        if CAUSAL and not SPARSE:
            half = (n_m + 1) // 2
            bh = u // half
            r = u % half
            pid_m = (n_m - 1 - r) * (1 - i) + r * i
        else:
            bh = u // n_m
            pid_m = u % n_m
        m0 = pid_m * BLOCK_M
        h = bh % H
        if SPARSE:  # the mask row's kept blocks, each MASK_BN // BLOCK_N key blocks; its first
            # `full` need no element mask. A row that keeps nothing runs one block with no key kept.
            sub: gl.constexpr = MASK_BN // BLOCK_N
            row = h * stride_mh + m0 // MASK_BM
            count = gl.load(ROW_COUNT + row) * sub
            full = gl.load(ROW_FULL + row) * sub
            n_blocks = gl.maximum(count, 1)
            return bh // H, h, bh, m0, n_blocks, gl.minimum(full, n_blocks), ROW_IDX + row * stride_mrow, \
                gl.where(count > 0, Nk, 0)
        else:
            if CAUSAL:  # key blocks [0, full_end) need no mask; the rest hold the diagonal
                causal_off = Nk - Nq
                hi = gl.minimum(Nk, m0 + BLOCK_M + causal_off)
                full_end = gl.maximum(gl.minimum(hi, m0 + causal_off + 1), 0) // BLOCK_N
            else:  # only the last block may need a mask (the Nk tail)
                hi = Nk
                full_end = Nk // BLOCK_N
            # rows that see no key (hi <= 0) still run one block, fully masked: output 0, LSE = +inf
            n_blocks = gl.maximum(gl.cdiv(hi, BLOCK_N), 1)
            return bh // H, h, bh, m0, n_blocks, gl.minimum(full_end, n_blocks), ROW_IDX, Nk

    @gluon.jit
    def _fwd_key_start(j, idx_ptr, BLOCK_N: gl.constexpr, SPARSE: gl.constexpr, MASK_BN: gl.constexpr):
        """First key of the tile's j-th key block."""
        if SPARSE:
            sub: gl.constexpr = MASK_BN // BLOCK_N
            return gl.load(idx_ptr + j // sub) * MASK_BN + (j % sub) * BLOCK_N
        else:
            return j * BLOCK_N

    @gluon.jit
    def _fwd_loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready,
                    k_empty, v_empty, n_units, n_m, H, Nq, Nk, ROW_COUNT, ROW_FULL, ROW_IDX, stride_mh,
                    stride_mrow, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    CAUSAL: gl.constexpr, SPARSE: gl.constexpr, MASK_BM: gl.constexpr, MASK_BN: gl.constexpr):
        """One warp: per tile of this program, Q (into the tile's half of a double buffer, so the next
        tile's Q arrives while the consumers finish this one), then K_j, V_j into the ring (one count
        over all of the program's tiles) as the consumers free the buffers."""
        c = 0  # K / V blocks loaded so far, over all tiles: ring slot c % STAGES
        n = 0  # tiles so far: Q slot n % 2
        for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
            for i in range(_fwd_unit_tiles(u, n_m, CAUSAL, SPARSE)):
                b, h, bh, m0, n_blocks, full_end, idx_ptr, nk_lim = _fwd_tile_coords(
                    u, i, n_m, H, Nq, Nk, ROW_COUNT, ROW_FULL, ROW_IDX, stride_mh, stride_mrow,
                    BLOCK_M, BLOCK_N, CAUSAL, SPARSE, MASK_BM, MASK_BN)
                qb = n % 2
                mbarrier.wait(q_empty.index(qb), ((n // 2) & 1) ^ 1)  # a fresh barrier passes parity 1
                mbarrier.expect(q_ready.index(qb), 2 * q_desc.block_type.nbytes)
                for w in gl.static_range(2):
                    _tma_rows(q_desc, b, h, m0 + w * 64, q_ready.index(qb), q_smem.index(2 * qb + w))
                for j in range(n_blocks):
                    buf = c % STAGES
                    free_phase = ((c // STAGES) & 1) ^ 1
                    start_n = _fwd_key_start(j, idx_ptr, BLOCK_N, SPARSE, MASK_BN)
                    mbarrier.wait(k_empty.index(buf), free_phase)
                    mbarrier.expect(k_ready.index(buf), k_desc.block_type.nbytes)
                    _tma_rows(k_desc, b, h, start_n, k_ready.index(buf), k_smem.index(buf))
                    mbarrier.wait(v_empty.index(buf), free_phase)
                    mbarrier.expect(v_ready.index(buf), v_desc.block_type.nbytes)
                    _tma_rows(v_desc, b, h, start_n, v_ready.index(buf), v_smem.index(buf))
                    c += 1
                n += 1

    @gluon.jit
    def _fwd_step(j, c, o, p_a, m_i, l_i, q_w, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, s_zero,
                  offs_m, offs_n, idx_ptr, nk_lim, causal_off, qk_scale,
                  o_l: gl.constexpr, p_l: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  MASK: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr, MASK_BN: gl.constexpr):
        """Key block j of the tile, ring count c (K_j in slot c % STAGES, V_{j-1} in the slot before)."""
        kb = c % STAGES
        vb = (c - 1) % STAGES
        mbarrier.wait(k_ready.index(kb), (c // STAGES) & 1)
        mbarrier.wait(v_ready.index(vb), ((c - 1) // STAGES) & 1)
        s = warpgroup_mma(q_w, k_smem.index(kb).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        o = warpgroup_mma(p_a, v_smem.index(vb), o, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        mbarrier.arrive(k_empty.index(kb))
        start_n = 0  # (only a masked block needs its first key)
        if MASK:
            start_n = _fwd_key_start(j, idx_ptr, BLOCK_N, SPARSE, MASK_BN)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, offs_m, offs_n, start_n, nk_lim, causal_off, qk_scale,
                                           MASK, CAUSAL)
        o, p_a = warpgroup_mma_wait(num_outstanding=0, deps=(o, p_a))
        mbarrier.arrive(v_empty.index(vb))
        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
        p_a = gl.convert_layout(p.to(p_a.dtype), p_l)
        return o, p_a, m_i, l_i

    @gluon.jit
    def _fwd_consumer(o_desc, LSE, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready,
                      k_empty, v_empty, n_units, n_m, H, Nq, Nk, qk_scale, ROW_COUNT, ROW_FULL, ROW_IDX,
                      stride_mh, stride_mrow,
                      WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      STAGES: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr, MASK_BM: gl.constexpr,
                      MASK_BN: gl.constexpr):
        """Rows [m0 + 64 WG, m0 + 64 WG + 64) of each of the program's tiles, one warpgroup."""
        dtype: gl.constexpr = q_smem.dtype
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, HEAD_DIM, 16])
        p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
        causal_off = Nk - Nq
        s_zero = gl.zeros([64, BLOCK_N], gl.float32, layout=s_l)
        c = 0  # K / V blocks consumed so far, over all tiles (the loader's count)
        n = 0
        for u in range(gl.program_id(0), n_units, gl.num_programs(0)):
            for i in range(_fwd_unit_tiles(u, n_m, CAUSAL, SPARSE)):
                b, h, bh, m0, n_blocks, full_end, idx_ptr, nk_lim = _fwd_tile_coords(
                    u, i, n_m, H, Nq, Nk, ROW_COUNT, ROW_FULL, ROW_IDX, stride_mh, stride_mrow,
                    BLOCK_M, BLOCK_N, CAUSAL, SPARSE, MASK_BM, MASK_BN)
                r0 = m0 + WG * 64
                q_w = q_smem.index(2 * (n % 2) + WG)
                offs_m = r0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_l))
                offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_l))
                m_i = gl.full([64], -1.0e30, gl.float32, layout=gl.SliceLayout(1, s_l))
                l_i = gl.zeros([64], gl.float32, layout=gl.SliceLayout(1, s_l))
                o = gl.zeros([64, HEAD_DIM], gl.float32, layout=o_l)

                mbarrier.wait(q_ready.index(n % 2), (n // 2) & 1)
                mbarrier.wait(k_ready.index(c % STAGES), (c // STAGES) & 1)
                s = warpgroup_mma(q_w, k_smem.index(c % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
                mbarrier.arrive(k_empty.index(c % STAGES))
                p, _, m_i, l_i = _softmax_step(s, m_i, l_i, offs_m, offs_n,
                                               _fwd_key_start(0, idx_ptr, BLOCK_N, SPARSE, MASK_BN), nk_lim,
                                               causal_off, qk_scale, True, CAUSAL)
                p_a = gl.convert_layout(p.to(dtype), p_l)
                for j in range(1, full_end):
                    o, p_a, m_i, l_i = _fwd_step(j, c + j, o, p_a, m_i, l_i, q_w, k_smem, v_smem, k_ready,
                                                 v_ready, k_empty, v_empty, s_zero, offs_m, offs_n, idx_ptr,
                                                 nk_lim, causal_off, qk_scale, o_l, p_l, BLOCK_N, STAGES,
                                                 False, CAUSAL, SPARSE, MASK_BN)
                for j in range(gl.maximum(full_end, 1), n_blocks):
                    o, p_a, m_i, l_i = _fwd_step(j, c + j, o, p_a, m_i, l_i, q_w, k_smem, v_smem, k_ready,
                                                 v_ready, k_empty, v_empty, s_zero, offs_m, offs_n, idx_ptr,
                                                 nk_lim, causal_off, qk_scale, o_l, p_l, BLOCK_N, STAGES,
                                                 True, CAUSAL, SPARSE, MASK_BN)
                c += n_blocks
                last = (c - 1) % STAGES
                mbarrier.wait(v_ready.index(last), ((c - 1) // STAGES) & 1)
                o = warpgroup_mma(p_a, v_smem.index(last), o, is_async=True)
                o, p_a = warpgroup_mma_wait(num_outstanding=0, deps=(o, p_a))
                mbarrier.arrive(v_empty.index(last))

                has_keys = l_i > 0.0
                l_safe = gl.where(has_keys, l_i, 1.0)
                lse = gl.where(has_keys, m_i + gl.log2(l_safe), float("inf"))
                gl.store(LSE + bh * Nq + offs_m, lse, mask=offs_m < Nq)
                # O through this warpgroup's Q buffer (its last product has retired) and a TMA store,
                # which drops rows past Nq; the buffer goes back to the loader once the store read it
                q_w.store((o / gl.convert_layout(l_safe, gl.SliceLayout(1, o_l))[:, None]).to(dtype))
                fence_async_shared()
                _tma_store(o_desc, [b, r0, h, 0],
                           q_w.reinterpret(dtype, o_desc.block_type.shape, o_desc.layout))
                tma.store_wait(0)
                mbarrier.arrive(q_empty.index(n % 2))
                n += 1

    @gluon.jit
    def _gl_fwd_kernel(q_desc, k_desc, v_desc, o_desc, LSE, ROW_COUNT, ROW_IDX, ROW_FULL, stride_mh,
                       stride_mrow, H, Nq, Nk, n_units, qk_scale,
                       HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       CAUSAL: gl.constexpr, SPARSE: gl.constexpr, MASK_BM: gl.constexpr,
                       MASK_BN: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                       num_warps: gl.constexpr):
        """Program p runs work units p, p + P, ... of n_units (P programs, `gluon_fwd`; a unit is one or
        two tiles, `_fwd_tile_coords`); a tile is BLOCK_M = 128 query rows. The default partition (4
        warps) and a 4-warp worker each own 64 rows; a 1-warp worker issues every TMA load. Buffers
        are handed over by mbarriers only (ready: TMA done; empty: both consumers' products that read
        the buffer retired), so the two warpgroups never wait for each other at a CTA-wide barrier and
        drift apart freely. q_desc, k_desc, v_desc, o_desc: host TMA descriptors of the (B, N, H,
        HEAD_DIM) tensors, blocks of [1, 64, 1, HEAD_DIM] (Q, O) and [1, BLOCK_N, 1, HEAD_DIM] (K, V)."""
        gl.static_assert(BLOCK_M == 128)
        gl.static_assert(num_warps == 4)
        gl.static_assert((not SPARSE) or ((MASK_BM % BLOCK_M == 0) and (MASK_BN % BLOCK_N == 0)))
        dtype: gl.constexpr = o_desc.dtype
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, HEAD_DIM], dtype)
        kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_smem = gl.allocate_shared_memory(dtype, [4, 64, HEAD_DIM], q_sl)  # [Q slot * 2 + consumer]
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_sl)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_sl)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)
        for st in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(st), count=1)
            mbarrier.init(v_ready.index(st), count=1)
            mbarrier.init(k_empty.index(st), count=2)
            mbarrier.init(v_empty.index(st), count=2)
        n_m = gl.cdiv(Nq, BLOCK_M)
        gl.warp_specialize([
            (_fwd_consumer, (o_desc, LSE, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready,
                             k_empty, v_empty, n_units, n_m, H, Nq, Nk, qk_scale, ROW_COUNT, ROW_FULL,
                             ROW_IDX, stride_mh, stride_mrow, 0, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL,
                             SPARSE, MASK_BM, MASK_BN)),
            (_fwd_consumer, (o_desc, LSE, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready,
                             k_empty, v_empty, n_units, n_m, H, Nq, Nk, qk_scale, ROW_COUNT, ROW_FULL,
                             ROW_IDX, stride_mh, stride_mrow, 1, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL,
                             SPARSE, MASK_BM, MASK_BN)),
            (_fwd_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready,
                           k_empty, v_empty, n_units, n_m, H, Nq, Nk, ROW_COUNT, ROW_FULL, ROW_IDX, stride_mh,
                           stride_mrow, BLOCK_M, BLOCK_N, STAGES, CAUSAL, SPARSE, MASK_BM, MASK_BN)),
        ], [4, 1], [CONSUMER_REGS, 24])


if HAVE_GLUON:
    @gluon.jit
    def _tma_rows(desc, b, h, row, bar, dst, col=0):
        """Rows [row, row + BLOCK_ROWS) of (batch b, head h) of a (B, N, H, D) descriptor (its columns
        [col, col + block width)) into the 2-D tile dst, onto bar (rows past N read as 0)."""
        _tma_load(desc, [b, row, h, col], bar, dst.reinterpret(dst.dtype, desc.block_type.shape, desc.layout))

    @gluon.jit
    def _bwd_load_kv(k_desc, v_desc, kc_desc, k_smem, v_smem, kc_smem, kv_bar, b, h, n0,
                     DQ_SPLIT: gl.constexpr):
        """Both consumers' K and V (64 keys each) onto kv_bar, once per program; with DQ_SPLIT also K's
        two 64-column halves over all 128 keys (kc_smem[c] = K[:, 64 c : 64 c + 64], consumer c's
        dQ columns)."""
        if DQ_SPLIT:
            mbarrier.expect(kv_bar, 4 * k_desc.block_type.nbytes + 4 * kc_desc.block_type.nbytes)
        else:
            mbarrier.expect(kv_bar, 4 * k_desc.block_type.nbytes)
        for w in gl.static_range(2):
            if DQ_SPLIT:  # k_smem[w]: a [64, HEAD_DIM] tile per consumer
                _tma_rows(k_desc, b, h, n0 + 64 * w, kv_bar, k_smem.index(w))
            else:  # one [128, 64] tile: the owner's dQ product reads all 128 keys
                _tma_rows(k_desc, b, h, n0 + 64 * w, kv_bar, k_smem.slice(64 * w, 64))
            _tma_rows(v_desc, b, h, n0 + 64 * w, kv_bar, v_smem.index(w))
            if DQ_SPLIT:
                for c in gl.static_range(2):
                    _tma_rows(kc_desc, b, h, n0 + 64 * w, kv_bar, kc_smem.index(c).slice(64 * w, 64), 64 * c)

    @gluon.jit
    def _bwd_load_q_do(q_desc, do_desc, q_smem, do_smem, bar, b, h, row, buf):
        """Q and dO rows [row, row + BLOCK_M) into ring buffer `buf`, onto `bar` (the caller expects)."""
        _tma_rows(q_desc, b, h, row, bar, q_smem.index(buf))
        _tma_rows(do_desc, b, h, row, bar, do_smem.index(buf))

    @gluon.jit
    def _bwd_loader(q_desc, do_desc, k_desc, v_desc, kc_desc, q_smem, do_smem, k_smem, v_smem, kc_smem,
                    kv_bar, ready, empty, b, h, n0, lo, n_tiles, idx_ptr, n_idx, BLOCK_M: gl.constexpr,
                    STAGES: gl.constexpr, SPARSE: gl.constexpr, MASK_BM: gl.constexpr,
                    DQ_SPLIT: gl.constexpr):
        """One warp: both consumers' K and V once, then Q_i, dO_i into the ring."""
        _bwd_load_kv(k_desc, v_desc, kc_desc, k_smem, v_smem, kc_smem, kv_bar, b, h, n0, DQ_SPLIT)
        _bwd_load_tiles(q_desc, do_desc, q_smem, do_smem, ready, empty, b, h, 0, n_tiles, lo, idx_ptr, n_idx,
                        BLOCK_M, STAGES, SPARSE, MASK_BM)

    @gluon.jit
    def _bwd_load_tiles(q_desc, do_desc, q_smem, do_smem, ready, empty, b, h, g, n_tiles, lo, idx_ptr, n_idx,
                        BLOCK_M: gl.constexpr, STAGES: gl.constexpr, SPARSE: gl.constexpr,
                        MASK_BM: gl.constexpr):
        """Q_i, dO_i of a key block's query blocks 0 .. n_tiles - 1 into the ring, as its uses g .. g +
        n_tiles - 1 (the program's earlier key blocks took g)."""
        for t in range(n_tiles):
            buf = (g + t) % STAGES
            mbarrier.wait(empty.index(buf), (((g + t) // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            mbarrier.expect(ready.index(buf), 2 * q_desc.block_type.nbytes)
            row = _bwd_tile_row(t, lo, idx_ptr, n_idx, BLOCK_M, SPARSE, MASK_BM)
            _bwd_load_q_do(q_desc, do_desc, q_smem, do_smem, ready.index(buf), b, h, row, buf)

    @gluon.jit
    def _bwd_program(ORDER, ORDERED: gl.constexpr):
        """(program column, batch * head) of this program: its grid position, or with ORDERED the p-th
        entry of the launch order, p = program_id(0) + program_id(1) * num_programs(0), as column
        ORDER[p] % num_programs(0) of (batch, head) ORDER[p] // num_programs(0) (BlockMask.column_order:
        heavy key blocks first)."""
        if ORDERED:
            entry = gl.load(ORDER + gl.program_id(0) + gl.program_id(1) * gl.num_programs(0))
            column = entry % gl.num_programs(0)
            bh = entry // gl.num_programs(0)
        else:
            column = gl.program_id(0)
            bh = gl.program_id(1)
        return column, bh

    @gluon.jit
    def _bwd_col_list(COL_COUNT, COL_IDX, COL_MASKED, h, stride_mh, stride_mcol, n0, BLOCK_M: gl.constexpr,
                      MASK_BM: gl.constexpr, MASK_BN: gl.constexpr):
        """Key block n0's list of kept query mask blocks: (idx_ptr, n_idx, n_masked, n_tiles)."""
        col = n0 // MASK_BN
        n_idx = gl.load(COL_COUNT + h * stride_mh + col)
        n_masked = gl.load(COL_MASKED + h * stride_mh + col)  # leading blocks crossing the diagonal
        idx_ptr = COL_IDX + (h * stride_mh + col) * stride_mcol
        return idx_ptr, n_idx, n_masked, n_idx * (MASK_BM // BLOCK_M)

    @gluon.jit
    def _bwd_loader_grouped(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_ready,
                            kv_empty, ready, empty, b, h, c_first, c_end, COL_COUNT, COL_IDX, COL_MASKED,
                            stride_mh, stride_mcol, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                            MASK_BM: gl.constexpr, MASK_BN: gl.constexpr):
        """GROUP > 1: the program's key blocks c_first .. c_end - 1 in turn, those that no query block
        keeps skipped; K, V double buffered (the j-th kept key block's load waits until both consumers
        are done with the (j - 2)-th), the ring continues."""
        g = 0
        j = 0
        for i in range(c_end - c_first):
            n0 = (c_first + i) * 128
            idx_ptr, n_idx, n_masked, n_tiles = _bwd_col_list(COL_COUNT, COL_IDX, COL_MASKED, h, stride_mh,
                                                              stride_mcol, n0, BLOCK_M, MASK_BM, MASK_BN)
            if n_tiles > 0:
                kb = j % 2
                mbarrier.wait(kv_empty.index(kb), ((j // 2) & 1) ^ 1)
                mbarrier.expect(kv_ready.index(kb), 4 * k_desc.block_type.nbytes)
                for w in gl.static_range(2):  # [128 keys, 64] tiles, consumer w's keys in rows 64 w ...
                    bar = kv_ready.index(kb)
                    _tma_rows(k_desc, b, h, n0 + 64 * w, bar, k_smem.index(kb).slice(64 * w, 64))
                    _tma_rows(v_desc, b, h, n0 + 64 * w, bar, v_smem.index(kb).slice(64 * w, 64))
                _bwd_load_tiles(q_desc, do_desc, q_smem, do_smem, ready, empty, b, h, g, n_tiles, 0, idx_ptr,
                                n_idx, BLOCK_M, STAGES, True, MASK_BM)
                g += n_tiles
                j += 1

    @gluon.jit
    def _bwd_tile_row(t, lo, idx_ptr, n_idx, BLOCK_M: gl.constexpr, SPARSE: gl.constexpr,
                      MASK_BM: gl.constexpr):
        """First query row of the program's t-th query block: consecutive from `lo` when dense; when
        block-sparse, block t % R of the (t // R)-th kept mask row block (R = MASK_BM / BLOCK_M) in
        the key block's list idx_ptr[0 : n_idx] (clamped: the step after the last reads the last)."""
        if SPARSE:
            R: gl.constexpr = MASK_BM // BLOCK_M
            return gl.load(idx_ptr + gl.minimum(t // R, n_idx - 1)) * MASK_BM + (t % R) * BLOCK_M
        else:
            return lo + t * BLOCK_M

    @gluon.jit
    def _bwd_red_dq(dq_desc, dq_buf, bh, start_m, dq, col0):
        """dq (this consumer's dQ columns [col0, col0 + width) of query rows [start_m, start_m + 64))
        into the fp32 accumulator: through this consumer's shared buffer and one TMA reduce-add (rows
        past Nq are dropped). The wait is for this buffer's previous reduction, long done by now."""
        tma.store_wait(0)
        dq_buf.store(dq)
        fence_async_shared()
        _tma_add(dq_desc, [bh, start_m, col0], dq_buf.reinterpret(gl.float32, dq_desc.block_type.shape,
                                                                   dq_desc.layout))

    @gluon.jit
    def _bwd_issue_s_dp(k_w, v_w, q_smem, do_smem, ready, t, s_zero, STAGES: gl.constexpr,
                        QM: gl.constexpr):
        """Wait for query block t's Q and dO; issue S^T = K Q^T and dP^T = V dO^T (asynchronous), or
        with QM (query-major, head dim 128) S = Q K^T and dP = dO V^T."""
        buf = t % STAGES
        mbarrier.wait(ready.index(buf), (t // STAGES) & 1)
        if QM:
            s = warpgroup_mma(q_smem.index(buf), k_w.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            dp = warpgroup_mma(do_smem.index(buf), v_w.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        else:
            s = warpgroup_mma(k_w, q_smem.index(buf).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            dp = warpgroup_mma(v_w, do_smem.index(buf).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        return s, dp

    @gluon.jit
    def _bwd_dq_qm(ds_smem, slot, kc_w, dq_zero):
        """Issue this consumer's 64 dQ columns of a query block (query-major, head dim 128): dS [64
        queries, 128 keys] (its two consumers' [64, 64] halves in slot `slot`) times K's matching rows
        of this consumer's column half (kc_w, [128 keys, 64]); asynchronous."""
        dq = warpgroup_mma(ds_smem.index(2 * slot), kc_w.slice(0, 64), dq_zero, use_acc=False, is_async=True)
        return warpgroup_mma(ds_smem.index(2 * slot + 1), kc_w.slice(64, 64), dq, is_async=True)

    @gluon.jit
    def _bwd_step_qm(t, s, dp, dk, dv, k_w, v_w, kc_w, ds_smem, pdq_buf, q_smem, do_smem, ready, empty,
                     ds_ready, ds_free, lse_ptr, delta_ptr, dq_desc, bh, start_m, full, Nq, causal_off,
                     qk_scale, s_zero, dq_zero, offs_n, offs_ms, dq_col0, WG: gl.constexpr,
                     STAGES: gl.constexpr, SPARSE: gl.constexpr, MASK: gl.constexpr, NEXT: gl.constexpr):
        """Head dim 128, query-major (FlashAttention-3's orientation): query block t (rows start_m ...),
        whose S = Q K_w^T and dP = dO V_w^T ([64 queries, 64 keys]) are in flight. LSE and delta are
        one value per accumulator row (2 registers per thread, where the key-major S^T needs 32); P
        and dS go through shared memory: P^T and dS^T are the A operands of dV += P^T dO and dK +=
        dS^T Q, dS that of dQ. P shares this consumer's buffer with its dQ reduction (P is read by the
        time dQ is stored; the reduction has read it before the next P is stored)."""
        buf = t % STAGES
        slot = t % 2
        use = t // 2
        dtype: gl.constexpr = q_smem.dtype
        rows = start_m + offs_ms
        lse = gl.load(lse_ptr + rows, mask=rows < Nq, other=0.0)
        delta = gl.load(delta_ptr + rows, mask=rows < Nq, other=0.0)
        q_t = q_smem.index(buf)
        do_t = do_smem.index(buf)
        s, dp = warpgroup_mma_wait(num_outstanding=0, deps=(s, dp))
        if MASK:
            if SPARSE:  # full: the first block past the list's n_masked mask blocks
                unmasked = t >= full
            else:  # full: the first query row of this half's first block past the diagonal
                unmasked = start_m >= full
            keep = (offs_n[None, :] <= rows[:, None] + causal_off) | unmasked
            s = gl.where(keep, s, float("-inf"))
        p = gl.exp2(s * qk_scale - lse[:, None])
        p_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 64], dtype)
        p_buf = pdq_buf.reinterpret(dtype, [64, 64], p_sl)
        tma.store_wait(0)  # the previous block's dQ reduction has read the buffer
        p_buf.store(p.to(dtype))
        ds = (p * (dp - delta[:, None])).to(dtype)
        ds_w = ds_smem.index(2 * slot + WG)
        mbarrier.wait(ds_free.index(slot), (use & 1) ^ 1)  # block t - 2's dQ products have read the slot
        ds_w.store(ds)
        fence_async_shared()
        mbarrier.arrive(ds_ready.index(slot))
        dv_acc = warpgroup_mma(p_buf.permute((1, 0)), do_t, dv, is_async=True)
        dk_acc = warpgroup_mma(ds_w.permute((1, 0)), q_t, dk, is_async=True)
        mbarrier.wait(ds_ready.index(slot), use & 1)  # the other consumer's dS half is in
        dq = _bwd_dq_qm(ds_smem, slot, kc_w, dq_zero)
        dq, dk_o, dv_o = warpgroup_mma_wait(num_outstanding=0, deps=(dq, dk_acc, dv_acc))
        mbarrier.arrive(ds_free.index(slot))
        mbarrier.arrive(empty.index(buf))
        _bwd_red_dq(dq_desc, pdq_buf, bh, start_m, dq, dq_col0)
        if NEXT:
            s_n, dp_n = _bwd_issue_s_dp(k_w, v_w, q_smem, do_smem, ready, t + 1, s_zero, STAGES, True)
        else:
            s_n = s
            dp_n = dp
        return s_n, dp_n, dk_o, dv_o

    @gluon.jit
    def _bwd_step(t, s, dp, lse, delta, dk, dv, k_w, v_w, k_both, ds_smem, q_smem, do_smem, ready, empty,
                  ds_ready, ds_free, lse_ptr, delta_ptr, dq_desc, bh, lo, full, idx_ptr, n_idx, Nq,
                  causal_off, qk_scale, s_zero, dq_zero, offs_n, offs_ms, dq_buf, dq_col0, a_l: gl.constexpr,
                  WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                  STAGES: gl.constexpr, SPARSE: gl.constexpr, MASK_BM: gl.constexpr, DQ_SPLIT: gl.constexpr,
                  MASK: gl.constexpr, NEXT: gl.constexpr):
        """Query block t, whose S^T and dP^T are in flight (s, dp) and whose LSE / delta rows were
        loaded one step earlier (head dim 64; DQ_SPLIT loads them here). Returns the next block's (s,
        dp, lse, delta), dK, dV and `lo` for the next step (dense: the first block's row, unchanged;
        block-sparse: the next block's first row, looked up here). k_both: K over all 128 keys, all
        columns (the owner's dQ product), or with DQ_SPLIT this consumer's 64 columns of it (the
        query-major step, _bwd_step_qm)."""
        if SPARSE:  # lo: this block's first row, looked up one step earlier
            start_m = lo
            lo_n = _bwd_tile_row(t + 1, lo, idx_ptr, n_idx, BLOCK_M, SPARSE, MASK_BM)
            start_n = lo_n
        else:
            start_m = lo + t * BLOCK_M
            lo_n = lo
            start_n = start_m + BLOCK_M
        if DQ_SPLIT:
            s_n, dp_n, dk_o, dv_o = _bwd_step_qm(
                t, s, dp, dk, dv, k_w, v_w, k_both, ds_smem, dq_buf, q_smem, do_smem, ready, empty, ds_ready,
                ds_free, lse_ptr, delta_ptr, dq_desc, bh, start_m, full, Nq, causal_off, qk_scale, s_zero,
                dq_zero, offs_n, offs_ms, dq_col0, WG, STAGES, SPARSE, MASK, NEXT)
            lse_n = lse
            delta_n = delta
        else:
            s_n, dp_n, lse_n, delta_n, dk_o, dv_o = _bwd_step_owner(
                t, s, dp, lse, delta, dk, dv, k_w, v_w, k_both, ds_smem, q_smem, do_smem, ready, empty,
                ds_ready, ds_free, lse_ptr, delta_ptr, dq_desc, bh, start_m, start_n, full, Nq, causal_off,
                qk_scale,
                s_zero, dq_zero, offs_n, offs_ms, dq_buf, dq_col0, a_l, WG, BLOCK_M, STAGES, SPARSE, MASK,
                NEXT)
        return s_n, dp_n, lse_n, delta_n, dk_o, dv_o, lo_n

    @gluon.jit
    def _bwd_step_owner(t, s, dp, lse, delta, dk, dv, k_w, v_w, k_both, ds_smem, q_smem, do_smem, ready,
                        empty,
                        ds_ready, ds_free, lse_ptr, delta_ptr, dq_desc, bh, start_m, start_n, full, Nq,
                        causal_off, qk_scale, s_zero, dq_zero, offs_n, offs_ms, dq_buf, dq_col0,
                        a_l: gl.constexpr, WG: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                        SPARSE: gl.constexpr, MASK: gl.constexpr, NEXT: gl.constexpr):
        """Head dim 64, key-major (S^T = K Q^T): query block t of _bwd_step; the block's owner (consumer
        t % 2) forms its whole dQ. Returns the next block's (s, dp, lse, delta), dK and dV."""
        buf = t % STAGES
        # dS slot; its owner (consumer `slot`) computes the block's dQ over all 128 keys
        slot = t % 2
        use = t // 2
        rows = start_m + offs_ms
        # the next block's LSE and delta: loaded now in a compact layout (a register or two per thread
        # across the step, where S^T's column layout holds 32), spread to S^T's columns when used
        rows_n = start_n + gl.arange(0, BLOCK_M, layout=_ROW_L)
        lse_n = gl.load(lse_ptr + rows_n, mask=rows_n < Nq, other=0.0)
        delta_n = gl.load(delta_ptr + rows_n, mask=rows_n < Nq, other=0.0)
        lse = gl.convert_layout(lse, offs_ms.type.layout)
        delta = gl.convert_layout(delta, offs_ms.type.layout)
        q_t = q_smem.index(buf)
        do_t = do_smem.index(buf)
        s, dp = warpgroup_mma_wait(num_outstanding=0, deps=(s, dp))
        if MASK:  # the diagonal blocks (below `full`); the one peeled last block may need none
            if SPARSE:  # full: the first block past the list's n_masked mask blocks
                unmasked = t >= full
            else:  # full: the first query row of this half's first block past the diagonal
                unmasked = start_m >= full
            keep = (offs_n[:, None] <= rows[None, :] + causal_off) | unmasked
            s = gl.where(keep, s, float("-inf"))
        p = gl.exp2(s * qk_scale - lse[None, :])
        p_a = gl.convert_layout(p.to(q_smem.dtype), a_l)
        dv_acc = warpgroup_mma(p_a, do_t, dv, is_async=True)
        ds = (p * (dp - delta[None, :])).to(q_smem.dtype)
        mbarrier.wait(ds_free.index(slot), (use & 1) ^ 1)  # block t - 2's dQ product has read the slot
        ds_smem.index(slot).slice(64 * WG, 64).store(ds)
        fence_async_shared()
        mbarrier.arrive(ds_ready.index(slot))
        ds_a = gl.convert_layout(ds, a_l)
        dk_acc = warpgroup_mma(ds_a, q_t, dk, is_async=True)
        # (new names in both branches: an asynchronous result may not change type inside an `if`)
        if slot == WG:  # the block's owner
            mbarrier.wait(ds_ready.index(slot), use & 1)  # the other consumer's dS^T half is in
            dq = warpgroup_mma(ds_smem.index(slot).permute((1, 0)), k_both, dq_zero, use_acc=False,
                               is_async=True)
            dq, dk_o, dv_o, p_a, ds_a = warpgroup_mma_wait(num_outstanding=0,
                                                           deps=(dq, dk_acc, dv_acc, p_a, ds_a))
            mbarrier.arrive(ds_free.index(slot))
            mbarrier.arrive(empty.index(buf))
            if NEXT:  # the next block's products run on the tensor cores during the reductions
                s_n, dp_n = _bwd_issue_s_dp(k_w, v_w, q_smem, do_smem, ready, t + 1, s_zero, STAGES, False)
            else:
                s_n = s
                dp_n = dp
            _bwd_red_dq(dq_desc, dq_buf, bh, start_m, dq, dq_col0)
        else:
            dk_o, dv_o, p_a, ds_a = warpgroup_mma_wait(num_outstanding=0, deps=(dk_acc, dv_acc, p_a, ds_a))
            mbarrier.arrive(empty.index(buf))
            if NEXT:
                s_n, dp_n = _bwd_issue_s_dp(k_w, v_w, q_smem, do_smem, ready, t + 1, s_zero, STAGES, False)
            else:
                s_n = s
                dp_n = dp
        return s_n, dp_n, lse_n, delta_n, dk_o, dv_o

    @gluon.jit
    def _bwd_consumer(dk_base, dv_base, stride_dkn, stride_dvn, lse_ptr, delta_ptr, dq_desc, bh,
                      q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem, dq_buf, kv_bar, ready, empty,
                      ds_ready, ds_free, n0, lo, n_tiles, idx_ptr, n_idx, n_masked, Nq, Nk, qk_scale,
                      sm_scale,
                      WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                      CAUSAL: gl.constexpr, SPARSE: gl.constexpr, MASK_BM: gl.constexpr,
                      DQ_SPLIT: gl.constexpr):
        """Keys [n0 + 64 WG, n0 + 64 WG + 64), one warpgroup."""
        DQC: gl.constexpr = HEAD_DIM // 2 if DQ_SPLIT else HEAD_DIM  # the dQ columns this consumer forms
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        kv_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
        dq_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, DQC, 16])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_l, k_width=2)
        if DQ_SPLIT:
            k_both = kc_smem.index(WG)
            dq_col0 = DQC * WG
        else:
            k_both = k_smem
            dq_col0 = 0
        dq_zero = gl.zeros([BLOCK_M, DQC], gl.float32, layout=dq_l)
        causal_off = Nk - Nq
        nw = n0 + 64 * WG
        if SPARSE:  # every query block of the list; those of its first n_masked mask blocks get the mask
            t0 = 0
            t_full = gl.minimum(n_masked * (MASK_BM // BLOCK_M), n_tiles)
            full = t_full
        else:
            m_end = n_tiles * BLOCK_M + lo
            if CAUSAL:  # this half's first query block and the first one that needs no mask
                lo_w = gl.minimum(gl.maximum(nw - causal_off, 0) // BLOCK_M * BLOCK_M, m_end)
                full_w = gl.minimum(gl.cdiv(gl.maximum(nw + 63 - causal_off, 0), BLOCK_M) * BLOCK_M, m_end)
                full_w = gl.maximum(full_w, lo_w)
            else:
                lo_w = lo
                full_w = lo
            # the second half starts at most one block later (0 <= t0 <= 1); it still releases the
            # block it skips. A half with no block at all runs the last one fully masked (adds zeros).
            # DQ_SPLIT: both consumers form dQ columns of every block, so none skips one: the half whose
            # keys block 0 does not see runs it fully masked (P = dS = 0). (Forming those columns
            # apart, before the loop, made ptxas serialise every wgmma of the kernel: C7514.)
            t_full = (full_w - lo) // BLOCK_M
            full = full_w
            if DQ_SPLIT:
                t0 = 0
            else:
                t0 = gl.minimum((lo_w - lo) // BLOCK_M, n_tiles - 1)
                # The skipped block must still be waited for: a parity wait only tells a phase from the
                # one before it, so block 2's wait (parity 1) would pass at once while block 0's TMA is
                # still in flight (ready[0] in phase 0) and this half would read block 0's buffer as 2.
                mbarrier.wait(ready.index(0), 0, pred=t0 > 0)
                mbarrier.arrive(empty.index(0), pred=t0 > 0)
                if t0 > 0:  # its half of block 0's dS^T is zero (block 0's dQ product sums both halves)
                    zero = gl.zeros([64, BLOCK_M], q_smem.dtype, layout=s_l)
                    ds_smem.index(0).slice(64 * WG, 64).store(zero)
                    fence_async_shared()
                    mbarrier.arrive(ds_ready.index(0))

        if DQ_SPLIT:
            k_w = k_smem.index(WG)
        else:
            k_w = k_smem.slice(64 * WG, 64)
        v_w = v_smem.index(WG)
        if DQ_SPLIT:  # query-major: S, dP are [queries, keys]
            offs_n = nw + gl.arange(0, 64, layout=gl.SliceLayout(0, s_l))
            offs_ms = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_l))
        else:  # key-major: S^T, dP^T are [keys, queries]
            offs_n = nw + gl.arange(0, 64, layout=gl.SliceLayout(1, s_l))
            offs_ms = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_l))
        s_zero = gl.zeros([64, BLOCK_M], gl.float32, layout=s_l)
        dk = gl.zeros([64, HEAD_DIM], gl.float32, layout=kv_l)
        dv = gl.zeros([64, HEAD_DIM], gl.float32, layout=kv_l)
        # block-sparse: a key block that no query block keeps stores dK = dV = 0 (after its K and V land)
        if SPARSE:
            any_block = n_tiles > 0
        else:
            any_block = True
        if any_block:
            dk, dv = _bwd_blocks(
                dk, dv, t0, t_full, full, n_tiles, k_w, v_w, k_both, ds_smem, q_smem, do_smem, kv_bar, ready,
                empty, ds_ready, ds_free, lse_ptr, delta_ptr, dq_desc, bh, lo, idx_ptr, n_idx, Nq, causal_off,
                qk_scale, s_zero, dq_zero, offs_n, offs_ms, dq_buf, dq_col0, a_l, WG, HEAD_DIM,
                BLOCK_M, STAGES, CAUSAL, SPARSE, MASK_BM, DQ_SPLIT)
        else:
            mbarrier.wait(kv_bar, 0)

        _bwd_store_dk_dv(dk, dv, dk_base, dv_base, stride_dkn, stride_dvn, nw, Nk, sm_scale, kv_l, HEAD_DIM)
        tma.store_wait(0)  # the last dQ reduction has read this consumer's buffer

    @gluon.jit
    def _bwd_store_dk_dv(dk, dv, dk_base, dv_base, stride_dkn, stride_dvn, nw, Nk, sm_scale,
                         kv_l: gl.constexpr, HEAD_DIM: gl.constexpr):
        """dK (times the softmax scale) and dV of keys [nw, nw + 64) (rows past Nk dropped)."""
        offs_nk = nw + gl.arange(0, 64, layout=gl.SliceLayout(1, kv_l))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_l))
        kv_mask = offs_nk[:, None] < Nk
        gl.store(dk_base + offs_nk[:, None] * stride_dkn + offs_d[None, :],
                 (dk * sm_scale).to(dk_base.dtype.element_ty), mask=kv_mask)
        gl.store(dv_base + offs_nk[:, None] * stride_dvn + offs_d[None, :],
                 dv.to(dv_base.dtype.element_ty), mask=kv_mask)

    @gluon.jit
    def _bwd_consumer_grouped(dk_base, dv_base, stride_dkn, stride_dvn, lse_ptr, delta_ptr, dq_desc, bh, h,
                              q_smem, do_smem, k_smem, v_smem, ds_smem, dq_buf, kv_ready, kv_empty, ready,
                              empty, ds_ready, ds_free, c_first, c_end, COL_COUNT, COL_IDX, COL_MASKED,
                              stride_mh, stride_mcol, Nq, Nk, qk_scale, sm_scale, WG: gl.constexpr,
                              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                              CAUSAL: gl.constexpr, MASK_BM: gl.constexpr, MASK_BN: gl.constexpr):
        """GROUP > 1 (block masks, head dim 64): keys [n0 + 64 WG, n0 + 64 WG + 64) of the program's key
        blocks n0 = 128 c, c_first <= c < c_end, in turn: one key block's steps as _bwd_consumer's, its
        ring uses and dS slots counted on from the key blocks before (g), K / V from buffer j % 2 (j: the
        kept key blocks before this one), released to the loader when both consumers' last products
        have read it. Block masks of a multiple of 128 query rows (R even: no key block has a single
        query block, so the first masked loop of _bwd_blocks always runs)."""
        R: gl.constexpr = MASK_BM // BLOCK_M
        s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        kv_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_l, k_width=2)
        dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=kv_l)
        s_zero = gl.zeros([64, BLOCK_M], gl.float32, layout=s_l)
        offs_ms = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_l))
        causal_off = Nk - Nq
        g = 0
        j = 0  # kept key blocks so far (a key block no query block keeps stores dK = dV = 0 at once)
        for i in range(c_end - c_first):
            n0 = (c_first + i) * 128
            nw = n0 + 64 * WG
            idx_ptr, n_idx, n_masked, n_tiles = _bwd_col_list(COL_COUNT, COL_IDX, COL_MASKED, h, stride_mh,
                                                              stride_mcol, n0, BLOCK_M, MASK_BM, MASK_BN)
            dk = gl.zeros([64, HEAD_DIM], gl.float32, layout=kv_l)
            dv = gl.zeros([64, HEAD_DIM], gl.float32, layout=kv_l)
            if n_tiles > 0:  # (g is a multiple of R: the list read with the program's count t)
                kb = j % 2
                t_full = g + gl.minimum(n_masked * R, n_tiles)
                offs_n = nw + gl.arange(0, 64, layout=gl.SliceLayout(1, s_l))
                k_both = k_smem.index(kb)
                dk, dv = _bwd_blocks(
                    dk, dv, g, t_full, t_full, g + n_tiles, k_both.slice(64 * WG, 64),
                    v_smem.index(kb).slice(64 * WG, 64), k_both, ds_smem, q_smem, do_smem,
                    kv_ready.index(kb), ready, empty, ds_ready, ds_free, lse_ptr, delta_ptr, dq_desc, bh, 0,
                    idx_ptr - g // R, n_idx + g // R, Nq, causal_off, qk_scale, s_zero, dq_zero, offs_n,
                    offs_ms, dq_buf, 0, a_l, WG, HEAD_DIM, BLOCK_M, STAGES,
                    CAUSAL, True, MASK_BM, False, (j // 2) & 1, True)
                mbarrier.arrive(kv_empty.index(kb))
                g += n_tiles
                j += 1
            _bwd_store_dk_dv(dk, dv, dk_base, dv_base, stride_dkn, stride_dvn, nw, Nk, sm_scale, kv_l,
                             HEAD_DIM)
        tma.store_wait(0)  # the last dQ reduction has read this consumer's buffer

    @gluon.jit
    def _bwd_blocks(dk, dv, t0, t_full, full, n_tiles, k_w, v_w, k_both, ds_smem, q_smem, do_smem, kv_bar,
                    ready, empty, ds_ready, ds_free, lse_ptr, delta_ptr, dq_desc, bh, lo, idx_ptr, n_idx, Nq,
                    causal_off, qk_scale, s_zero, dq_zero, offs_n, offs_ms, dq_buf, dq_col0,
                    a_l: gl.constexpr, WG: gl.constexpr, HEAD_DIM: gl.constexpr,
                    BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, SPARSE: gl.constexpr,
                    MASK_BM: gl.constexpr, DQ_SPLIT: gl.constexpr, kv_phase=0,
                    FIRST_MASKED: gl.constexpr = False):
        """One consumer's query blocks t0 .. n_tiles - 1, those below t_full masked (`full`: see
        _bwd_step): returns dK, dV. (GROUP > 1: t counts the program's ring uses over its key blocks.)

        FIRST_MASKED (the grouped kernel): the first block also runs in the masked loop, which then
        always runs (a masked step is exact for any block: its `full` test turns the mask off). With a
        K / V buffer picked at run time, Triton 3.6's build computed the dQ product's K descriptor in
        that loop's preheader only, and a key block whose list starts unmasked (every non-causal one)
        read shared memory out of range (compute-sanitizer; docs/kernel_notes.md Version 20)."""
        rows0 = gl.arange(0, BLOCK_M, layout=_ROW_L)  # (the compact layout of _bwd_step_owner's prefetch)
        if SPARSE:
            lo = _bwd_tile_row(t0, lo, idx_ptr, n_idx, BLOCK_M, SPARSE, MASK_BM)
            rows0 = lo + rows0
        else:
            rows0 = lo + t0 * BLOCK_M + rows0
        # the first block's LSE and delta (each head-dim-64 step prefetches the next one's; DQ_SPLIT steps
        # load their own, and these only seed the loop's values)
        lse = gl.load(lse_ptr + rows0, mask=rows0 < Nq, other=0.0)
        delta = gl.load(delta_ptr + rows0, mask=rows0 < Nq, other=0.0)
        mbarrier.wait(kv_bar, kv_phase)
        s, dp = _bwd_issue_s_dp(k_w, v_w, q_smem, do_smem, ready, t0, s_zero, STAGES, DQ_SPLIT)
        first_end = gl.minimum(t_full, n_tiles - 1)  # the masked steps, then the rest
        rest = t_full
        if FIRST_MASKED:  # the masked loop always runs (see the docstring)
            first_end = gl.maximum(first_end, gl.minimum(t0 + 1, n_tiles - 1))
            rest = first_end
        for t in range(t0, first_end):
            s, dp, lse, delta, dk, dv, lo = _bwd_step(
                t, s, dp, lse, delta, dk, dv, k_w, v_w, k_both, ds_smem, q_smem, do_smem, ready, empty,
                ds_ready, ds_free, lse_ptr, delta_ptr, dq_desc, bh, lo, full, idx_ptr, n_idx, Nq, causal_off,
                qk_scale, s_zero, dq_zero, offs_n, offs_ms, dq_buf, dq_col0, a_l, WG, HEAD_DIM,
                BLOCK_M, STAGES, SPARSE, MASK_BM, DQ_SPLIT, True, True)
        for t in range(rest, n_tiles - 1):
            s, dp, lse, delta, dk, dv, lo = _bwd_step(
                t, s, dp, lse, delta, dk, dv, k_w, v_w, k_both, ds_smem, q_smem, do_smem, ready, empty,
                ds_ready, ds_free, lse_ptr, delta_ptr, dq_desc, bh, lo, full, idx_ptr, n_idx, Nq, causal_off,
                qk_scale, s_zero, dq_zero, offs_n, offs_ms, dq_buf, dq_col0, a_l, WG, HEAD_DIM,
                BLOCK_M, STAGES, SPARSE, MASK_BM, DQ_SPLIT, False, True)
        s, dp, lse, delta, dk, dv, lo = _bwd_step(
            n_tiles - 1, s, dp, lse, delta, dk, dv, k_w, v_w, k_both, ds_smem, q_smem, do_smem, ready, empty,
            ds_ready, ds_free, lse_ptr, delta_ptr, dq_desc, bh, lo, full, idx_ptr, n_idx, Nq, causal_off,
            qk_scale, s_zero, dq_zero, offs_n, offs_ms, dq_buf, dq_col0, a_l, WG, HEAD_DIM, BLOCK_M,
            STAGES, SPARSE, MASK_BM, DQ_SPLIT, CAUSAL, False)
        return dk, dv

    @gluon.jit
    def _gl_bwd_kernel(q_desc, k_desc, v_desc, do_desc, kc_desc, dq_desc, DK, DV, LSE, DELTA,
                       COL_COUNT, COL_IDX, COL_MASKED, ORDER,
                       stride_dkb, stride_dkn, stride_dkh,
                       stride_dvb, stride_dvn, stride_dvh,
                       stride_mh, stride_mcol,
                       H, Nq, Nk, qk_scale, sm_scale,
                       HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr,
                       SPARSE: gl.constexpr, MASK_BM: gl.constexpr, MASK_BN: gl.constexpr,
                       STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, DQ_SWIZZLE: gl.constexpr,
                       ORDERED: gl.constexpr, num_warps: gl.constexpr):
        """128 keys per program: two consumer warpgroups of 64 keys, one loader warp (see the module
        docstring). Query blocks of BLOCK_M = 64 rows. q_desc ... do_desc: host TMA descriptors of the
        whole (B, N, H, HEAD_DIM) tensors, blocks of [1, 64, 1, HEAD_DIM] (gluon_bwd); kc_desc: K in
        blocks of [1, 64, 1, 64] (HEAD_DIM = 128: K's column halves for the split dQ; else unused);
        dq_desc: the fp32 dQ accumulator as (B * H, Nq, HEAD_DIM), blocks of [1, 64, the columns one
        consumer forms]. ORDERED: the p-th program to start (p = program_id(0) + program_id(1) *
        num_programs(0)) takes key block ORDER[p] % num_programs(0) of (batch, head) ORDER[p] //
        num_programs(0) (BlockMask.column_order: heavy key blocks first)."""
        gl.static_assert(BLOCK_M == 64)
        gl.static_assert((HEAD_DIM == 64) | (HEAD_DIM == 128))
        # HEAD_DIM = 128: a consumer's dK, dV accumulators take 128 of its 240 registers, too many to
        # also hold a [64, 128] dQ; each consumer forms 64 of dQ's columns over all 128 keys instead
        DQ_SPLIT: gl.constexpr = HEAD_DIM > 64
        gl.static_assert(num_warps == 4)
        dtype: gl.constexpr = DK.dtype.element_ty
        pid_n, bh = _bwd_program(ORDER, ORDERED)  # key block 0 sees the most query blocks when causal
        b = bh // H
        h = bh % H
        n0 = pid_n * 128
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        # K and the two dS^T halves as [128, *] tiles: dQ = dS K is one product over all 128 keys
        # (DQ_SPLIT: two products over K's column halves, kc_smem, and dS's two [64, 64] halves; K
        # itself is a [64, 128] tile per consumer, as a row slice of a [128, 128] tile would not be
        # contiguous in shared memory)
        if DQ_SPLIT:  # query-major dS: [slot * 2 + consumer] = the consumer's [64 queries, 64 keys]
            k_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], q_sl)
            ds_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 64], dtype)
            ds_smem = gl.allocate_shared_memory(dtype, [4, BLOCK_M, 64], ds_sl)
        else:  # key-major dS^T: [slot] = [128 keys, 64 queries], consumer c's keys in rows 64 c ...
            k2_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, HEAD_DIM], dtype)
            k_smem = gl.allocate_shared_memory(dtype, [128, HEAD_DIM], k2_sl)
            ds2_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, BLOCK_M], dtype)
            ds_smem = gl.allocate_shared_memory(dtype, [2, 128, BLOCK_M], ds2_sl)
        v_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], q_sl)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_sl)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_sl)
        # dQ leaves through one fp32 buffer per consumer and a TMA reduce-add (dq_desc's blocks)
        DQC: gl.constexpr = HEAD_DIM // 2 if DQ_SPLIT else HEAD_DIM  # the dQ columns one consumer forms
        dq_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=DQ_SWIZZLE, element_bitwidth=32, rank=2)
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, DQC], dq_sl)
        if DQ_SPLIT:
            kc_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, 64], dtype)
            kc_smem = gl.allocate_shared_memory(dtype, [2, 128, 64], kc_sl)
        else:
            kc_smem = k_smem
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for st in gl.static_range(STAGES):
            mbarrier.init(ready.index(st), count=1)
            mbarrier.init(empty.index(st), count=2)
        for st in gl.static_range(2):
            mbarrier.init(ds_ready.index(st), count=2)
            mbarrier.init(ds_free.index(st), count=2 if DQ_SPLIT else 1)  # the readers of the slot

        m_end = gl.cdiv(Nq, BLOCK_M) * BLOCK_M
        if CAUSAL:  # query rows i >= n - (Nk - Nq) see key n: the first block that sees key n0
            lo = gl.minimum(gl.maximum(n0 - (Nk - Nq), 0) // BLOCK_M * BLOCK_M, m_end)
        else:
            lo = 0
        n_tiles = (m_end - lo) // BLOCK_M
        idx_ptr = COL_IDX
        n_idx = 1
        n_masked = 0
        if SPARSE:  # the key block's list of kept query mask blocks (MASK_BN a multiple of 128)
            idx_ptr, n_idx, n_masked, n_tiles = _bwd_col_list(COL_COUNT, COL_IDX, COL_MASKED, h, stride_mh,
                                                              stride_mcol, n0, BLOCK_M, MASK_BM, MASK_BN)
        dk_base = DK + b.to(gl.int64) * stride_dkb + h.to(gl.int64) * stride_dkh
        dv_base = DV + b.to(gl.int64) * stride_dvb + h.to(gl.int64) * stride_dvh
        lse_ptr = LSE + bh * Nq
        delta_ptr = DELTA + bh * Nq
        gl.warp_specialize([
            (_bwd_consumer, (dk_base, dv_base, stride_dkn, stride_dvn, lse_ptr, delta_ptr, dq_desc, bh,
                             q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem, dq_smem.index(0), kv_bar,
                             ready, empty, ds_ready, ds_free, n0, lo, n_tiles, idx_ptr, n_idx, n_masked, Nq,
                             Nk, qk_scale, sm_scale, 0, HEAD_DIM, BLOCK_M, STAGES, CAUSAL, SPARSE, MASK_BM,
                             DQ_SPLIT)),
            (_bwd_consumer, (dk_base, dv_base, stride_dkn, stride_dvn, lse_ptr, delta_ptr, dq_desc, bh,
                             q_smem, do_smem, k_smem, v_smem, kc_smem, ds_smem, dq_smem.index(1), kv_bar,
                             ready, empty, ds_ready, ds_free, n0, lo, n_tiles, idx_ptr, n_idx, n_masked, Nq,
                             Nk, qk_scale, sm_scale, 1, HEAD_DIM, BLOCK_M, STAGES, CAUSAL, SPARSE, MASK_BM,
                             DQ_SPLIT)),
            (_bwd_loader, (q_desc, do_desc, k_desc, v_desc, kc_desc, q_smem, do_smem, k_smem, v_smem, kc_smem,
                           kv_bar, ready, empty, b, h, n0, lo, n_tiles, idx_ptr, n_idx, BLOCK_M, STAGES,
                           SPARSE, MASK_BM, DQ_SPLIT)),
        ], [4, 1], [CONSUMER_REGS, 24])


if HAVE_GLUON:
    @gluon.jit
    def _gl_bwd_grouped_kernel(q_desc, k_desc, v_desc, do_desc, dq_desc, DK, DV, LSE, DELTA, COL_COUNT,
                               COL_IDX, COL_MASKED, ORDER, stride_dkb, stride_dkn, stride_dkh, stride_dvb,
                               stride_dvn, stride_dvh, stride_mh, stride_mcol, H, Nq, Nk, qk_scale, sm_scale,
                               BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr, MASK_BM: gl.constexpr,
                               MASK_BN: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                               DQ_SWIZZLE: gl.constexpr, ORDERED: gl.constexpr, GROUP: gl.constexpr,
                               num_warps: gl.constexpr):
        """_gl_bwd_kernel for block masks at head dim 64 whose key blocks keep few query blocks: a program
        runs GROUP key blocks of 128 in turn (program column c: key blocks c GROUP ... c GROUP + GROUP -
        1), so that each does not pay a program's start (barriers, the first K / V and Q / dO loads)
        and end (dK / dV stores, the last dQ reduction): the next key block's K / V (a second buffer)
        and first Q / dO load while the last one's steps run. ORDER / ORDERED as _gl_bwd_kernel's, in
        program columns."""
        HEAD_DIM: gl.constexpr = 64
        gl.static_assert(BLOCK_M == 64)
        gl.static_assert(MASK_BM % 128 == 0)  # see _bwd_consumer_grouped
        gl.static_assert(num_warps == 4)
        dtype: gl.constexpr = DK.dtype.element_ty
        column, bh = _bwd_program(ORDER, ORDERED)
        c_first = column * GROUP
        c_end = gl.minimum(c_first + GROUP, gl.cdiv(Nk, 128))
        b = bh // H
        h = bh % H
        q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        k2_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, HEAD_DIM], dtype)
        k_smem = gl.allocate_shared_memory(dtype, [2, 128, HEAD_DIM], k2_sl)
        v_smem = gl.allocate_shared_memory(dtype, [2, 128, HEAD_DIM], k2_sl)
        ds2_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, BLOCK_M], dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [2, 128, BLOCK_M], ds2_sl)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_sl)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_sl)
        dq_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=DQ_SWIZZLE, element_bitwidth=32, rank=2)
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, HEAD_DIM], dq_sl)
        kv_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(2):
            mbarrier.init(kv_ready.index(st), count=1)
            mbarrier.init(kv_empty.index(st), count=2)
            mbarrier.init(ds_ready.index(st), count=2)
            mbarrier.init(ds_free.index(st), count=1)
        for st in gl.static_range(STAGES):
            mbarrier.init(ready.index(st), count=1)
            mbarrier.init(empty.index(st), count=2)
        dk_base = DK + b.to(gl.int64) * stride_dkb + h.to(gl.int64) * stride_dkh
        dv_base = DV + b.to(gl.int64) * stride_dvb + h.to(gl.int64) * stride_dvh
        lse_ptr = LSE + bh * Nq
        delta_ptr = DELTA + bh * Nq
        gl.warp_specialize([
            (_bwd_consumer_grouped, (dk_base, dv_base, stride_dkn, stride_dvn, lse_ptr, delta_ptr, dq_desc,
                                     bh, h, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem.index(0),
                                     kv_ready, kv_empty, ready, empty, ds_ready, ds_free, c_first, c_end,
                                     COL_COUNT, COL_IDX, COL_MASKED, stride_mh, stride_mcol, Nq, Nk, qk_scale,
                                     sm_scale, 0, HEAD_DIM, BLOCK_M, STAGES, CAUSAL, MASK_BM, MASK_BN)),
            (_bwd_consumer_grouped, (dk_base, dv_base, stride_dkn, stride_dvn, lse_ptr, delta_ptr, dq_desc,
                                     bh, h, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem.index(1),
                                     kv_ready, kv_empty, ready, empty, ds_ready, ds_free, c_first, c_end,
                                     COL_COUNT, COL_IDX, COL_MASKED, stride_mh, stride_mcol, Nq, Nk, qk_scale,
                                     sm_scale, 1, HEAD_DIM, BLOCK_M, STAGES, CAUSAL, MASK_BM, MASK_BN)),
            (_bwd_loader_grouped, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_ready,
                                   kv_empty, ready, empty, b, h, c_first, c_end, COL_COUNT, COL_IDX,
                                   COL_MASKED, stride_mh, stride_mcol, BLOCK_M, STAGES, MASK_BM, MASK_BN)),
        ], [4, 1], [CONSUMER_REGS, 24])


def gluon_fwd(q, k, v, o, lse, causal: bool, qk_scale: float, config, programs=None, sparse=None):
    """Launch the Gluon forward into `o` (like q) and `lse` ((B, H, Nq) fp32); returns the kernel
    handle. config = (BLOCK_N, STAGES, consumer registers); the caller has checked the inputs
    (fp16/bf16, head dim in HEAD_DIMS, TMA-aligned strides, sm_90). programs: how many programs run
    the work units (_fwd_tile_coords), each every programs-th one; default: one per SM (persistent) up
    to PERSISTENT_MAX_KEYS keys (always for block masks), one per unit above. sparse: None (dense) or
    the block mask's row lists as flash._mask_args(rows=True) gives them, (row_count, row_idx,
    row_full, stride_head, stride_row, MASK_BM, MASK_BN), MASK_BM a multiple of 128 (one tile's rows)
    and MASK_BN of BLOCK_N. Its descriptors are made here on the host, so it needs no Triton
    allocator."""
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    block_n, stages, regs = config
    count, idx, full, smh, smr, mbm, mbn = sparse if sparse is not None else (lse, lse, lse, 0, 0, 128, 128)
    n_m = -(-Nq // 128)
    n_units = B * H * ((n_m + 1) // 2 if causal and sparse is None else n_m)
    if programs is None:
        programs = n_units
        if Nk <= PERSISTENT_MAX_KEYS or sparse is not None:
            programs = _num_sms(q.device)
    return _gl_fwd_kernel[(min(n_units, programs),)](
        _bshd_desc(q), _bshd_desc(k, rows=block_n), _bshd_desc(v, rows=block_n), _bshd_desc(o), lse,
        count, idx, full, smh, smr, H, Nq, Nk, n_units, qk_scale,
        HEAD_DIM=D, BLOCK_M=128, BLOCK_N=block_n, CAUSAL=bool(causal), SPARSE=sparse is not None,
        MASK_BM=mbm, MASK_BN=mbn, STAGES=stages, CONSUMER_REGS=regs, num_warps=4)


def gluon_bwd(q, k, v, do, dk, dv, lse, delta, dqa, causal: bool, qk_scale: float, sm_scale: float, config,
              sparse=None, order=None, group=1):
    """Launch the Gluon backward: writes dk, dv (like k, v) and adds dQ / sm_scale into the zeroed
    fp32 `dqa` (B, H, Nq, D); returns the kernel handle. config = (STAGES, consumer registers); the
    caller has checked the inputs (fp16/bf16, head dim in BWD_HEAD_DIMS, TMA-aligned strides, sm_90).
    sparse: None (dense) or the block mask's column lists as flash._mask_args(rows=False) gives them,
    (col_count, col_idx, col_masked, stride_head, stride_col, MASK_BM, MASK_BN), with MASK_BN a
    multiple of 128 (one program's keys) and MASK_BM of 64 (one query block). order: None (key blocks
    in order, per batch and head) or the launch order BlockMask.column_order gives for programs of
    128 * group keys. group > 1 (block masks at head dim 64): each program runs `group` key blocks of 128.
    Its descriptors are made here on the host, so it needs no Triton allocator (no device scratch)."""
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    stages, regs = config
    q_desc, k_desc, v_desc, do_desc = (_bshd_desc(t) for t in (q, k, v, do))
    kc_desc = _bshd_desc(k, 64) if D > 64 else k_desc  # K's 64-column halves (the split dQ at D = 128)
    dq_swizzle = DQ_SWIZZLE_BYTES[(D, bool(causal))]
    dq_desc = _dq_desc(dqa, 64, dq_swizzle)
    count, idx, masked, smh, smc, mbm, mbn = sparse if sparse is not None else (lse, lse, lse, 0, 0, 64, 128)
    strides = (dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), smh, smc)
    order = lse if order is None else order
    if group > 1:
        assert sparse is not None and D == 64, "grouped key blocks: block masks at head dim 64"
        return _gl_bwd_grouped_kernel[(-(-Nk // (128 * group)), B * H)](
            q_desc, k_desc, v_desc, do_desc, dq_desc, dk, dv, lse, delta, count, idx, masked, order, *strides,
            H, Nq, Nk, qk_scale, sm_scale, BLOCK_M=64, CAUSAL=bool(causal), MASK_BM=mbm, MASK_BN=mbn,
            STAGES=stages, CONSUMER_REGS=regs, DQ_SWIZZLE=dq_swizzle, ORDERED=order is not lse, GROUP=group,
            num_warps=4)
    return _gl_bwd_kernel[(-(-Nk // 128), B * H)](
        q_desc, k_desc, v_desc, do_desc, kc_desc, dq_desc, dk, dv, lse, delta, count, idx, masked, order,
        *strides, H, Nq, Nk, qk_scale, sm_scale,
        HEAD_DIM=D, BLOCK_M=64, CAUSAL=bool(causal), SPARSE=sparse is not None, MASK_BM=mbm, MASK_BN=mbn,
        STAGES=stages, CONSUMER_REGS=regs, DQ_SWIZZLE=dq_swizzle, ORDERED=order is not lse, num_warps=4)


@functools.cache
def _num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device ("cuda" alone: the current one)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _swizzled(bits: int, rank: int, width: int = 128):
    """The `width`-byte-swizzled shared layout of a TMA tile (made once: building a layout object costs
    host time on every launch)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=width, element_bitwidth=bits, rank=rank)


def _bshd_desc(t, cols=None, rows=64):
    """Host TMA descriptor of a (B, N, H, D) tensor, `rows` rows of one (batch, head) per load, `cols`
    columns wide (default: all D)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, rows, 1, cols or t.shape[-1]],
                            _swizzled(t.element_size() * 8, 4))


def _dq_desc(dqa, cols, swizzle=128):
    """Host TMA descriptor of the fp32 dQ accumulator (B, H, Nq, D) as (B * H, Nq, D), 64 rows by `cols`
    columns per reduction (rows past Nq are dropped), its shared side `swizzle`-byte swizzled."""
    B, H, Nq, D = dqa.shape
    flat = dqa.view(B * H, Nq, D)
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [1, 64, cols],
                            _swizzled(32, 3, swizzle))
