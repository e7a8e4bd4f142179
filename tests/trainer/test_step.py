"""trainer/step.py: the micro-batch prefetcher and the training step against a plain loop."""
from __future__ import annotations

import pytest
import torch
from longctx.model import GPT, GPTConfig
from longctx.trainer.optim import Precision
from longctx.trainer.step import DeviceBatches, LossDiverged, train_step

ACCUM, MB, SEQ, VOCAB = 3, 2, 16, 64


def _tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(seq_len=SEQ, vocab_size=VOCAB, pad_vocab_multiple=32, n_layer=2, n_head=2, n_embd=32,
                         attn_impl="sdpa"))


def _fetch(step, micro):
    g = torch.Generator().manual_seed(1000 * step + micro)
    t = torch.randint(0, VOCAB, (MB, SEQ + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def test_device_batches_order_and_one_ahead():
    calls = []

    def fetch(step, micro):
        calls.append((step, micro))
        return _fetch(step, micro)

    it = DeviceBatches(fetch, torch.device("cpu"), range(5, 7), accum=2)
    assert calls == []  # nothing is read before the first batch is asked for
    x, y = next(it)
    assert calls == [(5, 0), (5, 1)]  # the next one is already fetched
    assert torch.equal(x, _fetch(5, 0)[0]) and torch.equal(y, _fetch(5, 0)[1])
    rest = list(it)
    assert calls == [(5, 0), (5, 1), (6, 0), (6, 1)] and len(rest) == 3
    assert torch.equal(rest[-1][0], _fetch(6, 1)[0])


def test_train_step_equals_a_plain_loop():
    model, ref = _tiny(), _tiny()
    # SGD: Adam would blow up rounding noise in gradients that are zero analytically (the key bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    batches = DeviceBatches(_fetch, torch.device("cpu"), range(2), ACCUM)
    prec = Precision("fp32", torch.device("cpu"))
    for step in range(2):
        loss, norm = train_step(model, batches, opt, prec, accum=ACCUM, grad_clip=0.5, step=step)
        # the plain loop: full logits + F.cross_entropy, mean over micro-batches, clip, SGD
        total = 0.0
        for micro in range(ACCUM):
            x, y = _fetch(step, micro)
            logits, _ = ref(x)
            ref_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()) / ACCUM
            ref_loss.backward()
            total += ref_loss.item()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5).item()
        ref_opt.step()
        ref_opt.zero_grad()
        assert loss == pytest.approx(total, rel=1e-6) and norm == pytest.approx(ref_norm, rel=1e-5)
        assert all(p.grad is None for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_nonfinite_loss_stops_before_the_optimizer_step():
    model = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def poisoned(step, micro):
        x, y = _fetch(step, micro)
        return x, y

    real_forward = model.forward
    model.forward = lambda x, y: (None, real_forward(x, y)[1] * float("nan"))
    batches = DeviceBatches(poisoned, torch.device("cpu"), range(3, 4), 1)
    with pytest.raises(LossDiverged, match="loss is nan at step 4"):
        train_step(model, batches, opt, Precision("fp32", torch.device("cpu")), accum=1, grad_clip=1.0, step=3)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def _fused_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)


def test_deferred_check_equals_immediate_and_skips_a_bad_step_on_the_device():
    """With a fused AdamW the step does not wait for the device: a NaN step is skipped by the
    optimizer itself (found_inf) and reported when the next step checks it, before applying."""
    prec = Precision("fp32", torch.device("cpu"))
    a, b = _tiny(), _tiny()
    opt_a, opt_b = _fused_adamw(a), _fused_adamw(b)
    ba = DeviceBatches(_fetch, torch.device("cpu"), range(3), ACCUM)
    bb = DeviceBatches(_fetch, torch.device("cpu"), range(3), ACCUM)
    res = None
    for step in range(2):
        res = train_step(a, ba, opt_a, prec, accum=ACCUM, grad_clip=1.0, step=step, pending=res, defer=True)
        ref = train_step(b, bb, opt_b, prec, accum=ACCUM, grad_clip=1.0, step=step, defer=False)
        assert tuple(res) == tuple(ref)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not hasattr(opt_a, "found_inf")
    # a NaN loss at step 3 (index 2): not applied; the next train_step raises before its own update
    before = [p.detach().clone() for p in a.parameters()]
    forward = a.forward
    a.forward = lambda x, y: (None, forward(x, y)[1] * float("nan"))
    bad = train_step(a, ba, opt_a, prec, accum=ACCUM, grad_clip=1.0, step=2, pending=res, defer=True)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert all(int(s["step"]) == 2 for s in opt_a.state.values())  # the step counter was not advanced
    a.forward = forward
    more = DeviceBatches(_fetch, torch.device("cpu"), range(3, 4), ACCUM)
    with pytest.raises(LossDiverged, match="loss is nan at step 3"):
        train_step(a, more, opt_a, prec, accum=ACCUM, grad_clip=1.0, step=3, pending=bad, defer=True)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
