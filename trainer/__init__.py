"""Supporting pieces of the training loop in train.py, one job per file.

  distributed.py  process group, barrier, all_reduce (one process: no-ops)
  parallelize.py  activation checkpointing -> torch.compile -> FSDP2 / DDP, applied from outside
  checkpoint.py   torch.distributed.checkpoint folders: atomic, resumable, reshardable
  optim.py        AdamW over the model's parameter groups; precision (autocast, grad scaler)
  schedule.py     learning rate: linear warmup, then cosine or linear decay to min_lr
  metrics.py      batch arithmetic, metrics.jsonl, the console progress line, MFU
  logger.py       Weights & Biases (online / offline / disabled), imported lazily
  cli.py          checks made before Hydra starts (unknown keys, run_dir), cleanup of a refused run

Nothing heavy is imported here, so `import trainer` is cheap.
"""
if not __name__.startswith("longctx."):  # one name per module: see longctx/__init__.py
    raise ImportError("import this package as longctx.trainer (`from longctx.trainer import ...`), not as trainer")


class ConfigError(ValueError):
    """A bad setting found before any work starts; train.py prints `error: <message>` and exits 2."""


__all__ = ["ConfigError"]
