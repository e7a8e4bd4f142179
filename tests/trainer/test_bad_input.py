"""Each bad input stops with one clear line before any work (CLI: `error: ...` on stderr, exit 2)."""
from __future__ import annotations

import pytest
from longctx.trainer import ConfigError

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
    # bytes changed inside val.bin (size unchanged) and an id above the vocabulary in train.bin: found
    # before training (never: one line; auto: rebuilt, and the run trains and evaluates)
    run_inprocess(corpus, tmp_path / "r3", max_steps=1, eval_tokens=0, **{"data.cache_dir": str(tmp_path / "c")})
    val_bin = next((tmp_path / "c").glob("*/val.bin"))
    good = val_bin.read_bytes()
    val_bin.write_bytes(good[:300] + bytes([good[300] ^ 0xFF]) + good[301:])
    msg = _config_error(corpus, tmp_path / "r4", **{"data.cache_dir": str(tmp_path / "c"), "data.rebuild": "never"})
    assert "val.bin: checksum mismatch in bytes 256.." in msg and "data.rebuild=auto" in msg
    run_inprocess(corpus, tmp_path / "r5", max_steps=1, **{"data.cache_dir": str(tmp_path / "c")})
    assert val_bin.read_bytes() == good


def test_dataset_not_downloadable_offline(corpus, tmp_path, monkeypatch):
    from tests.commands import offline

    offline(monkeypatch)
    msg = _config_error(corpus, tmp_path, data="openwebtext", **{
        "data.cache_dir": str(tmp_path / "cache"), "data.hf_cache_dir": str(tmp_path / "hf"),
        "data.paths": None, "data.val_fraction": 0.0005})
    assert "could not download the Hugging Face dataset 'Skylion007/openwebtext'" in msg and "data=stdlib" in msg
    assert list((tmp_path / "cache").iterdir()) == []  # no openwebtext-<key>/.lock left


def test_eval_tokens_larger_than_val_split(corpus, tmp_path):
    msg = _config_error(corpus, tmp_path, eval_tokens=32 * 10_000)
    assert "eval_tokens=320000" in msg


def test_logger_mode_checked(corpus, tmp_path):
    with pytest.raises(ConfigError, match="logger.mode='sometimes'"):
        run_inprocess(corpus, tmp_path, logger="wandb", **{"logger.mode": "sometimes"})


def test_logger_auto_mode_offline_when_not_logged_in(monkeypatch, tmp_path):
    from longctx.trainer.logger import resolve_mode

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    mode, note = resolve_mode("auto")
    assert mode == "offline" and "offline" in note
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == ("online", None)
    assert resolve_mode("disabled") == ("disabled", None)


# Every key of configs/config.yaml (and the groups' keys a user types) with a bad value: one line
# naming the key and what is right, found before the data is touched; no run dir left behind.
BAD_VALUES = [
    ("train.lr=abc", "train.lr='abc' must be a number"),
    ("train.lr=0", "train.lr=0.0 must be a number > 0"),
    ("train.min_lr=-1", "train.min_lr=-1.0 must be a number >= 0"),
    ("train.min_lr=1.0", "need 0 <= train.min_lr <= train.lr"),
    ("train.warmup_steps=2.5", "train.warmup_steps=2.5 must be an integer"),
    ("train.decay_steps=0", "train.decay_steps=0 must be an integer >= 1 or null"),
    ("train.decay=step", "train.decay='step': use cosine, linear or constant"),
    ("train.weight_decay=abc", "train.weight_decay='abc' must be a number"),
    ("train.betas=[0.9]", "train.betas=[0.9] must be two numbers in [0, 1)"),
    ("train.betas=[0.9,1.5]", "train.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    ("train.eps=0", "train.eps=0.0 must be a number > 0"),
    ("train.grad_clip=abc", "train.grad_clip='abc' must be a number"),
    ("train.micro_batch=abc", "train.micro_batch='abc' must be a positive integer or auto"),
    ("train.global_batch_tokens=-8", "train.global_batch_tokens=-8 must be a positive integer"),
    ("seq_len=abc", "seq_len='abc' must be an integer"),
    ("max_steps=-1", "max_steps=-1 must be a non-negative integer"),
    ("seed=-1", "seed=-1 must be a non-negative integer"),
    ("seed=abc", "seed='abc' must be an integer"),
    ("compile=abc", "compile='abc': use auto"),
    ("eval_every=abc", "eval_every='abc' must be an integer"),
    ("eval_tokens=100", "eval_tokens=100 must be a multiple of seq_len=32 (use 96)"),
    ("ckpt_every=-1", "ckpt_every=-1 must be a non-negative integer"),
    ("ckpt_keep=abc", "ckpt_keep='abc' must be an integer"),
    ("log_every=1.5", "log_every=1.5 must be an integer"),
    ("resume=/nonexistent/run", "resume=/nonexistent/run: no such checkpoint or run directory"),
    ("device=tpu", "device='tpu' is not one of auto, cuda, cuda:N, cpu"),
    ("device=cuda:x", "device='cuda:x': the GPU index must be a number"),
    ("model.n_embd=abc", "model.n_embd='abc' must be an integer"),
    ("model.n_layer=0", "model.n_layer=0 must be an integer >= 1"),
    ("model.n_head=3", "n_embd (64) must be divisible by n_head (3)"),
    ("model.dropout=2", "model.dropout=2.0 must be a number >= 0 and < 1 or null"),
    ("model.bias=maybe", "model.bias='maybe' must be true or false"),
    ("attention.impl=abc", "attention.impl='abc': use flash, block_sparse, sdpa or naive"),
    ("parallel.activation_checkpointing=some", "parallel.activation_checkpointing='some': use none, full or selective"),
    ("parallel.ac_every=0", "parallel.ac_every=0 must be an integer >= 1 or null"),
    ("data.val_fraction=2", "data.val_fraction=2.0 must be a number > 0 and < 1"),
    ("data.rebuild=abc", "data.rebuild='abc': use auto, always or never"),
    ("data.num_proc=0", "data.num_proc=0 must be an integer >= 1"),
    ("data.max_files=1", "data.max_files=1 must be an integer >= 2"),
    ("data.paths=[/nonexistent/*.txt]", "data.paths: '/nonexistent/*.txt' matches no files"),
]
GROUP_BAD = [  # values of a group's own keys (composed with that group)
    (["attention=block_sparse", "attention.layout=zigzag"], "attention.layout='zigzag': use dense, local"),
    (["attention=block_sparse", "attention.block_size=24"], "attention.block_size must be a power of two >= 16"),
    (["attention=block_sparse", "attention.layout=strided", "attention.stride=0"], "stride must be >= 1, got 0"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode='sometimes'"),
]


@pytest.fixture(scope="module")
def base_cfg(corpus, tmp_path_factory):
    from .conftest import base_overrides, compose_cfg

    return compose_cfg(base_overrides(corpus, tmp_path_factory.mktemp("unused")))


def _run_refused(cfg, run_dir, capsys, monkeypatch) -> str:
    from longctx import data
    from longctx import train as train_mod

    monkeypatch.setattr(data, "prepare_data", lambda *a, **k: pytest.fail("data touched before the check"))
    code = train_mod.run(cfg, str(run_dir))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not run_dir.exists()
    return err[0]


def _refusal(overrides, run_dir, capsys, monkeypatch) -> str:
    """What the command line says: the check before Hydra starts (trainer/cli.py: types while
    composing, then the schema's ranges), else the checks train.py makes before touching the data."""
    from longctx import train as train_mod
    from longctx.trainer.cli import check_override_keys

    from .conftest import compose_cfg

    try:
        check_override_keys(overrides, train_mod.CONFIG_DIR, train_mod.GROUPS)
    except ConfigError as e:
        assert "\n" not in str(e)
        return f"error: {e}"
    return _run_refused(compose_cfg(overrides), run_dir, capsys, monkeypatch)


@pytest.mark.parametrize("override, expect", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_one_line_before_work(corpus, override, expect, tmp_path, capsys, monkeypatch):
    from .conftest import base_overrides

    overrides = base_overrides(corpus, tmp_path / "run") + [override]
    assert expect in _refusal(overrides, tmp_path / "run", capsys, monkeypatch)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, expect", GROUP_BAD, ids=[" ".join(b[0]) for b in GROUP_BAD])
def test_bad_group_value_one_line_before_work(corpus, overrides, expect, tmp_path, capsys, monkeypatch):
    from .conftest import base_overrides

    assert expect in _refusal(base_overrides(corpus, tmp_path / "run") + overrides, tmp_path / "run", capsys,
                              monkeypatch)


def test_cuda_without_a_gpu(base_cfg, tmp_path, capsys, monkeypatch):
    import copy

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        cfg = copy.deepcopy(base_cfg)
        cfg.device, cfg.run_dir = device, str(tmp_path / "run")
        line = _run_refused(cfg, tmp_path / "run", capsys, monkeypatch)
        assert f"device={device} but no CUDA GPU is visible; use device=cpu or device=auto" in line


@pytest.mark.parametrize("argv, expect", [
    (["train.lrr=1"], "train.lrr: no such setting; did you mean train.lr or train.min_lr?"),
    (["model=gpt2_tiny", "model.n_embed=64"], "model.n_embed: no such setting; did you mean model.n_embd"),
    (["attention=block_sparse", "attention.layot=local"], "did you mean attention.layout"),
    (["xyz=1"], "xyz: no such setting (every setting is listed in configs/; +xyz=... adds a new key)"),
])
def test_unknown_key_one_line(argv, expect):
    from longctx.trainer.cli import check_override_keys

    from longctx import train as train_mod

    with pytest.raises(ConfigError) as e:
        check_override_keys(argv, train_mod.CONFIG_DIR, train_mod.GROUPS)
    assert expect in str(e.value) and "\n" not in str(e.value)
    check_override_keys(["train.lr=1e-3", "attention=block_sparse", "attention.layout=local", "+extra=1"],
                        train_mod.CONFIG_DIR, train_mod.GROUPS)


def test_empty_run_dir_refused(tmp_path):
    from longctx.trainer.cli import check_run_dir_writable

    with pytest.raises(ConfigError, match="run_dir is empty; give a folder"):
        check_run_dir_writable(["run_dir="])
    check_run_dir_writable([f"run_dir={tmp_path / 'new' / 'run'}"])
    assert not (tmp_path / "new").exists()  # checking writes nothing


@pytest.mark.parametrize("exc, code, expect", [
    ("oom", 1, "out of GPU memory at train.micro_batch=4, seq_len=32; use a smaller train.micro_batch"),
    ("interrupt", 130, "interrupted; continue from the newest checkpoint with the same command plus run_dir="),
])
def test_oom_and_ctrl_c_one_line(base_cfg, tmp_path, capsys, monkeypatch, exc, code, expect):
    """Raised in the first forward: one line, the exit code, no traceback."""
    import copy

    import torch

    from longctx import model as model_pkg
    from longctx import train as train_mod

    real = model_pkg.build_model

    def build(cfg):
        m = real(cfg)

        def forward(*a, **k):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory") if exc == "oom" else KeyboardInterrupt
        m.forward = forward
        return m

    monkeypatch.setattr(model_pkg, "build_model", build)
    cfg = copy.deepcopy(base_cfg)
    cfg.run_dir = str(tmp_path / "run")
    assert train_mod.run(cfg, str(tmp_path / "run")) == code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
