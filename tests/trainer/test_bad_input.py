"""Each bad input stops with one clear line before any work (CLI: `error: ...` on stderr, exit 2)."""
from __future__ import annotations

import pytest

from trainer import ConfigError

from .conftest import run_cli, run_inprocess


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def test_cli_unknown_group_option(tmp_path):
    line = _one_error_line(run_cli(["model=gpt2_huge", f"run_dir={tmp_path / 'r'}"]))
    assert "model=gpt2_huge" in line and "gpt2_small" in line
    line = _one_error_line(run_cli(["attention=flashy", f"run_dir={tmp_path / 'r'}"]))
    assert "attention=flashy" in line and "sdpa" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, expect", [
    (["seq_len=0"], "seq_len=0 must be a positive integer"),
    (["seq_len=-5"], "seq_len=-5 must be a positive integer"),
    (["seq_len=1000", "train.micro_batch=4"], "is not a multiple of micro_batch x seq_len x GPUs = 4 x 1000 x 1"),
    (["max_steps=0"], "max_steps=0"),
    (["train.precision=fp8"], "train.precision='fp8'"),
    (["compile=fast"], "compile='fast': use auto"),
])
def test_cli_bad_numbers(tmp_path, args, expect):
    line = _one_error_line(run_cli([*args, f"run_dir={tmp_path / 'r'}", "logger=none", "device=cpu"]))
    assert expect in line, line
    assert not (tmp_path / "r").exists()  # a run stopped by a config error leaves no directory


def _config_error(corpus, run_dir, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        run_inprocess(corpus, run_dir, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_batch_arithmetic_names_numbers_and_fix(corpus, tmp_path):
    msg = _config_error(corpus, tmp_path, **{"train.global_batch_tokens": 300})
    assert "4 x 32 x 1 = 128" in msg and "train.global_batch_tokens=256" in msg


def test_checkpoint_of_another_model_size(corpus, tmp_path):
    run_inprocess(corpus, tmp_path / "a", max_steps=2, eval_every=0, eval_tokens=0)
    msg = _config_error(corpus, tmp_path / "a", resume="auto", **{"model.n_embd": 128})
    assert "n_embd=64 vs 128" in msg and "step_0000002" in msg
    msg = _config_error(corpus, tmp_path / "a", resume="auto", seq_len=64)
    assert "seq_len=32" in msg
    msg = _config_error(corpus, tmp_path / "b", resume=str(tmp_path / "nowhere"))
    assert "no such checkpoint" in msg


def test_missing_and_corrupt_data_cache(corpus, tmp_path):
    msg = _config_error(corpus, tmp_path, **{"data.cache_dir": str(tmp_path / "empty"), "data.rebuild": "never"})
    assert "missing" in msg and "prepare_data.py" in msg
    # a corrupt cache: build it, then cut a token file short
    run_inprocess(corpus, tmp_path / "r", max_steps=1, eval_tokens=0, **{"data.cache_dir": str(tmp_path / "c")})
    train_bin = next((tmp_path / "c").glob("*/train.bin"))
    train_bin.write_bytes(train_bin.read_bytes()[:-10])
    msg = _config_error(corpus, tmp_path / "r2", **{"data.cache_dir": str(tmp_path / "c"), "data.rebuild": "never"})
    assert "train.bin" in msg


def test_dataset_not_downloadable_offline(corpus, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    msg = _config_error(corpus, tmp_path, data="openwebtext", **{
        "data.cache_dir": str(tmp_path / "cache"), "data.hf_cache_dir": str(tmp_path / "hf"),
        "data.paths": None, "data.val_fraction": 0.0005})
    assert "openwebtext" in msg.lower()


def test_eval_tokens_larger_than_val_split(corpus, tmp_path):
    msg = _config_error(corpus, tmp_path, eval_tokens=32 * 10_000)
    assert "eval_tokens=320000" in msg


def test_logger_mode_checked(corpus, tmp_path):
    with pytest.raises(ConfigError, match="logger.mode='sometimes'"):
        run_inprocess(corpus, tmp_path, logger="wandb", **{"logger.mode": "sometimes"})


def test_logger_auto_mode_offline_when_not_logged_in(monkeypatch, tmp_path):
    from trainer.logger import resolve_mode

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    mode, note = resolve_mode("auto")
    assert mode == "offline" and "offline" in note
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == ("online", None)
    assert resolve_mode("disabled") == ("disabled", None)
