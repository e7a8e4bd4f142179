"""AdamW over the model's parameter groups, and the numeric precision of the step.

Weight decay only on 2-D matmul weights (the model's `optim_groups`); fused AdamW on CUDA.

Precision (`train.precision`):
  bf16  autocast to bfloat16 on CUDA (default; fp32 master weights and optimizer state)
  fp16  autocast to float16 on CUDA with a dynamic loss scaler (GradScaler)
  fp32  no autocast (TF32 matmuls allowed on CUDA)
On the CPU the run is always fp32: CPU autocast is slower and changes the numbers, and CPU runs
are for tests and the quick start (one line says so when precision was not fp32).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from longctx.trainer import ConfigError
from longctx.trainer.parallelize import unwrap

log = logging.getLogger(__name__)

# The dtype of each precision name (train.precision, parallel.param_dtype / reduce_dtype).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW per cfg.train (a typed Config; a DictConfig is typed first)."""
    from longctx.trainer.config import as_group

    t = as_group("train", cfg.train)
    groups = unwrap(model).optim_groups(float(t.weight_decay))
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=float(t.lr), betas=tuple(float(b) for b in t.betas), eps=float(t.eps), **kw)


class Precision:
    """`with prec.autocast():` around forward; `prec.backward(loss)`; `prec.unscale(opt)` before
    clipping; `prec.step(opt)` instead of opt.step()."""

    def __init__(self, name: str, device: torch.device, sharded: bool = False):
        if name not in DTYPES:
            raise ConfigError(f"train.precision={name!r}: use bf16, fp16 or fp32")
        self.device = device
        if device.type != "cuda":
            if name != "fp32":
                log.info(f"precision: fp32 on {device.type} (train.precision={name} applies on CUDA)")
            name = "fp32"
        self.name = name
        self.dtype = None if name == "fp32" else DTYPES[name]  # None: no autocast
        self.scaler = None
        if name == "fp16":
            if sharded:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
                self.scaler = ShardedGradScaler()
            else:
                self.scaler = torch.amp.GradScaler("cuda")
        if name == "fp32" and device.type == "cuda":
            torch.set_float32_matmul_precision("high")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped (and the scale lowered) when grads hold inf/NaN
            self.scaler.update()
        else:
            optimizer.step()
