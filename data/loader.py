"""Batches from the token files: random training windows and a fixed validation span.

Training: a step's global batch is G = world_size * grad_accum * micro_batch windows of
seq_len + 1 tokens whose starts come from a generator seeded by (seed, step) alone:

    starts = Generator(PCG64(SeedSequence([seed, step]))).integers(0, n_train - seq_len, size=G)

Process `rank` at micro-step `m` takes the slice [(rank * grad_accum + m) * micro_batch, +micro_batch).
So batches are a pure function of (seed, step, rank, micro_step): resuming at step s needs no
loader state, and any split of the same G into world_size x grad_accum sees the same windows.

Validation: the first eval_tokens + 1 tokens of val.bin cut into eval_tokens / seq_len
non-overlapping windows, so runs at 1k, 2k or 4k context are scored on the same predicted tokens.
Each rank gets an equal contiguous share (so FSDP ranks run the same number of forwards).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .prepare import prepare_data, typed
from .tokenfile import CacheError, open_tokens
from .tokenizer import VOCAB_SIZE, tokenizer_fingerprint


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_rank(rank, world_size) -> int:
    """world_size (an integer >= 1) after checking 0 <= rank < world_size."""
    world_size = _check_int("world_size", world_size, 1)
    if not 0 <= _check_int("rank", rank, 0) < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return world_size


@dataclass(frozen=True)
class ValPlan:
    """How a validation pass is laid out; totals are over all ranks."""

    seq_len: int
    eval_tokens: int  # predicted tokens scored in total (= windows * seq_len)
    windows: int  # eval_tokens // seq_len
    windows_per_rank: int
    tokens_per_rank: int  # predicted tokens this rank scores (windows_per_rank * seq_len)
    batches_per_rank: int  # same on every rank; the last batch may be smaller than micro_batch
    first_window: int  # this rank's windows are [first_window, first_window + windows_per_rank)


class TokenData:
    """The train and val token arrays (uint16 memmaps) of a prepared cache folder."""

    def __init__(self, folder: Path, tokenizer_fp: str | None = None):
        self.folder = Path(folder)
        tok = tokenizer_fp or tokenizer_fingerprint()
        self.train = open_tokens(self.folder / "train.bin", tok)
        self.val = open_tokens(self.folder / "val.bin", tok)

    def __repr__(self) -> str:
        return f"TokenData({self.folder}, train={len(self.train):,} tokens, val={len(self.val):,} tokens)"

    # ------------------------------------------------------------------------------- training
    def _check_seq_len(self, seq_len: int, split: str, n: int) -> None:
        if seq_len + 1 > n:
            raise ValueError(
                f"seq_len={seq_len} needs windows of {seq_len + 1} tokens but the {split} split has only "
                f"{n} tokens: use a smaller seq_len or more data"
            )

    def train_starts(self, step: int, *, seed: int, seq_len: int, global_windows: int) -> np.ndarray:
        """The start offsets of all `global_windows` windows of `step` (same on every rank)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step])))
        return rng.integers(0, len(self.train) - seq_len, size=global_windows, dtype=np.int64)

    def train_batch(
        self,
        step: int,
        *,
        seed: int,
        seq_len: int,
        micro_batch: int,
        micro_step: int = 0,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 CPU tensors of shape (micro_batch, seq_len); y is x shifted left by one."""
        step, seed = _check_int("step", step, 0), _check_int("seed", seed, 0)
        seq_len, micro_batch, grad_accum = (_check_int(n, v, 1) for n, v in (
            ("seq_len", seq_len), ("micro_batch", micro_batch), ("grad_accum", grad_accum)))
        world_size = _check_rank(rank, world_size)
        if not 0 <= _check_int("micro_step", micro_step, 0) < grad_accum:
            raise ValueError(f"micro_step must be in [0, grad_accum={grad_accum}), got {micro_step}")
        self._check_seq_len(seq_len, "train", len(self.train))
        starts = self.train_starts(
            step, seed=seed, seq_len=seq_len, global_windows=world_size * grad_accum * micro_batch
        )
        first = (rank * grad_accum + micro_step) * micro_batch
        return self._windows("train", starts[first : first + micro_batch], seq_len)

    def _windows(self, split: str, starts, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.train if split == "train" else self.val
        buf = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int64)
        top = int(buf.max())
        if top >= VOCAB_SIZE:  # verified when opened; this catches a file changed during the run
            raise CacheError(f"{self.folder / split}.bin: token id {top} is not below the vocabulary size "
                             f"{VOCAB_SIZE}: the file changed after it was checked; rerun with data.rebuild=always")
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    # ----------------------------------------------------------------------------- validation
    def val_plan(
        self, seq_len: int, micro_batch: int, eval_tokens: int, rank: int = 0, world_size: int = 1
    ) -> ValPlan:
        """Check the arguments of `val_batches` and say how the pass is laid out (no data read)."""
        seq_len, micro_batch, eval_tokens = (_check_int(n, v, 1) for n, v in (
            ("seq_len", seq_len), ("micro_batch", micro_batch), ("eval_tokens", eval_tokens)))
        world_size = _check_rank(rank, world_size)
        if eval_tokens % seq_len:
            raise ValueError(
                f"eval_tokens={eval_tokens} is not a multiple of seq_len={seq_len}: pick eval_tokens "
                f"divisible by every seq_len you compare (e.g. a multiple of 16384)"
            )
        if eval_tokens + 1 > len(self.val):
            raise ValueError(
                f"eval_tokens={eval_tokens} needs {eval_tokens + 1} validation tokens but val.bin has "
                f"{len(self.val)}: lower eval_tokens or raise data.val_fraction"
            )
        windows = eval_tokens // seq_len
        if windows % world_size:
            raise ValueError(
                f"eval_tokens/seq_len = {windows} validation windows do not split evenly over "
                f"world_size={world_size} ranks: make eval_tokens a multiple of seq_len * world_size"
            )
        per_rank = windows // world_size
        return ValPlan(
            seq_len=seq_len,
            eval_tokens=eval_tokens,
            windows=windows,
            windows_per_rank=per_rank,
            tokens_per_rank=per_rank * seq_len,
            batches_per_rank=-(-per_rank // micro_batch),
            first_window=rank * per_rank,
        )

    def val_batches(
        self, seq_len: int, micro_batch: int, eval_tokens: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) int64 (<= micro_batch, seq_len) over this rank's share of the fixed span.

        Together the ranks score exactly val[1 : eval_tokens + 1] once each. Average as
        sum(loss_mean * y.numel()) / eval_tokens (all-reduce the sum across ranks).
        Arguments are checked when this is called, not at the first `next()`.
        """
        plan = self.val_plan(seq_len, micro_batch, eval_tokens, rank, world_size)
        return self._val_iter(plan, micro_batch)

    def _val_iter(self, plan: ValPlan, micro_batch: int):
        end = plan.first_window + plan.windows_per_rank
        for w0 in range(plan.first_window, end, micro_batch):
            starts = np.arange(w0, min(w0 + micro_batch, end), dtype=np.int64) * plan.seq_len
            yield self._windows("val", starts, plan.seq_len)


def load_data(data_cfg) -> TokenData:
    """Open the token files of `data_cfg`, preparing them first if the cache is missing or bad.

    In a multi-process job call `prepare_data` on rank 0 first, barrier, then this everywhere
    (without the barrier it is still safe: ranks wait on the cache lock). data.rebuild=always is
    honoured by `prepare_data` only; here it counts as auto, so the files are not built twice.
    """
    data_cfg = typed(data_cfg)
    return TokenData(prepare_data(data_cfg, rebuild="auto" if data_cfg.rebuild == "always" else data_cfg.rebuild))
