#!/usr/bin/env python
"""Reproduce the FlashAttention paper's tables with the project's own commands.

    python scripts/reproduce.py TABLE [TABLE ...] --scale smoke|small|paper [--out DIR]
    TABLE: table4 | table2 | blocksparse | figure3 | table5 | all

  table4       perplexity vs context length (1k, 2k, 4k + 8k, 16k) at the same token budget
  table2       training speed vs Hugging Face GPT-2 (eager, sdpa), GPT-2 small and medium
  blocksparse  dense vs block-sparse (local, BigBird) training: perplexity, tokens/s, longest context
  figure3      attention speed and memory vs sequence length (scripts/bench_attention.py)
  table5       long-document classification F1 vs length (scripts/eval_longdoc.py)

Every row runs the real user command as a subprocess (`python train.py ...`, `torchrun ...
train.py ...`, `python scripts/bench_attention.py ...`, `python scripts/eval_longdoc.py ...`) with
its output streamed; nothing is re-implemented here. Each table writes DIR/TABLE/:
  TABLE.md    the table, the paper's numbers beside ours, the protocol, the exact commands
  TABLE.png   the plot
  TABLE.json  rows (status, result, command, wall time, GPU, date) + environment; also the state
              that makes a second invocation continue where the first stopped
  runs/ROW/   train.py run directories (fixed per row: metrics.jsonl, config.yaml, train.log)
  logs/ROW.log  each row's full output

Continuing: the same command again skips finished rows, reruns failed ones and continues
unfinished trainings from their newest checkpoint (every training row runs with its own fixed
run_dir and resume=auto). A row whose command changed (other --set, other code defaults) reruns
from scratch. A failed row is marked failed with the last line of its error and the rest runs.
Exit status: 0 all rows finished, 1 some row failed, 3 stopped by --max-minutes (run again).

Scales (budgets measured for one H200; `--dry-run` prints every command and estimate):
  smoke  CPU-sized plumbing check (tiny models, a few steps; CI runs it): every table in ~2 min
  small  one GPU: table4 ~9 min (gpt2_small, 5 contexts x 20M tokens of site-packages Python),
         table2 ~4 min (3.1M tokens for small, 1M for medium, per backend), blocksparse ~3.5 min
         (gpt2_small at 8k, 4.2M tokens per layout, plus a 1-step probe per layout),
         figure3 ~3 min, table5 ~3 min. With --max-minutes a run stops before a row that would
         not fit and says so; the same command continues later (see docs/reproduce.md).
  paper  the paper's recipe: OpenWebText, GPT-2 small/medium, 400k steps of 0.5M tokens, 8 GPUs
         per training row (torchrun + FSDP2; --nproc to change); days per row.

  python scripts/reproduce.py table4 --scale small --out outputs/reproduce
  python scripts/reproduce.py table4 table2 blocksparse --scale small --max-minutes 9
  python scripts/reproduce.py all --scale smoke --out /tmp/repro
  python scripts/reproduce.py all --scale paper --dry-run
"""
from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk  # noqa: E402

ROOT = bk.REPO
SCALES = ("smoke", "small", "paper")
TABLE_ORDER = ("table4", "table2", "blocksparse", "figure3", "table5")
EXIT_FAILED, EXIT_STOPPED = 1, 3

# ------------------------------------------------------------------------------ paper numbers
# From the FlashAttention paper (arXiv 2205.14135) and the FlashAttention-2 README, as listed in the
# project's published anchors. Only these are printed; nothing is interpolated.
PAPER = {
    "table4": {"source": "FlashAttention paper, Table 4: GPT-2 small on OpenWebText, 8xA100",
               "ppl": {1024: 18.2, 2048: 17.6, 4096: 17.5}, "days": {1024: 2.7, 2048: 3.0, 4096: 3.6},
               "megatron_1k_days": 4.7},
    "table2": {"source": "FlashAttention paper, Table 2: GPT-2 on OpenWebText, 8xA100",
               "gpt2_small": {"ppl": 18.2, "hf_days": 9.5, "megatron_days": 4.7, "flash_days": 2.7},
               "gpt2_medium": {"ppl": 14.3, "hf_days": 21.0, "flash_days": 6.9}},
    "table5": {"source": "FlashAttention paper, Table 5: long-document classification, micro-F1",
               "seq_lens": [512, 1024, 2048, 4096, 8192, 16384],
               "mimic": [52.8, 50.7, 51.7, 54.6, 56.4, 57.1], "ecthr": [72.2, 74.3, 77.1, 78.6, 80.7, 79.2]},
    "figure3": {"source": "FlashAttention-2 README: H100, causal, head dim 64, forward+backward TFLOP/s",
                "tflops": {512: 141, 16384: 284}},
    "blocksparse": {"source": "FlashAttention paper: block-sparse FlashAttention is faster than dense "
                              "at the same length and reaches longer sequences, with quality close to "
                              "dense (no GPT-2 numbers published)"},
}

# Training throughput of gpt2_small through train.py on one H200 (tokens/s; docs/benchmarks.md and
# this script's GPU check of 2026-11-22: ours 344k at 1k, 177k at 16k, HF eager 119k at 1k, BigBird
# 323k at 8k), used only to size --scale small and to estimate durations; rows measure everything.
H200_TOKS = {"ours": {1024: 344e3, 2048: 321e3, 4096: 285e3, 8192: 233e3, 16384: 177e3},
             "hf_eager": {1024: 119e3}, "hf_sdpa": {1024: 150e3}}
SPARSE_SPEEDUP = 1.35  # block-sparse (local, BigBird) over dense at 8k, measured 1.39 for BigBird
MEDIUM_SLOWDOWN = 2.9  # gpt2_medium / gpt2_small step time at equal tokens (355M vs 124M params)
# start-up, kernel compilation, evaluation and checkpoints of one row (measured 14-18 s on the H200;
# the first row of a machine also tokenises the corpus: 18.5 s for 150 MB of site-packages)
ROW_OVERHEAD_S = {"smoke": 8.0, "small": 20.0, "paper": 300.0}

# Tiny model for --scale smoke: gpt2_tiny narrowed to 2 layers of width 64 (3.3M params, most of
# them the embedding); the point is the plumbing, not the numbers.
SMOKE_MODEL = ["model=gpt2_tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=64"]
SMOKE_DATA = ["data=stdlib", "data.max_files=40", "data.progress=false"]

# scripts/eval_longdoc.py task names (the long-document issue): an offline task built from source
# files that runs anywhere, and the paper's sets for users who have them.
LONGDOC_OFFLINE_TASK = "offline"
LONGDOC_PAPER_TASKS = ("ecthr_a", "mimic")  # mimic needs the user's MIMIC-III files (task.train_file=...)
# smoke: two torch sub-packages as classes, a few short documents, two optimizer steps per length
LONGDOC_SMOKE = [*SMOKE_MODEL, "device=cpu", "logger=none", "task.packages=[torch.fx,torch.utils]",
                 "task.train_per_class=8", "task.test_per_class=4", "max_steps=2"]

CORPUS_CAP_BYTES = 150e6     # site-packages Python beyond this is subsampled (data.max_files)
CORPUS_MIN_BYTES = 60e6      # below this the standard library (data=stdlib) is used instead
BYTES_PER_TOKEN = 2.2        # GPT-2 BPE on Python source (measured on torch's .py files)


# ------------------------------------------------------------------------------ small helpers
def fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = round(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def fmt_tok(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def gb(x) -> str:
    return "-" if x is None else f"{x:.1f} GB"


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def log(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


class RowError(RuntimeError):
    """A row finished but its results are missing or incomplete."""


class SkipRow(Exception):
    """A row that has no meaning on this machine (e.g. a GPU memory probe on a CPU)."""


def shell_join(argv: list[str]) -> str:
    """The command as a user would type it (the interpreter shown as `python`)."""
    shown = ["python" if a == sys.executable else a for a in argv]
    return " ".join(shlex.quote(a) for a in shown)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def error_line(text: str) -> str:
    """The line that says what went wrong: train.py's `error: ...`, else an exception's last line,
    else the last non-empty line."""
    lines = [ln.strip() for ln in _ANSI.sub("", text).replace("\r", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*", ln):
            return ln
    return lines[-1] if lines else "(no output)"


def is_oom(text: str) -> bool:
    return bool(re.search(r"out of memory|OutOfMemoryError", text, re.IGNORECASE))


def _child_env(drop_interpreter: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if drop_interpreter:
        # Training rows on a machine without CUDA use the model's CPU fallbacks (sdpa / reference
        # attention); Triton's interpreter is for the kernel tests and far too slow to train with.
        env.pop("TRITON_INTERPRET", None)
    return env


# ------------------------------------------------------------------------------ the corpus
def site_packages_dirs() -> list[str]:
    """Folders of installed packages of this interpreter: sysconfig's purelib/platlib and the folder
    holding torch (found without importing it)."""
    import importlib.util
    import sysconfig

    found = [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")]
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        found.append(str(Path(spec.origin).resolve().parent.parent))
    dirs = []
    for d in found:
        if d and Path(d).is_dir():
            d = str(Path(d).resolve())
            if d not in dirs:
                dirs.append(d)
    # drop folders inside another one (a file must not be listed twice)
    return [d for d in dirs if not any(d != o and d.startswith(o + os.sep) for o in dirs)]


def python_files(dirs: list[str]) -> tuple[int, int]:
    n = size = 0
    for root in dirs:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [x for x in dirnames if x != "__pycache__" and not x.startswith(".")]
            for f in filenames:
                if f.endswith(".py"):
                    try:
                        size += os.path.getsize(os.path.join(dirpath, f))
                        n += 1
                    except OSError:
                        pass
    return n, size


@dataclass
class Corpus:
    overrides: list[str]
    note: str


def small_corpus(eval_tokens: int) -> Corpus:
    """data=local over this interpreter's site-packages .py files (long real documents present on
    every machine): subsampled to about CORPUS_CAP_BYTES, or the standard library when too small.
    The validation share is sized to hold 2.5x the largest eval_tokens."""
    dirs = site_packages_dirs()
    n_files, size = python_files(dirs)
    if size < CORPUS_MIN_BYTES:
        return Corpus(["data=stdlib", "data.progress=false"],
                      f"data=stdlib (the standard library's .py files): site-packages holds only "
                      f"{size / 1e6:.0f} MB of Python, less than {CORPUS_MIN_BYTES / 1e6:.0f} MB")
    paths = ",".join(f'"{d}/**/*.py"' for d in dirs)
    over = ["data=local", f"data.paths=[{paths}]", "data.progress=false"]
    used = size
    if size > CORPUS_CAP_BYTES:
        max_files = int(n_files * CORPUS_CAP_BYTES / size)
        over.append(f"data.max_files={max_files}")
        used = CORPUS_CAP_BYTES
    val_fraction = min(0.2, max(0.005, round(2.5 * eval_tokens * BYTES_PER_TOKEN / used, 4)))
    over.append(f"data.val_fraction={val_fraction}")
    note = (f"data=local: the .py files of {', '.join(dirs)} ({n_files:,} files, {size / 1e6:.0f} MB"
            + (f"; a seeded subset of ~{CORPUS_CAP_BYTES / 1e6:.0f} MB" if size > CORPUS_CAP_BYTES else "")
            + f"), one document per file; validation = {val_fraction:.2%} of the bytes, whole files")
    return Corpus(over, note)


# ------------------------------------------------------------------------------ rows and tables
@dataclass
class Row:
    key: str                      # unique in its table; names runs/<key> and logs/<key>.log
    label: dict                   # what the row is (seq_len, model, backend, layout, ...)
    kind: str                     # "train" (train.py) or "script" (a benchmark / eval script)
    est_s: float                  # expected wall time (budgets, ETA)
    argv: list[str] | None = None
    # argv built from finished rows' results (the memory probes); returns (argv, None) or (None, why)
    make_argv: Callable[[dict], tuple[list[str] | None, str | None]] | None = None
    max_steps: int | None = None  # train rows: the step count metrics.jsonl must reach
    result_json: Path | None = None  # script rows: where the script writes its results
    expect_failure: Callable[[str], dict | None] | None = None  # probe: an OOM is a result, not a failure


@dataclass
class Ctx:
    scale: str
    out: Path
    sets: list[str]
    nproc: int
    env: dict
    corpus: Corpus | None = None
    notes: dict = field(default_factory=dict)

    def table_dir(self, table: str) -> Path:
        return self.out / table

    def run_dir(self, table: str, key: str) -> Path:
        return self.out / table / "runs" / key

    def train_argv(self, table: str, key: str, overrides: list[str]) -> list[str]:
        """python train.py (or torchrun ... train.py) with the row's fixed run_dir and resume=auto."""
        launch = ([sys.executable, "train.py"] if self.nproc == 1 else
                  ["torchrun", "--standalone", f"--nproc_per_node={self.nproc}", "train.py"])
        logger = [] if self.scale == "paper" else ["logger=none"]
        return [*launch, *overrides, *logger, f"run_dir={self.run_dir(table, key)}", "resume=auto", *self.sets]

    def preset_over(self, preset: str, *variant: str) -> list[str]:
        """--scale paper: the experiment preset, the row's variant, FSDP over several GPUs."""
        return [f"experiment={preset}", *variant] + (["parallel=fsdp"] if self.nproc > 1 else [])

    def sized_over(self, s: dict, *variant: str, seq: int) -> list[str]:
        """--scale smoke / small: model, the row's variant, corpus, then the sizes of `s`."""
        return [*s["model"], *variant, *(self.corpus.overrides if self.corpus else []), f"seq_len={seq}",
                f"max_steps={s['steps']}", f"train.global_batch_tokens={s['batch']}",
                *([f"train.micro_batch={s['micro']}"] if "micro" in s else []), f"eval_tokens={s['eval']}",
                "eval_every=0", *s["extra"]]


def est_train_s(scale: str, tokens: float, tok_s: float) -> float:
    return ROW_OVERHEAD_S[scale] + tokens / tok_s


class Table:
    name = ""
    title = ""

    def rows(self, ctx: Ctx) -> list[Row]:
        raise NotImplementedError

    def protocol(self, ctx: Ctx) -> str:
        return ""

    def markdown(self, state: dict, ctx: Ctx) -> str:
        raise NotImplementedError

    def plot(self, state: dict, path: Path) -> str | None:
        return None


def _done(state: dict) -> dict:
    return {k: r for k, r in state["rows"].items() if r.get("status") == "done"}


def _res(state: dict, key: str) -> dict | None:
    r = state["rows"].get(key)
    return r.get("result") if r and r.get("status") == "done" else None


def _status_cell(state: dict, key: str) -> str | None:
    """'failed: <error>' / 'not run yet' for a row without a result; None when it has one."""
    r = state["rows"].get(key, {})
    if r.get("status") == "done":
        return None
    if r.get("status") == "failed":
        return f"failed: {r.get('error', '?')}"
    if r.get("status") == "skipped":
        return f"n/a: {r.get('error', '?')}"
    return "not run yet"


def _md_table(head: list[str], rows: list[list], tail: list[str]) -> str:
    """A markdown table (an empty cell as "| |"), then the lines of `tail`."""
    def line(cells):
        return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"
    return "\n".join([line(head), "|" + "---|" * len(head), *map(line, rows), *tail])


def _blank(state: dict, key: str, before: list, empty: int, after: list) -> list | None:
    """The row of a table line without a result ('failed: ...', 'not run yet'), else None."""
    bad = _status_cell(state, key)
    return None if bad is None else [*before, bad, *[""] * empty, *after]


def _figure(ncols: int, size: tuple):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=size, squeeze=False)
    return fig, list(axes[0])


def _save(fig, path: Path) -> None:
    """Write the PNG (atomic); None: the plot's "nothing went wrong"."""
    fig.tight_layout()
    bk.save_figure(fig, path)


def _loss_curves(ax, runs: dict, **legend) -> None:
    """Training loss vs tokens of finished training rows {label: result}."""
    for label, res in runs.items():
        c = res.get("curve") or []
        ax.plot([t for t, _ in c], [v for _, v in c], label=label)
    ax.set(xlabel="training tokens", ylabel="training loss")
    ax.legend(**legend)


# ------------------------------------------------------------------------------ table 4
class Table4(Table):
    name = "table4"
    title = "Table 4: perplexity vs context length at the same token budget"

    def sizes(self, ctx: Ctx) -> dict:
        if ctx.scale == "smoke":
            return dict(seq_lens=[64, 128, 256], model=SMOKE_MODEL, batch=1024, steps=4, eval=2048,
                        extra=["train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_steps=1", "ckpt_every=0",
                               "log_every=1"])
        if ctx.scale == "small":
            # 136 steps x 131072 tokens = 17.8M tokens per context; all five contexts ~7.5 min on an H200
            return dict(seq_lens=[1024, 2048, 4096, 8192, 16384], model=["model=gpt2_small"], batch=131072,
                        steps=136, eval=524288,
                        extra=["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=15", "ckpt_every=40",
                               "ckpt_keep=1", "log_every=4", "compile=false"])
        return dict(seq_lens=[1024, 2048, 4096, 8192, 16384], presets=True, eval=2097152, steps=400000,
                    batch=524288)

    def rows(self, ctx: Ctx) -> list[Row]:
        s = self.sizes(ctx)
        rows = []
        for n in s["seq_lens"]:
            key = f"ctx{n}"
            if s.get("presets"):
                over = ctx.preset_over(f"gpt2_small_owt_{n // 1024}k")
                est = s["steps"] * s["batch"] / (H200_TOKS["ours"][n] * 0.6 * ctx.nproc)  # A100-class GPUs
            else:
                over = ctx.sized_over(s, seq=n)
                tok_s = H200_TOKS["ours"].get(n, 170e3) if ctx.scale == "small" else 2e3
                est = est_train_s(ctx.scale, s["steps"] * s["batch"], tok_s)
            paper_ctx = n if ctx.scale != "smoke" else 1024 * n // s["seq_lens"][0]  # smoke: 64 stands for 1k
            rows.append(Row(key, {"seq_len": n, "paper_ctx": paper_ctx}, "train", est,
                            argv=ctx.train_argv(self.name, key, over), max_steps=s["steps"]))
        return rows

    def protocol(self, ctx: Ctx) -> str:
        s = self.sizes(ctx)
        model = "gpt2_small (124M)" if ctx.scale != "smoke" else "a 2-layer, 64-wide GPT-2 (smoke)"
        data = ctx.corpus.note if ctx.corpus else "OpenWebText (the paper's corpus)"
        return (f"Model {model}, trained at each context for the same {fmt_tok(s['steps'] * s['batch'])} tokens "
                f"({s['steps']} steps x {s['batch']:,} tokens), same data, same seed and recipe. {data}. "
                f"Every model is scored on the same first {s['eval']:,} validation tokens, cut into "
                f"non-overlapping windows of its own context length (so a token sees on average half a "
                f"window of context); perplexity = exp(mean loss over those tokens). Train time = time "
                f"in training steps (evaluation and checkpoints excluded), first step's compilation "
                f"included.")

    def markdown(self, state: dict, ctx: Ctx) -> str:
        p, rows = PAPER["table4"], []
        for key, r in state["rows"].items():
            n, pn = r["label"]["seq_len"], r["label"].get("paper_ctx", r["label"]["seq_len"])
            paper = f"{pn}, {p['ppl'][pn]}, {p['days'][pn]}" if pn in p["ppl"] else f"{pn}, -, -"
            x = r.get("result")
            rows.append(_blank(state, key, [n], 6, [paper]) or [
                n, f"**{x['val_ppl']:.2f}**", f"{x['val_loss']:.4f}", fmt_tok(x["tokens"]), fmt_s(x["train_s"]),
                fmt_tok(x["tokens_per_s"]), pct(x.get("mfu")), gb(x.get("mem_gb")), paper])
        return _md_table(["context", "val ppl (ours)", "val loss", "tokens", "train time", "tokens/s", "MFU",
                          "peak mem", "paper: context, ppl, days (8xA100)"], rows,
                         ["", f"Paper: {p['source']}; Megatron-LM at 1k: {p['megatron_1k_days']} days. Beyond 4k "
                          f"the paper has no GPT-2 numbers.", "", self.verdict(state)])

    @staticmethod
    def verdict(state: dict) -> str:
        res = sorted((r["label"]["seq_len"], r["result"]["val_ppl"]) for r in _done(state).values())
        if len(res) < 2:
            return "Trend: needs at least two finished contexts."
        falls = [b[1] < a[1] for a, b in itertools.pairwise(res)]
        steps = ", ".join(f"{a[0]}->{b[0]}: {b[1] - a[1]:+.2f}" for a, b in itertools.pairwise(res))
        if all(falls):
            return f"Trend: perplexity falls with every longer context ({steps})."
        return (f"Trend: perplexity does NOT fall at every step ({steps}); at this token budget the longer "
                f"contexts have seen fewer distinct windows (same tokens in fewer, longer sequences) and "
                f"the positions beyond the shortest context are trained less, which can outweigh the extra context.")

    def plot(self, state: dict, path: Path) -> str | None:
        done = _done(state)
        if not done:
            return "no finished rows"
        fig, (a1, a2) = _figure(2, (11, 4))
        pts = sorted((r["label"]["seq_len"], r["result"]["val_ppl"]) for r in done.values())
        a1.plot(*zip(*pts), "o-", label="ours (val ppl)")
        a1.set_xscale("log", base=2)
        a1.set(xlabel="context length (tokens)", ylabel="validation perplexity (ours)",
               title="perplexity vs context (same tokens)")
        pp = sorted((r["label"]["seq_len"], PAPER["table4"]["ppl"][r["label"]["paper_ctx"]])
                    for r in state["rows"].values() if r["label"].get("paper_ctx") in PAPER["table4"]["ppl"])
        b1 = a1.twinx()
        b1.plot([x for x, _ in pp], [y for _, y in pp], "s--", color="gray", label="paper (OpenWebText)")
        b1.set_ylabel("paper perplexity (OpenWebText)", color="gray")
        h1, l1 = a1.get_legend_handles_labels()
        h2, l2 = b1.get_legend_handles_labels()
        a1.legend(h1 + h2, l1 + l2, fontsize=8)
        _loss_curves(a2, {f"{r['label']['seq_len']}": r["result"]
                          for r in sorted(done.values(), key=lambda r: r["label"]["seq_len"])},
                     title="context", fontsize=8)
        a2.set_title("training loss per context")
        return _save(fig, path)


# ------------------------------------------------------------------------------ table 2
class Table2(Table):
    name = "table2"
    title = "Table 2: training speed vs Hugging Face GPT-2 (same trainer, data and batch)"
    BACKENDS = ("ours", "hf_eager", "hf_sdpa")

    def sizes(self, ctx: Ctx) -> dict:
        if ctx.scale == "smoke":  # one tiny size stands for both models
            return {"gpt2_small": dict(model=SMOKE_MODEL, seq=64, micro=8, batch=512, steps=3, eval=1024,
                                       extra=["train.warmup_steps=1", "log_every=1", "ckpt_every=0"])}
        if ctx.scale == "small":
            return {"gpt2_small": dict(model=["model=gpt2_small"], seq=1024, micro=16, batch=65536, steps=48,
                                       eval=131072, extra=["train.warmup_steps=4", "log_every=4", "ckpt_every=0"]),
                    "gpt2_medium": dict(model=["model=gpt2_medium"], seq=1024, micro=8, batch=65536, steps=16,
                                        eval=131072, extra=["train.lr=3e-4", "train.min_lr=3e-5",
                                                            "train.warmup_steps=2", "log_every=2", "ckpt_every=0"])}
        return {"gpt2_small": dict(preset="gpt2_small_owt_1k", steps=400000, batch=524288),
                "gpt2_medium": dict(preset="gpt2_medium_owt", steps=400000, batch=524288)}

    def rows(self, ctx: Ctx) -> list[Row]:
        rows = []
        for model, s in self.sizes(ctx).items():
            for backend in self.BACKENDS:
                key = f"{model.removeprefix('gpt2_')}_{backend}"
                # ours runs the trainer's default (its fastest path); Hugging Face runs as users run it,
                # uncompiled, like the paper's Hugging Face baseline
                variant = [] if backend == "ours" else [f"model.backend={backend}", "compile=false"]
                if "preset" in s:
                    over = ctx.preset_over(s["preset"], *variant)
                    est = s["steps"] * s["batch"] / (H200_TOKS[backend][1024] * 0.6 * ctx.nproc)
                else:
                    over = ctx.sized_over(s, *variant, seq=s["seq"])
                    tok_s = H200_TOKS[backend][1024] / (MEDIUM_SLOWDOWN if model == "gpt2_medium" else 1)
                    est = est_train_s(ctx.scale, s["steps"] * s["batch"], tok_s if ctx.scale == "small" else 1e3)
                    if backend != "ours":
                        est += 5  # importing transformers
                rows.append(Row(key, {"model": model, "backend": backend}, "train", est,
                                argv=ctx.train_argv(self.name, key, over), max_steps=s["steps"]))
        return rows

    def protocol(self, ctx: Ctx) -> str:
        sizes = self.sizes(ctx)
        parts = []
        for model, s in sizes.items():
            parts.append(f"{model}: {fmt_tok(s['steps'] * s['batch'])} tokens ({s['steps']} steps x "
                         f"{s['batch']:,})" + (f", micro-batch {s['micro']} x {s['seq']}" if "micro" in s else ""))
        data = ctx.corpus.note if ctx.corpus else "OpenWebText"
        return ("Each row is `python train.py` with model.backend=ours (our GPT-2, attention=flash) or "
                "hf_eager / hf_sdpa (transformers' GPT2LMHeadModel of the same sizes, padded vocabulary, "
                "same init scheme) through the same loop, optimizer (fused AdamW), bf16 autocast, data and "
                f"batch. {'; '.join(parts)}. {data}. Speed-up = steady tokens/s (logged intervals after "
                "the first) of ours / the row's; time to the token budget at that speed is the comparison "
                "the paper makes in days to a target perplexity. MFU uses our FLOPs formula for every row "
                "(equal work). The val loss shows all backends learn the same way.")

    def markdown(self, state: dict, ctx: Ctx) -> str:
        p, rows = PAPER["table2"], []
        for key, r in state["rows"].items():
            model, backend = r["label"]["model"], r["label"]["backend"]
            pm = p.get(model, {})
            paper = {"ours": f"{pm.get('flash_days', '-')} days (ppl {pm.get('ppl', '-')})",
                     "hf_eager": f"HF {pm['hf_days']} days ({pm['hf_days'] / pm['flash_days']:.1f}x)" if pm else "-",
                     "hf_sdpa": "-"}[backend]
            x, ours = r.get("result"), _res(state, f"{model.removeprefix('gpt2_')}_ours")
            rows.append(_blank(state, key, [model, backend], 6, [paper]) or [
                model, backend, fmt_tok(x["tokens"]), fmt_s(x["tokens"] / x["tokens_per_s"]),
                fmt_tok(x["tokens_per_s"]), pct(x.get("mfu")), gb(x.get("mem_gb")), f"{x['val_loss']:.3f}",
                "1.00x" if backend == "ours" else f"{ours['tokens_per_s'] / x['tokens_per_s']:.2f}x" if ours else "-",
                paper])
        return _md_table(["model", "backend", "tokens", "time at steady speed", "tokens/s", "MFU", "peak mem",
                          "val loss", "speed-up of ours", "paper: days (speed-up of FlashAttention)"], rows,
                         ["", f"Paper: {p['source']}; Megatron-LM took {p['gpt2_small']['megatron_days']} days for "
                          f"GPT-2 small. The paper's Hugging Face runs used its eager attention."])

    def plot(self, state: dict, path: Path) -> str | None:
        done = _done(state)
        if not done:
            return "no finished rows"
        fig, (a1, a2) = _figure(2, (11, 4))
        models = list(dict.fromkeys(r["label"]["model"] for r in done.values()))
        width = 0.8 / len(self.BACKENDS)
        for i, backend in enumerate(self.BACKENDS):
            ys = [next((r["result"]["tokens_per_s"] for r in done.values()
                        if r["label"] == {"model": m, "backend": backend}), 0) for m in models]
            a1.bar([j + i * width for j in range(len(models))], ys, width, label=backend)
        a1.set_xticks([j + width for j in range(len(models))], models)
        a1.set(ylabel="tokens/s", title="training throughput (same trainer)")
        a1.legend(fontsize=8)
        _loss_curves(a2, {f"{r['label']['model']} {r['label']['backend']}": r["result"] for r in done.values()},
                     fontsize=7)
        a2.set_title("same math: loss vs tokens")
        return _save(fig, path)


# ------------------------------------------------------------------------------ block-sparse
# the memory model of the probe: bytes per parameter that do not scale with tokens
# (fp32 weights 4 + gradients 4 + AdamW moments 8 + the bf16 autocast copies 2)
BYTES_PER_PARAM = 18
USABLE_MEMORY = 0.88  # share of the GPU's memory a run may plan to fill (allocator slack, CUDA context)


def gpt2_params(n_layer: int, n_embd: int, seq_len: int, padded_vocab: int = 50304) -> int:
    """Parameters of our GPT-2 (tied embedding): wte + wpe + blocks (12 d^2 + 13 d each) + ln_f."""
    return padded_vocab * n_embd + seq_len * n_embd + n_layer * (12 * n_embd ** 2 + 13 * n_embd) + 2 * n_embd


def estimate_max_context(peak_bytes: float, tokens_per_micro: int, seq_len: int, world_size: int,
                         n_layer: int, n_embd: int, gpu_bytes: float, multiple: int = 8192) -> dict:
    """The longest seq_len (micro-batch 1, one GPU) whose peak memory fits, from one measured peak.

    peak = BYTES_PER_PARAM * P(seq_len) / world_size + a * tokens_per_micro  (FlashAttention and
    block-sparse attention keep O(N) activations, so a = activation bytes per token is constant)
    P(L) = P(seq_len) + n_embd * (L - seq_len)  (the position table grows with L)
    L_max solves BYTES_PER_PARAM * P(L) + a * L = USABLE_MEMORY * gpu_bytes; rounded down to `multiple`.
    """
    p_now = gpt2_params(n_layer, n_embd, seq_len)
    static = BYTES_PER_PARAM * p_now / world_size
    a = (peak_bytes - static) / tokens_per_micro
    if a <= 0:
        raise RowError(f"measured peak {peak_bytes / 1e9:.1f} GB is below the model state alone")
    p_fixed = p_now - n_embd * seq_len
    budget = USABLE_MEMORY * gpu_bytes - BYTES_PER_PARAM * p_fixed
    est = budget / (a + BYTES_PER_PARAM * n_embd)
    return {"act_bytes_per_token": a, "estimate": int(est), "probe_len": max(multiple, int(est) // multiple * multiple)}


class BlockSparse(Table):
    name = "blocksparse"
    title = "Block-sparse FlashAttention: dense vs local vs BigBird at the same length and tokens"
    LAYOUTS = {"dense": ["attention=flash"],
               "local": ["attention=block_sparse", "attention.layout=local"],
               "bigbird": ["attention=block_sparse", "attention.layout=bigbird"]}

    def sizes(self, ctx: Ctx) -> dict:
        if ctx.scale == "smoke":
            return dict(model=SMOKE_MODEL, n_layer=2, n_embd=64, seq=512, batch=1024, steps=3, eval=1024,
                        layout_extra=["attention.window_blocks=1", "attention.random_blocks=1"],
                        extra=["train.warmup_steps=1", "log_every=1", "ckpt_every=0"])
        if ctx.scale == "small":
            # 32 steps x 131072 tokens = 4.2M tokens per layout at 8k (block 128: 64 blocks per row)
            return dict(model=["model=gpt2_small"], n_layer=12, n_embd=768, seq=8192, batch=131072, steps=32,
                        eval=262144, layout_extra=[],
                        extra=["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=4", "log_every=4",
                               "ckpt_every=0", "compile=false"])
        return dict(preset="gpt2_small_owt_16k", n_layer=12, n_embd=768, seq=16384, batch=524288, steps=400000,
                    layout_extra=[])

    def rows(self, ctx: Ctx) -> list[Row]:
        s = self.sizes(ctx)
        rows = []
        for layout, attn in self.LAYOUTS.items():
            extra = s["layout_extra"] if layout != "dense" else []
            if "preset" in s:
                over = ctx.preset_over(s["preset"], *attn, *extra)
                est = s["steps"] * s["batch"] / (H200_TOKS["ours"][16384] * 0.6 * ctx.nproc)
            else:
                over = ctx.sized_over(s, *attn, *extra, seq=s["seq"])
                tok_s = H200_TOKS["ours"][8192] * (1.0 if layout == "dense" else SPARSE_SPEEDUP)
                est = est_train_s(ctx.scale, s["steps"] * s["batch"], tok_s if ctx.scale == "small" else 2e3)
            rows.append(Row(layout, {"layout": layout, "seq_len": s["seq"]}, "train", est,
                            argv=ctx.train_argv(self.name, layout, over), max_steps=s["steps"]))
        for layout, attn in self.LAYOUTS.items():
            rows.append(self._probe_row(ctx, s, layout, attn))
        return rows

    def _probe_row(self, ctx: Ctx, s: dict, layout: str, attn: list[str]) -> Row:
        key = f"probe_{layout}"
        extra = s["layout_extra"] if layout != "dense" else []
        base = s.get("model") or [f"experiment={s.get('preset')}"]
        gpu_bytes = ctx.env.get("gpu_mem_bytes")

        def make_argv(results: dict):
            train = results.get(layout)
            if train is None:
                return None, f"needs the finished '{layout}' training row"
            if not gpu_bytes or not train.get("mem_gb"):
                raise SkipRow("no GPU memory to probe on this machine (CPU)")
            micro = train.get("micro_batch") or 1
            est = estimate_max_context(train["mem_gb"] * 1e9, micro * s["seq"], s["seq"], ctx.nproc,
                                       s["n_layer"], s["n_embd"], gpu_bytes)
            n = est["probe_len"]
            ctx.notes[key] = {"method": "estimated from the training row's peak memory", **est}
            over = [*base, *attn, *extra, *(ctx.corpus.overrides if ctx.corpus else []), *ctx.sets,
                    f"seq_len={n}", "max_steps=1", f"train.global_batch_tokens={n}", "train.micro_batch=1",
                    "eval_tokens=0", "train.warmup_steps=0", "log_every=1", "ckpt_every=0", "parallel=single",
                    "compile=false"]
            return [sys.executable, "train.py", *over, "logger=none", f"run_dir={ctx.run_dir(self.name, key)}"], None

        def oom(text: str):
            return {"fits": False, "error": error_line(text)} if is_oom(text) else None

        est = ROW_OVERHEAD_S[ctx.scale] + (15 if ctx.scale == "small" else 0)
        return Row(key, {"layout": layout, "probe": True}, "train", est, make_argv=make_argv, max_steps=1,
                   expect_failure=oom)

    def protocol(self, ctx: Ctx) -> str:
        s = self.sizes(ctx)
        data = ctx.corpus.note if ctx.corpus else "OpenWebText"
        tokens = fmt_tok(s["steps"] * s["batch"])
        return (f"GPT-2 trained at seq_len {s['seq']} for the same {tokens} tokens with our dense causal kernel "
                f"(attention=flash) and the same kernel with block-sparse layouts (attention=block_sparse: "
                f"local window, BigBird = window + global + random blocks; block 128). {data}. Same "
                f"validation tokens, non-overlapping windows. Longest context: the activation memory per "
                f"token is estimated from the training row's peak memory (model state taken as "
                f"{BYTES_PER_PARAM} bytes/param, {USABLE_MEMORY:.0%} of the GPU usable; FlashAttention keeps "
                f"O(N) memory for every layout), then verified by one real training step (micro-batch 1) "
                f"at that length rounded down to a multiple of 8192: 'fits' with its measured peak, or OOM.")

    def markdown(self, state: dict, ctx: Ctx) -> str:
        dense, rows = _res(state, "dense"), []
        for layout in self.LAYOUTS:
            r = state["rows"].get(layout)
            if r is None:
                continue
            density = self._density(layout, r["label"]["seq_len"], ctx)
            probe = state["rows"].get(f"probe_{layout}", {})
            pres = probe.get("result") if probe.get("status") == "done" else None
            est = (pres or {}).get("estimate")
            est_txt = f"{fmt_tok(est)} tokens" if est else (
                "n/a (no GPU memory statistics)" if pres else (_status_cell(state, f"probe_{layout}") or "-"))
            step = "-" if not pres else (f"{pres['seq_len']:,}: fits ({gb(pres.get('mem_gb'))})" if pres.get("fits")
                                         else f"{pres['seq_len']:,}: OOM")
            x = r.get("result")
            rows.append(_blank(state, layout, [layout, density], 4, [est_txt, step]) or [
                layout, density, f"**{x['val_ppl']:.2f}**", f"{x['val_loss']:.4f}", fmt_tok(x["tokens_per_s"]),
                f"{x['tokens_per_s'] / dense['tokens_per_s']:.2f}x" if dense else "-", gb(x.get("mem_gb")),
                est_txt, step])
        return _md_table(["layout", "causal density", "val ppl", "val loss", "tokens/s", "speed vs dense",
                          "peak mem", "longest context (est.)", "one step at that length"], rows,
                         ["", f"Paper: {PAPER['blocksparse']['source']}."])

    def _density(self, layout: str, seq_len: int, ctx: Ctx) -> str:
        """The layout's kept share of the causal blocks, from the same config train.py builds it from."""
        if layout == "dense":
            return "1.000"
        try:
            import yaml
            from omegaconf import OmegaConf

            from longctx import kernels
            attn = OmegaConf.load(ROOT / "configs/attention/block_sparse.yaml")
            for o in self.LAYOUTS[layout][1:] + self.sizes(ctx)["layout_extra"]:
                k, _, v = o.partition("=")
                OmegaConf.update(attn, k.removeprefix("attention."), yaml.safe_load(v))
            return f"{kernels.build_block_mask_from_config(attn, seq_len, 1).causal_density:.3f}"
        except Exception as e:  # the table still renders; the cell says why the value is missing
            return f"n/a ({type(e).__name__})"

    def plot(self, state: dict, path: Path) -> str | None:
        done = {k: r for k, r in _done(state).items() if not r["label"].get("probe")}
        if not done:
            return "no finished rows"
        fig, (a1, a2, a3) = _figure(3, (13, 4))
        names = list(done)
        a1.bar(names, [done[k]["result"]["tokens_per_s"] for k in names])
        a1.set(ylabel="tokens/s", title="training throughput")
        a2.bar(names, [done[k]["result"]["val_ppl"] for k in names], color="tab:orange")
        a2.set(ylabel="validation perplexity", title="quality at the same tokens")
        _loss_curves(a3, {k: done[k]["result"] for k in names}, fontsize=8)
        return _save(fig, path)


# ------------------------------------------------------------------------------ figure 3
class Figure3(Table):
    name = "figure3"
    title = "Figure 3: attention speed and memory vs sequence length (scripts/bench_attention.py)"

    def args(self, ctx: Ctx) -> tuple[list[str], str, float]:
        if ctx.scale == "smoke":
            return (["--smoke", "--seqlens", "32,64", "--causal", "causal", "--methods", "ours,naive,sdpa_flash",
                     "--no-isolate"], "smoke/causal", 30)
        if ctx.scale == "small":
            return (["--preset", "d64", "--causal", "causal", "--quick", "--bwd", "derived", "--max-minutes", "3"],
                    "d64/causal", 200)
        return (["--preset", "d64", "--causal", "causal"], "d64/causal", 400)

    def rows(self, ctx: Ctx) -> list[Row]:
        args, _, est = self.args(ctx)
        out = ctx.table_dir(self.name) / "bench" / "attention.json"
        argv = [sys.executable, "scripts/bench_attention.py", *args, "--out", str(out), "--markdown"]
        return [Row("bench", {"script": "bench_attention.py"}, "script", est, argv=argv, result_json=out)]

    def protocol(self, ctx: Ctx) -> str:
        return ("scripts/bench_attention.py as run above: causal attention, GPT-2's head dim 64 (H=16; batch x "
                "N constant), forward+backward TFLOP/s = 3.5 x 4BHN^2D/2 / time, median of CUDA-event timings "
                "after warm-up; memory = peak allocated beyond q, k, v, dO. Its own JSON, markdown and PNG are "
                "in bench/.")

    def summarize(self, data: dict, ctx: Ctx) -> dict:
        group = self.args(ctx)[1]
        out: dict = {}
        for r in data.get("results", []):
            if r.get("group") != group:
                continue
            cell = {"status": r.get("status")}
            if r.get("status") == "ok":
                cell.update(fwd=(r.get("fwd") or {}).get("tflops"), fwdbwd=(r.get("fwdbwd") or {}).get("tflops"),
                            ms=(r.get("fwdbwd") or {}).get("ms"), mem_gb=(r.get("mem_bytes") or 0) / 1e9)
            out.setdefault(str(r["n"]), {})[r["method"]] = cell
        if not out:
            raise RowError(f"bench_attention.py wrote no '{group}' results")
        return {"by_n": out, "env": data.get("env", {})}

    def markdown(self, state: dict, ctx: Ctx) -> str:
        bad = _status_cell(state, "bench")
        if bad:
            return f"bench_attention.py: {bad}"
        by_n = state["rows"]["bench"]["result"]["by_n"]
        methods = list(dict.fromkeys(m for cells in by_n.values() for m in cells))
        paper, rows = PAPER["figure3"]["tflops"], []
        for n in sorted(by_n, key=int):
            cells = by_n[n]
            o, nv = cells.get("ours", {}), cells.get("naive", {})
            ok = o.get("status") == "ok" and nv.get("status") == "ok"
            rows.append([n, *(f"{c['fwdbwd']:.3g}" if c.get("status") == "ok" and c.get("fwdbwd") else
                              c.get("status", "-") for c in (cells.get(m, {}) for m in methods)),
                         f"{nv['ms'] / o['ms']:.2f}x" if ok and o.get("ms") else "-",
                         f"{o['mem_gb']:.3g} / {nv['mem_gb']:.3g} GB" if ok else "-", bk.fmt(paper.get(int(n)), "d")])
        return _md_table(["N", *(f"{m} fwd+bwd TFLOP/s" for m in methods), "ours vs naive (time)", "mem ours / naive",
                          "FlashAttention-2 (published, H100)"], rows,
                         ["", f"Published: {PAPER['figure3']['source']} (512: {paper[512]}, 16k: {paper[16384]})."])

    def plot(self, state: dict, path: Path) -> str | None:
        r = _res(state, "bench")
        if not r:
            return "no finished rows"
        fig, (a1, a2) = _figure(2, (11, 4))
        by_n = r["by_n"]
        for m in dict.fromkeys(m for cells in by_n.values() for m in cells):
            pts = sorted((int(n), c[m]) for n, c in by_n.items() if c.get(m, {}).get("status") == "ok")
            if pts:
                a1.plot([n for n, _ in pts], [c["fwdbwd"] or 0 for _, c in pts], "o-", label=m)
                a2.plot([n for n, _ in pts], [max(c["mem_gb"], 1e-6) for _, c in pts], "o-", label=m)
        a1.plot(*zip(*sorted(PAPER["figure3"]["tflops"].items())), "k*", label="FA2 published (H100)")
        for a, yl in ((a1, "forward+backward TFLOP/s"), (a2, "extra memory (GB)")):
            a.set_xscale("log", base=2)
            a.set(xlabel="sequence length N", ylabel=yl)
            a.legend(fontsize=7)
        a2.set_yscale("log")
        return _save(fig, path)


# ------------------------------------------------------------------------------ table 5
class Table5(Table):
    name = "table5"
    title = "Table 5: long-document classification, micro-F1 vs length (scripts/eval_longdoc.py)"

    def tasks(self, ctx: Ctx) -> list[tuple[str, list[str], list[int], float]]:
        if ctx.scale == "smoke":
            return [(LONGDOC_OFFLINE_TASK, LONGDOC_SMOKE, [64, 128], 60)]
        if ctx.scale == "small":  # random init; the script also takes init_from=<a train.py run dir>
            return [(LONGDOC_OFFLINE_TASK, ["model=gpt2_small", "logger=none"], [512, 1024, 2048, 4096], 240)]
        lens = PAPER["table5"]["seq_lens"]
        return [(t, ["init_from=gpt2"], lens, 3600) for t in LONGDOC_PAPER_TASKS]

    def rows(self, ctx: Ctx) -> list[Row]:
        rows = []
        for task, model, lens, est in self.tasks(ctx):
            out = ctx.table_dir(self.name) / "eval" / task
            argv = [sys.executable, "scripts/eval_longdoc.py", f"task={task}", *model,
                    f"seq_lens=[{','.join(map(str, lens))}]", f"out_dir={out}"]
            rows.append(Row(task, {"task": task, "model": " ".join(model)}, "script", est, argv=argv,
                            result_json=out / "results.json"))
        return rows

    def protocol(self, ctx: Ctx) -> str:
        return ("scripts/eval_longdoc.py as run above: the model fine-tuned with a classification head at each "
                "length, documents truncated to the length, micro/macro-F1 on the test split (its own "
                "results.json, markdown and plot are in eval/TASK/).")

    def summarize(self, data, ctx: Ctx) -> dict:
        rows = data if isinstance(data, list) else (data.get("rows") or data.get("results") or [])
        keep = [{k: r.get(k) for k in ("seq_len", "micro_f1", "macro_f1", "train_examples", "test_examples",
                                       "majority_micro_f1")}
                for r in rows if isinstance(r, dict) and "seq_len" in r]
        if not keep:
            raise RowError("eval_longdoc.py's results.json has no rows with seq_len")
        return {"rows": keep}

    def markdown(self, state: dict, ctx: Ctx) -> str:
        p, rows = PAPER["table5"], []
        for key, r in state["rows"].items():
            blank = _blank(state, key, [key, ""], 4, [])
            if blank:
                rows.append(blank)
                continue
            for x in r["result"]["rows"]:
                n = x["seq_len"]
                i = p["seq_lens"].index(n) if n in p["seq_lens"] else None
                f1 = x.get("micro_f1")
                scale = 100 if f1 is not None and f1 <= 1 else 1  # report in percent like the paper
                rows.append([key, n, *(bk.fmt(x.get(k) and x[k] * scale, ".1f")
                                       for k in ("micro_f1", "macro_f1", "majority_micro_f1")),
                             f"{x.get('train_examples', '-')} / {x.get('test_examples', '-')}",
                             f"{p['mimic'][i]} / {p['ecthr'][i]}" if i is not None else "-"])
        return _md_table(["task", "length", "micro-F1", "macro-F1", "majority-class micro-F1", "train / test examples",
                          "paper micro-F1 (MIMIC-III / ECtHR)"], rows, ["", f"Paper: {p['source']}."])

    def plot(self, state: dict, path: Path) -> str | None:
        done = _done(state)
        if not done:
            return "no finished rows"
        fig, (ax,) = _figure(1, (6, 4))
        for key, r in done.items():
            pts = sorted((x["seq_len"], x["micro_f1"]) for x in r["result"]["rows"] if x.get("micro_f1") is not None)
            ax.plot([n for n, _ in pts], [f * (100 if f <= 1 else 1) for _, f in pts], "o-", label=f"ours: {key}")
        p = PAPER["table5"]
        for name in ("mimic", "ecthr"):
            ax.plot(p["seq_lens"], p[name], "s--", alpha=0.6, label=f"paper: {name}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="document length (tokens)", ylabel="micro-F1 (%)")
        ax.legend(fontsize=7)
        return _save(fig, path)


TABLES: dict[str, Table] = {t.name: t for t in (Table4(), Table2(), BlockSparse(), Figure3(), Table5())}


# ------------------------------------------------------------------------------ results of a row
def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RowError(f"{path} is missing")
    return sorted(bk.read_jsonl(path), key=lambda r: r.get("step", 0))


def train_summary(run_dir: Path, max_steps: int, need_eval: bool = True) -> dict:
    """What a finished training row reports, from its metrics.jsonl."""
    rows = read_metrics(run_dir)
    if not rows or rows[-1].get("step") != max_steps:
        raise RowError(f"training stopped at step {rows[-1].get('step') if rows else 0} of {max_steps}")
    last = rows[-1]
    tokens_per_step = last["tokens"] / last["step"]
    train_s, prev = 0.0, 0
    for r in rows:  # each row's tokens_per_s covers the steps since the previous row (pauses excluded)
        if r.get("tokens_per_s"):
            train_s += (r["step"] - prev) * tokens_per_step / r["tokens_per_s"]
        prev = r["step"]
    steady = rows[1:] or rows  # the first interval holds compilation / autotuning
    tps = [r["tokens_per_s"] for r in steady if r.get("tokens_per_s")]
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    mem = [r["mem_gb"] for r in rows if r.get("mem_gb") is not None]
    stride = max(1, len(rows) // 200)
    out = {"steps": last["step"], "tokens": last["tokens"], "train_loss": last.get("loss"), "train_s": train_s,
           "tokens_per_s": statistics.median(tps) if tps else None, "mfu": statistics.median(mfu) if mfu else None,
           "mem_gb": max(mem) if mem else None,
           "curve": [(r["tokens"], r["loss"]) for r in rows[::stride] if "loss" in r and "tokens" in r]}
    cfg = Path(run_dir) / "config.yaml"
    if cfg.is_file():
        m = re.search(r"^  micro_batch: (\d+)$", cfg.read_text(), re.MULTILINE)
        out["micro_batch"] = int(m.group(1)) if m else None
    if need_eval:
        if "val_loss" not in last:
            raise RowError(f"no evaluation at step {max_steps} in metrics.jsonl")
        out.update(val_loss=last["val_loss"], val_ppl=last["val_ppl"])
    return out


# ------------------------------------------------------------------------------ running
class Stop(Exception):
    """Raised by the SIGTERM handler: finish the current row's bookkeeping, then stop."""


def _on_sigterm(signum, frame):
    raise Stop(f"signal {signum}")


def run_process(argv: list[str], log_path: Path, deadline: float | None, drop_interpreter: bool) -> tuple[int, str, str]:
    """Run argv from the repository root, streaming its output to ours and to log_path.

    Returns (exit code, last ~16 KB of output, why it was stopped: '' | 'deadline' | 'interrupted').
    On the deadline or our own interruption the child gets SIGINT (train.py stops between steps;
    its last checkpoint stays), then SIGTERM/SIGKILL if it does not exit.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail = bytearray()
    stopped = ""
    with open(log_path, "ab") as logf:
        logf.write(f"\n==== {now_iso()} $ {shell_join(argv)}\n".encode())
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=_child_env(drop_interpreter))
        fd = proc.stdout.fileno()
        try:
            while True:
                if deadline is not None and time.time() > deadline and not stopped:
                    stopped = "deadline"
                    log("time budget reached: stopping the running row (it continues next time)")
                    _stop(proc)
                ready, _, _ = select.select([fd], [], [], 1.0)
                if ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                    logf.write(chunk)
                    tail += chunk
                    del tail[:-16384]
            rc = proc.wait()
        except (KeyboardInterrupt, Stop):
            stopped = "interrupted"
            _stop(proc)
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, tail.decode("utf-8", "replace"), stopped


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(sig)
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def signature(argv: list[str], out: Path) -> str:
    """The command with this machine's out-dir path and interpreter abstracted away, so a restored
    out dir (another machine, another mount point) still recognises its finished rows."""
    return shell_join(argv).replace(str(out.resolve()), "<out>")


def has_checkpoint(run_dir: Path) -> bool:
    ck = run_dir / "checkpoints"
    return ck.is_dir() and any((p / "meta.json").is_file() for p in ck.glob("step_*"))


def render(table: Table, state: dict, ctx: Ctx) -> str:
    """TABLE.md: header, the table, protocol, commands; from the state alone (TABLE.json)."""
    env = ctx.env
    head = [f"# {table.title}", "",
            (f"Scale `{ctx.scale}`; updated {state.get('updated', now_iso())}; "
            f"GPU {env.get('gpu') or 'none (CPU)'}; torch {env.get('torch')}, triton {env.get('triton')}, "
            f"transformers {env.get('transformers')}, Python {env.get('python')}, commit {env.get('git_commit')}."),
            "", table.markdown(state, ctx), "", "## Protocol", "", state.get("protocol") or table.protocol(ctx), "",
            "## Commands (run from the repository root)", ""]
    for key, r in state["rows"].items():
        when = f"{r.get('status', 'pending')}" + (f", {fmt_s(r['wall_s'])} wall" if r.get("wall_s") else "") + \
               (f", {r['gpu']}" if r.get("gpu") else "") + (f", {r['finished']}" if r.get("finished") else "")
        head.append(f"- `{key}` ({when}):\n  `{r.get('command', '(built from earlier rows)')}`")
    return "\n".join(head) + "\n"


class Runner:
    def __init__(self, ctx: Ctx, args):
        self.ctx, self.args = ctx, args
        self.t0 = time.time()
        self.deadline = self.t0 + args.max_minutes * 60 if args.max_minutes else None
        self.spent_actual = 0.0
        self.spent_est = 0.0
        self.stopped_for_time = False
        self.failed = 0

    # ---- state -------------------------------------------------------------------------------
    def load_state(self, table: Table) -> dict:
        path = self.ctx.table_dir(table.name) / f"{table.name}.json"
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except json.JSONDecodeError:
                state = None
            if state and state.get("scale") != self.ctx.scale:
                raise SystemExit(f"error: {path.parent} holds a --scale {state.get('scale')} reproduction; use "
                                 f"another --out, or --fresh to start this table over at --scale {self.ctx.scale}")
            if state:
                return state
        return {"table": table.name, "title": table.title, "scale": self.ctx.scale, "created": now_iso(), "rows": {}}

    def save(self, table: Table, state: dict, plot: bool = False) -> None:
        """JSON and markdown after every row (atomic); the PNG once the table's rows have run."""
        d = self.ctx.table_dir(table.name)
        state.update(updated=now_iso(), env=self.ctx.env, protocol=table.protocol(self.ctx),
                     paper=PAPER.get(table.name), notes={k: v for k, v in self.ctx.notes.items()},
                     commands=[r["command"] for r in state["rows"].values() if r.get("command")])
        bk.write_json(d / f"{table.name}.json", state)
        bk.write_text(d / f"{table.name}.md", render(table, state, self.ctx))
        if not plot:
            return
        try:
            why = table.plot(state, d / f"{table.name}.png")
        except Exception as e:  # a plot problem must not lose the run's results
            why = f"{type(e).__name__}: {e}"
        if why and any(r.get("status") == "done" for r in state["rows"].values()):
            log(f"{table.name}: plot not written ({why})")

    # ---- the loop ----------------------------------------------------------------------------
    def ratio(self) -> float:
        """Measured / estimated duration of the rows run so far (ETA and budget correction)."""
        if self.spent_est <= 0:
            return 1.0
        return min(5.0, max(0.3, self.spent_actual / self.spent_est))

    def run(self, names: list[str]) -> int:
        plans = []
        for name in names:
            table = TABLES[name]
            if self.args.fresh and self.ctx.table_dir(name).exists():
                shutil.rmtree(self.ctx.table_dir(name))
            state = self.load_state(table)
            rows = table.rows(self.ctx)
            for row in rows:
                st = state["rows"].setdefault(row.key, {"label": row.label, "status": "pending"})
                st["label"] = row.label
                if row.argv is not None:
                    sig = signature(row.argv, self.ctx.out)
                    if st.get("signature") not in (None, sig):  # other settings: old results/checkpoints are void
                        if st.get("status") == "done":
                            log(f"{name}/{row.key}: its command changed since it ran; running it again")
                        st["status"] = "pending"
                        shutil.rmtree(self.ctx.run_dir(name, row.key), ignore_errors=True)
                        if row.result_json is not None:  # the script's own results of the old settings
                            shutil.rmtree(row.result_json.parent, ignore_errors=True)
                    st["command"] = shell_join(row.argv)
                    st["signature"] = sig
            state["rows"] = {r.key: state["rows"][r.key] for r in rows}  # table order, no stale rows
            plans.append((table, rows, state))
            if not self.args.dry_run:
                self.save(table, state)

        if self.args.only:
            unknown = self.args.only - {r.key for _, rows, _ in plans for r in rows}
            if unknown:
                raise SystemExit(f"error: --only {','.join(sorted(unknown))}: no such row in "
                                 f"{', '.join(names)} (see --dry-run for the row keys)")
            plans = [(t, [r for r in rows if r.key in self.args.only], s) for t, rows, s in plans]
        if self.args.dry_run:
            return self.dry_run(plans)
        todo = [(t, r) for t, rows, s in plans for r in rows if s["rows"][r.key].get("status") != "done"]
        total = sum(len(rows) for _, rows, _ in plans)
        log(f"{', '.join(names)} at --scale {self.ctx.scale}: {total} rows, {total - len(todo)} already done, "
            f"~{fmt_s(sum(r.est_s for _, r in todo))} of work estimated -> {self.ctx.out}")
        for table, rows, state in plans:
            for i, row in enumerate(rows, 1):
                self.run_row(table, row, i, len(rows), state, todo)
                self.save(table, state)
            self.save(table, state, plot=True)
        return self.finish(plans)

    def run_row(self, table: Table, row: Row, i: int, n: int, state: dict, todo: list) -> None:
        st = state["rows"][row.key]
        where = f"[{table.name} {i}/{n}] {row.key}"
        if st.get("status") == "done":
            log(f"{where}: done earlier, skipped")
            return
        if row.argv is None:
            results = {k: r["result"] for k, r in state["rows"].items() if r.get("status") == "done"}
            try:
                argv, why = row.make_argv(results)
            except SkipRow as e:
                self._mark(st, "skipped", error=str(e))
                log(f"{where}: skipped: {e}")
                self._done(todo, table, row)
                return
            if argv is None:
                self._mark(st, "failed", error=why)
                log(f"{where}: not run: {why}")
                self.failed += 1
                self._done(todo, table, row)
                return
            st["command"], st["signature"] = shell_join(argv), signature(argv, self.ctx.out)
        else:
            argv = row.argv
        est = row.est_s * self.ratio()
        remaining_todo = sum(r.est_s for _, r in todo) * self.ratio()
        if self.deadline is not None and time.time() + est > self.deadline:
            self.stopped_for_time = True
            st["status"] = "pending"
            log(f"{where}: deferred: needs ~{fmt_s(est)}, {fmt_s(self.deadline - time.time())} left in "
                f"--max-minutes; run the same command again to continue")
            return
        log(f"{where}: est {fmt_s(est)}, all remaining ~{fmt_s(remaining_todo)}\n    $ {shell_join(argv)}")
        if row.kind == "train":
            run_dir = self.ctx.run_dir(table.name, row.key)
            if run_dir.exists() and not has_checkpoint(run_dir):
                shutil.rmtree(run_dir)  # a start that left no checkpoint: begin again, cleanly
            elif run_dir.exists():
                log(f"{where}: continuing from its newest checkpoint (resume=auto)")
        script = ROOT / argv[1] if len(argv) > 1 and argv[1].endswith(".py") else None
        st["attempts"] = st.get("attempts", 0) + 1
        t = time.time()
        if script is not None and not script.is_file():
            rc, tail, stopped = 2, f"error: {argv[1]} not found (it is not in this checkout)", ""
        else:
            rc, tail, stopped = run_process(argv, self.ctx.table_dir(table.name) / "logs" / f"{row.key}.log",
                                            self.deadline, drop_interpreter=row.kind == "train")
        wall = time.time() - t
        st["wall_s"] = st.get("wall_s", 0.0) + wall
        self.spent_actual += wall
        self.spent_est += row.est_s
        self._done(todo, table, row)
        if stopped:
            st["status"] = "pending"
            self.stopped_for_time = True
            log(f"{where}: stopped after {fmt_s(wall)} ({stopped}); the same command continues it")
            return
        try:
            if rc != 0:
                expected = row.expect_failure(tail) if row.expect_failure else None
                if expected is None:
                    raise RowError(error_line(tail))
                result = {**expected, **self.ctx.notes.get(row.key, {}), "seq_len": _arg_int(argv, "seq_len")}
            else:
                result = self.collect(table, row, argv)
        except RowError as e:
            self._mark(st, "failed", error=str(e))
            self.failed += 1
            log(f"{where}: FAILED after {fmt_s(wall)}: {e}")
            return
        self._mark(st, "done", result=result)
        log(f"{where}: done in {fmt_s(wall)}" + _headline(result))
        if row.kind == "train" and self.args.prune_checkpoints:
            shutil.rmtree(self.ctx.run_dir(table.name, row.key) / "checkpoints", ignore_errors=True)

    def collect(self, table: Table, row: Row, argv: list[str]) -> dict:
        if row.kind == "train":
            max_steps = _arg_int(argv, "max_steps") or row.max_steps  # --set max_steps=... wins
            res = train_summary(self.ctx.run_dir(table.name, row.key), max_steps,
                                need_eval=not row.label.get("probe"))
            if row.label.get("probe"):
                res = {"fits": True, "seq_len": _arg_int(argv, "seq_len"), "mem_gb": res.get("mem_gb"),
                       **self.ctx.notes.get(row.key, {})}
            return res
        if row.result_json is None or not row.result_json.is_file():
            raise RowError(f"the script wrote no {row.result_json}")
        try:
            data = json.loads(row.result_json.read_text())
        except json.JSONDecodeError as e:
            raise RowError(f"{row.result_json}: not JSON ({e})") from None
        return table.summarize(data, self.ctx)

    def _mark(self, st: dict, status: str, **kw) -> None:
        st.pop("error", None)
        st.pop("result", None)
        st.update(status=status, finished=now_iso(), gpu=self.ctx.env.get("gpu") or "cpu", **kw)

    @staticmethod
    def _done(todo: list, table: Table, row: Row) -> None:
        for j, (t, r) in enumerate(todo):
            if t is table and r is row:
                del todo[j]
                return

    def finish(self, plans) -> int:
        log(f"finished in {fmt_s(time.time() - self.t0)}:")
        for table, rows, state in plans:
            counts = {}
            for r in state["rows"].values():
                counts[r.get("status", "pending")] = counts.get(r.get("status", "pending"), 0) + 1
            d = self.ctx.table_dir(table.name)
            log(f"  {table.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) +
                f" -> {d / (table.name + '.md')}")
            for key, r in state["rows"].items():
                if r.get("status") == "failed":
                    log(f"    {key} failed: {r.get('error')}")
        for table, _, state in plans:
            print()
            print(table.markdown(state, self.ctx))
        if self.stopped_for_time:
            log("stopped by --max-minutes: run the same command again to continue")
            return EXIT_STOPPED
        return EXIT_FAILED if self.failed else 0

    def dry_run(self, plans) -> int:
        total = 0.0
        for table, rows, state in plans:
            print(f"## {table.name} (--scale {self.ctx.scale}): {table.title}")
            print(table.protocol(self.ctx))
            for row in rows:
                st = state["rows"][row.key]
                total += row.est_s if st.get("status") != "done" else 0
                cmd = shell_join(row.argv) if row.argv else "(built from the training row's measured memory)"
                print(f"  {row.key:14s} est {fmt_s(row.est_s):>7s}  [{st.get('status', 'pending')}]  {cmd}")
        print(f"total estimate for the rows not done: {fmt_s(total)}")
        return 0


def _arg_int(argv: list[str], key: str) -> int | None:
    """The value of `key=` in a train.py command: the last one wins, as in Hydra."""
    for a in reversed(argv):
        if a.startswith(key + "="):
            try:
                return int(a.split("=", 1)[1])
            except ValueError:
                return None
    return None


def _headline(res: dict) -> str:
    bits = []
    if res.get("val_ppl") is not None:
        bits.append(f"val_ppl {res['val_ppl']:.2f}")
    if res.get("tokens_per_s"):
        bits.append(f"{fmt_tok(res['tokens_per_s'])} tok/s")
    if "fits" in res:
        bits.append(f"seq_len {res.get('seq_len')}: {'fits' if res['fits'] else 'OOM'}")
    return (": " + ", ".join(bits)) if bits else ""


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("tables", nargs="+", metavar="TABLE", help=f"{' | '.join(TABLE_ORDER)} | all")
    p.add_argument("--scale", required=True, choices=SCALES)
    p.add_argument("--out", default="outputs/reproduce", help="output folder (default outputs/reproduce)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train.py override for every training row (repeatable), e.g. data.cache_dir=/big")
    p.add_argument("--nproc", type=int, default=None,
                   help="GPUs per training row (torchrun when > 1); default 8 at --scale paper, else 1")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time budget: rows that would not finish in it are left for the next invocation")
    p.add_argument("--prune-checkpoints", action=argparse.BooleanOptionalAction, default=None,
                   help="delete a training row's checkpoints once its results are recorded, so the out dir "
                        "stays a few MB (default: on, except at --scale paper)")
    p.add_argument("--only", default=None, metavar="ROW,ROW",
                   help="run only these rows (keys as in the table's JSON, e.g. ctx1024,small_hf_eager)")
    p.add_argument("--fresh", action="store_true", help="delete the named tables' folders first and start over")
    p.add_argument("--dry-run", action="store_true", help="print every row's command and estimate; run nothing")
    return p


def parse_args(argv: list[str] | None):
    p = build_parser()
    a = p.parse_args(argv)
    names = []
    for t in a.tables:
        if t == "all":
            names.extend(TABLE_ORDER)
        elif t in TABLES:
            names.append(t)
        else:
            p.error(f"unknown table {t!r}: choose from {', '.join(TABLE_ORDER)}, all")
    a.names = list(dict.fromkeys(names))
    a.only = {k for k in (a.only or "").replace(",", " ").split() if k} or None
    if a.nproc is None:
        a.nproc = 8 if a.scale == "paper" else 1
    if a.nproc < 1:
        p.error(f"--nproc must be >= 1, got {a.nproc}")
    if a.max_minutes is not None and a.max_minutes <= 0:
        p.error(f"--max-minutes must be positive, got {a.max_minutes}")
    for s in a.sets:
        if "=" not in s or s.startswith("="):
            p.error(f"--set {s!r}: expected KEY=VALUE (a train.py override)")
    if a.prune_checkpoints is None:
        a.prune_checkpoints = a.scale != "paper"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out).expanduser().resolve()
    env = {"date": now_iso(), "gpu": None} if a.dry_run else bk.env_info(torch_details=False)
    ctx = Ctx(scale=a.scale, out=out, sets=a.sets, nproc=a.nproc, env=env)
    if a.scale != "paper" and set(a.names) & {"table4", "table2", "blocksparse"}:
        ctx.corpus = (Corpus(SMOKE_DATA, "data=stdlib, a seeded 40-file subset of the standard library")
                      if a.scale == "smoke" else small_corpus(eval_tokens=Table4().sizes(ctx)["eval"]))
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return Runner(ctx, a).run(a.names)
    except (KeyboardInterrupt, Stop) as e:
        log(f"interrupted ({type(e).__name__}); finished rows are saved: run the same command again to continue")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
