"""IO-aware exact attention (FlashAttention) in Triton: forward, backward, dense and block-sparse.

The algorithm, in the order the kernels below run:

Forward (`_fwd_kernel`, one program per BLOCK_M query rows of one (batch, head)):
    load Q_i once; for each kept K/V block j (all blocks, the causal prefix, or the block-sparse
    row list): S = Q_i K_j^T * scale * log2(e); running row max m, running sum l and fp32
    accumulator acc are rescaled by exp2(m_old - m_new) and updated with P = exp2(S - m_new);
    finally O_i = acc / l and LSE_i = m + log2(l) (base 2, scaled units) is saved for the
    backward. The N x N score matrix never exists in memory: only (BLOCK_M, BLOCK_N) tiles in
    registers / shared memory.

Backward (two variants, chosen by `deterministic=`):
    1. `_bwd_preprocess`: delta_i = rowsum(dO_i * O_i) (and, for the fused variant, zeroes the
       fp32 dQ accumulator).
    2. `_bwd_dkdv_kernel`, one program per K/V block j, looping over the query blocks i that
       see it: recompute P^T = exp2(K_j Q_i^T * scale * log2(e) - LSE_i), then
       dV_j += P^T dO_i, dP^T = V_j dO_i^T, dS^T = P^T * (dP^T - delta_i), dK_j += dS^T Q_i.
       Fused (default, FUSED_DQ=True): the same step also forms dQ_i's share dS K_j and adds it
       into an fp32 (B, H, Nq, D) accumulator with atomic adds, as FlashAttention-2 does: 5
       matrix products per tile, and `_bwd_dq_convert` scales and casts the accumulator into dQ.
       The order of the atomic adds varies between runs, so dQ may differ in the last bits.
    3. Deterministic (`deterministic=True`): `_bwd_dq_kernel`, one program per query block i,
       loops over K blocks j like the forward and recomputes S and dP: dQ_i += dS K_j
       (7 matrix products per tile in total). Every output tile is owned by exactly one program
       (no atomics), so the same call gives bitwise-identical gradients.
    Every accumulation is fp32.

Dense and block-sparse share these kernels: the K-block loop runs over either a contiguous
range of blocks or a per-row list of kept blocks (`BlockMask`, SPARSE=True), and the dK/dV loop
over a contiguous range or a per-column list of kept query blocks.

Launch configurations come from a table per (GPU arch, kernel, head dim, causal; block-sparse
and short rows have their own rows), fitted to the dtype's shared memory and looked up once per
case (cached); nothing is autotuned at import or at the first call. The same table says which
backward is faster where the caller does not ask for determinism.

TMA: the forward and the fused backward can load tiles through tensor descriptors
(`tl.make_tensor_descriptor`, one 2-D (seq, head_dim) descriptor per (batch, head); rows and
columns outside the tensor read as 0, as the masked loads give) when strides and base addresses
are 16-byte aligned. On an H200 with Triton 3.6 this measured slower than the cp.async pipeline
(docs/kernel_notes.md), so it is off unless `set_kernel_options(tma=True)`.

Causal alignment for Nq != Nk is bottom-right (as FlashAttention >= 2.1): query i sits at key
position i + Nk - Nq, so it sees keys j <= i + Nk - Nq. With Nq > Nk the first Nq - Nk rows see no
key; like every row that sees no key (also in a block-sparse layout), their output is 0 and
their gradients are 0.

fp32 inputs: the dot products run in TF32 on the tensor cores when
`torch.get_float32_matmul_precision()` is "high" or "medium", and in IEEE fp32 when it is
"highest" (PyTorch's default); `fp32_precision="tf32"|"ieee"` overrides that per call.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# Device-side TMA descriptors: tl.make_tensor_descriptor (Triton >= 3.4; 3.6 on the GPU image).
_HAS_TMA = hasattr(tl, "make_tensor_descriptor")


@triton.jit
def _tile_src(base, stride_row, n_rows, offs_r, offs_d,
              HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Where (rows, head_dim) tiles of one (batch, head) come from: a TMA descriptor of shape
    (n_rows, HEAD_DIM), or the pointer tile of rows offs_r (offset by row * stride_row later)."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_row, 1],
                                         block_shape=[BLOCK_R, BLOCK_D])
    else:
        return base + offs_r[:, None] * stride_row + offs_d[None, :]


@triton.jit
def _load_tile(src, start, stride_row, rows, n_rows, offs_d,
               ROW_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Tile [start, start + BLOCK) of `src`; rows >= n_rows and columns >= HEAD_DIM read as 0.

    rows = start + arange(BLOCK); ROW_MASK=False promises every row is < n_rows."""
    if USE_TMA:  # the copy engine zero-fills outside the descriptor's shape
        return src.load([start, 0])
    elif ROW_MASK:
        return tl.load(src + start * stride_row, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM),
                       other=0.0)
    elif HEAD_DIM == BLOCK_D:
        return tl.load(src + start * stride_row)
    else:
        return tl.load(src + start * stride_row, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_src, v_src, start_n, offs_m, offs_n, offs_d,
              stride_kn, stride_vn, Nk, qk_scale, causal_off,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr):
    """One step of the online softmax: fold K/V block [start_n, start_n + BLOCK_N) into acc."""
    cols = start_n + offs_n
    k = _load_tile(k_src, start_n, stride_kn, cols, Nk, offs_d, MASK, HEAD_DIM, BLOCK_D, USE_TMA)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if MASK:
        keep = cols[None, :] < Nk
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + causal_off)
        s = tl.where(keep, s, float("-inf"))
    # m_i starts at -1e30 (finite), so a fully masked tile gives p = 0 and alpha = 1, never NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_tile(v_src, start_n, stride_vn, cols, Nk, offs_d, MASK, HEAD_DIM, BLOCK_D, USE_TMA)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, ROW_COUNT, ROW_IDX, ROW_FULL,
                stride_qb, stride_qn, stride_qh,
                stride_kb, stride_kn, stride_kh,
                stride_vb, stride_vn, stride_vh,
                stride_ob, stride_on, stride_oh,
                stride_mh, stride_mrow,
                H, Nq, Nk, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
                MASK_BM: tl.constexpr, MASK_BN: tl.constexpr, DOT_PREC: tl.constexpr,
                USE_TMA: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # heaviest query blocks first: better load balance at the tail of the grid
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    causal_off = Nk - Nq

    q_src = _tile_src(Q + b * stride_qb + h * stride_qh, stride_qn, Nq, offs_m - m0, offs_d,
                      HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    q = _load_tile(q_src, m0, stride_qn, offs_m, Nq, offs_d, True, HEAD_DIM, BLOCK_D, USE_TMA)
    k_src = _tile_src(K + b * stride_kb + h * stride_kh, stride_kn, Nk, offs_n, offs_d,
                      HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    v_src = _tile_src(V + b * stride_vb + h * stride_vh, stride_vn, Nk, offs_n, offs_d,
                      HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if SPARSE:
        # Kept K blocks of this query block's mask row; each mask block is MASK_BN // BLOCK_N tiles.
        SUB: tl.constexpr = MASK_BN // BLOCK_N
        row = m0 // MASK_BM
        count = tl.load(ROW_COUNT + h * stride_mh + row)
        n_full = tl.load(ROW_FULL + h * stride_mh + row)  # leading blocks that need no element mask
        idx_ptr = ROW_IDX + (h * stride_mh + row) * stride_mrow
        for t in range(0, n_full * SUB):
            nb = tl.load(idx_ptr + t // SUB)
            start_n = nb * MASK_BN + (t % SUB) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_src, v_src, start_n, offs_m, offs_n, offs_d,
                                      stride_kn, stride_vn, Nk, qk_scale, causal_off,
                                      False, CAUSAL, HEAD_DIM, BLOCK_D, DOT_PREC, USE_TMA)
        for t in range(n_full * SUB, count * SUB):
            nb = tl.load(idx_ptr + t // SUB)
            start_n = nb * MASK_BN + (t % SUB) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_src, v_src, start_n, offs_m, offs_n, offs_d,
                                      stride_kn, stride_vn, Nk, qk_scale, causal_off,
                                      True, CAUSAL, HEAD_DIM, BLOCK_D, DOT_PREC, USE_TMA)
    else:
        # Blocks [0, full_end) need no mask; [full_end, hi) hold the causal diagonal / the Nk tail.
        if CAUSAL:
            hi = tl.minimum(Nk, m0 + BLOCK_M + causal_off)
            full_end = tl.maximum(tl.minimum(hi, m0 + causal_off + 1), 0) // BLOCK_N * BLOCK_N
        else:
            hi = Nk
            full_end = Nk // BLOCK_N * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_src, v_src, start_n, offs_m, offs_n, offs_d,
                                      stride_kn, stride_vn, Nk, qk_scale, causal_off,
                                      False, CAUSAL, HEAD_DIM, BLOCK_D, DOT_PREC, USE_TMA)
        for start_n in range(full_end, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_src, v_src, start_n, offs_m, offs_n, offs_d,
                                      stride_kn, stride_vn, Nk, qk_scale, causal_off,
                                      True, CAUSAL, HEAD_DIM, BLOCK_D, DOT_PREC, USE_TMA)

    # Rows that saw no key (l = 0): output 0 and LSE = +inf, so the backward's P is exactly 0.
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE + bh * Nq + offs_m, lse, mask=offs_m < Nq)
    o_base = O + b * stride_ob + h * stride_oh
    if USE_TMA:  # stores outside the descriptor's shape are dropped
        o_desc = tl.make_tensor_descriptor(o_base, shape=[Nq, HEAD_DIM], strides=[stride_on, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        o_desc.store([m0, 0], out.to(O.dtype.element_ty))
    else:
        tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(O, DO, DELTA, DQA,
                    stride_ob, stride_on, stride_oh, stride_dob, stride_don, stride_doh,
                    H, Nq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    ZERO_DQA: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, stored as (B, H, Nq); optionally zero the dQ accumulator."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=msk, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)
    if ZERO_DQA:
        dqa_ptrs = DQA + bh.to(tl.int64) * Nq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(dqa_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=msk)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, dqa_ptrs, start_m, offs_m, offs_n, offs_d,
               stride_qn, stride_don, Nq, qk_scale, causal_off,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT_PREC: tl.constexpr, FUSED_DQ: tl.constexpr, USE_TMA: tl.constexpr):
    """Fold query block [start_m, start_m + BLOCK_M) into this K/V block's dK and dV (and, when
    FUSED_DQ, add this K/V block's share of dQ for those rows into the fp32 accumulator)."""
    rows = start_m + offs_m
    # Rows past Nq load q = dO = 0 and a finite LSE: they add exactly 0 to dK and dV.
    q = _load_tile(q_src, start_m, stride_qn, rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D, USE_TMA)
    do = _load_tile(do_src, start_m, stride_don, rows, Nq, offs_d, True, HEAD_DIM, BLOCK_D, USE_TMA)
    lse = tl.load(lse_ptr + rows, mask=rows < Nq, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=rows < Nq, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
    if MASK:
        if CAUSAL:  # masked before exp2, so no overflow can appear in dropped entries
            s_t = tl.where(offs_n[:, None] <= rows[None, :] + causal_off, s_t, float("-inf"))
    p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk = tl.dot(ds_t, q, dk, input_precision=DOT_PREC)
    if FUSED_DQ > 0:
        # dQ_i += dS K_j; K rows past Nk are 0, so their (finite) dS adds nothing.
        dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_D) fp32
        dq_mask = (rows[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
        if FUSED_DQ == 1:
            tl.atomic_add(dqa_ptrs + start_m * HEAD_DIM, dq, mask=dq_mask, sem="relaxed")
        else:  # profiling only (_PROFILE_DQ_MODE = 2): plain stores, wrong sums, the atomics' cost left out
            tl.store(dqa_ptrs + start_m * HEAD_DIM, dq, mask=dq_mask)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, DQA, COL_COUNT, COL_IDX, COL_MASKED, ORDER,
                     stride_qb, stride_qn, stride_qh,
                     stride_kb, stride_kn, stride_kh,
                     stride_vb, stride_vn, stride_vh,
                     stride_dob, stride_don, stride_doh,
                     stride_dkb, stride_dkn, stride_dkh,
                     stride_dvb, stride_dvn, stride_dvh,
                     stride_mh, stride_mcol,
                     H, Nq, Nk, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
                     MASK_BM: tl.constexpr, MASK_BN: tl.constexpr, DOT_PREC: tl.constexpr,
                     FUSED_DQ: tl.constexpr, USE_TMA: tl.constexpr, ORDERED: tl.constexpr):
    if ORDERED:  # block masks: the p-th program to start takes ORDER[p] (BlockMask.column_order)
        entry = tl.load(ORDER + tl.program_id(0) + tl.program_id(1) * tl.num_programs(0))
        pid_n = entry % tl.num_programs(0)
        bh = entry // tl.num_programs(0)
    else:
        pid_n = tl.program_id(0)  # K block 0 sees the most query blocks when causal: heaviest first
        bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    causal_off = Nk - Nq

    # K/V rows past Nk load as 0; their dK/dV rows are never stored, so no column mask is needed.
    kv_mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    q_src = _tile_src(Q + b * stride_qb + h * stride_qh, stride_qn, Nq, offs_m, offs_d,
                      HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    do_src = _tile_src(DO + b * stride_dob + h * stride_doh, stride_don, Nq, offs_m, offs_d,
                       HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    lse_ptr = LSE + bh * Nq
    delta_ptr = DELTA + bh * Nq
    # fp32 dQ accumulator, (B, H, Nq, HEAD_DIM) contiguous (a dummy when not FUSED_DQ)
    dqa_ptrs = DQA + bh.to(tl.int64) * Nq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if SPARSE:
        SUB: tl.constexpr = MASK_BM // BLOCK_M
        col = n0 // MASK_BN
        count = tl.load(COL_COUNT + h * stride_mh + col)
        n_masked = tl.load(COL_MASKED + h * stride_mh + col)  # leading blocks crossing the diagonal
        idx_ptr = COL_IDX + (h * stride_mh + col) * stride_mcol
        for t in range(0, n_masked * SUB):
            mb = tl.load(idx_ptr + t // SUB)
            start_m = mb * MASK_BM + (t % SUB) * BLOCK_M
            dk, dv = _dkdv_tile(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, dqa_ptrs, start_m, offs_m,
                                offs_n, offs_d, stride_qn, stride_don, Nq, qk_scale, causal_off,
                                True, CAUSAL, HEAD_DIM, BLOCK_D, DOT_PREC, FUSED_DQ, USE_TMA)
        for t in range(n_masked * SUB, count * SUB):
            mb = tl.load(idx_ptr + t // SUB)
            start_m = mb * MASK_BM + (t % SUB) * BLOCK_M
            dk, dv = _dkdv_tile(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, dqa_ptrs, start_m, offs_m,
                                offs_n, offs_d, stride_qn, stride_don, Nq, qk_scale, causal_off,
                                False, CAUSAL, HEAD_DIM, BLOCK_D, DOT_PREC, FUSED_DQ, USE_TMA)
    else:
        if CAUSAL:
            # Rows i >= n0 - off see some key of this block; rows i >= n0 + BLOCK_N - 1 - off see all.
            lo = tl.maximum(n0 - causal_off, 0) // BLOCK_M * BLOCK_M
            full_start = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M,
                                    tl.cdiv(Nq, BLOCK_M) * BLOCK_M)
            full_start = tl.maximum(full_start, lo)
            for start_m in range(lo, full_start, BLOCK_M):
                start_m = tl.multiple_of(start_m, BLOCK_M)
                dk, dv = _dkdv_tile(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, dqa_ptrs, start_m,
                                    offs_m, offs_n, offs_d, stride_qn, stride_don, Nq, qk_scale, causal_off,
                                    True, CAUSAL, HEAD_DIM, BLOCK_D, DOT_PREC, FUSED_DQ, USE_TMA)
        else:
            full_start = 0
        for start_m in range(full_start, Nq, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk, dv = _dkdv_tile(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, dqa_ptrs, start_m, offs_m,
                                offs_n, offs_d, stride_qn, stride_don, Nq, qk_scale, causal_off,
                                False, CAUSAL, HEAD_DIM, BLOCK_D, DOT_PREC, FUSED_DQ, USE_TMA)

    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_convert(DQA, DQ, stride_dqb, stride_dqn, stride_dqh, H, Nq, sm_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """dQ = sm_scale * accumulator, cast to dQ's dtype and written with dQ's strides."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    acc = tl.load(DQA + bh.to(tl.int64) * Nq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=msk, other=0.0)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             (acc * sm_scale).to(DQ.dtype.element_ty), mask=msk)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
             stride_kn, stride_vn, Nk, qk_scale, causal_off,
             MASK: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
             DOT_PREC: tl.constexpr):
    """Fold K/V block [start_n, start_n + BLOCK_N) into this query block's dQ."""
    cols = start_n + offs_n
    # Columns past Nk load k = v = 0: their dS multiplies k = 0, so they add nothing to dQ.
    if MASK:
        kv_mask = (cols[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptrs + start_n * stride_kn, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs + start_n * stride_kn)
        v = tl.load(v_ptrs + start_n * stride_vn)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if MASK:
        if CAUSAL:
            s = tl.where(cols[None, :] <= offs_m[:, None] + causal_off, s, float("-inf"))
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, ROW_COUNT, ROW_IDX, ROW_FULL,
                   stride_qb, stride_qn, stride_qh,
                   stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh,
                   stride_dob, stride_don, stride_doh,
                   stride_dqb, stride_dqn, stride_dqh,
                   stride_mh, stride_mrow,
                   H, Nq, Nk, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, SPARSE: tl.constexpr,
                   MASK_BM: tl.constexpr, MASK_BN: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    causal_off = Nk - Nq

    ld_mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=ld_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=ld_mask, other=0.0)
    lse = tl.load(LSE + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    delta = tl.load(DELTA + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if SPARSE:
        SUB: tl.constexpr = MASK_BN // BLOCK_N
        row = m0 // MASK_BM
        count = tl.load(ROW_COUNT + h * stride_mh + row)
        n_full = tl.load(ROW_FULL + h * stride_mh + row)
        idx_ptr = ROW_IDX + (h * stride_mh + row) * stride_mrow
        for t in range(0, n_full * SUB):
            nb = tl.load(idx_ptr + t // SUB)
            start_n = nb * MASK_BN + (t % SUB) * BLOCK_N
            dq = _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                          stride_kn, stride_vn, Nk, qk_scale, causal_off,
                          False, CAUSAL, EVEN_D, HEAD_DIM, DOT_PREC)
        for t in range(n_full * SUB, count * SUB):
            nb = tl.load(idx_ptr + t // SUB)
            start_n = nb * MASK_BN + (t % SUB) * BLOCK_N
            dq = _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                          stride_kn, stride_vn, Nk, qk_scale, causal_off,
                          True, CAUSAL, EVEN_D, HEAD_DIM, DOT_PREC)
    else:
        if CAUSAL:
            hi = tl.minimum(Nk, m0 + BLOCK_M + causal_off)
            full_end = tl.maximum(tl.minimum(hi, m0 + causal_off + 1), 0) // BLOCK_N * BLOCK_N
        else:
            hi = Nk
            full_end = Nk // BLOCK_N * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            dq = _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                          stride_kn, stride_vn, Nk, qk_scale, causal_off,
                          False, CAUSAL, EVEN_D, HEAD_DIM, DOT_PREC)
        for start_n in range(full_end, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            dq = _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d,
                          stride_kn, stride_vn, Nk, qk_scale, causal_off,
                          True, CAUSAL, EVEN_D, HEAD_DIM, DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=ld_mask)


# --------------------------------------------------------------------------------------------
# Launch configuration: a table per (arch, kernel, head dim, causal), fitted to shared memory
# --------------------------------------------------------------------------------------------
# Each entry: (max head dim, causal config, non-causal config); a config is
# (BLOCK_M, BLOCK_N, num_warps, num_stages). For "dkdv" and "bwd" (the fused backward) BLOCK_N
# is the K/V tile a program owns and BLOCK_M the query tile it streams; for "fwd" and "dq" the
# other way round. Hopper values: scripts/tune_attention.py and three runs of
# scripts/kernel_lab.py on an H200, 2026-11-22 (docs/kernel_notes.md, docs/benchmarks.md).
_TABLES = {
    "hopper": {
        "fwd": [(64, (128, 64, 8, 3), (128, 64, 8, 3)), (128, (128, 64, 8, 3), (128, 64, 8, 3)),
                (256, (64, 64, 4, 2), (64, 64, 4, 2))],
        "bwd": [(64, (64, 64, 4, 3), (64, 64, 4, 3)), (128, (64, 128, 8, 3), (64, 128, 8, 3)),
                (256, (32, 64, 4, 2), (32, 64, 4, 2))],
        # block-sparse: smaller tiles keep more programs per SM busy when rows keep few blocks
        "fwd_sparse": [(64, (64, 64, 4, 3), (64, 64, 4, 3)), (128, (64, 64, 4, 3), (64, 64, 4, 3)),
                       (256, (64, 64, 4, 2), (64, 64, 4, 2))],
        # rows of at most _SHORT_SEQ keys: few K tiles per program
        "fwd_short": [(64, (64, 64, 4, 3), (64, 64, 4, 3)), (128, (128, 64, 8, 3), (128, 64, 8, 3)),
                      (256, (64, 64, 4, 2), (64, 64, 4, 2))],
        # which backward is faster when the caller does not ask for determinism: True = fused
        # (atomic dQ), False = the two deterministic kernels
        "bwd_fused": [(64, True, True), (128, True, False), (256, True, True)],
        # the Gluon forward (kernels/flash_gluon.py) where it measured faster than the Triton one:
        # (minimum keys, BLOCK_N, STAGES, consumer registers) per exact head dim. Head dim 64: 1.03-1.05x
        # causal from 2048 keys (0.99-1.03x at 1024), 1.04-1.21x non-causal from 1024; head dim 128:
        # 1.17-1.30x everywhere (docs/benchmarks.md 1j)
        "fwd_gluon": [(64, (2048, 128, 2, 240), (1024, 128, 2, 240)),
                      (128, (0, 128, 2, 240), (0, 128, 2, 240))],
        # short rows: (maximum keys, BLOCK_N) for dense calls of at most that many keys. Head dim 128 causal:
        # 64-key blocks halve the masked diagonal block's wasted work, 1.07x at 1024 keys (0.92x at 2048);
        # head dim 64 and non-causal measured level or slower (docs/benchmarks.md 1k)
        "fwd_gluon_short": [(128, (1024, 64), None)],
        # block masks whose rows keep few key blocks: (mean key blocks of 128 per row below which, BLOCK_N,
        # STAGES). 64-key blocks and a 3-deep ring: 1.14-1.17x the Triton forward at 2 blocks per row and
        # 1.10-1.14x the 128-key Gluon one at 4 (head dim 64); 1.50x at 2 at head dim 128; level to 0.97x
        # from 7.8 (causal local and BigBird masks, docs/benchmarks.md 2g)
        "fwd_gluon_sparse_short": [(64, (6, 64, 3), (6, 64, 3)), (128, (6, 64, 3), (6, 64, 3))],
        # the Gluon fused backward (kernels/flash_gluon.py, head dims 64 and 128): (minimum keys,
        # STAGES, consumer registers); below the minimum the Triton backward measured faster. With dQ
        # by TMA reductions: head dim 64 1.04x causal at 512 keys, 1.16x at 1k, 1.06-1.24x non-causal
        # from 512 (docs/benchmarks.md 1k); head dim 128 (query-major, docs/benchmarks.md 1l) 1.07x
        # causal at 512 keys, 1.17x at 1k, 1.24x at 2k, 1.07-1.14x non-causal at 512-1k
        "bwd_gluon": [(64, (512, 2, 240), (512, 2, 240)), (128, (512, 2, 240), (512, 2, 240))],
        "dkdv": [(64, (64, 64, 4, 3), (64, 64, 4, 3)), (128, (64, 128, 8, 3), (64, 128, 8, 3)),
                 (256, (32, 64, 4, 2), (32, 64, 4, 2))],
        "dq": [(64, (128, 64, 8, 3), (128, 64, 8, 3)), (128, (128, 64, 8, 3), (128, 64, 8, 3)),
               (256, (64, 32, 4, 2), (64, 32, 4, 2))],
    },
    "default": {
        "fwd": [(64, (128, 64, 4, 2), (128, 64, 4, 2)), (128, (64, 64, 4, 2), (64, 64, 4, 2)),
                (256, (32, 32, 4, 1), (32, 32, 4, 1))],
        "bwd": [(64, (64, 64, 4, 2), (64, 64, 4, 2)), (128, (32, 64, 4, 2), (32, 64, 4, 2)),
                (256, (16, 32, 4, 1), (16, 32, 4, 1))],
        "dkdv": [(64, (64, 64, 4, 2), (64, 64, 4, 2)), (128, (32, 64, 4, 2), (32, 64, 4, 2)),
                 (256, (16, 32, 4, 1), (16, 32, 4, 1))],
        "dq": [(64, (64, 64, 4, 2), (64, 64, 4, 2)), (128, (64, 32, 4, 2), (64, 32, 4, 2)),
               (256, (32, 16, 4, 1), (32, 16, 4, 1))],
        "bwd_fused": [(256, True, True)],
    },
}
_KINDS = ("fwd", "bwd", "dkdv", "dq")
# The interpreter runs tiles as numpy arrays: large tiles mean fewer Python-level steps.
_INTERP = (64, 64, 4, 1)

_OVERRIDE: dict = {}  # filled by set_launch_config() (benchmarks / tuning sweeps)
# TMA descriptor loads per pass: None: automatic (Hopper + aligned inputs); True / False: forced
_OPTIONS = {"fwd_tma": None, "bwd_tma": None, "bwd_fused": None, "fwd_gluon": None, "bwd_gluon": None,
            "sparse_order": True, "sparse_group": None}
# Automatic choices (measured on an H200, docs/kernel_notes.md): TMA descriptor loads were slower
# than cp.async pipelining with Triton 3.6, so "automatic" leaves them off.
_TMA_AUTO = False
_SHORT_SEQ = 1024  # the forward's "_short" table for at most this many keys
_UNSET = object()


def set_launch_config(kind: str, block_m: int, block_n: int, num_warps: int, num_stages: int) -> None:
    """Force the launch configuration of one kernel ("fwd", "bwd" (fused backward), "dkdv" or "dq")."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    _OVERRIDE[kind] = (block_m, block_n, num_warps, num_stages)


def clear_launch_config() -> None:
    _OVERRIDE.clear()


def set_kernel_options(*, tma=_UNSET, fwd_tma=_UNSET, bwd_tma=_UNSET, gluon=_UNSET, fwd_gluon=_UNSET,
                       bwd_gluon=_UNSET, sparse_order=_UNSET, sparse_group=_UNSET) -> None:
    """TMA descriptor loads in the Triton forward (fwd_tma), the fused backward (bwd_tma) or both (tma):
    None = on Hopper when the inputs allow (the default); True / False = always / never. True still
    needs 16-byte aligned strides and base addresses; the interpreter emulates the loads. fwd_gluon /
    bwd_gluon (gluon: both): the warp-specialised Gluon kernels on Hopper (kernels/flash_gluon.py). None
    (default) = where the launch table marks them faster (forward: head dim 128, head dim 64 with >=
    2048 keys causal, >= 1024 non-causal, block masks of a multiple of 128 x 128 at either, with 64-key
    blocks where rows keep fewer than 6 blocks of 128 keys on average; fused backward: head dims 64 and
    128 with >= 512 keys, block masks whose programs see >= 6 query blocks, or any at head dim 64 with
    mask blocks of a multiple of 128 x 128, whose programs then run several key blocks where they keep
    few query blocks);
    True = for every case they are built for (forward: head dim 64, 128, also block masks of a multiple
    of 128 x 128; backward: 64, 128, also block masks of a multiple of 64 x 128); False = never. Either
    way only fp16/bf16 inputs with TMA-aligned strides on sm_90; the Gluon backward replaces the fused
    (non-deterministic) one. sparse_order (True by default): a block mask's backward starts its heavy key
    blocks first (BlockMask.column_order); False: key blocks in order. sparse_group: how many key blocks
    of 128 one Gluon backward program runs for block masks at head dim 64 (of 128-row mask blocks):
    None (default) = about 32 query blocks of 64 per program, at most 8 key blocks; an int >= 1 = that
    many (1: one key block per program)."""
    if sparse_group is not _UNSET:
        if sparse_group is not None and (isinstance(sparse_group, bool) or not isinstance(sparse_group, int)
                                         or sparse_group < 1):
            raise ValueError(f"sparse_group must be None or an int >= 1, got {sparse_group!r}")
        _OPTIONS["sparse_group"] = sparse_group
    if sparse_order is not _UNSET:
        if sparse_order not in (True, False):
            raise ValueError(f"sparse_order must be True or False, got {sparse_order!r}")
        _OPTIONS["sparse_order"] = sparse_order
    for key, val in (("fwd_tma", tma), ("bwd_tma", tma), ("fwd_tma", fwd_tma), ("bwd_tma", bwd_tma),
                     ("fwd_gluon", gluon), ("bwd_gluon", gluon), ("fwd_gluon", fwd_gluon),
                     ("bwd_gluon", bwd_gluon)):
        if val is not _UNSET:
            if val not in (None, True, False):
                raise ValueError(f"{key} must be None, True or False, got {val!r}")
            _OPTIONS[key] = val


def _smem_bytes(kind: str, bm: int, bn: int, stages: int, block_d: int, esize: int) -> int:
    """Shared memory a config needs, roughly: resident tiles + pipelined tiles + one score tile."""
    if kind == "fwd":
        return (bm * block_d + stages * 2 * bn * block_d + bm * bn) * esize
    if kind in ("dkdv", "bwd"):  # the K/V tile stays, query tiles stream
        return (2 * bn * block_d + stages * 2 * bm * block_d + 2 * bm * bn) * esize
    return (2 * bm * block_d + stages * 2 * bn * block_d + bm * bn) * esize  # dq


def _fit(kind, cfg, block_d, esize, limit):
    """Fewer pipeline stages, then smaller tiles, until the config fits `limit` bytes (fp32 inputs
    need twice the shared memory of the 16-bit configs the table is tuned for)."""
    bm, bn, w, s = cfg
    while _smem_bytes(kind, bm, bn, s, block_d, esize) > limit:
        if s > 1:
            s -= 1
        elif max(bm, bn) > 16:
            if bm >= bn:
                bm //= 2
            else:
                bn //= 2
            w = 4 if bm * bn <= 64 * 64 else w
        else:
            break
    return bm, bn, w, s


def _device_index(device: torch.device) -> int:
    """The CUDA device index the cached table lookups are keyed by ("cuda" alone: the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _table_config(kind: str, device_index: int, head_dim: int, sparse: bool, causal: bool, esize: int,
                  short: bool):
    """The table's config for one case, fitted to the device's shared memory. Cached: the device
    query behind it costs far more host time than a short kernel runs."""
    major, _ = torch.cuda.get_device_capability(device_index)
    table = _TABLES["hopper" if major == 9 else "default"]
    rows = table[kind]
    for variant, wanted in ((f"{kind}_short", short), (f"{kind}_sparse", sparse)):
        if wanted and variant in table:
            rows = table[variant]
    cfg = next(((c if causal else nc) for max_d, c, nc in rows if head_dim <= max_d),
               rows[-1][1] if causal else rows[-1][2])
    limit = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return _fit(kind, cfg, _block_d(head_dim), esize, int(limit * 0.9))


def _launch_config(kind: str, device: torch.device, head_dim: int, block_mask=None, *, causal: bool = True,
                   dtype: torch.dtype = torch.bfloat16, seq_k: int | None = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). seq_k: rows of at most _SHORT_SEQ keys use the
    "<kind>_short" table where there is one (few K tiles per program favour smaller tiles)."""
    if kind in _OVERRIDE:
        bm, bn, w, s = _OVERRIDE[kind]
    elif device.type != "cuda":
        bm, bn, w, s = _INTERP
    else:
        index = _device_index(device)
        short = seq_k is not None and seq_k <= _SHORT_SEQ
        bm, bn, w, s = _table_config(kind, index, head_dim, block_mask is not None, bool(causal),
                                     _ELEMENT_SIZE[dtype], short)
    if block_mask is not None:  # kernel tiles must subdivide the mask's blocks
        bm = min(bm, block_mask.block_m)
        bn = min(bn, block_mask.block_n)
    return bm, bn, w, s


_ELEMENT_SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


# --------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype, fp32_precision: str | None) -> str:
    if dtype != torch.float32:
        return "ieee"  # fp16/bf16 operands: the setting only matters for fp32 x fp32 dots
    if fp32_precision is None:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    if fp32_precision not in ("tf32", "ieee"):
        raise ValueError(f"fp32_precision must be 'tf32' or 'ieee', got {fp32_precision!r}")
    return fp32_precision


def _mask_args(block_mask, device, rows: bool, causal: bool):
    """(count, idx, split, stride_head, stride_row, MASK_BM, MASK_BN) for the kernels' SPARSE path.

    split: per row, how many leading kept blocks need no element mask (rows=True); per column, how
    many leading kept blocks cross the causal diagonal (rows=False).
    """
    if block_mask is None:
        dummy = _dummy_index(device)
        return dummy, dummy, dummy, 0, 0, 16, 16
    row_count, row_idx, col_count, col_idx = block_mask.lists(device)
    row_full, col_masked = block_mask.split_counts(device, causal)
    count, idx, split = (row_count, row_idx, row_full) if rows else (col_count, col_idx, col_masked)
    stride_h = count.stride(0) if count.shape[0] > 1 else 0
    if idx.shape[0] > 1:
        assert idx.stride(0) == count.shape[1] * idx.stride(1)
    return count, idx, split, stride_h, idx.stride(1), block_mask.block_m, block_mask.block_n


_DUMMIES: dict = {}


def _dummy_index(device: torch.device) -> torch.Tensor:
    """The (never read) index arguments of a dense launch: one small tensor per device, made once
    (a fresh one per call cost an allocation and a fill kernel on every launch)."""
    t = _DUMMIES.get(device)
    if t is None:
        t = _DUMMIES[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


def _check_tiles(bm, bn, block_mask):
    if block_mask is not None and (block_mask.block_m % bm or block_mask.block_n % bn):
        raise ValueError(f"block mask blocks {block_mask.block_m}x{block_mask.block_n} are not multiples of "
                         f"the kernel tiles {bm}x{bn}; build the mask with block sizes that are multiples of 16")


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """Output buffers (tests replace this with a NaN-filled allocator to catch unwritten elements)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _empty(shape, device) -> torch.Tensor:
    return torch.empty(shape, device=device, dtype=torch.float32)


def _tma_ok(*tensors) -> bool:
    """TMA descriptors need 16-byte aligned base addresses and row strides (and unit last stride)."""
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _use_tma(kind: str, *tensors) -> bool:
    want = _OPTIONS[f"{kind}_tma"]
    if not _HAS_TMA or want is False:
        return False
    dev = tensors[0].device
    if want is None and (not _TMA_AUTO or dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] < 9):
        return False
    if not _tma_ok(*tensors):
        return False
    if dev.type == "cuda":
        _ensure_allocator()
    return True


def _tma_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    """Device-side descriptors are written to a global scratch buffer that Triton asks an allocator
    for. The allocator is per thread (a ContextVar; autograd runs the backward on its own thread),
    so it is set before each launch, and only where the caller has not set one of their own."""
    try:
        from triton.runtime import _allocation
        if _allocation._allocator.get() is not _allocation._NULL_ALLOCATOR:
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_tma_scratch)


# Profiling knob for scripts/kernel_lab.py, never for training: 1 = atomic dQ adds (the real
# kernel); 0 = no dQ at all and 2 = plain racy stores, to time what the dQ product and its atomics cost.
_PROFILE_DQ_MODE = 1
_RECORD: dict | None = None  # kernel kind -> compiled kernel of the last launch (scripts/kernel_lab.py)


def _record(kind: str, handle) -> None:
    if _RECORD is not None:
        _RECORD[kind] = handle


@functools.cache
def _gluon_rows(device_index: int, kind: str, causal: bool) -> dict:
    """{head dim: config or None} of the Hopper table's Gluon rows for kind ("fwd_gluon",
    "fwd_gluon_short" or "bwd_gluon"); {} off Hopper."""
    if torch.cuda.get_device_capability(device_index)[0] != 9:
        return {}
    return {d: (c if causal else nc) for d, c, nc in _TABLES["hopper"][kind]}


def _gluon_rows_for(q, kind: str, causal, block_mask, head_dims) -> dict | None:
    """The Gluon rows that apply to this call, or None where no Gluon kernel may run: switched off,
    no Gluon, a block mask the kernel does not take (blocks of other than a multiple of 128 (forward) /
    64 (backward) query rows by a multiple of 128 keys), a set_launch_config override, not CUDA,
    not fp16/bf16, or a head dim the kernel is not built for. kind "fwd_gluon" / "bwd_gluon" is the
    option's name; its first three letters are the set_launch_config kind that overrides it."""
    tile_m = 64 if kind == "bwd_gluon" else 128  # the kernels' query and key tiles
    mask_ok = block_mask is None or (block_mask.block_m % tile_m == 0 and block_mask.block_n % 128 == 0)
    if (_OPTIONS[kind] is False or not _gluon.HAVE_GLUON or not mask_ok
            or kind[:3] in _OVERRIDE or q.device.type != "cuda"
            or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in head_dims):
        return None
    return _gluon_rows(_device_index(q.device), kind, bool(causal))


def _gluon_fwd_config(q, k, v, causal, block_mask):
    """The Gluon forward's (BLOCK_N, STAGES, registers) for this call, or None for the Triton forward."""
    rows = _gluon_rows_for(q, "fwd_gluon", causal, block_mask, _gluon.HEAD_DIMS)
    row = rows.get(q.shape[-1]) if rows else None  # (minimum keys, BLOCK_N, STAGES, registers)
    if row is None:
        return None
    if not _OPTIONS["fwd_gluon"] and k.shape[1] < row[0]:
        return None
    index = _device_index(q.device)
    if block_mask is not None:
        short = _gluon_rows(index, "fwd_gluon_sparse_short", bool(causal)).get(q.shape[-1])
        if short is not None and _sparse_key_blocks_per_row(block_mask) < short[0]:
            row = (row[0],) + short[1:] + row[3:]
    else:
        short = _gluon_rows(index, "fwd_gluon_short", bool(causal)).get(q.shape[-1])
        if short is not None and k.shape[1] <= short[0]:
            row = (row[0], short[1]) + row[2:]
    return row[1:] if _tma_ok(q, k, v) else None


def _gluon_bwd_config(q, k, v, do, causal, block_mask):
    """The Gluon backward's (STAGES, registers) for this call, or None for the Triton fused one."""
    rows = _gluon_rows_for(q, "bwd_gluon", causal, block_mask, _gluon.BWD_HEAD_DIMS)
    row = rows.get(q.shape[-1]) if rows else None  # (minimum keys, STAGES, registers)
    if row is None:
        return None
    if not _OPTIONS["bwd_gluon"]:
        if block_mask is None and k.shape[1] < row[0]:
            return None
        if (block_mask is not None and _sparse_tiles_per_program(block_mask) < _GLUON_SPARSE_MIN_TILES
                and _sparse_group(block_mask, q.shape[-1]) == 1):
            return None
    return row[1:] if _tma_ok(q, k, v, do) else None


# Block-sparse: the Gluon backward (128 keys per program, one program per SM) is faster where its
# programs see enough query blocks of 64 rows to amortise their start (K/V loads, barrier set-up) - on
# an H200: 1.17-1.37x the Triton one at 16 blocks per program (local / BigBird, 16k and 64k keys),
# 1.05x at 7.6-8, 0.92-0.93x at 4 (docs/benchmarks.md 2b). The threshold lies between the last two.
# Head dim 128 (query-major): forward+backward 1.02-1.04x at 7.9 blocks per program, 1.01-1.07x from 15.6,
# level at 4 (docs/benchmarks.md 1l). Head dim 64 with 128-row mask blocks no longer uses this threshold:
# below it, programs run several key blocks (_sparse_group), 1.05x the Triton backward at 4 query blocks
# per key block (docs/benchmarks.md 2f).
_GLUON_SPARSE_MIN_TILES = 6


def _column_order(block_mask, q, k, block_n, group=1):
    """The launch order of a backward's programs of `group` key columns of block_n keys
    (BlockMask.column_order), or None: dense, or a mask without heavy key blocks (the natural order is
    the same), or switched off (set_kernel_options(sparse_order=False))."""
    if block_mask is None or not _OPTIONS["sparse_order"]:
        return None
    B, _, H, _ = q.shape
    n_columns = triton.cdiv(k.shape[1], block_n)
    return block_mask.column_order(q.device, B * H, H, n_columns, block_mask.block_n // block_n, group)


# Block-sparse at head dim 64 where key blocks keep few query blocks: each Gluon backward program runs
# several key blocks of 128 in turn (flash_gluon._gl_bwd_grouped_kernel), about _GLUON_SPARSE_GROUP_TILES
# query blocks of 64 in all, so that the next key block's loads overlap the last one's steps. Backward
# alone on an H200 against one key block per program (docs/benchmarks.md 2f): 1.09-1.12x at 4 query
# blocks per key block (G = 2-8), 1.06-1.07x at 7.9 (G = 2-8), 1.03-1.07x at 16 with G = 2 and
# 0.88-0.96x with G = 8 there. Masks of 64-row blocks keep one key block per program (see
# _bwd_consumer_grouped).
_GLUON_SPARSE_GROUP_TILES = 32


def _sparse_group(block_mask, head_dim: int) -> int:
    """How many 128-key blocks one Gluon backward program runs for this mask (1 = one, _gl_bwd_kernel):
    set_kernel_options(sparse_group=) or about _GLUON_SPARSE_GROUP_TILES query blocks per program."""
    if block_mask is None or head_dim != 64 or block_mask.block_n % 128 or block_mask.block_m % 128:
        return 1
    if _OPTIONS["sparse_group"] is not None:
        return _OPTIONS["sparse_group"]
    tiles = _sparse_tiles_per_program(block_mask)
    return max(1, min(8, round(_GLUON_SPARSE_GROUP_TILES / max(tiles, 1.0))))


def _sparse_key_blocks_per_row(block_mask) -> float:
    """Mean number of 128-key blocks a mask row keeps (the Gluon forward's steps per tile)."""
    return block_mask.nnz / (block_mask.n_heads * block_mask.n_blocks_m) * block_mask.block_n / 128


def _sparse_tiles_per_program(block_mask) -> float:
    """Mean number of 64-row query blocks a 128-key program of the Gluon backward runs for this mask."""
    return block_mask.nnz / (block_mask.n_heads * block_mask.n_blocks_n) * block_mask.block_m / 64


def _flash_fwd(q, k, v, causal, sm_scale, block_mask, dot_prec):
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    o = _empty_like(q)
    lse = _empty((B, H, Nq), q.device)
    gluon_cfg = _gluon_fwd_config(q, k, v, causal, block_mask)
    if gluon_cfg is not None:
        sparse = _mask_args(block_mask, q.device, True, causal) if block_mask is not None else None
        _record("fwd", _gluon.gluon_fwd(q, k, v, o, lse, causal, sm_scale * LOG2E, gluon_cfg, sparse=sparse))
        return o, lse
    bm, bn, w, s = _launch_config("fwd", q.device, D, block_mask, causal=causal, dtype=q.dtype, seq_k=Nk)
    _check_tiles(bm, bn, block_mask)
    count, idx, split, smh, smr, mbm, mbn = _mask_args(block_mask, q.device, True, causal)
    grid = (triton.cdiv(Nq, bm), B * H)
    h = _fwd_kernel[grid](
        q, k, v, o, lse, count, idx, split,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        smh, smr, H, Nq, Nk, sm_scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=bm, BLOCK_N=bn,
        CAUSAL=causal, SPARSE=block_mask is not None, MASK_BM=mbm, MASK_BN=mbn, DOT_PREC=dot_prec,
        USE_TMA=_use_tma("fwd", q, k, v, o), num_warps=w, num_stages=s)
    _record("fwd", h)
    return o, lse


def _convert_dq(dqa, dq, H, Nq, sm_scale, D, BLOCK_D):
    conv_m = 64 if dq.device.type == "cuda" else 128
    _bwd_dq_convert[(triton.cdiv(Nq, conv_m), dq.shape[0] * H)](
        dqa, dq, dq.stride(0), dq.stride(1), dq.stride(2), H, Nq, sm_scale,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=conv_m)
    return dq


def _deterministic_default(device: torch.device, head_dim: int, causal: bool, gluon: bool) -> bool:
    """deterministic=None: the two-kernel backward when torch asks for deterministic algorithms;
    else the fused one where the Gluon backward runs (`gluon`: it measured faster than both Triton
    backwards wherever the table enables it, also at head dim 128 non-causal, where the table marks
    the deterministic Triton one faster than the fused Triton one); else whichever backward the table
    marks faster for this arch, head dim and causal flag."""
    if torch.are_deterministic_algorithms_enabled():
        return True
    if _OPTIONS["bwd_fused"] is not None:
        return not _OPTIONS["bwd_fused"]
    if device.type != "cuda":
        return False
    return not (gluon or _table_fused(_device_index(device), head_dim, bool(causal)))


@functools.cache
def _table_fused(device_index: int, head_dim: int, causal: bool) -> bool:
    major, _ = torch.cuda.get_device_capability(device_index)
    rows = _TABLES["hopper" if major == 9 else "default"]["bwd_fused"]
    return next(((c if causal else nc) for max_d, c, nc in rows if head_dim <= max_d), True)


def _flash_bwd(do, q, k, v, o, lse, causal, sm_scale, block_mask, dot_prec, *, deterministic=None):
    """(dq, dk, dv). deterministic=True: the two-kernel bitwise-reproducible backward; False: the
    fused one (atomic dQ); None: see _deterministic_default."""
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    if do.stride(-1) != 1:
        do = do.contiguous()
    # the Gluon backward's config (None: a Triton backward), looked up once per call
    gluon_cfg = None if deterministic else _gluon_bwd_config(q, k, v, do, causal, block_mask)
    if deterministic is None:
        deterministic = _deterministic_default(q.device, D, causal, gluon_cfg is not None)
    fused = not deterministic
    BLOCK_D = _block_d(D)
    delta = _empty(lse.shape, lse.device)
    # fp32 dQ accumulator (B, H, Nq, D), zeroed by the preprocess kernel (as FlashAttention-2's)
    dqa = _empty((B, H, Nq, D), q.device) if fused else delta
    pre_m = 64 if q.device.type == "cuda" else 128
    _bwd_preprocess[(triton.cdiv(Nq, pre_m), B * H)](
        o, do, delta, dqa, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, Nq, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=pre_m, ZERO_DQA=fused)
    dq = _empty_like(q)
    dk = _empty_like(k)
    dv = _empty_like(v)
    qk_scale = sm_scale * LOG2E
    sparse = block_mask is not None

    if fused and gluon_cfg is not None:
        lists = _mask_args(block_mask, q.device, False, causal) if sparse else None
        group = _sparse_group(block_mask, D)
        order = _column_order(block_mask, q, k, 128, group)
        _record("bwd", _gluon.gluon_bwd(q, k, v, do, dk, dv, lse, delta, dqa, causal, qk_scale, sm_scale,
                                        gluon_cfg, lists, order, group))
        return _convert_dq(dqa, dq, H, Nq, sm_scale, D, BLOCK_D), dk, dv

    kind = "bwd" if fused else "dkdv"
    bm, bn, w, s = _launch_config(kind, q.device, D, block_mask, causal=causal, dtype=q.dtype)
    _check_tiles(bm, bn, block_mask)
    count, idx, split, smh, smc, mbm, mbn = _mask_args(block_mask, q.device, False, causal)
    order = _column_order(block_mask, q, k, bn)
    h = _bwd_dkdv_kernel[(triton.cdiv(Nk, bn), B * H)](
        q, k, v, do, dk, dv, lse, delta, dqa, count, idx, split, count if order is None else order,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        smh, smc, H, Nq, Nk, qk_scale, sm_scale,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, SPARSE=sparse,
        MASK_BM=mbm, MASK_BN=mbn, DOT_PREC=dot_prec, FUSED_DQ=_PROFILE_DQ_MODE if fused else 0,
        USE_TMA=fused and _use_tma("bwd", q, do), ORDERED=order is not None, num_warps=w, num_stages=s)
    _record(kind, h)

    if fused:
        return _convert_dq(dqa, dq, H, Nq, sm_scale, D, BLOCK_D), dk, dv

    bm, bn, w, s = _launch_config("dq", q.device, D, block_mask, causal=causal, dtype=q.dtype)
    _check_tiles(bm, bn, block_mask)
    count, idx, split, smh, smr, mbm, mbn = _mask_args(block_mask, q.device, True, causal)
    h = _bwd_dq_kernel[(triton.cdiv(Nq, bm), B * H)](
        q, k, v, do, dq, lse, delta, count, idx, split,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        smh, smr, H, Nq, Nk, qk_scale, sm_scale,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, SPARSE=sparse,
        MASK_BM=mbm, MASK_BN=mbn, DOT_PREC=dot_prec, num_warps=w, num_stages=s)
    _record("dq", h)
    return dq, dk, dv


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


class _FlashAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, block_mask, dot_prec, deterministic):
        o, lse = _flash_fwd(q, k, v, causal, sm_scale, block_mask, dot_prec)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale, ctx.block_mask, ctx.dot_prec = causal, sm_scale, block_mask, dot_prec
        ctx.deterministic = deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale, ctx.block_mask, ctx.dot_prec,
                                deterministic=ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate(q, k, v, causal, softmax_scale, block_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must have rank 4 (batch, seq, heads, head_dim), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"flash_attention: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                        "cast them to the same dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v are on different devices ({q.device}, {k.device}, "
                         f"{v.device}); move them to one device")
    B, Nq, H, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[2] != H or v.shape[2] != H:
        raise ValueError(f"flash_attention: batch and head counts must match: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)} (layout (batch, seq, heads, head_dim))")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"flash_attention: head_dim must match: q {D}, k {k.shape[3]}, v {v.shape[3]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"flash_attention: k and v must have the same sequence length, got {k.shape[1]} and "
                         f"{v.shape[1]}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head_dim {D} is larger than the supported {MAX_HEAD_DIM}; use more "
                         "heads of a smaller head_dim")
    if Nq == 0 or k.shape[1] == 0 or B == 0 or H == 0 or D == 0:
        raise ValueError(f"flash_attention: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if softmax_scale is not None and not math.isfinite(float(softmax_scale)):
        raise ValueError(f"flash_attention: softmax_scale must be finite, got {softmax_scale}")
    if q.device.type == "cpu" and not _INTERPRET:
        raise ValueError("flash_attention: got CPU tensors but the Triton kernels are compiled for a GPU; move "
                         "q, k, v to CUDA, or set TRITON_INTERPRET=1 before Python starts to run the kernels "
                         "through Triton's (slow) interpreter")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"flash_attention: unsupported device {q.device}; use a CUDA GPU")
    if block_mask is not None:
        block_mask.check(Nq, k.shape[1], H, causal=bool(causal))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None, block_mask=None,
                    fp32_precision: str | None = None, deterministic: bool | None = None) -> torch.Tensor:
    """Exact attention softmax(q k^T * softmax_scale) v without materialising the scores.

    q: (B, Nq, H, D); k, v: (B, Nk, H, D) with the same B, H, D (D <= 256) and dtype (fp16, bf16
    or fp32); returns (B, Nq, H, D) in that dtype. Differentiable in q, k and v. Inputs may be
    strided views (e.g. of a fused (B, N, 3, H, D) projection) as long as the last dim is
    contiguous; they are not copied.
    causal: bottom-right aligned when Nq != Nk (query i sees keys j <= i + Nk - Nq); rows that
    see no key give 0.
    softmax_scale: defaults to D ** -0.5.
    block_mask: a `kernels.BlockMask`; only the blocks it keeps are computed.
    fp32_precision: "tf32" or "ieee" for fp32 inputs (default: follows
    torch.get_float32_matmul_precision(): "highest" -> ieee, otherwise tf32).
    deterministic: backward variant. False: the fused backward (one pass per K/V block that also
    adds dQ into an fp32 accumulator with atomics; fewer matrix products, but the order of the
    additions, hence dQ's last bits, can change between runs). True: dK/dV and dQ in two kernels
    that recompute the scores, bitwise reproducible. None (default): True when
    torch.use_deterministic_algorithms(True) is on; otherwise whichever of the two the launch
    table marks faster for this GPU, head dim and causal flag (on Hopper the fused one, except
    head dims 65-128 without causal masking, where the two kernels measured faster).
    """
    _validate(q, k, v, causal, softmax_scale, block_mask)
    # fp32 with no fp32_precision: the op reads torch.get_float32_matmul_precision() when it runs
    auto = q.dtype == torch.float32 and fp32_precision is None
    dot_prec = "auto" if auto else _dot_precision(q.dtype, fp32_precision)
    sm_scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"flash_attention: deterministic must be True, False or None, got {deterministic!r}")
    # Eager: an autograd.Function over the launch code; under torch.compile the torch.library ops
    # (kernels/ops.py), which dynamo traces into the surrounding graph (fake shapes, no graph break).
    return _ops.flash_attn(q, k, v, bool(causal), sm_scale, block_mask, dot_prec, deterministic)


from . import flash_gluon as _gluon  # the Hopper forward (imports nothing from this module)
from . import ops as _ops  # last: ops.py reads _flash_fwd / _flash_bwd from this module
