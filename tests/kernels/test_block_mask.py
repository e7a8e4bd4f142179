"""Block-sparse layouts (kernels/block_mask.py): pure PyTorch, no Triton, fast."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from longctx.kernels.block_mask import (
    BlockMask,
    bigbird_mask,
    build_block_mask_from_config,
    butterfly_mask,
    dense_block_mask,
    fixed_mask,
    from_block_fn,
    from_dense_mask,
    local_mask,
    longformer_mask,
    save_layout_png,
    strided_mask,
)

# (seq_q, seq_k, block_m, block_n): square, ragged, bm != bn, seq_q != seq_k both ways
GEOMETRIES = [
    (512, 512, 64, 64),
    (1000, 1000, 128, 128),
    (300, 300, 32, 64),
    (256, 640, 64, 64),
    (640, 256, 64, 32),
    (200, 333, 16, 32),
]

BUILDERS = {
    "dense": lambda sq, sk, bm, bn, c: dense_block_mask(sq, sk, block_m=bm, block_n=bn, causal=c),
    "local": lambda sq, sk, bm, bn, c: local_mask(sq, sk, window_blocks=1, block_m=bm, block_n=bn,
                                                  causal=c),
    "strided": lambda sq, sk, bm, bn, c: strided_mask(sq, sk, stride=3, block_m=bm, block_n=bn,
                                                      causal=c),
    "fixed": lambda sq, sk, bm, bn, c: fixed_mask(sq, sk, stride=4, summary=2, block_m=bm,
                                                  block_n=bn, causal=c),
    "butterfly": lambda sq, sk, bm, bn, c: butterfly_mask(sq, sk, block_m=bm, block_n=bn, causal=c),
    "bigbird": lambda sq, sk, bm, bn, c: bigbird_mask(sq, sk, window_blocks=1, global_blocks=1,
                                                      random_blocks=2, seed=3, block_m=bm,
                                                      block_n=bn, causal=c, n_heads=3),
    "longformer": lambda sq, sk, bm, bn, c: longformer_mask(sq, sk, window_blocks=1,
                                                            global_tokens=[0, sk // 2], block_m=bm,
                                                            block_n=bn, causal=c),
}


def _square(builder, n, causal=False, block=64):
    return BUILDERS[builder](n * block, n * block, block, block, causal)


def _rebuild(count, idx, n_cols):
    """Layout from (count, idx) lists; also checks ascending order and padding."""
    hm, rows, width = idx.shape
    out = torch.zeros(hm, rows, n_cols, dtype=torch.bool)
    for h in range(hm):
        for r in range(rows):
            c = int(count[h, r])
            kept = idx[h, r, :c].tolist()
            assert kept == sorted(set(kept)), "indices must be strictly ascending"
            pad = idx[h, r, c:].tolist()
            assert all(p == (kept[-1] if kept else 0) for p in pad), "padding = last valid or 0"
            out[h, r, kept] = True
    return out


def _block_above_diag_by_elements(sq, sk, bm, bn):
    """Blocks with no causally visible element, computed element by element."""
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    vis = j <= i + (sk - sq)
    nmb, nnb = math.ceil(sq / bm), math.ceil(sk / bn)
    vis = torch.nn.functional.pad(vis, (0, nnb * bn - sk, 0, nmb * bm - sq))
    return ~vis.view(nmb, bm, nnb, bn).any(3).any(1)


# ------------------------------------------------------------------ structure of every mask
@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_lists_match_layout_and_causal_composition(name, geo):
    sq, sk, bm, bn = geo
    full = BUILDERS[name](sq, sk, bm, bn, False)
    causal = BUILDERS[name](sq, sk, bm, bn, True)
    nmb, nnb = math.ceil(sq / bm), math.ceil(sk / bn)
    for m in (full, causal):
        assert m.shape[1:] == (nmb, nnb) and m.layout.dtype == torch.bool
        assert (m.block_m, m.block_n, m.seq_q, m.seq_k) == (bm, bn, sq, sk)
        rc, ri, cc, ci = m.lists("cpu")
        for t in (rc, ri, cc, ci):
            assert t.dtype == torch.int32 and t.is_contiguous()
        assert rc.shape == (m.n_heads, nmb) and cc.shape == (m.n_heads, nnb)
        assert ri.shape == (m.n_heads, nmb, max(1, int(rc.max())))
        assert ci.shape == (m.n_heads, nnb, max(1, int(cc.max())))
        assert torch.equal(_rebuild(rc, ri, nnb), m.layout)
        assert torch.equal(_rebuild(cc, ci, nmb).transpose(1, 2), m.layout)
        assert m.lists("cpu") is m.lists(torch.device("cpu"))  # cached
        assert m.nnz == int(m.layout.sum()) == int(rc.sum()) == int(cc.sum())
        assert m.density == pytest.approx(m.nnz / m.layout.numel())
    # causal = the non-causal layout minus exactly the blocks with no visible element
    above = _block_above_diag_by_elements(sq, sk, bm, bn)
    assert not (causal.layout & above).any()
    if name == "bigbird":  # causal draws its random blocks below the diagonal: compare without
        full = bigbird_mask(sq, sk, random_blocks=0, block_m=bm, block_n=bn, n_heads=3)
        causal = bigbird_mask(sq, sk, random_blocks=0, block_m=bm, block_n=bn, n_heads=3,
                              causal=True)
    assert torch.equal(causal.layout, full.layout & ~above)
    assert causal.causal and not full.causal
    assert torch.equal(full.as_causal().layout, causal.layout)
    # the element mask is the block expansion intersected with the causal element mask
    dense = causal.to_dense_mask(sq, sk)
    assert dense.shape == (causal.n_heads, sq, sk)
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    expanded = full.to_dense_mask()
    assert torch.equal(dense, expanded & (j <= i + sk - sq))
    assert torch.equal(from_dense_mask(expanded, bm, bn).layout, full.layout)


@pytest.mark.parametrize("name", [n for n in BUILDERS if n != "longformer"])
def test_causal_keeps_diagonal_blocks(name):
    m = _square(name, 12, causal=True)
    lay = m.layout
    n = lay.shape[1]
    assert lay[:, torch.arange(n), torch.arange(n)].all()
    assert not torch.triu(lay, diagonal=1).any()


# ------------------------------------------------------------------ documented densities
def test_dense_density():
    m = dense_block_mask(1000, block_m=64, block_n=64)
    assert m.density == 1.0 and m.causal_density == 1.0
    c = dense_block_mask(1024, block_m=64, block_n=64, causal=True)
    assert c.nnz == 16 * 17 // 2
    assert c.density == pytest.approx(17 / 32) and c.causal_density == 1.0


@pytest.mark.parametrize("n,w", [(1, 0), (10, 0), (10, 2), (16, 3), (7, 10)])
def test_local_density_and_symmetry(n, w):
    m = local_mask(n * 64, window_blocks=w, block_m=64, block_n=64)
    expected = sum(min(i + w, n - 1) - max(i - w, 0) + 1 for i in range(n))
    assert m.nnz == expected
    assert torch.equal(m.layout, m.layout.transpose(1, 2))
    c = local_mask(n * 64, window_blocks=w, block_m=64, block_n=64, causal=True)
    assert c.nnz == sum(i - max(i - w, 0) + 1 for i in range(n))
    assert c.causal_density == pytest.approx(c.nnz / (n * (n + 1) // 2))


def test_local_rectangular_matches_element_definition():
    # A query at position q belongs to pattern row (q + seq_k - seq_q) // block_n.
    for sq, sk, bm, bn, w in [(256, 640, 64, 64, 1), (640, 256, 64, 32, 0), (300, 300, 32, 64, 1),
                              (200, 333, 16, 32, 2)]:
        off = sk - sq
        nnb = math.ceil(sk / bn)
        prow = ((torch.arange(sq) + off) // bn).clamp(0, nnb - 1)[:, None]
        pcol = (torch.arange(sk) // bn)[None, :]
        elem = (prow - pcol).abs() <= w
        m = local_mask(sq, sk, window_blocks=w, block_m=bm, block_n=bn)
        assert torch.equal(m.layout, from_dense_mask(elem, bm, bn).layout)


@pytest.mark.parametrize("n,s", [(12, 1), (12, 3), (13, 4), (8, 8)])
def test_strided_density(n, s):
    m = strided_mask(n * 32, stride=s, block_m=32, block_n=32)
    expected = sum(1 for i in range(n) for j in range(n) if abs(i - j) < s or j % s == s - 1)
    assert m.nnz == expected
    c = strided_mask(n * 32, stride=s, block_m=32, block_n=32, causal=True)
    # causal row i: its last `stride` blocks plus the summary columns before them
    rc = c.lists()[0][0].tolist()
    for i in range(n):
        window = set(range(max(0, i - s + 1), i + 1))
        summary = {j for j in range(i + 1) if j % s == s - 1}
        assert rc[i] == len(window | summary)


@pytest.mark.parametrize("n,s,c", [(12, 4, 1), (12, 4, 4), (10, 3, 2)])
def test_fixed_density(n, s, c):
    m = fixed_mask(n * 32, stride=s, summary=c, block_m=32, block_n=32)
    lay = m.layout[0]
    for i in range(n):
        own = set(range(i // s * s, min(n, i // s * s + s)))
        summ = {j for j in range(n) if j % s >= s - c}
        assert set(torch.nonzero(lay[i]).flatten().tolist()) == own | summ


@pytest.mark.parametrize("n", [1, 2, 8, 16, 32])
def test_butterfly_power_of_two(n):
    m = butterfly_mask(n * 16, block_m=16, block_n=16)
    lay = m.layout[0]
    assert (lay.sum(1) == 1 + int(math.log2(n))).all()
    assert torch.equal(lay, lay.T)
    assert m.density == pytest.approx((1 + math.log2(n)) / n)


@pytest.mark.parametrize("n", [3, 5, 10, 13])
def test_butterfly_non_power_of_two(n):
    lay = butterfly_mask(n * 16, block_m=16, block_n=16).layout[0]
    levels = math.ceil(math.log2(n))
    for i in range(n):
        partners = {i} | {i ^ (1 << k) for k in range(levels) if i ^ (1 << k) < n}
        assert set(torch.nonzero(lay[i]).flatten().tolist()) == partners
    assert torch.equal(lay, lay.T)


def test_bigbird_per_head_and_seeded():
    kw = dict(window_blocks=1, global_blocks=1, random_blocks=2, block_m=32, block_n=32)
    a = bigbird_mask(1024, n_heads=4, seed=7, **kw)
    b = bigbird_mask(1024, n_heads=4, seed=7, **kw)
    c = bigbird_mask(1024, n_heads=4, seed=8, **kw)
    shared = bigbird_mask(1024, seed=7, **kw)
    assert a.shape == (4, 32, 32) and shared.shape == (1, 32, 32)
    assert torch.equal(a.layout, b.layout)
    assert not torch.equal(a.layout, c.layout)
    assert len({tuple(a.layout[h].flatten().tolist()) for h in range(4)}) == 4
    assert torch.equal(a.layout[0], shared.layout[0])
    n = 32
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    base = ((i - j).abs() <= 1) | (i < 1) | (j < 1)
    for h in range(4):
        lay = a.layout[h]
        assert (lay & base).sum() == base.sum()
        extra = (lay & ~base).sum(1)
        assert (extra == torch.clamp((~base).sum(1), max=2)).all()
    # causal: random blocks are drawn below the diagonal only, so none is lost
    cz = bigbird_mask(1024, n_heads=2, seed=7, causal=True, **kw)
    cbase = base & (j <= i)
    for h in range(2):
        extra = (cz.layout[h] & ~cbase).sum(1)
        assert (extra == torch.clamp((~base & (j <= i)).sum(1), max=2)).all()


def test_longformer_global_tokens_symmetric():
    m = longformer_mask(2048, window_blocks=1, global_tokens=[0, 700, 690], block_m=64,
                        block_n=64)
    lay = m.layout[0]
    assert torch.equal(lay, lay.T)
    for blk in (0, 700 // 64):
        assert lay[blk].all() and lay[:, blk].all()
    ref = local_mask(2048, window_blocks=1, block_m=64, block_n=64).layout[0]
    ref[[0, 10]] = True
    ref[:, [0, 10]] = True
    assert torch.equal(lay, ref)
    c = longformer_mask(2048, window_blocks=1, global_tokens=[700], block_m=64, block_n=64,
                        causal=True).layout[0]
    assert c[10, :11].all() and not c[10, 11:].any() and c[10:, 10].all()


# ------------------------------------------------------------------ dense masks and functions
def test_from_dense_mask_round_trip_block_aligned():
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(3, 5, 7, generator=g) < 0.4
    dense = blocks.repeat_interleave(32, 1).repeat_interleave(16, 2)[:, :150, :100]  # ragged
    m = from_dense_mask(dense, 32, 16)
    assert m.shape == (3, 5, 7) and torch.equal(m.layout, blocks)
    assert torch.equal(m.to_dense_mask(), dense)
    # 2-D and (1, H, Nq, Nk) inputs
    assert from_dense_mask(dense[0], 32, 16).shape == (1, 5, 7)
    assert torch.equal(from_dense_mask(dense[None], 32, 16).layout, blocks)
    # causal: intersect first, then the round trip holds for a causal block-aligned mask
    i = torch.arange(150)[:, None]
    j = torch.arange(100)[None, :]
    cdense = dense & (j <= i - 50)
    cm = from_dense_mask(cdense, 32, 16, causal=True)
    assert cm.causal and torch.equal(cm.to_dense_mask(), cdense)


def test_from_dense_mask_any_element_keeps_block():
    mask = torch.zeros(100, 100, dtype=torch.bool)
    mask[70, 3] = True
    m = from_dense_mask(mask, 64, 16)
    assert m.nnz == 1 and m.layout[0, 1, 0]
    assert m.to_dense_mask()[0, 64:, :16].all()  # the whole block, not just the element


def test_from_block_fn_vectorised_and_scalar():
    def vec(q, k):
        return (q - k).abs() <= 1

    def scalar(q, k):  # not vectorisable ("and" on tensors raises) -> scalar fallback
        return q % 2 == 0 and k <= q

    a = from_block_fn(vec, 1000, block_m=64, block_n=64)
    assert torch.equal(a.layout, local_mask(1000, window_blocks=1, block_m=64, block_n=64).layout)
    b = from_block_fn(scalar, 300, 500, block_m=32, block_n=64)
    ref = torch.tensor([[q % 2 == 0 and k <= q for k in range(8)] for q in range(10)])
    assert torch.equal(b.layout[0], ref)
    heads = from_block_fn(lambda h, q, k: (q + h) % 3 == k % 3, 256, block_m=32, block_n=32,
                          n_heads=3, causal=True)
    assert heads.shape == (3, 8, 8)
    assert not torch.equal(heads.layout[0], heads.layout[1])
    assert heads.layout[1, 2, 0] and not heads.layout[1, 0, 2]


def test_empty_rows_allowed():
    lay = torch.ones(2, 4, 5, dtype=torch.bool)
    lay[0, 2] = False
    lay[1, :, 3] = False
    m = BlockMask(lay, block_m=16, block_n=16, seq_q=64, seq_k=80)
    rc, ri, cc, ci = m.lists()
    assert rc[0, 2] == 0 and (ri[0, 2] == 0).all()
    assert cc[1, 3] == 0 and (ci[1, 3] == 0).all()
    assert not m.to_dense_mask()[0, 32:48].any()
    empty = BlockMask(torch.zeros(1, 3, 3, dtype=torch.bool), block_m=16, block_n=16, seq_q=40)
    rc, ri, cc, ci = empty.lists()
    assert ri.shape == (1, 3, 1) and ci.shape == (1, 3, 1) and rc.sum() == 0
    assert empty.density == 0.0
    # seq_q > seq_k, causal: the first query blocks see no key at all
    c = dense_block_mask(256, 64, block_m=64, block_n=64, causal=True)
    assert c.lists()[0][0].tolist() == [0, 0, 0, 1]


def test_column_order_starts_heavy_key_blocks_first():
    """The backward's launch order: a permutation of every (batch * head, program column) that starts
    the key blocks keeping more than twice the mean number of query blocks, heaviest first, then the
    rest in order; None where no key block is heavy."""
    lay = torch.zeros(2, 8, 8, dtype=torch.bool)
    lay[:, :, 0] = True  # head 0 and 1: key block 0 global (8 query blocks)
    lay[:, range(8), range(8)] = True  # the diagonal (1 each)
    lay[1, 4:, 3] = True  # head 1: key block 3 keeps 5 (0 -> 4 after the diagonal's own)
    m = BlockMask(lay, block_m=16, block_n=32, seq_q=128, seq_k=256)
    bh, heads, split = 4, 2, 2  # batch 2 of 2 heads; two programs per key block
    order = m.column_order("cpu", bh, heads, 16, split)
    assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(bh * 16))
    weight = {e: int(lay[(e // 16) % heads].sum(0)[(e % 16) // split]) for e in range(bh * 16)}
    mean = sum(weight.values()) / len(weight)
    heavy = [e for e in range(bh * 16) if weight[e] > 2 * mean]
    assert set(order[:len(heavy)].tolist()) == set(heavy)
    first = [weight[e] for e in order[:len(heavy)].tolist()]
    assert first == sorted((weight[e] for e in heavy), reverse=True)
    assert order[len(heavy):].tolist() == sorted(set(range(bh * 16)) - set(heavy))
    assert {e % 16 for e in heavy} == {0, 1, 6, 7}  # key blocks 0 and 3 (head 1), both programs each
    assert m.column_order("cpu", bh, heads, 16, split) is order  # cached
    assert local_mask(512, window_blocks=2, block_m=64, block_n=64).column_order("cpu", 4, 2, 8) is None


def test_column_order_over_groups_of_key_blocks():
    """Programs of `group` consecutive key columns (the grouped Gluon backward): one entry per program,
    weighted by its columns together; the last program of a head may take fewer columns."""
    lay = torch.zeros(1, 8, 7, dtype=torch.bool)
    lay[0, range(7), range(7)] = True  # one query block per key block
    lay[0, :, 4] = True  # key block 4 global: 8
    m = BlockMask(lay, block_m=16, block_n=16, seq_q=128, seq_k=112)
    order = m.column_order("cpu", 2, 1, 7, 1, 3)  # programs {0, 1, 2}, {3, 4, 5}, {6} per head
    assert order.tolist() == [1, 4, 0, 2, 3, 5]  # program 1 weighs 1 + 8 + 1 = 10 > 2 x 28 / 6
    assert m.column_order("cpu", 2, 1, 7, 1, 1).tolist()[:2] == [4, 11]  # one column each: column 4


# ------------------------------------------------------------------ checks and errors
def test_check_errors():
    m = local_mask(4096, window_blocks=2, causal=True)
    m.check(4096, 4096, 12, 128, 128)
    m.check(4000, 4000, 1, 128, 128, causal=True)  # same block grid and diagonal: fine
    with pytest.raises(ValueError, match=r"built with block 128x128 for 4096x4096.*rebuild it with"
                                         r".*block_m=64"):
        m.check(4096, 4096, 12, 64, 64)
    with pytest.raises(ValueError, match="number of blocks"):
        m.check(8192, 8192, 12, 128, 128)
    with pytest.raises(ValueError, match="causal diagonal"):
        m.check(4000, 4096, 12, 128, 128)
    with pytest.raises(ValueError, match="causal=False"):
        m.check(4096, 4096, 12, 128, 128, causal=False)
    per_head = bigbird_mask(1024, n_heads=4)
    per_head.check(1024, 1024, 4)
    with pytest.raises(ValueError, match="12 heads"):
        per_head.check(1024, 1024, 12)
    with pytest.raises(ValueError, match="number of blocks"):
        m.to_dense_mask(1024, 1024)


@pytest.mark.parametrize("call,match", [
    (lambda: local_mask(512, window_blocks=-1), "window_blocks must be >= 0"),
    (lambda: local_mask(512, window_blocks=1.5), "window_blocks must be an integer"),
    (lambda: strided_mask(512, stride=0), "stride must be >= 1"),
    (lambda: fixed_mask(512, stride=4, summary=5), r"summary must be in \[1, 4\]"),
    (lambda: fixed_mask(512, stride=0), "stride must be >= 1"),
    (lambda: bigbird_mask(512, random_blocks=-2), "random_blocks must be >= 0"),
    (lambda: longformer_mask(512, window_blocks=1, global_tokens=[512]),
     r"global_tokens entry must be in \[0, 511\]"),
    (lambda: local_mask(0, window_blocks=1), "seq_q must be >= 1"),
    (lambda: local_mask(512, window_blocks=1, block_m=48), "block_m must be a power of two >= 16"),
    (lambda: local_mask(512, window_blocks=1, block_n=8), "block_n must be a power of two >= 16"),
    (lambda: from_dense_mask(torch.ones(64, 64), 16, 16), "mask must be a bool tensor"),
    (lambda: from_dense_mask(torch.ones(2, 2, 64, 64, dtype=torch.bool), 16, 16),
     r"mask must have shape"),
    (lambda: from_dense_mask(torch.ones(64, dtype=torch.bool), 16, 16), r"mask must have shape"),
    (lambda: BlockMask(torch.ones(1, 3, 3, dtype=torch.bool), block_m=16, block_n=16, seq_q=64),
     r"layout must have shape \(Hm, 4, 4\)"),
    (lambda: BlockMask(torch.ones(1, 4, 4), block_m=16, block_n=16, seq_q=64),
     "layout must be a bool tensor"),
    (lambda: build_block_mask_from_config({"layout": "diagonal"}, 1024, 12),
     "attention.layout must be one of"),
    (lambda: build_block_mask_from_config({"layout": "local", "block_size": 100}, 1024, 12),
     "attention.block_size must be a power of two"),
])
def test_bad_parameters(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_immutable():
    m = local_mask(512, window_blocks=1, block_m=64, block_n=64)
    with pytest.raises(AttributeError):
        m.causal = True
    m.layout[0, 0, 5] = True  # a copy: the mask does not change
    assert not m.layout[0, 0, 5]
    assert "block=64x64" in repr(m) and "density=" in repr(m) and "(1, 8, 8)" in repr(m)


def test_union_intersection():
    a = local_mask(512, window_blocks=0, block_m=64, block_n=64)
    b = strided_mask(512, stride=4, block_m=64, block_n=64)
    assert torch.equal((a | b).layout, a.layout | b.layout)
    assert torch.equal((a & b).layout, a.layout & b.layout)
    with pytest.raises(ValueError, match="different geometry"):
        a | local_mask(1024, window_blocks=0, block_m=64, block_n=64)


# ------------------------------------------------------------------ config and PNG
def test_config_file_builds_every_layout():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs/attention/block_sparse.yaml")
    assert cfg.impl == "block_sparse"
    for layout in ("local", "strided", "fixed", "butterfly", "bigbird", "longformer", "dense"):
        cfg.layout = layout
        m = build_block_mask_from_config(cfg, 2000, 12)
        assert m.causal and m.block_m == cfg.block_size and m.seq_q == 2000
        m.check(2000, 2000, 12, cfg.block_size, cfg.block_size)
    cfg.layout, cfg.per_head = "bigbird", True
    assert build_block_mask_from_config(cfg, 4096, 12).n_heads == 12


def _check_png_shows(path, layout, capture):
    """The PNG's pixel at the centre of every block is black for a kept block and white for a
    dropped one; the image has the figure's size. `capture` holds the Figure that was saved."""
    from matplotlib.image import imread

    img = imread(path)  # (H, W, 4) floats in [0, 1]
    fig = capture["fig"]
    w, h = fig.get_size_inches() * 100  # saved at dpi=100
    assert img.shape[:2] == (round(h), round(w))
    ax = fig.axes[0]
    n_mb, n_nb = layout.shape
    centres = [(j, i) for i in range(n_mb) for j in range(n_nb)]  # imshow: x = key block, y = query block
    px = ax.transData.transform(centres)  # display pixels, y from the bottom
    grey = img[..., :3].mean(-1)
    for (j, i), (x, y) in zip(centres, px):
        value = grey[round(img.shape[0] - y), int(x)]
        assert value == (0.0 if layout[i, j] else 1.0), (i, j, value, bool(layout[i, j]))


@pytest.fixture
def capture(monkeypatch):
    from matplotlib.figure import Figure

    box, real = {}, Figure.savefig

    def savefig(self, *a, **k):
        box["fig"] = self
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return box


def test_png_written(tmp_path, capture):
    m = bigbird_mask(2048, n_heads=2, block_m=64, block_n=64, causal=True)
    out = save_layout_png(m, tmp_path / "sub" / "layout.png", head=1)
    assert str(out).endswith("layout.png")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["layout.png"]  # no temp files left
    assert not torch.equal(m.layout[0], m.layout[1])  # head 1 is drawn, not head 0
    _check_png_shows(tmp_path / "sub" / "layout.png", m.layout[1], capture)
    with pytest.raises(ValueError, match=r"head must be in \[0, 1\]"):
        save_layout_png(m, tmp_path / "x.png", head=2)


def test_show_layout_cli(tmp_path, capture):
    path = Path(__file__).resolve().parents[2] / "scripts" / "show_layout.py"
    spec = importlib.util.spec_from_file_location("show_layout", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "layout.png"
    assert mod.main(["--layout", "longformer", "--seq-len", "1024", "--block-size", "64",
                     "--global-tokens", "0,500", "--out", str(out)]) == 0
    from omegaconf import OmegaConf

    window = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs/attention/block_sparse.yaml").window_blocks
    want = longformer_mask(1024, window_blocks=window, global_tokens=[0, 500], block_m=64, block_n=64, causal=True)
    _check_png_shows(out, want.layout[0], capture)
