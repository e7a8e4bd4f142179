"""Helpers for the trainer tests: a small corpus, composed configs, in-process and CLI runs.

Runs use a very small GPT (2 layers, width 64) at seq_len 32 on a generated corpus with
data=local, logger=none, device=cpu, attention=sdpa (the Triton interpreter is for kernel tests).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "to", "big", "red", "small", "house", "tree", "under", "over", "with", "bird", "sings", "song", "every", "morning", "when", "sun", "rises", "above", "hill", "river", "flows", "past", "old", "mill"]


def write_corpus(folder: Path, n_files: int = 24, seed: int = 0) -> Path:
    """Learnable text: sentences from a small grammar, so the loss falls within a few steps."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for _ in range(60):
            a, b, c = rng.choice(WORDS), rng.choice(WORDS), rng.choice(WORDS)
            lines.append(f"The {a} and the {b} sat on the {c}. The {a} ran to the {c} every morning.")
        (folder / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def make_corpus(base: Path) -> dict:
    """write_corpus under base/text; the glob data.paths takes and a cache folder for data.cache_dir."""
    write_corpus(base / "text")
    return {"glob": str(base / "text" / "*.txt"), "cache": str(base / "cache")}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def base_overrides(corpus: dict, run_dir: Path, **kw) -> list[str]:
    o = {
        "model": "gpt2_tiny", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64,
        "data": "local", "data.paths": f"[{corpus['glob']}]", "data.cache_dir": corpus["cache"],
        "data.val_fraction": 0.2, "data.progress": False, "data.num_proc": 1,
        "attention": "sdpa", "logger": "none", "device": "cpu", "run_dir": str(run_dir),
        "seq_len": 32, "max_steps": 20, "seed": 7,
        "train.global_batch_tokens": 256, "train.micro_batch": 4,  # 4 x 32 x accum 2
        "train.lr": 3e-3, "train.min_lr": 3e-4, "train.warmup_steps": 5,
        "eval_every": 10, "eval_tokens": 256, "ckpt_every": 10, "ckpt_keep": 3, "log_every": 1,
    }
    o.update(kw)
    return [f"{k}={v}" for k, v in o.items() if v is not None]  # None: leave the key out


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_inprocess(corpus: dict, run_dir: Path, **kw) -> dict:
    from longctx import train as train_mod

    cfg = compose_cfg(base_overrides(corpus, run_dir, **kw))
    return train_mod.train(cfg, run_dir=run_dir)


def run_cli(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = dict(os.environ, **(env or {}))
    e.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout, check=False)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
