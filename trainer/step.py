"""One optimizer step: the function train.py's loop calls, and the one the benchmarks time.

    batches = DeviceBatches(fetch, device, steps=range(start, max_steps), accum=accum)
    for step in range(start, max_steps):
        loss, grad_norm = train_step(model, batches, optimizer, prec, accum=accum, grad_clip=1.0, step=step)

`train_step` runs `accum` micro-steps of forward + backward (gradients reduced over ranks on the
last one only), unscales (fp16), clips the global gradient norm, averages the loss over ranks,
then synchronises with the device ONCE, to read the loss and the norm and refuse a step whose
loss or norm is not finite (LossDiverged, nothing applied), and applies the optimizer step.
Inside the micro-step loop nothing waits for the device: the loss is summed on the device, and
the next micro-batch is already there (DeviceBatches).

`DeviceBatches` yields the micro-batches of consecutive steps, one ahead: when micro-batch i is
handed out, micro-batch i + 1 is fetched (CPU), pinned and its host-to-device copy queued
(non_blocking), while the device still works on earlier micro-steps. At the end of a step the
next step's first micro-batch is thus on its way before the step's one synchronisation.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch

from trainer.distributed import all_reduce
from trainer.parallelize import clip_grad_norm, grad_sync

__all__ = ["LossDiverged", "DeviceBatches", "train_step"]

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


def train_step(model: torch.nn.Module, batches: Iterator[Batch], optimizer: torch.optim.Optimizer, prec, *,
               accum: int, grad_clip: float | None, step: int = 0) -> tuple[float, float]:
    """One optimizer step over the next `accum` micro-batches of `batches`.

    prec: trainer.optim.Precision (autocast, loss scaling). Returns (loss averaged over the
    micro-batches and ranks, gradient norm before clipping). Raises LossDiverged (step `step` + 1
    named, the optimizer step not applied) when either is NaN/inf; with fp16 a non-finite norm
    is left to the grad scaler, which skips that step and lowers its scale.
    """
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
    loss_v, norm_v = torch.stack([loss_sum, grad_norm.to(loss_sum)]).tolist()  # the one sync per step
    if not math.isfinite(loss_v) or (prec.scaler is None and not math.isfinite(norm_v)):
        what = "loss" if not math.isfinite(loss_v) else "gradient norm"
        raise LossDiverged(f"{what} is {loss_v if what == 'loss' else norm_v} at step {step + 1}; "
                           f"the step was not applied and nothing was saved (last good checkpoint: "
                           f"resume=auto); try a lower train.lr or more train.warmup_steps")
    prec.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return loss_v, norm_v
