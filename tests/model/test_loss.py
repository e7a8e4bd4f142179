"""model/loss.py: the chunked lm_head cross-entropy against the plain one (full logits,
F.cross_entropy) in float64, in bf16 autocast, in fp16 (the recompute path) and without grad."""
import pytest
import torch
import torch.nn.functional as F
from longctx.model.loss import lm_head_cross_entropy

V, C = 40, 12


def _inputs(T=37, dtype=torch.float64, seed=0, ignore=(0, 5, 36)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, C, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(V, C, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    t = torch.randint(0, V, (T,), generator=g)
    t[list(ignore)] = -1
    return x, w, t


def _plain(x, w, t, g=1.0):
    logits = x @ w.t()
    loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), t, ignore_index=-1)
    dx, dw = torch.autograd.grad(loss * g, (x, w))
    return loss.detach(), dx, dw


def _chunked(x, w, t, g=1.0, **kw):
    loss = lm_head_cross_entropy(x, w, t, **kw)
    dx, dw = torch.autograd.grad(loss * g, (x, w))
    return loss.detach(), dx, dw


@pytest.mark.parametrize("chunk", [1, 8, 37, 4096])
def test_fp64_equals_full_logits(chunk):
    x, w, t = _inputs()
    for a, b in zip(_chunked(x, w, t, g=0.25, chunk_tokens=chunk), _plain(x, w, t, g=0.25)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_no_grad_and_leading_dims():
    x, w, t = _inputs()
    ref = _plain(x, w, t)[0]
    with torch.no_grad():
        loss = lm_head_cross_entropy(x.view(1, 37, C), w, t.view(1, 37), chunk_tokens=10)
    assert loss.dtype == torch.float64 and not loss.requires_grad
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


def test_bf16_autocast_matches_plain_path():
    x, w, t = _inputs(T=64, dtype=torch.float32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _plain(x, w, t, g=0.5)
        out = _chunked(x, w, t, g=0.5, chunk_tokens=16)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32 and out[2].dtype == torch.float32
    x64, w64, _ = (a.detach().double().requires_grad_() for a in (x, w, w))
    exact = _plain(x64, w64, t, g=0.5)
    for name, a, b, e in zip(("loss", "dx", "dw"), out, ref, exact):
        err_chunked = ((a.double() - e).norm() / e.norm()).item()
        err_plain = ((b.double() - e).norm() / e.norm()).item()
        assert err_chunked < 2e-2, (name, err_chunked)  # bf16 logits and dlogits, as the plain path
        assert err_chunked < 2 * err_plain + 1e-3, (name, err_chunked, err_plain)


def test_fp16_recomputes_with_the_loss_scale():
    # With a GradScaler-sized incoming gradient the fp16 path must keep small dlogits: compare to
    # the exact gradient, scaled the same way.
    x, w, t = _inputs(T=32, dtype=torch.float16, seed=2, ignore=(3,))
    scale = 2.0 ** 12
    loss, dx, dw = _chunked(x, w, t, g=scale, chunk_tokens=8)
    assert dx.dtype == torch.float16 and dw.dtype == torch.float16
    x64, w64 = (a.detach().double().requires_grad_() for a in (x, w))
    ref = _plain(x64, w64, t, g=scale)
    torch.testing.assert_close(loss.double(), ref[0], rtol=2e-3, atol=2e-3)
    for a, e in zip((dx, dw), ref[1:]):
        assert ((a.double() - e).norm() / e.norm()).item() < 5e-3
