"""One optimizer step: the function train.py's loop calls, and the one the benchmarks time.

    batches = DeviceBatches(fetch, device, steps=range(start, max_steps), accum=accum)
    result = None
    for step in range(start, max_steps):
        result = train_step(model, batches, optimizer, prec, accum=accum, grad_clip=1.0, step=step,
                            pending=result)
        ... result.loss, result.grad_norm (read when logging; raise LossDiverged if not finite)

`train_step` runs `accum` micro-steps of forward + backward (gradients reduced over ranks on the
last one only), unscales (fp16), clips the global gradient norm, averages the loss over ranks
and applies the optimizer step, refusing a step whose loss or norm is not finite (LossDiverged,
nothing applied). Nothing inside the micro-step loop waits for the device: the loss is summed on
the device, and the next micro-batch is already there (DeviceBatches). With a fused AdamW (CUDA)
not even the step waits: the optimizer skips a non-finite step on the device (found_inf) and the
loss and norm are read one step later (StepResult), when the device has long produced them, so
the device never idles between steps. Otherwise the step synchronises once, before the optimizer.

`DeviceBatches` yields the micro-batches of consecutive steps, one ahead: when micro-batch i is
handed out, micro-batch i + 1 is fetched (CPU), pinned and its host-to-device copy queued
(non_blocking), while the device still works on earlier micro-steps. At the end of a step the
next step's first micro-batch is thus on its way before the step's one synchronisation.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from longctx.trainer.distributed import all_reduce
from longctx.trainer.parallelize import clip_grad_norm, grad_sync

__all__ = ["DeviceBatches", "LossDiverged", "StepResult", "train_step"]

Batch = tuple[torch.Tensor, torch.Tensor]


class LossDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; nothing of that step was applied or saved."""


class DeviceBatches:
    """Iterator over (x, y) on `device` for every micro-step of `steps`, prefetched one ahead.

    fetch(step, micro_step) -> (x, y) CPU tensors (e.g. TokenData.train_batch with this rank's
    arguments). On CUDA they are pinned and copied with non_blocking=True.
    """

    def __init__(self, fetch: Callable[[int, int], Batch], device: torch.device, steps: Iterable[int],
                 accum: int):
        self._fetch = fetch
        self._device = torch.device(device)
        self._keys = ((s, m) for s in steps for m in range(accum))
        self._next: Batch | None = None
        self._started = False

    def _load(self) -> Batch | None:
        key = next(self._keys, None)
        if key is None:
            return None
        x, y = self._fetch(*key)
        if self._device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self._device, non_blocking=True), y.to(self._device, non_blocking=True)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if not self._started:
            self._started = True
            self._next = self._load()
        current = self._next
        if current is None:
            raise StopIteration
        self._next = self._load()  # queued behind the work already launched
        return current


class StepResult:
    """The loss and gradient norm of one step, read from the device when first asked for.

    `check()` (or `loss`, `grad_norm`, or unpacking: `loss, norm = result`) synchronises once and
    raises LossDiverged when the step's loss or norm is not finite (with fp16 a non-finite norm
    is left to the grad scaler, which skipped that step and lowered its scale).
    """

    def __init__(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, scaler: bool):
        self.step = step
        self._values: tuple[float, float] | None = None
        self._scaler = scaler
        both = torch.stack([loss.float(), grad_norm.to(device=loss.device, dtype=torch.float32)])
        self._event = None
        if both.is_cuda:
            # Queued now, right behind this step's backward and clipping: the copy to (pinned) host
            # memory and an event. check() waits for that event only. Stacking at check() time would
            # queue the stack behind everything launched since (the next step's whole forward and
            # backward) and make the read wait for the device to drain: the device then idled while
            # the host launched the optimizer step and the next micro-step (gpt2_small at 1k on an H200:
            # 139 -> 135 ms per step with 4 micro-steps, 143 -> 126 ms with one; docs/benchmarks.md 8e).
            host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            host.copy_(both, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            both = host
        self._both = both

    def check(self) -> tuple[float, float]:
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()  # the one wait: for this step's loss and norm, nothing later
            self._values = tuple(self._both.tolist())
            self._both = self._event = None
        loss_v, norm_v = self._values
        if not math.isfinite(loss_v) or (not self._scaler and not math.isfinite(norm_v)):
            what = "loss" if not math.isfinite(loss_v) else "gradient norm"
            raise LossDiverged(f"{what} is {loss_v if what == 'loss' else norm_v} at step {self.step + 1}; "
                               f"the step was not applied and nothing was saved (last good checkpoint: "
                               f"resume=auto); try a lower train.lr or more train.warmup_steps")
        return self._values

    @property
    def loss(self) -> float:
        return self.check()[0]

    @property
    def grad_norm(self) -> float:
        return self.check()[1]

    def __iter__(self):
        return iter(self.check())


def _can_defer(optimizer, prec) -> bool:
    """A fused Adam/AdamW skips its update on the device when `found_inf` is set, so the finiteness
    check need not wait for the device (no GradScaler: it owns found_inf)."""
    return prec.scaler is None and bool(optimizer.defaults.get("fused")) and "found_inf" not in vars(optimizer)


def train_step(model: torch.nn.Module, batches: Iterator[Batch], optimizer: torch.optim.Optimizer, prec, *,
               accum: int, grad_clip: float | None, step: int = 0, pending: StepResult | None = None,
               defer: bool | None = None) -> StepResult:
    """One optimizer step over the next `accum` micro-batches of `batches`.

    prec: trainer.optim.Precision (autocast, loss scaling). Returns the step's StepResult (loss
    averaged over the micro-batches and ranks, gradient norm before clipping).

    A step whose loss or norm is NaN/inf is never applied, and LossDiverged names it:
      - immediate (defer=False; the CPU, fp16, unfused optimizers): the step synchronises once,
        before the optimizer step, and raises at once;
      - deferred (defer=None/True with a fused AdamW on the device): the optimizer step is launched
        with found_inf = not finite (the fused kernel then leaves parameters and moments as they
        are), and nothing waits for the device. The check happens when the result is read, at
        the latest inside the next train_step (pass it as `pending`), before that step's own
        optimizer step: by then the device has long finished it, so the read costs no idle time.
    """
    if defer is None:
        defer = _can_defer(optimizer, prec)
    device = prec.device
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accum):
        x, y = next(batches)
        with grad_sync(model, micro_step == accum - 1):  # reduce gradients on the last one only
            with prec.autocast():
                _, loss = model(x, y)
            loss = loss / accum
            prec.backward(loss)
        loss_sum += loss.detach().float()
    prec.unscale(optimizer)
    grad_norm = clip_grad_norm(model, grad_clip)
    all_reduce(loss_sum, "avg")
    if pending is not None:
        pending.check()  # the previous step: raises before this step is applied
    result = StepResult(step, loss_sum, grad_norm, scaler=prec.scaler is not None)
    if defer:
        optimizer.found_inf = (~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))).float()
        try:
            prec.step(optimizer)
        finally:
            del optimizer.found_inf
    else:
        result.check()
        prec.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return result
