"""Batch arithmetic, throughput/MFU, `metrics.jsonl`, the console progress line and the end-of-run
summary (`<run_dir>/summary.json` + the lines printed last).

metrics.jsonl (run directory, rank 0 only): one JSON object per logged step,
    {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb", "elapsed", "tokens"}
where `step` counts finished optimizer steps (1..max_steps), `loss` is the mean training loss of
that step over all micro-batches and ranks, `mfu` is null when the peak FLOP/s of the device is
unknown (CPU, unlisted GPUs) and `mem_gb` null on CPU. A row at an evaluation step also carries
`val_loss` and `val_ppl`. On resume from step S the rows with step > S are dropped first, so the
file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from longctx.trainer import ConfigError

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak FLOP/s per GPU (no sparsity), by a substring of the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,   # SXM; the PCIe card is lower (756e12)
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (MFU is then reported as n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


MICRO_TOKENS_DEFAULT = 16384  # micro_batch_tokens=auto without a GPU to size it by
# micro_batch_tokens=auto on a GPU: the largest of these whose activations fit _ACT_SHARE of its memory
_MICRO_TOKENS = (65536, 32768, 16384)
_ACT_SHARE = 0.45
# Activation bytes per token per (layer x width) in training (bf16 autocast, compiled, chunked loss),
# measured: gpt2_small holds 32.2 GB at 65,536 tokens per micro-batch and 10.1 GB at 16,384 on an H200
# (docs/benchmarks.md 8e; ~2 GB of that is weights, gradients and AdamW state): ~50, rounded up.
_ACT_BYTES = 56


def micro_batch_tokens(cfg, device=None) -> int:
    """Tokens per micro-batch that micro_batch=auto aims at: train.micro_batch_tokens when a number;
    auto: 16,384 without a CUDA device, or for attention whose memory grows with seq_len squared
    (naive, Hugging Face backends); otherwise the largest of 64k / 32k / 16k tokens whose estimated
    activations (_ACT_BYTES x n_layer x n_embd per token) fit 45% of the GPU's memory. Larger
    micro-batches mean fewer, larger kernels: +8% tokens/s for gpt2_small at 1k and 16k on an H200
    at 64k tokens against 16k (docs/benchmarks.md 8e)."""
    from longctx.trainer.config import as_config

    cfg = as_config(cfg)
    want = cfg.train.micro_batch_tokens
    if want != "auto":
        return int(want)
    if device is None or getattr(device, "type", str(device)) != "cuda":
        return MICRO_TOKENS_DEFAULT
    if cfg.model.backend != "ours" or cfg.attention.impl not in ("flash", "sdpa", "block_sparse"):
        return MICRO_TOKENS_DEFAULT
    import torch

    memory = torch.cuda.get_device_properties(device).total_memory
    per_token = _ACT_BYTES * cfg.model.n_layer * cfg.model.n_embd
    return next((t for t in _MICRO_TOKENS if t * per_token <= _ACT_SHARE * memory), MICRO_TOKENS_DEFAULT)


def batch_arithmetic(cfg, world_size: int, device=None) -> tuple[int, int]:
    """(micro_batch, grad_accum) of a typed Config (a DictConfig or dict is typed first) such that
        global_batch_tokens = micro_batch x seq_len x grad_accum x world_size   (exactly)
    micro_batch=auto picks the largest micro-batch <= max(1, micro_batch_tokens // seq_len) sequences
    (micro_batch_tokens(cfg, device): 16k tokens without a GPU) that divides each process's share of
    the global batch, so a preset runs on 1, 2, 4, 8, ... processes unchanged (quickstart: 8
    sequences of 256 -> micro-batch 8, 4, 2, 1). An explicit micro_batch larger than that share
    (global_batch_tokens / (seq_len x GPUs) sequences) is lowered to the share, with one log line:
    more cannot be meant literally.
    """
    from longctx.trainer.config import as_config

    cfg = as_config(cfg)  # types and ranges: the schema (trainer/config.py)
    seq_len, gbt, mb = cfg.seq_len, cfg.train.global_batch_tokens, cfg.train.micro_batch
    if mb == "auto":
        mb = max(1, micro_batch_tokens(cfg, device) // seq_len)
        while mb > 1 and gbt % (mb * seq_len * world_size):
            mb -= 1
    share = gbt // (seq_len * world_size)  # sequences per process per optimizer step
    if share == 0:
        raise ConfigError(
            f"train.global_batch_tokens={gbt} is less than one sequence per process (seq_len x processes = "
            f"{seq_len} x {world_size} = {seq_len * world_size}); use train.global_batch_tokens="
            f"{seq_len * world_size} or more, or fewer processes")
    if gbt % (seq_len * world_size) == 0 and 0 < share < mb:
        log.info(f"train.micro_batch={mb} is more than the {share} sequence(s) each of {world_size} process(es) "
                 f"gets per step (global_batch_tokens / (seq_len x processes)); using micro_batch={share}")
        mb = share
    per_micro = mb * seq_len * world_size
    if gbt % per_micro:
        lo = max(per_micro, gbt // per_micro * per_micro)
        raise ConfigError(
            f"train.global_batch_tokens={gbt} is not a multiple of micro_batch x seq_len x GPUs = "
            f"{mb} x {seq_len} x {world_size} = {per_micro}; use train.global_batch_tokens={lo} "
            f"(or {lo + per_micro}), or change train.micro_batch / seq_len")
    return mb, gbt // per_micro


class MetricsFile:
    """Appends one JSON object per line to <run_dir>/metrics.jsonl (only on rank 0)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop rows with step > `step` (written after the checkpoint we resume from)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def rows(self) -> list[dict]:
        """Every complete row written so far (a line cut short by a kill is skipped)."""
        if not self.enabled or not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _fmt_tokens(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


class Throughput:
    """Tokens/s, MFU and ETA over the interval since the last `read()`. Evaluation and
    checkpoint time is excluded by calling `pause()`/`resume()` around it."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None,
                 world_size: int, max_steps: int, device: torch.device):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size
        self.max_steps = max_steps
        self.device = device
        self.start = time.perf_counter()
        self._t0 = self.start
        self._steps = 0
        self._paused_at = None
        self._paused_total = 0.0  # evaluation + checkpoint seconds since start
        self._total_steps = 0

    def pause(self):
        self._paused_at = time.perf_counter()

    def resume(self):
        if self._paused_at is not None:
            dt = time.perf_counter() - self._paused_at
            self._t0 += dt
            self._paused_total += dt
            self._paused_at = None

    def tick(self):
        self._steps += 1
        self._total_steps += 1

    def totals(self) -> dict:
        """Since start: optimizer steps, training seconds (evaluation and checkpoints excluded),
        mean tokens/s (all ranks) and mean MFU (None when the device's peak is unknown)."""
        train_s = max(time.perf_counter() - self.start - self._paused_total, 1e-9)
        tps = self._total_steps * self.tokens_per_step / train_s
        mfu = self.flops_per_token * tps / (self.peak * self.world_size) if self.peak else None
        return {"steps": self._total_steps, "train_s": train_s, "tokens_per_s": tps, "mfu": mfu}

    def read(self, step: int) -> dict:
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        steps, self._steps, self._t0 = self._steps, 0, now
        tps = steps * self.tokens_per_step / dt
        mfu = None
        if self.peak:
            mfu = self.flops_per_token * tps / (self.peak * self.world_size)
        mem = None
        if self.device.type == "cuda":
            mem = torch.cuda.max_memory_allocated(self.device) / 1e9
        eta = (self.max_steps - step) * dt / steps if steps else float("nan")
        return {"tokens_per_s": tps, "mfu": mfu, "mem_gb": mem, "elapsed": now - self.start, "eta_s": eta}


def progress_line(row: dict, max_steps: int) -> str:
    w = len(str(max_steps))
    parts = [f"step {row['step']:>{w}}/{max_steps}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}",
             f"gnorm {row['grad_norm']:.3f}", f"{_fmt_tokens(row['tokens_per_s'])} tok/s",
             "MFU n/a" if row.get("mfu") is None else f"MFU {100 * row['mfu']:.1f}%"]
    if row.get("mem_gb") is not None:
        parts.append(f"mem {row['mem_gb']:.1f}GB")
    parts.append(f"eta {_fmt_time(row.get('eta_s', float('nan')))}")
    return " | ".join(parts)


def eval_line(step: int, val_loss: float, val_ppl: float, tokens: int, seconds: float) -> str:
    return (f"eval step {step}: val_loss {val_loss:.4f} | val_ppl {val_ppl:.2f} "
            f"({_fmt_tokens(tokens)} tokens, {seconds:.1f}s)")


# ------------------------------------------------------------------------------ end-of-run summary
def peak_memory(device: torch.device) -> tuple[float | None, str]:
    """(GB, what was measured): peak CUDA memory allocated by this process, or its peak host RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "GPU memory allocated, peak"
    try:
        import resource
    except ImportError:  # not POSIX
        return None, "n/a"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9, "host RSS of this process, peak"


def next_commands(run_dir: Path, world_size: int, max_steps: int, overrides: list[str]) -> dict:
    """The commands to sample from the run and to continue it (same settings, resume=auto)."""
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("run_dir", "resume", "max_steps")]
    launch = ["python", "train.py"] if world_size == 1 else [
        "torchrun", "--standalone", f"--nproc_per_node={world_size}", "train.py"]
    rd = shlex.quote(str(run_dir))
    return {
        "sample": f"python scripts/sample.py {rd} --max-new-tokens 200",
        "resume": " ".join([*launch, *map(shlex.quote, keep), f"run_dir={rd}", "resume=auto",
                            f"max_steps={2 * max_steps}"]),
    }


def _last(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def build_summary(*, run_dir: Path, rows: list[dict], totals: dict, tokens_per_step: int, wall_s: float,
                  device: torch.device, checkpoint: Path | None, log_file: str | None, world_size: int,
                  max_steps: int, overrides: list[str]) -> dict:
    """What the run reached and where everything is; `rows` are metrics.jsonl's (the whole run,
    resumed parts included), `totals` this process's Throughput.totals()."""
    loss, val_loss = _last(rows, "loss"), _last(rows, "val_loss")
    step = _last(rows, "step") or 0
    mem, mem_kind = peak_memory(device)
    run_dir = Path(run_dir).absolute()
    return {
        "step": step, "max_steps": max_steps, "tokens": step * tokens_per_step,
        "loss": loss, "ppl": math.exp(min(loss, 700.0)) if loss is not None else None,
        "val_loss": val_loss, "val_ppl": _last(rows, "val_ppl"),
        "wall_s": wall_s, "steps_this_run": totals["steps"], "train_s": totals["train_s"],
        "tokens_per_s": totals["tokens_per_s"], "mfu": totals["mfu"],
        "peak_mem_gb": mem, "peak_mem_kind": mem_kind, "device": str(device), "world_size": world_size,
        "run_dir": str(run_dir), "metrics": str(run_dir / "metrics.jsonl"),
        "log": log_file, "checkpoint": str(Path(checkpoint).absolute()) if checkpoint else None,
        "commands": next_commands(run_dir, world_size, max_steps, overrides),
    }


def summary_lines(s: dict) -> list[str]:
    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    mfu = "n/a (peak FLOP/s of this device unknown)" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
    return [
        (f"done: step {s['step']}/{s['max_steps']}, {_fmt_tokens(s['tokens'])} tokens, wall {_fmt_time(s['wall_s'])} "
         f"({s['steps_this_run']} steps in this run, {_fmt_time(s['train_s'])} of them training)"),
        (f"  train loss {f(s['loss'], '.4f')} (ppl {f(s['ppl'], '.2f')}) | val loss {f(s['val_loss'], '.4f')} "
         f"(ppl {f(s['val_ppl'], '.2f')})"),
        (f"  mean {_fmt_tokens(s['tokens_per_s'])} tok/s over {s['world_size']} process(es) on {s['device']} | "
         f"MFU {mfu} | peak memory {f(s['peak_mem_gb'], '.2f')} GB ({s['peak_mem_kind']})"),
        f"  metrics:    {s['metrics']}",
        f"  log:        {s['log'] or 'n/a (not run through Hydra)'}",
        f"  checkpoint: {s['checkpoint'] or 'none'}",
        f"  summary:    {Path(s['run_dir']) / 'summary.json'}",
        f"  sample:     {s['commands']['sample']}",
        f"  continue:   {s['commands']['resume']}   (max_steps is up to you; the LR schedule follows it)",
    ]


def write_summary(path: Path, summary: dict) -> None:
    """summary.json, written to a temporary file and renamed (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
