"""Block-sparse FlashAttention (the same Triton kernels, iterating over kept blocks only) against the
float64 reference attention with the block mask expanded to its element mask."""
import longctx.kernels.flash as flash_mod
import pytest
import torch
from longctx.kernels import flash_attention

from longctx import kernels
from tests.kernels.test_flash import DEVICE, poison_outputs, run_case  # noqa: F401 (autouse fixture)

BLOCK = 32  # small mask blocks keep the interpreter fast and give many blocks at small N

BUILDERS = {
    "local": lambda n, causal, **kw: kernels.local_mask(n, window_blocks=1, causal=causal, **kw),
    "strided": lambda n, causal, **kw: kernels.strided_mask(n, stride=2, causal=causal, **kw),
    "fixed": lambda n, causal, **kw: kernels.fixed_mask(n, stride=2, summary=1, causal=causal, **kw),
    "butterfly": lambda n, causal, **kw: kernels.butterfly_mask(n, causal=causal, **kw),
    "bigbird": lambda n, causal, **kw: kernels.bigbird_mask(n, window_blocks=1, global_blocks=1, random_blocks=1,
                                                           seed=7, causal=causal, **kw),
    "longformer": lambda n, causal, **kw: kernels.longformer_mask(n, window_blocks=1, global_tokens=[0, 70],
                                                                 causal=causal, **kw),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", sorted(BUILDERS))
def test_each_layout_matches_reference(layout, causal):
    n = 150  # not a multiple of the block
    mask = BUILDERS[layout](n, causal, block_m=BLOCK, block_n=BLOCK)
    assert 0 < mask.density < 1 or layout == "bigbird"
    run_case(2, n, n, 2, 32, causal, torch.float32, block_mask=mask)


@pytest.mark.parametrize("variant", ["deterministic", "tma"])
def test_backward_variants_block_sparse(variant, monkeypatch):
    """The default fused backward runs in every test above; the two-kernel deterministic backward
    and the TMA-descriptor loads get a per-head causal layout with partial blocks."""
    if variant == "tma":
        monkeypatch.setattr(flash_mod, "_OPTIONS", {**flash_mod._OPTIONS, "fwd_tma": True, "bwd_tma": True})
    n, heads = 150, 2
    mask = kernels.bigbird_mask(n, window_blocks=1, global_blocks=1, random_blocks=1, seed=3, n_heads=heads,
                                block_m=BLOCK, block_n=BLOCK, causal=True)
    run_case(1, n, n, heads, 32, True, torch.float32, block_mask=mask,
             deterministic=variant == "deterministic")


@pytest.mark.parametrize("deterministic", [False, True])
def test_heavy_key_blocks_first(deterministic, monkeypatch):
    """A global key block (kept by every query block) is heavy: the backward starts its programs first
    (BlockMask.column_order). Same gradients as the float64 reference, and the same dK, dV bitwise as
    key blocks in order (each program forms its key block's dK, dV alone)."""
    n, heads = 256, 2
    mask = kernels.bigbird_mask(n, window_blocks=0, global_blocks=1, random_blocks=1, seed=5, n_heads=heads,
                                block_m=BLOCK, block_n=BLOCK, causal=True)
    assert mask.column_order("cpu", 2 * heads, heads, n // BLOCK) is not None
    _, ordered = run_case(2, n, n, heads, 16, True, torch.float32, block_mask=mask,
                          deterministic=deterministic)
    monkeypatch.setattr(flash_mod, "_OPTIONS", {**flash_mod._OPTIONS, "sparse_order": False})
    _, natural = run_case(2, n, n, heads, 16, True, torch.float32, block_mask=mask,
                          deterministic=deterministic)
    assert torch.equal(ordered[1], natural[1]) and torch.equal(ordered[2], natural[2])
    if deterministic:
        assert torch.equal(ordered[0], natural[0])


def test_sparse_group_rule_and_option(monkeypatch):
    """How many 128-key blocks one Gluon backward program runs (flash._sparse_group): about 32 query
    blocks of 64 per program, at most 8 key blocks; one for head dim 128, masks of 64-row blocks and
    dense calls; set_kernel_options(sparse_group=) overrides the rule and checks its value."""
    # 4 query blocks of 64 per key block, 34 (the wide one)
    narrow = kernels.local_mask(4096, window_blocks=1, block_m=128, block_n=128, causal=True)
    wide = kernels.local_mask(4096, window_blocks=16, block_m=128, block_n=128, causal=True)
    rows64 = kernels.local_mask(4096, window_blocks=2, block_m=64, block_n=128, causal=True)
    assert round(flash_mod._sparse_tiles_per_program(narrow)) == 4
    assert flash_mod._sparse_group(narrow, 64) == 8 and flash_mod._sparse_group(wide, 64) == 1
    assert flash_mod._sparse_group(narrow, 128) == 1 and flash_mod._sparse_group(rows64, 64) == 1
    assert flash_mod._sparse_group(None, 64) == 1
    monkeypatch.setattr(flash_mod, "_OPTIONS", dict(flash_mod._OPTIONS))
    flash_mod.set_kernel_options(sparse_group=3)
    assert flash_mod._sparse_group(wide, 64) == 3 and flash_mod._sparse_group(rows64, 64) == 1
    flash_mod.set_kernel_options(sparse_group=None)
    assert flash_mod._sparse_group(narrow, 64) == 8
    for bad in (0, 2.0, True, "2"):
        with pytest.raises(ValueError, match="sparse_group must be None or an int >= 1"):
            flash_mod.set_kernel_options(sparse_group=bad)


def test_per_head_layouts():
    n, heads = 140, 3
    mask = kernels.bigbird_mask(n, window_blocks=0, global_blocks=1, random_blocks=1, seed=1, n_heads=heads,
                                block_m=BLOCK, block_n=BLOCK, causal=True)
    assert mask.layout.shape[0] == heads and not torch.equal(mask.layout[0], mask.layout[1])
    run_case(1, n, n, heads, 16, True, torch.float32, block_mask=mask)


def test_fp16_block_sparse():
    mask = kernels.local_mask(200, window_blocks=2, block_m=BLOCK, block_n=BLOCK, causal=True)
    run_case(2, 200, 200, 2, 64, True, torch.float16, block_mask=mask)


def test_cross_lengths_block_sparse():
    nq, nk = 70, 170
    mask = kernels.local_mask(nq, nk, window_blocks=1, block_m=BLOCK, block_n=BLOCK, causal=True)
    run_case(2, nq, nk, 2, 32, True, torch.float32, block_mask=mask)


def test_empty_rows_give_zero_output_and_gradients():
    n = 128
    layout = torch.ones(1, n // BLOCK, n // BLOCK, dtype=torch.bool)
    layout[0, 1, :] = False  # query block 1 keeps no key block
    mask = kernels.BlockMask(layout, block_m=BLOCK, block_n=BLOCK, seq_q=n, seq_k=n)
    out, (dq, dk, dv) = run_case(2, n, n, 2, 16, False, torch.float32, block_mask=mask)
    rows = slice(BLOCK, 2 * BLOCK)
    assert torch.equal(out[:, rows], torch.zeros_like(out[:, rows]))
    assert torch.equal(dq[:, rows], torch.zeros_like(dq[:, rows]))


@pytest.mark.parametrize("causal", [False, True])
def test_dense_layout_equals_dense_kernel_exactly(causal):
    n = 150
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, n, 2, 32, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    do = torch.randn(2, n, 2, 32, generator=gen).to(DEVICE)
    mask = kernels.dense_block_mask(n, block_m=64, block_n=64, causal=causal)
    dense_tiles = kernels.flash._launch_config("fwd", q.device, 32)[:2]
    if dense_tiles != (64, 64):
        pytest.skip(f"bitwise equality needs equal tiles; dense tiles here are {dense_tiles}")
    o1 = flash_attention(q, k, v, causal=causal)
    o2 = flash_attention(q, k, v, causal=causal, block_mask=mask)
    assert torch.equal(o1, o2)
    g1 = torch.autograd.grad(o1, (q, k, v), do)
    g2 = torch.autograd.grad(o2, (q, k, v), do)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_mask_geometry_mismatch_is_a_clear_error():
    mask = kernels.local_mask(256, window_blocks=1, block_m=BLOCK, block_n=BLOCK)
    q = torch.randn(1, 128, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="block mask"):
        flash_attention(q, q, q, block_mask=mask)


def test_causal_mask_used_without_causal_is_refused():
    mask = kernels.local_mask(64, window_blocks=1, block_m=BLOCK, block_n=BLOCK, causal=True)
    q = torch.randn(1, 64, 2, 16, device=DEVICE)
    with pytest.raises(ValueError):
        flash_attention(q, q, q, causal=False, block_mask=mask)


def test_non_causal_mask_in_a_causal_call():
    """A layout built without causal=True still composes with causal=True at call time."""
    mask = kernels.local_mask(130, window_blocks=1, block_m=BLOCK, block_n=BLOCK, causal=False)
    run_case(2, 130, 130, 2, 16, True, torch.float32, block_mask=mask)
