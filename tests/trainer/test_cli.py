"""train.py run as a user runs it (a subprocess through Hydra): the end-of-run summary on the console,
in train.log and in summary.json; bad input stops with one line and leaves nothing behind (the run
dir with .hydra/ and train.log, Hydra's outputs/<date>/ folders, cache folders and locks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from longctx.trainer import ConfigError
from longctx.trainer.cli import check_run_dir_writable
from omegaconf import OmegaConf

from .conftest import ROOT, base_overrides, compose_cfg, run_cli


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def test_run_ends_with_a_summary(corpus, tmp_path):
    from tests.commands import parse

    run_dir = tmp_path / "run"
    r = run_cli(base_overrides(corpus, run_dir, max_steps=2, eval_every=0, ckpt_every=0))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    log = (run_dir / "train.log").read_text()
    assert s["log"] == str(run_dir / "train.log") and s["step"] == 2
    for text in (r.stdout, log):  # printed, and in train.log
        assert "done: step 2/2" in text and f"metrics:    {run_dir / 'metrics.jsonl'}" in text
        assert f"checkpoint: {run_dir / 'checkpoints' / 'step_0000002'}" in text
        assert f"sample:     {s['commands']['sample']}" in text and f"continue:   {s['commands']['resume']}" in text
    # the continue command is this run's command line with run_dir, resume=auto and twice the steps
    cmd = parse(s["commands"]["resume"])
    again = compose_cfg(cmd.overrides)
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert (again.resume, again.max_steps, again.run_dir) == ("auto", 4, str(run_dir))
    again.resume, again.max_steps = saved.resume, saved.max_steps
    assert OmegaConf.to_container(again, resolve=True) == OmegaConf.to_container(saved)


def test_bad_value_leaves_no_outputs_folder(tmp_path):
    """No run_dir given: Hydra makes outputs/<date>/<time>/ in the launch folder before train.py
    runs; a refused run removes it and the folders above it that it made."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "train.lr=abc", "logger=none", "device=cpu"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert "train.lr='abc' must be a number" in _one_error_line(r)
    assert list(tmp_path.iterdir()) == []


def test_data_error_leaves_nothing(corpus, tmp_path):
    """data=local on an empty file: refused after Hydra made the run dir; run dir, cache folder and
    its .lock are gone. (A run dir that held an earlier run is kept: resume=auto must not lose it.)"""
    (tmp_path / "empty.txt").write_text("")
    cache = tmp_path / "cache"
    args = base_overrides(corpus, tmp_path / "run", **{"data.paths": f"[{tmp_path / 'empty.txt'}]",
                                                        "data.cache_dir": str(cache)})
    line = _one_error_line(run_cli(args))
    assert "need at least 2 non-empty documents to make a train and a validation split, found 0" in line
    assert not (tmp_path / "run").exists() and not cache.exists()


def test_refused_run_keeps_an_earlier_runs_folder(corpus, tmp_path, capsys):
    from longctx import train as train_mod

    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text("{}\n")
    cfg = compose_cfg(base_overrides(corpus, old, **{"train.lr": -1}))
    assert train_mod.run(cfg, str(old)) == 2 and "train.lr=-1" in capsys.readouterr().err
    assert [p.name for p in old.iterdir()] == ["metrics.jsonl"]


def _make_unwritable(path) -> str:
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode == 0:
        return "immutable"
    if os.geteuid() != 0:
        path.chmod(0o555)
        return "read-only"
    pytest.skip("cannot make a folder unwritable here: running as root without chattr")


def test_run_dir_not_writable(corpus, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    how = _make_unwritable(ro)
    try:
        line = _one_error_line(run_cli(base_overrides(corpus, ro)))  # through Hydra: nothing else printed
        assert f"run_dir={ro}: cannot write in {ro}" in line and "pick a writable folder" in line, how
        with pytest.raises(ConfigError, match=f"run_dir={ro / 'sub' / 'run'}: cannot write in {ro} "):
            check_run_dir_writable([f"run_dir={ro / 'sub' / 'run'}"])  # a new folder inside it
        assert list(ro.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True, check=False)
        ro.chmod(0o755)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'file'} is a file, not a folder"):
        check_run_dir_writable([f"run_dir={tmp_path / 'file' / 'run'}"])
