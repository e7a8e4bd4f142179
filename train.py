"""Train a GPT-2 model: `python train.py experiment=quickstart`, `python train.py model=gpt2_small seq_len=4096`.

Every setting comes from the Hydra config tree in configs/ (see configs/config.yaml). Many GPUs:
`torchrun --standalone --nproc_per_node=8 train.py parallel=fsdp run_dir=outputs/run1`.

train() = setup -> loop -> finish:
  setup: init_distributed -> check the config (typed by trainer/config.py; one-line errors, before
  any work) -> seed
  -> data (prepare on rank 0, barrier, load everywhere) -> build_model -> parallelize
  -> AdamW + LR schedule -> maybe resume
  loop: for each step:
       train_step (trainer/step.py): for each micro-step: (x, y) = the next prefetched micro-batch;
       loss = model(x, y) / accum; backward (gradients reduced over ranks on the last one only);
       clip -> optimizer step (a non-finite loss or grad norm is never applied: LossDiverged)
       -> log -> evaluate every eval_every -> checkpoint every ckpt_every
  finish: summary (console, train.log, <run_dir>/summary.json: losses, speed, paths, next commands)
`run()` wraps it for the command line: `error: <one line>` for bad input, and a run stopped by a
config or data error leaves no run dir behind (trainer/cli.py).
Supporting pieces live in trainer/ (one job per file).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from longctx.trainer import ConfigError
from longctx.trainer.cli import check_group_choices as _check_group_choices
from longctx.trainer.cli import (
    check_override_keys,
    check_run_dir_writable,
    only_hydra_files,
    remove_run_dir,
)
from longctx.trainer.config import Config, as_config
from omegaconf import DictConfig, OmegaConf

# torch and the trainer modules that need it are imported inside the functions below, so that
# `python train.py --help` and tab completion do not wait for torch.

log = logging.getLogger("train")


def check_config(cfg, world_size: int, device=None) -> tuple[int, int]:
    """What the schema (trainer/config.py) cannot see alone, found before any work: the batch
    arithmetic, the launcher, W&B's mode, the data files. Returns (micro_batch, accum); device: the
    GPU that micro_batch=auto sizes the micro-batch by (None: the CPU default, 16k tokens)."""
    from longctx.data import check_data_config
    from longctx.trainer.distributed import check_launch
    from longctx.trainer.logger import resolve_mode, wandb_missing
    from longctx.trainer.metrics import batch_arithmetic

    cfg = as_config(cfg)
    micro_batch, accum = batch_arithmetic(cfg, world_size, device)
    if cfg.eval_tokens and cfg.eval_tokens % cfg.seq_len:
        raise ConfigError(f"eval_tokens={cfg.eval_tokens} must be a multiple of seq_len={cfg.seq_len} "
                          f"(use {max(1, cfg.eval_tokens // cfg.seq_len) * cfg.seq_len})")
    check_launch(cfg.parallel.name, world_size)  # parallel=ddp|fsdp needs torchrun, single one process
    if cfg.logger.name == "wandb":
        resolve_mode(cfg.logger.mode)
        wandb_missing(cfg.logger.mode)  # an explicit mode without wandb installed: refused here, before work
    try:
        check_data_config(cfg.data)  # lists the files (cheap); reading and tokenising come later
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return micro_batch, accum


@dataclasses.dataclass
class Run:
    """What setup() builds and the loop uses."""
    cfg: Config
    dist: Any
    run_dir: Path
    data: Any
    model: Any
    optimizer: Any
    prec: Any
    schedule: Any
    metrics: Any
    logger: Any
    meter: Any
    micro_batch: int
    accum: int
    tokens_per_step: int
    start_step: int
    model_meta: dict
    config_yaml: str
    t_start: float

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"


def prepare(cfg: Config, dist, run_dir: Path) -> tuple:
    """Every check before any work, then the run dir: (micro_batch, accum, init, resume_from, config_yaml)."""
    import torch
    from longctx.model import build_model
    from longctx.trainer.checkpoint import check_compatible, read_meta, resolve_resume
    from longctx.trainer.init import apply_init_from

    micro_batch, accum = check_config(cfg, dist.world_size, dist.device)
    init = apply_init_from(cfg)  # init_from=: model sizes come from that checkpoint (one line on a conflict)
    resume_from = resolve_resume(cfg.resume, run_dir)
    if resume_from is not None:
        check_compatible(read_meta(resume_from), dataclasses.asdict(cfg.model), cfg.seq_len, resume_from)
    try:
        with torch.device("meta"):  # shapes only, no memory: a bad model config fails here
            build_model(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    return micro_batch, accum, init, resume_from, config_yaml


def load_token_data(cfg: Config, dist, micro_batch: int):
    """Token files: prepared on rank 0 (the others wait), opened and checked everywhere."""
    from longctx.data import CacheError, DataError, TokenData, load_data, prepare_data  # per call: tests patch them
    from longctx.trainer.distributed import broadcast_object

    data_errors = (ValueError, DataError, CacheError)  # bad data settings, missing/corrupt cache, offline
    problem = folder = None
    if dist.is_main:
        try:
            folder = prepare_data(cfg.data)  # tokenises once and caches; the other ranks wait for the result
        except data_errors as e:
            problem = str(e)
    problem = broadcast_object(problem)  # also the barrier: every rank stops on rank 0's data error
    if problem:
        raise ConfigError(problem)
    try:
        data = TokenData(folder) if folder is not None else load_data(cfg.data)  # (rank 0 just checked it)
        if cfg.eval_tokens:  # the validation span and the windows fit the prepared splits
            data.val_plan(cfg.seq_len, micro_batch, cfg.eval_tokens, dist.rank, dist.world_size)
        data.train_batch(0, seed=cfg.seed, seq_len=cfg.seq_len, micro_batch=1)
    except data_errors as e:
        raise ConfigError(str(e)) from e
    log.info(f"data: {cfg.data.name}, {len(data.train):,} train / {len(data.val):,} val tokens")
    return data


def setup(cfg: Config, run_dir: str | Path | None = None) -> Run:
    """Processes, checks, data, model, parallelism, optimizer, schedule, resume: everything but the loop."""
    import torch
    from longctx.model import build_model
    from longctx.trainer.distributed import broadcast_object, init_distributed
    from longctx.trainer.init import load_init
    from longctx.trainer.logger import build_logger
    from longctx.trainer.metrics import MetricsFile, Throughput, peak_flops
    from longctx.trainer.optim import Precision, build_optimizer
    from longctx.trainer.parallelize import parallelize
    from longctx.trainer.schedule import build_schedule

    t_start = time.perf_counter()
    dist = init_distributed(cfg.device, timeout_s=cfg.parallel.timeout_s)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one process talks
    run_dir = Path(broadcast_object(str(run_dir or cfg.run_dir)))  # every rank writes to rank 0's dir
    micro_batch, accum, init, resume_from, config_yaml = prepare(cfg, dist, run_dir)
    tokens_per_step = micro_batch * cfg.seq_len * accum * dist.world_size
    log.info(f"run dir: {run_dir}")
    log.info(f"tokens/step = micro_batch x seq_len x accum x GPUs = {micro_batch} x {cfg.seq_len} x {accum} "
             f"x {dist.world_size} = {tokens_per_step:,}")

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    data = load_token_data(cfg, dist, micro_batch)
    model = build_model(cfg)
    if resume_from is None:
        load_init(model, init, cfg)  # init_from= weights, positions extended to seq_len (no-op without it)
    model = model.to(dist.device)
    n_params, flops_per_token = model.num_params(), model.flops_per_token(cfg.seq_len)
    log.info(f"model: {cfg.model.name}, {n_params / 1e6:.1f}M params, attention={cfg.attention.impl}, "
             f"{flops_per_token / 1e9:.2f} GFLOP/token, parallel={cfg.parallel.name}, device={dist.device}")
    model = parallelize(model, cfg, dist)
    optimizer = build_optimizer(model, cfg, dist.device)
    prec = Precision(cfg.train.precision, dist.device, sharded=cfg.parallel.name == "fsdp")
    schedule = build_schedule(cfg)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs per rank; batches come from (seed, step, rank)

    metrics = MetricsFile(run_dir / "metrics.jsonl", enabled=dist.is_main)
    start_step = restore(resume_from, model, optimizer, prec, metrics, dist.rank)
    if resume_from is None and cfg.resume == "auto":
        log.info(f"resume=auto: no checkpoint in {run_dir / 'checkpoints'}, starting from scratch")
    logger = build_logger(cfg, run_dir, dist.is_main, resuming=resume_from is not None)
    meter = Throughput(tokens_per_step, flops_per_token, peak_flops(dist.device), dist.world_size,
                       cfg.max_steps, dist.device)
    return Run(cfg, dist, run_dir, data, model, optimizer, prec, schedule, metrics, logger, meter, micro_batch,
               accum, tokens_per_step, start_step, dataclasses.asdict(cfg.model), config_yaml, t_start)


def restore(resume_from, model, optimizer, prec, metrics, rank: int) -> int:
    """Load the checkpoint to resume from (if any) into model, optimizer and grad scaler; drop the
    metrics rows after it. Returns the step to start at."""
    from longctx.trainer.checkpoint import load_checkpoint

    if resume_from is None:
        return 0
    meta = load_checkpoint(resume_from, model, optimizer, rank=rank)
    start_step = int(meta["step"])
    if prec.scaler is not None and meta.get("grad_scaler"):
        prec.scaler.load_state_dict(meta["grad_scaler"])
    log.info(f"resumed from {resume_from} (step {start_step})")
    metrics.truncate_after(start_step)
    return start_step


def evaluate(r: Run) -> tuple[float, float, int]:
    """Validation loss over the first eval_tokens tokens of the val split: sum of loss / token count
    over all ranks. Returns (val_loss, val_ppl, tokens)."""
    import torch
    from longctx.trainer.distributed import all_reduce

    cfg, dist, model = r.cfg, r.dist, r.model
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)  # [sum of token losses, tokens]
    with torch.no_grad():
        for x, y in r.data.val_batches(cfg.seq_len, r.micro_batch, cfg.eval_tokens, dist.rank, dist.world_size):
            x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
            with r.prec.autocast():
                _, loss = model(x, y)
            total[0] += loss.double() * y.numel()
            total[1] += y.numel()
    all_reduce(total, "sum")
    model.train()
    loss_sum, count = total.tolist()
    val_loss = loss_sum / max(count, 1)
    return val_loss, math.exp(min(val_loss, 700.0)), int(count)


def checkpoint(r: Run, step: int) -> None:
    from longctx.trainer.checkpoint import save_checkpoint

    meta = {"model": r.model_meta, "seq_len": r.cfg.seq_len, "world_size": r.dist.world_size,
            "schedule": r.schedule.state_dict(), "tokens_per_step": r.tokens_per_step,
            "grad_scaler": r.prec.scaler.state_dict() if r.prec.scaler is not None else None}
    path = save_checkpoint(r.ckpt_root, step, r.model, r.optimizer, meta=meta, config_yaml=r.config_yaml,
                           rank=r.dist.rank, is_main=r.dist.is_main, keep=r.cfg.ckpt_keep or None)
    log.info(f"checkpoint: {path}")


def after_step(r: Run, done: int, lr: float, result) -> None:
    """Log, evaluate and checkpoint as due after optimizer step `done` (1-based)."""
    from longctx.trainer.metrics import eval_line, progress_line

    cfg = r.cfg
    last = done == cfg.max_steps
    do_eval = cfg.eval_tokens > 0 and (last or (cfg.eval_every and done % cfg.eval_every == 0))
    do_log = last or do_eval or (cfg.log_every and done % cfg.log_every == 0)
    do_ckpt = last or (cfg.ckpt_every and done % cfg.ckpt_every == 0)
    if do_log or do_ckpt:
        loss_v, norm_v = result.check()  # LossDiverged before anything is logged or saved
    if do_log:
        row = {"step": done, "loss": loss_v, "lr": lr, "grad_norm": norm_v, **r.meter.read(done),
               "tokens": done * r.tokens_per_step}
        log.info(progress_line(row, cfg.max_steps))
        if do_eval:
            r.meter.pause()
            t0 = time.perf_counter()
            val_loss, val_ppl, n_tok = evaluate(r)
            log.info(eval_line(done, val_loss, val_ppl, n_tok, time.perf_counter() - t0))
            row.update(val_loss=val_loss, val_ppl=val_ppl)
            r.meter.resume()
        row.pop("eta_s", None)
        r.metrics.write(row)
        r.logger.log(row, step=done)
    if do_ckpt:
        r.meter.pause()
        checkpoint(r, done)
        r.meter.resume()


@contextlib.contextmanager
def collect_garbage_every(every: int):
    """Python's automatic GC off (what exists now frozen out of later scans) while training, and a
    young-generation collection every `every` steps, at the same step on every rank: an automatic
    collection pauses one rank at a time, and under FSDP/DDP the others wait for it. 0: unchanged."""
    if not every:
        yield lambda step: None
        return
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield lambda step: gc.collect(1) if step % every == 0 else None
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def loop(r: Run) -> None:
    """The training loop: train_step (trainer/step.py) then logging / evaluation / checkpoints."""
    from longctx.trainer.parallelize import compiled
    from longctx.trainer.step import DeviceBatches, train_step

    cfg = r.cfg
    batches = DeviceBatches(  # this rank's micro-batches of every remaining step, prefetched one ahead
        lambda s, m: r.data.train_batch(s, seed=cfg.seed, seq_len=cfg.seq_len, micro_batch=r.micro_batch,
                                        micro_step=m, grad_accum=r.accum, rank=r.dist.rank,
                                        world_size=r.dist.world_size),
        r.dist.device, range(r.start_step, cfg.max_steps), r.accum)
    if r.start_step >= cfg.max_steps:
        log.info(f"nothing to do: the checkpoint is at step {r.start_step}, max_steps={cfg.max_steps}")
    r.model.train()
    result = None  # the last step's StepResult: loss and grad norm, read (and checked) when needed
    with collect_garbage_every(cfg.gc_every) as gc_tick:
        for step in range(r.start_step, cfg.max_steps):
            lr = r.schedule.apply(r.optimizer, step)
            t_step = time.perf_counter()
            result = train_step(r.model, batches, r.optimizer, r.prec, accum=r.accum,
                                grad_clip=cfg.train.grad_clip, step=step, pending=result)  # checks the previous step
            r.meter.tick()
            if step == r.start_step:
                result.check()  # waits for the device: the first step's time
                log.info(f"first step: {time.perf_counter() - t_step:.1f}s (one-time costs included: kernel "
                         f"compilation{', torch.compile' if compiled(r.model) else ''})")
            after_step(r, step + 1, lr, result)
            gc_tick(step + 1)


def finish(r: Run) -> dict:
    """The end-of-run summary: where everything is, what it reached, what to run next (rank 0)."""
    from longctx.trainer.checkpoint import latest_checkpoint
    from longctx.trainer.distributed import destroy
    from longctx.trainer.metrics import build_summary, summary_lines, write_summary

    summary = {}
    if r.dist.is_main:
        summary = build_summary(
            run_dir=r.run_dir, rows=r.metrics.rows(), totals=r.meter.totals(), tokens_per_step=r.tokens_per_step,
            wall_s=time.perf_counter() - r.t_start, device=r.dist.device, checkpoint=latest_checkpoint(r.ckpt_root),
            log_file=_log_file(), world_size=r.dist.world_size, max_steps=r.cfg.max_steps,
            overrides=_hydra_overrides())
        write_summary(r.run_dir / "summary.json", summary)
        for line in summary_lines(summary):
            log.info(line)
    destroy()
    return summary


def train(cfg, run_dir: str | Path | None = None) -> dict:
    """Run training as configured (a Config, or a composed DictConfig: checked and typed first);
    returns the end-of-run summary (what summary.json holds; rank 0 only, {} elsewhere)."""
    r = setup(as_config(cfg, strict=True), run_dir)
    try:
        loop(r)
    except BaseException:
        r.logger.finish(exit_code=1)
        raise
    r.logger.finish()
    return finish(r)


def _hydra_run_dir(cfg: DictConfig | None = None) -> str | None:
    """The folder Hydra made for this job: run_dir, or <run_dir>/<job number> under -m (multirun),
    which is then also written into cfg.run_dir so the job's config.yaml names its own folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if cfg is not None and hc.mode == RunMode.MULTIRUN:
        cfg.run_dir = hc.runtime.output_dir
    return hc.runtime.output_dir


def _hydra_overrides() -> list[str]:
    """The command line's overrides (for the summary's `continue` command); [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _log_file() -> str | None:
    """train.log (Hydra's file handler), if logging goes to a file."""
    files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return files[0] if files else None


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
GROUPS = ("model", "data", "attention", "parallel", "logger", "experiment")


def check_group_choices(argv: list[str]) -> None:
    """`model=gpt2_huge` -> one line naming the bad option and the valid ones (trainer/cli.py)."""
    _check_group_choices(argv, CONFIG_DIR, GROUPS)


def run(cfg: DictConfig, run_dir: str | None) -> int:
    """train() with the command line's error handling; returns the exit code.

    A bad setting or bad data prints `error: <one line>` (exit 2) and leaves nothing behind: the
    run dir is removed when it held only Hydra's files when the run began (a run dir of an earlier
    run, e.g. with resume=auto, is kept). A diverged loss or running out of GPU memory prints its
    line and exits 1; Ctrl-C exits 130 with the line that says how to continue.
    """
    import torch
    from longctx.trainer.step import LossDiverged

    run_dir = run_dir or str(cfg.run_dir)  # (Hydra's output dir is cfg.run_dir too)
    fresh = only_hydra_files(run_dir)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        train(cfg, run_dir=run_dir)
    except (ConfigError, LossDiverged) as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if isinstance(e, ConfigError) and fresh:  # every rank: the folder its Hydra made
            remove_run_dir(run_dir)
        return 2 if isinstance(e, ConfigError) else 1
    except torch.cuda.OutOfMemoryError:
        if main_rank:
            print(f"error: out of GPU memory at train.micro_batch={cfg.train.micro_batch}, seq_len={cfg.seq_len}; "
                  "use a smaller train.micro_batch (the global batch stays: more accumulation steps), "
                  "parallel.activation_checkpointing=full, or more GPUs with parallel=fsdp", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if main_rank:
            print(f"error: interrupted; continue from the newest checkpoint with the same command plus "
                  f"run_dir={run_dir} resume=auto", file=sys.stderr, flush=True)
        return 130
    if fresh and only_hydra_files(run_dir):  # a rank's own Hydra folder (rank 0's run dir was used)
        remove_run_dir(run_dir)
    return 0


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    code = run(cfg, _hydra_run_dir(cfg))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:])
        check_override_keys(sys.argv[1:], CONFIG_DIR, GROUPS)
        check_run_dir_writable(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
