"""Hydra multirun through train.py: `-m` sweeps (a,b / choice / range / glob) run every job in its
own folder under run_dir, and group options inside sweeps are checked before any work."""
from __future__ import annotations

import json

import pytest
from longctx.trainer import ConfigError

from longctx import train as train_mod

from .conftest import base_overrides, read_rows, run_cli


@pytest.mark.parametrize("argv", [
    ["model=gpt2_tiny,gpt2_small"],
    ["model=choice(gpt2_tiny,gpt2_small)", "-m"],
    ["model=glob(gpt2_*)", "--multirun"],
    ["model=glob(*,exclude=gpt2_xl)"],
    ["+experiment=quickstart", "seq_len=range(32,97,32)", "seed=choice(1,2)"],
    ["model=null", "~logger", "data.paths=[a,b]"],
])
def test_group_sweeps_accepted(argv):
    train_mod.check_group_choices(argv)


@pytest.mark.parametrize("argv, expect", [
    (["model=gpt2_tiny,gpt2_huge"], "model=gpt2_huge is not an option"),
    (["model=choice(gpt2_small,gpt2_huge)"], "model=gpt2_huge is not an option"),
    (["attention=glob(flashy*)"], "attention=glob(flashy*) matches no option; choose from: block_sparse"),
    (["model=range(1,3)"], "model=1 is not an option"),
])
def test_group_sweeps_rejected(argv, expect):
    with pytest.raises(ConfigError) as e:
        train_mod.check_group_choices(argv)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_multirun_jobs_in_their_own_folders(corpus, tmp_path):
    """glob x choice x range = 1 x 2 x 1 jobs, each a full train.py run in <run_dir>/<job number>."""
    sweep = tmp_path / "sweep"
    over = [o for o in base_overrides(corpus, sweep, max_steps=2, eval_every=0, ckpt_every=0, seed=None,
                                      seq_len=None, model=None)]
    proc = run_cli(["-m", "model=glob(gpt2_ti*)", "seq_len=choice(32,64)", "seed=range(7,8)", *over])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (sweep / "multirun.yaml").is_file()
    for job, seq_len in (("0", 32), ("1", 64)):
        d = sweep / job
        rows = read_rows(d)
        assert [r["step"] for r in rows] == [1, 2] and "val_loss" in rows[-1]
        cfg = (d / "config.yaml").read_text()
        assert f"seq_len: {seq_len}\n" in cfg and "seed: 7\n" in cfg
        assert f"run_dir: {d}\n" in cfg  # the job's own folder, not the sweep's
        assert (d / "checkpoints" / "step_0000002" / "meta.json").is_file()
        assert json.loads((d / "checkpoints" / "step_0000002" / "meta.json").read_text())["seq_len"] == seq_len
    assert not (sweep / "checkpoints").exists() and not (sweep / "metrics.jsonl").exists()
