"""train.py end to end under torchrun on the CPU (gloo): `parallel=fsdp` on 2 processes trains the
same loss curve as one process on the same global batch; its checkpoint (saved by 2 processes)
resumes on 1 process and on 2 (as DDP) with the same following losses; `parallel=fsdp` without
torchrun stops with the launch command. fp32 (the CPU always is); rtol 1e-5 on the logged losses.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-5
STEPS, CKPT = 8, 4


def _corpus(folder: Path) -> str:
    rng = random.Random(0)
    words = "the cat dog sat on a mat and ran to big red small house tree bird sings every morning".split()
    folder.mkdir(parents=True)
    for i in range(12):
        text = "\n".join(f"The {rng.choice(words)} and the {rng.choice(words)} sat on the {rng.choice(words)}."
                         for _ in range(80))
        (folder / f"doc{i:02d}.txt").write_text(text + "\n")
    return str(folder / "*.txt")


def _args(base: Path, run_dir: Path, **kw) -> list[str]:
    o = {"model": "gpt2_tiny", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64,
         "data": "local", "data.paths": f"[{base / 'text' / '*.txt'}]", "data.cache_dir": str(base / "cache"),
         "data.val_fraction": 0.2, "data.progress": "false", "data.num_proc": 1,
         "attention": "sdpa", "logger": "none", "device": "cpu", "run_dir": str(run_dir),
         "seq_len": 32, "max_steps": STEPS, "seed": 7,
         "train.global_batch_tokens": 256, "train.micro_batch": 2,  # 1 proc: accum 4; 2 procs: accum 2
         "train.lr": 3e-3, "train.warmup_steps": 2, "eval_every": 0, "eval_tokens": 256,
         "ckpt_every": CKPT, "log_every": 1}
    o.update(kw)
    return [f"{k}={v}" for k, v in o.items()]


def _run(nproc: int, args: list[str], expect_rc: int = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRITON_INTERPRET")}
    launch = [sys.executable] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    r = subprocess.run([*launch, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == expect_rc, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _close(a: dict, b: dict, steps):
    torch.testing.assert_close(torch.tensor([a[s] for s in steps], dtype=torch.float64),
                               torch.tensor([b[s] for s in steps], dtype=torch.float64), rtol=RTOL, atol=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    b = tmp_path_factory.mktemp("trainpar")
    _corpus(b / "text")
    _run(0, _args(b, b / "single"))                              # 1 process, no torchrun
    _run(2, _args(b, b / "fsdp2", parallel="fsdp"))              # 2 processes, FSDP2
    return b


def test_fsdp_2_processes_same_losses_as_1(base):
    one, two = _losses(base / "single"), _losses(base / "fsdp2")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    _close(two, one, range(1, STEPS + 1))
    meta = json.loads((base / "fsdp2" / "checkpoints" / f"step_{CKPT:07d}" / "meta.json").read_text())
    assert meta["world_size"] == 2


def test_fsdp_checkpoint_resumes_on_1(base):
    ckpt = base / "fsdp2" / "checkpoints" / f"step_{CKPT:07d}"
    _run(0, _args(base, base / "resume1", resume=str(ckpt)))
    _close(_losses(base / "resume1"), _losses(base / "single"), range(CKPT + 1, STEPS + 1))


def test_fsdp_checkpoint_resumes_on_2_as_ddp(base):
    ckpt = base / "fsdp2" / "checkpoints" / f"step_{CKPT:07d}"
    _run(2, _args(base, base / "resume2", parallel="ddp", resume=str(ckpt)))
    _close(_losses(base / "resume2"), _losses(base / "single"), range(CKPT + 1, STEPS + 1))


def test_fsdp_without_torchrun_one_line(base, tmp_path):
    r = _run(0, _args(base, tmp_path / "run", parallel="fsdp"), expect_rc=2)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: parallel=fsdp needs one process per device; launch with "
                                "`torchrun --standalone --nproc_per_node=N train.py parallel=fsdp"), r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
