"""Learning-rate schedule: linear warmup, then cosine or linear decay to `min_lr`.

The schedule is a pure function of the step, so resuming needs only the step number; the
optimizer's param groups get `lr_at(step) * group["lr_scale"]` (scale 1 unless a group sets one)
before every optimizer step.

    step < warmup:            lr * (step + 1) / warmup
    warmup <= step < decay:   min_lr + (lr - min_lr) * f(progress),  progress in [0, 1)
                                 cosine: f = 0.5 * (1 + cos(pi * progress));  linear: f = 1 - progress
    step >= decay_steps:      min_lr
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from longctx.trainer import ConfigError


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int  # the step at which min_lr is reached (max_steps by default)
    decay: str = "cosine"

    def __post_init__(self):
        if self.decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"train.decay={self.decay!r}: use cosine, linear or constant")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= train.min_lr <= train.lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} must be >= 0")

    def __call__(self, step: int) -> float:
        """Learning rate of the optimizer step with 0-based index `step`."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.lr
        span = self.decay_steps - self.warmup_steps
        if span <= 0 or step >= self.decay_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / span
        if self.decay == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            f = 1.0 - progress
        return self.min_lr + (self.lr - self.min_lr) * f

    def apply(self, optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict:
        return asdict(self)


def build_schedule(cfg) -> LRSchedule:
    """The schedule of cfg.train (a typed Config; a DictConfig or dict is typed first)."""
    from longctx.trainer.config import as_config

    cfg = as_config(cfg)
    t = cfg.train
    decay_steps = t.decay_steps or cfg.max_steps
    return LRSchedule(lr=float(t.lr), min_lr=float(t.min_lr), warmup_steps=int(t.warmup_steps),
                      decay_steps=int(decay_steps), decay=str(t.decay))
