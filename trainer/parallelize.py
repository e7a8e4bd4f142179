"""Apply parallelism to a single-device model from the outside (torchtitan style).

The model code (model/) knows nothing about any of this. `parallelize(model, cfg, dist)` applies,
always in this order:

  1. activation checkpointing, per block of `model.blocks`
       parallel.activation_checkpointing = none | full | selective
       full:      every block is recomputed in the backward (activation memory ~ one block's
                  inputs per layer; about +1/3 compute, a second forward)
       selective: every `parallel.ac_every`-th block (default 2: blocks 0, 2, 4, ...) is
                  recomputed; about half the activation memory saved for half the recompute.
     (torch.utils.checkpoint, non-reentrant, through checkpoint_wrapper)
  2. torch.compile, `cfg.compile` = auto | true | false | blocks | model (after AC so the
     recompute is compiled too, before sharding so FSDP's hooks stay outside the compiled graphs)
       blocks: each transformer block is one compiled graph (attention included: our kernel is a
               torch.library op, kernels/ops.py, so nothing breaks the graph), and the loss's
               per-chunk math is compiled too (model/loss.py)
       model:  the whole model is one graph (embeddings, blocks, final norm, chunked loss);
               parallel=single only (DDP's and FSDP's hooks need per-block graphs)
       auto:   CUDA -> the faster of the two as measured on an H200 (DEFAULT_COMPILE: per
               parallel mode, docs/benchmarks.md), CPU -> off (compiling costs more than it gains
               in short CPU runs); true: that same choice on any device; false: eager
     The compilation itself happens in the first step (train.py logs its time).
  3. data parallelism, `parallel.name`:
       single: nothing
       ddp:    DistributedDataParallel (`unwrap(model)` is the GPT under it)
       fsdp:   FSDP2 `fully_shard` on every block, then on the root. The root group holds the
               embeddings, the final norm and the tied lm_head (lm_head.weight IS wte.weight,
               one parameter, sharded once). MixedPrecisionPolicy(param_dtype, reduce_dtype)
               (param_dtype auto = train.precision on CUDA, fp32 on the CPU),
               reshard_after_forward (default false: gathered params stay until the block's
               backward, one all-gather per block and micro-step; with true, the last block can
               still keep its parameters gathered, since the backward needs them at once), optional CPUOffloadPolicy, and explicit prefetch
               (`parallel.prefetch` = k > 0: each block issues the all-gathers of the next k
               blocks in the forward and of the previous k in the backward, so communication
               runs under the current block's compute even when the CPU is not far ahead).

`grad_sync(model, enabled)` turns the gradient reduction off for the micro-steps of gradient
accumulation; `clip_grad_norm(model, max_norm)` clips by the global norm over all shards and
returns a plain scalar tensor, identical on every rank.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn
from longctx.trainer.distributed import DistInfo, check_launch

log = logging.getLogger(__name__)

__all__ = ["parallelize", "grad_sync", "clip_grad_norm", "unwrap", "parallel_name", "compile_mode", "compiled"]

# compile=auto|true on CUDA, per parallel mode: measured on one H200 (docs/benchmarks.md, training speed)
DEFAULT_COMPILE = {"single": "model", "ddp": "blocks", "fsdp": "blocks"}

def parallel_name(cfg) -> str:
    """cfg.parallel.name ("single" | "ddp" | "fsdp") of a typed Config, a DictConfig or a dict."""
    from longctx.trainer.config import as_config

    return as_config(cfg).parallel.name


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT under a DDP wrapper (FSDP2 and compile-per-block keep the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"parallelize needs model.blocks to be an nn.ModuleList, got {type(blocks).__name__}")
    return blocks


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    if mode == "none":  # (values checked by ParallelConfig, trainer/config.py)
        return
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        if mode == "full" or i % every == 0:
            # preserve_rng_state: dropout masks in the recompute equal those of the forward
            blocks[i] = checkpoint_wrapper(block, CheckpointImpl.NO_REENTRANT, preserve_rng_state=True)


def compile_mode(cfg, device: torch.device | str | None = None) -> str | None:
    """`cfg.compile` resolved for `device`: "blocks", "model" or None (eager).

    cfg: a typed Config (a DictConfig or dict is typed first: a bad value, or compile=model with
    parallel=ddp|fsdp, is a ConfigError from the schema, trainer/config.py).
    """
    from longctx.trainer.config import as_config

    cfg = as_config(cfg)
    value, name = cfg.compile, cfg.parallel.name
    if value == "false" or (value == "auto" and device is not None and torch.device(device).type != "cuda"):
        return None
    if value in ("auto", "true"):
        return DEFAULT_COMPILE.get(name, "blocks")
    return value


def compiled(model: nn.Module) -> bool:
    """Whether parallelize compiled (part of) this model."""
    return getattr(unwrap(model), "compile_mode", None) is not None


def apply_compile(model: nn.Module, mode: str = "blocks", fullgraph: bool = False) -> None:
    """mode "blocks": torch.compile each block (a new module object around it, so FSDP's hooks on
    it stay outside the graph) and the chunked loss; "model": the whole model, in place."""
    if mode == "model":
        model.compile(fullgraph=fullgraph)
    elif mode == "blocks":
        blocks = _blocks(model)
        for i, block in enumerate(blocks):
            blocks[i] = torch.compile(block, fullgraph=fullgraph)
        if hasattr(model, "compile_loss"):
            model.compile_loss = True
    else:
        raise ValueError(f"apply_compile: mode must be 'blocks' or 'model', got {mode!r}")
    model.compile_mode = mode


def apply_fsdp(model: nn.Module, pcfg, dist: DistInfo, precision: str = "bf16") -> None:
    """FSDP2 per `pcfg` (an FSDPConfig); param_dtype auto follows `precision` (train.precision) on
    CUDA, fp32 on the CPU (the CPU always trains in fp32, as train.py does)."""
    from longctx.trainer.optim import DTYPES
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    param_dtype = pcfg.param_dtype
    if param_dtype == "auto":
        param_dtype = "fp32" if dist.device.type != "cuda" else precision
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[pcfg.reduce_dtype])
    kw = {"mesh": mesh, "mp_policy": mp}
    if pcfg.cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=dist.device.type == "cuda")
    reshard = pcfg.reshard_after_forward
    blocks = _blocks(model)
    n = len(blocks)
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=reshard and (i < n - 1 or pcfg.reshard_last_block), **kw)
    # Root: embeddings (wte == lm_head.weight, tied, one parameter), position embeddings, final norm.
    fully_shard(model, reshard_after_forward=reshard, **kw)
    model.reshard_between_micro_steps = bool(pcfg.reshard_between_micro_steps)  # read by grad_sync
    prefetch = pcfg.prefetch
    if prefetch:
        model.set_modules_to_forward_prefetch(list(blocks[:prefetch]))
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(list(blocks[i + 1:i + 1 + prefetch]))
            block.set_modules_to_backward_prefetch(list(blocks[max(0, i - prefetch):i])[::-1])


def parallelize(model: nn.Module, cfg, dist: DistInfo) -> nn.Module:
    """Activation checkpointing -> torch.compile -> FSDP2/DDP, per `cfg.parallel` and `cfg.compile`.

    cfg: a typed Config (a DictConfig or dict is typed first). The model must already be on
    `dist.device` (FSDP2 shards what it finds there; with parallel.cpu_offload the shards then
    move to CPU).
    """
    from longctx.trainer.config import as_config

    cfg = as_config(cfg)
    pcfg = cfg.parallel
    check_launch(pcfg.name, dist.world_size)  # (train.py checked it before any work; scripts rely on this)
    apply_activation_checkpointing(model, pcfg.activation_checkpointing, pcfg.ac_every)
    mode = compile_mode(cfg, dist.device)
    if mode is not None:
        apply_compile(model, mode, fullgraph=pcfg.compile_fullgraph)
        log.info(f"compile: {mode} (compile={cfg.compile}); compiled in the first step")

    if pcfg.name == "fsdp":
        apply_fsdp(model, pcfg, dist, cfg.train.precision)
    elif pcfg.name == "ddp":
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=ids,
            bucket_cap_mb=pcfg.bucket_cap_mb,
            gradient_as_bucket_view=True,
            find_unused_parameters=pcfg.find_unused_parameters,
        )
    return model


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Wrap forward+backward of one micro-step; `enabled=False` skips the gradient reduction.

        for micro in range(grad_accum):
            with grad_sync(model, micro == grad_accum - 1):
                loss = model(x, y)[1] / grad_accum
                loss.backward()

    FSDP2: set_requires_gradient_sync (unsharded grads accumulate locally, in reduce_dtype), and
    unless parallel.reshard_between_micro_steps, set_reshard_after_backward(False) on all but the
    last micro-step (the gathered params stay for the next micro-step: no second all-gather);
    DDP: no_sync(); single process: nothing.
    """
    if _is_fsdp(model):
        keep = not enabled and not getattr(model, "reshard_between_micro_steps", True)
        model.set_requires_gradient_sync(bool(enabled))
        if keep:
            model.set_reshard_after_backward(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
            if keep:
                model.set_reshard_after_backward(True)
    elif isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip gradients to the global L2 norm `max_norm` (None/0/inf: only measure).

    Works on FSDP2's DTensor gradient shards (the norm is reduced over ranks). Returns the
    pre-clip total norm as a plain fp32 scalar tensor, identical on every rank.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    clip = max_norm is not None and 0 < float(max_norm) < float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, float(max_norm) if clip else float("inf"), foreach=None)
    if hasattr(norm, "full_tensor"):  # DTensor (FSDP2)
        norm = norm.full_tensor()
    return norm.float()
