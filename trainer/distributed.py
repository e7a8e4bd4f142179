"""Process-group setup and the few collectives the training loop needs.

One process (no torchrun, WORLD_SIZE unset): every helper is a cheap no-op, so train.py reads the
same whether it runs on a laptop or on 64 GPUs.

Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT set by the launcher):
`init_distributed` picks the backend (nccl on CUDA, gloo on CPU), binds the process to
`cuda:LOCAL_RANK`, and sets safe NCCL defaults before the first communicator is created:

- NCCL_NVLS_ENABLE=0 (NVLink multicast / SHARP stays off; never enabled by this code),
- TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (a timed-out collective aborts the process instead of hanging),

A collective that times out or fails is re-raised by `collective_guard` with the rank, world
size, host and the timeout, so the first line of the traceback says which rank failed.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from longctx.trainer import ConfigError  # ValueError subclass; train.py prints `error: <message>`, exits 2

__all__ = [
    "DistInfo",
    "init_distributed",
    "barrier",
    "all_reduce",
    "reduce_metrics",
    "broadcast_object",
    "destroy",
    "is_distributed",
    "under_torchrun",
    "check_launch",
    "collective_guard",
    "DistributedError",
]

DEFAULT_TIMEOUT_S = 1800
_timeout_s: float = DEFAULT_TIMEOUT_S  # the collective timeout in force (for error messages)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    is_main: bool = True


class DistributedError(RuntimeError):
    """A collective failed or timed out; the message names the rank."""


def under_torchrun() -> bool:
    """True when launched by torchrun (or any launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def check_launch(parallel_name: str, world_size: int) -> None:
    """One-line errors (ConfigError) for a launch that does not fit `parallel=`: ddp|fsdp started as
    a plain `python train.py`, or single under a multi-process torchrun."""
    if parallel_name in ("ddp", "fsdp") and not under_torchrun():
        raise ConfigError(
            f"parallel={parallel_name} needs one process per device; launch with "
            f"`torchrun --standalone --nproc_per_node=N train.py parallel={parallel_name} ...` "
            f"(or use parallel=single for one process)"
        )
    if parallel_name == "single" and world_size > 1:
        raise ConfigError(f"parallel=single but {world_size} processes were launched; use parallel=fsdp or "
                          f"parallel=ddp with torchrun, or run one process")


def _resolve_device(device: str, local_rank: int) -> torch.device:
    device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.startswith("cuda:"):
        index = device[len("cuda:"):]
        if not index.isdigit():
            raise ConfigError(f"device={device!r}: the GPU index must be a number, e.g. device=cuda:0")
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device} but no CUDA GPU is visible; use device=cpu or device=auto")
        count = torch.cuda.device_count()
        # an explicit index is honoured in a single process; under torchrun each rank takes its own
        if under_torchrun():
            return torch.device("cuda", local_rank % count)
        if int(index) >= count:
            raise ConfigError(f"device={device} but only {count} GPU(s) are visible (cuda:0..cuda:{count - 1})")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device={device!r} is not one of auto, cuda, cuda:N, cpu")


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Set up the process group (under torchrun) or describe the single process.

    device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cuda", "cpu".
    timeout_s: collective timeout (`parallel.timeout_s`); a hung rank is reported after this.
    """
    # Never turn on NVLink multicast; set before any NCCL communicator exists.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")

    if not under_torchrun():
        dev = _resolve_device(device, 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank=0, local_rank=0, world_size=1, device=dev, is_main=True)

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ["WORLD_SIZE"])
    dev = _resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    global _timeout_s
    _timeout_s = float(timeout_s or DEFAULT_TIMEOUT_S)
    timeout = datetime.timedelta(seconds=_timeout_s)
    if not dist.is_initialized():
        kwargs = {"backend": backend, "timeout": timeout}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # eager NCCL init: a bad GPU fails here, not mid-step
        try:
            dist.init_process_group(**kwargs)
        except Exception as e:  # noqa: BLE001
            raise DistributedError(
                f"rank {rank}/{world_size} on {socket.gethostname()}: init_process_group({backend}) failed "
                f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): {e}"
            ) from e
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, is_main=rank == 0)


@contextlib.contextmanager
def collective_guard(what: str = "collective"):
    """Re-raise a failed/timed-out collective with the rank that saw it."""
    try:
        yield
    except DistributedError:
        raise
    except Exception as e:  # noqa: BLE001  (DistBackendError, RuntimeError from a watchdog abort)
        if not is_distributed():
            raise
        raise DistributedError(
            f"rank {dist.get_rank()}/{dist.get_world_size()} on {socket.gethostname()}: {what} failed "
            f"({type(e).__name__}: {e}). A timeout usually means another rank crashed or is stuck; "
            f"look for its traceback above, or raise parallel.timeout_s (now {_timeout_s:g} s)."
        ) from e


def barrier() -> None:
    if is_distributed():
        with collective_guard("barrier"):
            dist.barrier()


_OPS = {"sum": "SUM", "avg": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of `t` (op: sum | avg | max | min); returns `t`. No-op on one process.

    avg is sum / world_size (gloo has no AVG op).
    """
    if op not in _OPS:
        raise ValueError(f"all_reduce op must be one of {sorted(_OPS)}, got {op!r}")
    if not is_distributed():
        return t
    with collective_guard(f"all_reduce({op})"):
        dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]))
    if op in ("avg", "mean"):
        t.div_(dist.get_world_size())
    return t


def reduce_metrics(metrics: dict, device: torch.device | str = "cpu", op: str = "avg") -> dict:
    """Reduce a dict of python numbers / scalar tensors over ranks in one collective.

    Returns plain floats (same on every rank). Used for loss, tokens/s (op="sum"), memory (op="max").
    """
    if not metrics:
        return {}
    keys = list(metrics)
    vals = torch.tensor(
        [float(v.detach().float().item() if torch.is_tensor(v) else v) for v in metrics.values()],
        dtype=torch.float64 if torch.device(device).type == "cpu" else torch.float32,
        device=device,
    )
    all_reduce(vals, op)
    return dict(zip(keys, vals.tolist()))


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (returns it everywhere)."""
    if not is_distributed():
        return obj
    box = [obj]
    with collective_guard("broadcast_object"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


