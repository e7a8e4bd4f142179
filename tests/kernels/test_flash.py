"""The Triton FlashAttention against a float64 reference, on the CPU through Triton's interpreter.

Every case draws fresh random inputs, poisons the kernel's output buffers with NaN first (so an
element the kernel forgets to write fails), and compares the output and all three gradients.
Set LONGCTX_TEST_GPU=1 on a CUDA machine to run the same file against the compiled kernels.
"""
import os

import longctx.kernels.flash as flash_mod
import pytest
import torch
from longctx.kernels import flash_attention, reference_attention

DEVICE = "cuda" if os.environ.get("LONGCTX_TEST_GPU") == "1" and torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_like(t):
        return torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device)

    def nan_empty(shape, device):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)

    monkeypatch.setattr(flash_mod, "_empty_like", nan_like)
    monkeypatch.setattr(flash_mod, "_empty", nan_empty)


def rel_err(a, ref, floor=1e-2):
    """||a - ref|| / ||ref||, with ||ref|| floored at `floor` per element (for exactly-zero gradients)."""
    a, ref = a.double(), ref.double()
    denom = max(ref.norm().item(), floor * ref.numel() ** 0.5)
    return (a - ref).norm().item() / denom


def run_case(B, Nq, Nk, H, D, causal, dtype, scale=1.0, make=None, block_mask=None, deterministic=None):
    gen = torch.Generator().manual_seed(hash((B, Nq, Nk, H, D, causal, str(dtype))) % 2**31)
    if make is None:
        q = torch.randn(B, Nq, H, D, generator=gen) * scale
        k = torch.randn(B, Nk, H, D, generator=gen) * scale
        v = torch.randn(B, Nk, H, D, generator=gen)
        q, k, v = (t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v))
        leaves = (q, k, v)
    else:
        (q, k, v), leaves = make(gen)
    out = flash_attention(q, k, v, causal=causal, block_mask=block_mask, deterministic=deterministic)
    do = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, causal=causal, block_mask=block_mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    tol = TOL[dtype]
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out,) + grads, (ref,) + ref_grads):
        assert torch.isfinite(a).all(), f"{name} has NaN/inf (unwritten or overflowed elements)"
        err = rel_err(a, r)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
    return out, grads


NS = [1, 17, 63, 64, 65, 127, 200, 257]
DS = [16, 40, 64, 80, 128]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", NS)
def test_seqlens_fp32(n, causal):
    run_case(2, n, n, 2, DS[NS.index(n) % len(DS)], causal, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", DS)
def test_head_dims_fp32(d, causal):
    run_case(1, 65, 65, 3, d, causal, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,d", [(1, 64), (63, 40), (130, 64), (257, 128)])
def test_fp16(n, d, causal):
    run_case(2, n, n, 2, d, causal, torch.float16)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(17, 200), (200, 17), (1, 65), (64, 130)])
def test_cross_attention_lengths(nq, nk, causal):
    """Nq != Nk; causal is bottom-right aligned (query i sees keys j <= i + Nk - Nq)."""
    out, grads = run_case(2, nq, nk, 2, 32, causal, torch.float32)
    if causal and nq > nk:  # the first nq - nk query rows see no key: exactly 0, zero gradient
        assert torch.equal(out[:, : nq - nk], torch.zeros_like(out[:, : nq - nk]))
        assert torch.equal(grads[0][:, : nq - nk], torch.zeros_like(grads[0][:, : nq - nk]))


def test_causal_alignment_is_bottom_right():
    q, k, v = (torch.randn(1, n, 1, 16, device=DEVICE) for n in (3, 5, 5))
    out = flash_attention(q, k, v, causal=True)
    # the last query sees every key: equal to non-causal attention of that row alone
    full = flash_attention(q[:, -1:], k, v, causal=False)
    torch.testing.assert_close(out[:, -1:], full, rtol=1e-5, atol=1e-6)
    # the first query sees keys 0..2 only
    first = flash_attention(q[:, :1], k[:, :3], v[:, :3], causal=False)
    torch.testing.assert_close(out[:, :1], first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_strided_fused_qkv_views_are_not_copied(causal, monkeypatch):
    def make(gen):
        qkv = torch.randn(2, 77, 3, 2, 40, generator=gen).to(DEVICE).requires_grad_()
        q, k, v = qkv.unbind(2)
        assert not q.is_contiguous()
        return (q, k, v), (qkv,)

    def no_copy(self, *a, **kw):
        raise AssertionError("flash_attention copied a strided input to a contiguous tensor")

    monkeypatch.setattr(torch.Tensor, "contiguous", no_copy)
    out = flash_attention(*make(torch.Generator().manual_seed(0))[0], causal=causal)
    monkeypatch.undo()
    assert torch.isfinite(out).all()
    run_case(2, 77, 77, 2, 40, causal, torch.float32, make=make)


@pytest.mark.parametrize("causal", [False, True])
def test_large_scores_stay_finite_and_accurate(causal):
    # q, k entries of std ~8.4 give scores q.k / sqrt(D) of std ~50 (nearly one-hot softmax rows)
    run_case(2, 130, 130, 2, 64, causal, torch.float32, scale=50 ** 0.5)


def test_deterministic_backward_is_bitwise_reproducible():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 150, 2, 64, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    do = torch.randn(2, 150, 2, 64, generator=gen).to(DEVICE)
    g1 = torch.autograd.grad(flash_attention(q, k, v, causal=True, deterministic=True), (q, k, v), do)
    g2 = torch.autograd.grad(flash_attention(q, k, v, causal=True, deterministic=True), (q, k, v), do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    # the fused (atomic dQ) backward computes the same gradients up to fp32 summation order
    g3 = torch.autograd.grad(flash_attention(q, k, v, causal=True, deterministic=False), (q, k, v), do)
    for a, b in zip(g1, g3):
        assert rel_err(b, a) < 1e-5
    assert torch.equal(g1[1], g3[1]) and torch.equal(g1[2], g3[2])  # dK, dV: same code, same order


# The default (fused) backward runs in every case above; these run the deterministic two-kernel
# backward and the TMA-descriptor loads (emulated by the interpreter) against float64 too.
@pytest.mark.parametrize("variant", ["deterministic", "tma"])
@pytest.mark.parametrize("nq,nk,d,causal", [(65, 65, 40, True), (17, 130, 64, False), (130, 17, 32, True)])
def test_backward_variants(variant, nq, nk, d, causal, monkeypatch):
    if variant == "tma":
        monkeypatch.setattr(flash_mod, "_OPTIONS", {**flash_mod._OPTIONS, "fwd_tma": True, "bwd_tma": True})
        launched = []
        real = flash_mod._use_tma
        monkeypatch.setattr(flash_mod, "_use_tma", lambda *t: launched.append(real(*t)) or launched[-1])
    out, grads = run_case(2, nq, nk, 2, d, causal, torch.float32, deterministic=variant == "deterministic")
    if variant == "tma":
        assert launched and all(launched), "TMA was not used for aligned inputs"
    if causal and nq > nk:
        assert torch.equal(grads[0][:, : nq - nk], torch.zeros_like(grads[0][:, : nq - nk]))


def test_tma_strided_views_and_misaligned_fallback(monkeypatch):
    monkeypatch.setattr(flash_mod, "_OPTIONS", {**flash_mod._OPTIONS, "fwd_tma": True, "bwd_tma": True})

    def make(gen):
        qkv = torch.randn(2, 77, 3, 2, 40, generator=gen).to(DEVICE).requires_grad_()
        return qkv.unbind(2), (qkv,)

    run_case(2, 77, 77, 2, 40, True, torch.float32, make=make)
    # fp16 rows of 17 elements are 34 bytes: not 16-byte aligned, so the pointer path is taken
    t = torch.randn(1, 9, 2, 17, dtype=torch.float16)
    assert not flash_mod._tma_ok(t) and flash_mod._tma_ok(torch.randn(1, 9, 2, 16, dtype=torch.float16))
    assert not flash_mod._use_tma("fwd", t)


def test_deterministic_follows_torch_setting(monkeypatch):
    calls = []
    real = flash_mod._bwd_dq_convert
    monkeypatch.setattr(flash_mod, "_bwd_dq_convert", type("Spy", (), {
        "__getitem__": lambda self, grid: (lambda *a, **kw: calls.append(1) or real[grid](*a, **kw))})())
    q = torch.randn(1, 20, 1, 16, device=DEVICE, requires_grad=True)
    flash_attention(q, q, q).sum().backward()
    assert calls == [1]  # default: fused backward
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    flash_attention(q, q, q).sum().backward()
    assert calls == [1]  # deterministic algorithms on: the two-kernel backward
    flash_attention(q, q, q, deterministic=False).sum().backward()
    assert calls == [1, 1]  # an explicit argument wins
    with pytest.raises(TypeError, match="deterministic"):
        flash_attention(q, q, q, deterministic="yes")


def test_softmax_scale_argument():
    q, k, v = (torch.randn(1, 33, 2, 16, device=DEVICE) for _ in range(3))
    out = flash_attention(q, k, v, softmax_scale=0.3)
    ref = reference_attention(q.double(), k.double(), v.double(), softmax_scale=0.3)
    assert rel_err(out, ref) < 1e-5


def test_fp32_precision_option():
    q, k, v = (torch.randn(1, 40, 2, 16, device=DEVICE) for _ in range(3))
    ref = reference_attention(q.double(), k.double(), v.double())
    for prec in ("tf32", "ieee"):
        assert rel_err(flash_attention(q, k, v, fp32_precision=prec), ref) < 5e-3
    with pytest.raises(ValueError, match="fp32_precision"):
        flash_attention(q, k, v, fp32_precision="bf16")


# ---- bad input: a clear error before anything is launched --------------------------------
def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape).to(device, dtype) if dtype.is_floating_point else torch.ones(*shape, dtype=dtype)


@pytest.mark.parametrize("args,exc,msg", [
    ((_t(2, 8, 16), _t(2, 8, 16), _t(2, 8, 16)), ValueError, "rank 4"),
    ((_t(1, 8, 2, 16), _t(2, 8, 2, 16), _t(2, 8, 2, 16)), ValueError, "batch and head"),
    ((_t(1, 8, 2, 16), _t(1, 8, 3, 16), _t(1, 8, 3, 16)), ValueError, "batch and head"),
    ((_t(1, 8, 2, 16), _t(1, 8, 2, 32), _t(1, 8, 2, 32)), ValueError, "head_dim must match"),
    ((_t(1, 8, 2, 16), _t(1, 8, 2, 16), _t(1, 9, 2, 16)), ValueError, "same sequence length"),
    ((_t(1, 8, 1, 320), _t(1, 8, 1, 320), _t(1, 8, 1, 320)), ValueError, "larger than the supported 256"),
    ((_t(1, 8, 2, 16, dtype=torch.int64),) * 3, TypeError, "dtype torch.int64"),
    ((_t(1, 8, 2, 16), _t(1, 8, 2, 16, dtype=torch.float16), _t(1, 8, 2, 16)), TypeError, "share one dtype"),
    ((_t(1, 8, 2, 16), _t(1, 8, 2, 16, device="meta"), _t(1, 8, 2, 16)), ValueError, "different devices"),
])
def test_bad_input_errors(args, exc, msg):
    with pytest.raises(exc, match=msg):
        flash_attention(*args)


def test_cpu_tensor_without_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.setattr(flash_mod, "_INTERPRET", False)
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        flash_attention(q, q, q)
