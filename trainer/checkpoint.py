"""Checkpoints with `torch.distributed.checkpoint` (DCP): one folder per step, complete or absent.

    <run_dir>/checkpoints/step_0001000/
        .metadata, __0_0.distcp, ...   model + optimizer state (DCP; each rank writes its shards)
        meta.json                      step, model config, schedule, grad scaler, world size, versions
        config.yaml                    the run's resolved config
        rng/rank_00000.pt ...          python / numpy / torch / cuda RNG states, one file per rank

The state dicts come from `torch.distributed.checkpoint.state_dict.get_state_dict`, so the same
code saves and loads a single-process model, DDP and FSDP2, and a checkpoint written on N GPUs
loads on M (DCP reshards on load).

Atomicity: everything is written into `checkpoints/.tmp-step_XXXXXXX/`; after a barrier, rank 0
writes meta.json last and renames the folder to `step_XXXXXXX`. A folder named step_* therefore
always holds a complete checkpoint; a kill mid-write leaves only a `.tmp-*` folder, which
`latest_checkpoint` ignores and the next save of that step removes. The newest `ckpt_keep` are kept.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from longctx.trainer import ConfigError
from longctx.trainer.distributed import barrier
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STEP_RE = re.compile(r"^step_(\d{7,})$")
META = "meta.json"
# model config keys that must match to load a checkpoint (dropout may change on resume)
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "pad_vocab_multiple", "bias")


def step_dir(ckpt_root: Path, step: int) -> Path:
    return Path(ckpt_root) / f"step_{step:07d}"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (step_* folders holding meta.json), oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_RE.match(p.name)) and p.is_dir() and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume, run_dir: Path) -> Path | None:
    """`resume` setting -> a checkpoint folder, or None to start fresh.

    null: fresh start. auto: newest complete checkpoint under <run_dir>/checkpoints (fresh start
    if there is none). A path: a checkpoint folder, or a run directory / checkpoints folder (its newest).
    """
    if resume is None or resume is False or str(resume).lower() in ("", "none", "null", "false"):
        return None
    if str(resume) == "auto":
        return latest_checkpoint(Path(run_dir) / "checkpoints")
    p = Path(str(resume)).expanduser()
    if (p / META).is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    if p.exists():
        raise ConfigError(f"resume={resume}: no complete checkpoint (a step_* folder with {META}) in {p}")
    raise ConfigError(f"resume={resume}: no such checkpoint or run directory")


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint {ckpt} has no readable {META} ({e}); pick another or resume=null") from e


def _arch(model_cfg: dict) -> dict:
    return {k: model_cfg.get(k) for k in ARCH_KEYS if k in model_cfg}


def check_compatible(meta: dict, model_cfg: dict, seq_len: int, ckpt: Path) -> None:
    """One clear line if the checkpoint was trained with another model shape."""
    saved, now = _arch(meta.get("model", {})), _arch(model_cfg)
    diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now) if saved.get(k) != now.get(k)}
    if diff:
        what = ", ".join(f"{k}={a} vs {b}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(
            f"checkpoint {ckpt} is model={meta.get('model', {}).get('name', '?')}, this run is "
            f"model={model_cfg.get('name', '?')} ({what}); use model={meta.get('model', {}).get('name', '?')} "
            f"to resume it, or another run_dir / resume=null to start a new run")
    if int(meta.get("seq_len", seq_len)) != int(seq_len):
        raise ConfigError(
            f"checkpoint {ckpt} was trained at seq_len={meta['seq_len']} (position embeddings of that size), "
            f"this run has seq_len={seq_len}; use seq_len={meta['seq_len']} to resume it")


@contextlib.contextmanager
def _quiet():
    """One process without a process group is the normal single-GPU/CPU case: no warning per save."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, *, meta: dict, config_yaml: str,
                    rank: int, is_main: bool, keep: int | None = None) -> Path:
    """Write checkpoint `step` atomically (every rank calls this); returns the final folder."""
    ckpt_root = Path(ckpt_root)
    final, tmp = step_dir(ckpt_root, step), ckpt_root / f".tmp-step_{step:07d}"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed mid-save
        (tmp / "rng").mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    barrier()
    if is_main:
        (tmp / "config.yaml").write_text(config_yaml)
        meta = dict(meta, step=step, saved_at=time.strftime("%Y-%m-%d %H:%M:%S"), torch=torch.__version__)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks completeness
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        if keep:
            for old in list_checkpoints(ckpt_root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(ckpt: Path, model, optimizer, *, rank: int) -> dict:
    """Load model + optimizer (resharded to this run's layout) and this rank's RNG; returns meta."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet():
        dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = ckpt / "rng" / f"rank_{rank:05d}.pt"
    if rng.is_file():  # absent when resuming on more ranks than were saved: fresh RNG for those
        _set_rng_state(torch.load(rng, weights_only=False))
    return meta


def load_model_only(ckpt: Path, model) -> dict:
    """Weights only, into a plain single-process model (scripts/sample.py, evals)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    meta = read_meta(ckpt)
    sd = {"model": get_model_state_dict(model)}
    with _quiet():
        dcp.load(sd, checkpoint_id=str(ckpt))
    set_model_state_dict(model, sd["model"])
    return meta


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
