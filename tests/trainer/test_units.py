"""Small pieces of trainer/: LR schedule, batch arithmetic, metrics file, console line, checkpoint picking."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from longctx.trainer import ConfigError
from longctx.trainer.checkpoint import latest_checkpoint, list_checkpoints, resolve_resume
from longctx.trainer.metrics import MetricsFile, batch_arithmetic, peak_flops, progress_line
from longctx.trainer.schedule import LRSchedule
from omegaconf import OmegaConf


def test_schedule_warmup_cosine_linear():
    s = LRSchedule(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110, decay="cosine")
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)  # halfway through the cosine
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    lin = LRSchedule(lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=100, decay="linear")
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.5) and lin(100) == 0.0
    assert all(s(i) >= s(i + 1) for i in range(10, 120))
    with pytest.raises(ConfigError, match="train.decay"):
        LRSchedule(lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=10, decay="step")
    with pytest.raises(ConfigError, match="min_lr"):
        LRSchedule(lr=1.0, min_lr=2.0, warmup_steps=0, decay_steps=10)


def _cfg(seq_len, gbt=524288, mb="auto"):
    return OmegaConf.create({"seq_len": seq_len, "train": {"global_batch_tokens": gbt, "micro_batch": mb}})


@pytest.mark.parametrize("seq_len, ws, expect", [
    (1024, 1, (16, 32)), (2048, 1, (8, 32)), (4096, 8, (4, 4)), (16384, 1, (1, 32)), (16384, 4, (1, 8)),
])
def test_batch_arithmetic_auto(seq_len, ws, expect):
    assert batch_arithmetic(_cfg(seq_len), ws) == expect


def test_batch_arithmetic_errors():
    with pytest.raises(ConfigError, match=r"3 x 1024 x 2 = 6144; use train.global_batch_tokens=522240"):
        batch_arithmetic(_cfg(1024, mb=3), 2)
    with pytest.raises(ConfigError, match="seq_len=0"):
        batch_arithmetic(_cfg(0), 1)
    with pytest.raises(ConfigError, match="micro_batch"):
        batch_arithmetic(_cfg(1024, mb=0), 1)


def test_metrics_file_truncates_on_resume(tmp_path):
    f = MetricsFile(tmp_path / "metrics.jsonl")
    for s in range(1, 6):
        f.write({"step": s, "loss": 1.0 / s})
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 6, "lo')  # cut short by a kill
    f.truncate_after(3)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    MetricsFile(tmp_path / "other.jsonl", enabled=False).write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()


def test_progress_line_and_peak():
    assert peak_flops(torch.device("cpu")) is None
    row = {"step": 5, "loss": 3.14159, "lr": 6e-4, "grad_norm": 0.5, "tokens_per_s": 123456.0, "mfu": None,
           "mem_gb": None, "eta_s": 125.0}
    line = progress_line(row, 100)
    assert "step   5/100" in line and "loss 3.1416" in line and "MFU n/a" in line and "123.5k tok/s" in line
    assert "eta 2m05s" in line
    line = progress_line({**row, "mfu": 0.4123, "mem_gb": 12.34, "eta_s": 7300}, 100)
    assert "MFU 41.2%" in line and "mem 12.3GB" in line and "eta 2h01m" in line


def test_checkpoint_picking(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for name, complete in [("step_0000010", True), ("step_0000020", True), ("step_0000030", False),
                           (".tmp-step_0000040", True), ("notes", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "meta.json").write_text(json.dumps({"step": 1}))
    assert [p.name for p in list_checkpoints(root)] == ["step_0000010", "step_0000020"]
    assert latest_checkpoint(root).name == "step_0000020"
    assert resolve_resume("auto", tmp_path / "run").name == "step_0000020"
    assert resolve_resume(str(tmp_path / "run"), tmp_path / "x").name == "step_0000020"
    assert resolve_resume(str(root / "step_0000010"), tmp_path / "x").name == "step_0000010"
    assert resolve_resume(None, tmp_path / "run") is None
    assert resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume(str(root / "step_0000030"), tmp_path)


PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs" / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def presets():
    from .conftest import compose_cfg

    return {name: compose_cfg([f"experiment={name}"]) for name in PRESETS}


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("name", PRESETS)
def test_presets_split_over_1_2_4_8_processes(presets, name, world):
    cfg = presets[name]
    gbt, seq = cfg.train.global_batch_tokens, cfg.seq_len
    mb, accum = batch_arithmetic(cfg, world)
    assert mb * seq * accum * world == gbt  # the same global batch on any number of processes
    share = gbt // (seq * world)  # sequences per process per step
    if cfg.train.micro_batch == "auto":  # no device: 16k tokens per micro-batch at most
        assert mb <= max(1, 16384 // seq) and share % mb == 0
    else:
        assert mb == min(cfg.train.micro_batch, share)


@pytest.mark.parametrize("world, expect", [(1, (8, 1)), (2, (4, 1)), (4, (2, 1)), (8, (1, 1))])
def test_quickstart_micro_batch(presets, world, expect):
    """2048 tokens of 256 = 8 sequences per step: all in one forward pass on each process."""
    assert batch_arithmetic(presets["quickstart"], world) == expect


def test_explicit_micro_batch_capped_at_the_share(caplog):
    with caplog.at_level("INFO"):
        assert batch_arithmetic(_cfg(1024, gbt=65536, mb=16), 8) == (8, 1)  # 64 sequences / 8 processes
    assert "train.micro_batch=16 is more than the 8 sequence(s) each of 8 process(es) gets" in caplog.text
    assert batch_arithmetic(_cfg(1024, gbt=65536, mb=16), 2) == (16, 2)  # fits: unchanged
    with pytest.raises(ConfigError, match=r"less than one sequence per process .* use train.global_batch_tokens=16384"):
        batch_arithmetic(_cfg(1024, gbt=8192, mb=4), 16)  # fewer sequences than processes


def test_wandb_missing_auto_logs_locally_explicit_mode_refused(monkeypatch, tmp_path, caplog):
    """wandb is an optional extra: without it, logger.mode=auto falls back to metrics.jsonl with one
    line naming the extra; an explicit online/offline mode is a one-line ConfigError."""
    import importlib.util
    import logging

    from longctx.trainer import logger as lg

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = OmegaConf.create({"logger": {"name": "wandb", "mode": "auto", "project": "p"}})
    with caplog.at_level(logging.INFO):
        assert isinstance(lg.build_logger(cfg, tmp_path, True, resuming=False), lg.NullLogger)
    assert "longctx-gpt[wandb]" in caplog.text
    cfg.logger.mode = "offline"
    with pytest.raises(ConfigError, match=r"logger.mode=offline needs wandb.*longctx-gpt\[wandb\]"):
        lg.build_logger(cfg, tmp_path, True, resuming=False)
    assert list(tmp_path.iterdir()) == []


def test_collect_garbage_every_pauses_gc_and_collects_on_schedule(monkeypatch):
    """gc_every=N: automatic GC off inside the loop, gc.collect(1) exactly at steps N, 2N, ...;
    GC state restored afterwards (also after an exception); gc_every=0 changes nothing."""
    import gc

    from longctx.train import collect_garbage_every

    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or real_collect(*a))
    assert gc.isenabled()
    with collect_garbage_every(3) as tick:
        assert not gc.isenabled()
        calls.clear()
        for step in range(1, 8):
            tick(step)
    assert calls == [(1,), (1,)]  # steps 3 and 6
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), collect_garbage_every(2):
        raise RuntimeError("stop")
    assert gc.isenabled() and gc.get_freeze_count() == 0
    calls.clear()
    with collect_garbage_every(0) as tick:
        assert gc.isenabled()
        tick(1)
    assert calls == []


@pytest.mark.parametrize("model, gib, attention, expect", [
    ("gpt2_small", 80, "flash", 65536), ("gpt2_small", 141, "sdpa", 65536), ("gpt2_small", 40, "flash", 32768),
    ("gpt2_small", 24, "flash", 16384), ("gpt2_medium", 141, "flash", 32768), ("gpt2_medium", 80, "flash", 16384),
    ("gpt2_small", 141, "naive", 16384)])
def test_auto_micro_batch_by_gpu_memory(monkeypatch, model, gib, attention, expect):
    """micro_batch_tokens=auto sizes the micro-batch by the GPU's memory (activations of n_layer x
    n_embd per token within 45% of it); naive attention (memory ~ seq_len^2) keeps 16k; no GPU: 16k."""
    import types

    from longctx.trainer.metrics import micro_batch_tokens
    from .conftest import compose_cfg

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(total_memory=gib * 2**30))
    cfg = compose_cfg([f"model={model}", f"attention={attention}", "seq_len=1024", "train.global_batch_tokens=524288"])
    assert micro_batch_tokens(cfg, torch.device("cuda", 0)) == expect
    assert micro_batch_tokens(cfg, torch.device("cpu")) == 16384 and micro_batch_tokens(cfg) == 16384
    assert batch_arithmetic(cfg, 1, torch.device("cuda", 0)) == (expect // 1024, 524288 // expect)
    fixed = compose_cfg([f"model={model}", "seq_len=1024", "train.micro_batch_tokens=4096"])
    assert micro_batch_tokens(fixed, torch.device("cuda", 0)) == 4096


def test_as_group_takes_a_node_of_a_composed_config():
    """as_group on a group node of a Hydra-composed config (build_optimizer's cfg.train when the
    caller holds the DictConfig, as the benchmarks do): the node keeps its schema type, which the
    key filtering used to collide with ("dict is not a subclass of OptimConfig")."""
    from longctx.trainer.config import as_config, as_group
    from .conftest import compose_cfg

    cfg = compose_cfg(["model=gpt2_tiny", "train.lr=0.001"])
    train = as_group("train", cfg.train)
    assert train == as_config(cfg).train and train.lr == 0.001
