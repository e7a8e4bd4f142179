"""The training loop end to end on the CPU: loss falls, exact resume, atomic checkpoints, NaN stop,
metrics.jsonl contract, W&B offline."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from longctx.trainer import checkpoint as ckpt_mod
from longctx.trainer import step as step_mod
from longctx.trainer.checkpoint import latest_checkpoint, list_checkpoints

from longctx import train as train_mod

from .conftest import read_rows, run_inprocess


@pytest.fixture(scope="module")
def run20(corpus, tmp_path_factory) -> Path:
    """20 uninterrupted steps (checkpoints at 10 and 20)."""
    run_dir = tmp_path_factory.mktemp("run20")
    run_inprocess(corpus, run_dir)
    return run_dir


def train_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_rows(run_dir)}


def test_loss_falls_and_metrics_contract(run20):
    rows = read_rows(run20)
    assert [r["step"] for r in rows] == list(range(1, 21))  # log_every=1, no duplicates
    for r in rows:
        for key in ("step", "loss", "lr", "tokens_per_s", "grad_norm", "elapsed", "mfu", "mem_gb"):
            assert key in r, key
        assert r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # warmup then decay
    assert rows[0]["lr"] == pytest.approx(3e-3 / 5) and rows[4]["lr"] == pytest.approx(3e-3)
    assert rows[-1]["lr"] < rows[5]["lr"]
    # resolved config and checkpoints
    assert "seq_len: 32" in (run20 / "config.yaml").read_text()
    assert [p.name for p in list_checkpoints(run20 / "checkpoints")] == ["step_0000010", "step_0000020"]
    assert (run20 / "checkpoints" / "step_0000020" / "meta.json").is_file()


def test_resume_auto_matches_uninterrupted(corpus, run20, tmp_path, monkeypatch):
    """Interrupt after step 12 (checkpoint at 10, rows 11-12 written), resume=auto to 20: the losses
    equal those of the uninterrupted run exactly, and metrics.jsonl has no duplicate steps."""

    class Killed(Exception):
        pass

    import longctx.trainer.step as step_mod  # the training step (clip, then the optimizer step) lives there

    real_clip, calls = step_mod.clip_grad_norm, {"n": 0}

    def clip_then_die(model, max_norm):
        calls["n"] += 1
        if calls["n"] == 13:
            raise Killed
        return real_clip(model, max_norm)

    monkeypatch.setattr(step_mod, "clip_grad_norm", clip_then_die)
    with pytest.raises(Killed):
        run_inprocess(corpus, tmp_path)
    monkeypatch.setattr(step_mod, "clip_grad_norm", real_clip)
    assert [r["step"] for r in read_rows(tmp_path)] == list(range(1, 13))
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000010"

    run_inprocess(corpus, tmp_path, resume="auto")
    resumed, straight = read_rows(tmp_path), read_rows(run20)
    assert [r["step"] for r in resumed] == list(range(1, 21))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # bitwise (CPU, fp32)
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]
    assert resumed[-1]["val_loss"] == straight[-1]["val_loss"]


def test_resume_explicit_path(corpus, run20, tmp_path):
    """resume=<checkpoint folder> of another run dir continues from that step."""
    run_inprocess(corpus, tmp_path, resume=str(run20 / "checkpoints" / "step_0000010"))
    assert [r["step"] for r in read_rows(tmp_path)] == list(range(11, 21))
    assert [r["loss"] for r in read_rows(tmp_path)] == [r["loss"] for r in read_rows(run20)[10:]]


def test_kill_during_checkpoint_keeps_previous(corpus, run20, tmp_path, monkeypatch):
    """A save that dies half-way leaves only a .tmp-* folder; resume=auto takes the previous one."""
    real_save, calls = ckpt_mod.dcp.save, {"n": 0}

    class Killed(Exception):
        pass

    def save_then_die(state, checkpoint_id):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-20 save: some bytes hit the disk, then the process "dies"
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
            raise Killed
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(ckpt_mod.dcp, "save", save_then_die)
    with pytest.raises(Killed):
        run_inprocess(corpus, tmp_path)
    monkeypatch.setattr(ckpt_mod.dcp, "save", real_save)
    ckdir = tmp_path / "checkpoints"
    assert (ckdir / ".tmp-step_0000020").is_dir() and not (ckdir / "step_0000020").exists()
    assert latest_checkpoint(ckdir).name == "step_0000010"

    run_inprocess(corpus, tmp_path, resume="auto")  # continues from 10, saves 20 cleanly
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_0000010", "step_0000020"]
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_rows(run20)]  # bitwise: as if never killed
    assert rows[-1]["val_loss"] == read_rows(run20)[-1]["val_loss"]


def test_ckpt_keep_prunes(corpus, tmp_path):
    run_inprocess(corpus, tmp_path, max_steps=8, ckpt_every=2, ckpt_keep=2, eval_every=0, log_every=4)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_0000006", "step_0000008"]
    assert [r["step"] for r in read_rows(tmp_path)] == [4, 8]
    assert "val_loss" in read_rows(tmp_path)[-1]  # evaluated at the end even with eval_every=0


def test_nan_loss_stops_naming_the_step(corpus, tmp_path, monkeypatch):
    from longctx import model as model_pkg

    real_build = model_pkg.build_model

    def build_poisoned(cfg):
        m = real_build(cfg)
        calls, fwd = {"n": 0}, m.forward

        def forward(idx, targets=None):
            logits, loss = fwd(idx, targets)
            if targets is not None and m.training:
                calls["n"] += 1
                if calls["n"] > 2 * 4:  # accum=2: the 5th step's first micro-batch
                    loss = loss * float("nan")
            return logits, loss

        m.forward = forward
        return m

    # train.py imports build_model inside train(), so patching the package is enough
    monkeypatch.setattr(model_pkg, "build_model", build_poisoned)
    with pytest.raises(step_mod.LossDiverged, match=r"loss is nan at step 5"):
        run_inprocess(corpus, tmp_path, ckpt_every=2)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_0000002", "step_0000004"]
    assert [r["step"] for r in read_rows(tmp_path)] == [1, 2, 3, 4]


def test_wandb_offline_writes_a_run(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_inprocess(corpus, tmp_path, logger="wandb", max_steps=4, eval_every=2, ckpt_every=0)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1, list(runs[0].iterdir())
    assert (tmp_path / "wandb_run_id").read_text().strip() in files[0].name
    # every logged value reached the run file (history values are stored as their JSON text); the
    # wandb service writes it in its own process: shut it down so that it has flushed
    import wandb

    wandb.teardown()
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    want = [(r["step"], k, json.dumps(r[k]).encode()) for r in rows for k in ("loss", "val_loss") if k in r]
    for _ in range(50):  # (and give a slow disk a few seconds)
        data = files[0].read_bytes()
        if all(v in data for _, _, v in want):
            break
        time.sleep(0.2)
    for step, key, value in want:
        assert key.encode() in data and value in data, (step, key)


def test_load_into_plain_model(run20):
    """A checkpoint loads into a fresh single-process model (what scripts/sample.py does): that model
    scores the validation span exactly as the trained model did at step 20 (metrics.jsonl)."""
    from longctx.data import load_data
    from longctx.model import build_model
    from omegaconf import OmegaConf

    ckpt = latest_checkpoint(run20 / "checkpoints")
    cfg = OmegaConf.load(ckpt / "config.yaml")
    torch.manual_seed(0)
    m = build_model(cfg)
    fresh = {k: v.clone() for k, v in m.state_dict().items()}
    meta = ckpt_mod.load_model_only(ckpt, m)
    assert meta["step"] == 20
    changed = [k for k, v in m.state_dict().items() if not torch.equal(v, fresh[k])]
    assert "wte.weight" in changed and len(changed) == len(fresh)  # every tensor came from the file
    m.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in load_data(cfg.data).val_batches(cfg.seq_len, 4, cfg.eval_tokens):
            total += m(x, y)[1].double().item() * y.numel()
            count += y.numel()
    logged = read_rows(run20)[-1]
    assert logged["step"] == 20 and count == cfg.eval_tokens
    assert total / count == pytest.approx(logged["val_loss"], rel=1e-6, abs=0)


def test_sample_script(run20, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample", Path(__file__).resolve().parents[2] / "scripts" / "sample.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    assert sample.main([str(run20), "--prompt", "The cat", "--max-new-tokens", "5", "--num-samples", "2",
                        "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out.count("The cat") == 2 and "step 20" in out.err
    assert sample.main([str(run20 / "nothing")]) == 2
    # greedy decoding equals an argmax loop over the checkpoint's model, written out here
    from longctx.data import get_tokenizer
    from longctx.model import build_model
    from omegaconf import OmegaConf

    assert sample.main([str(run20), "--prompt", "The cat", "--max-new-tokens", "6", "--temperature", "0",
                        "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    ckpt = latest_checkpoint(run20 / "checkpoints")
    cfg = OmegaConf.load(ckpt / "config.yaml")
    cfg.attention.impl = "sdpa"
    m = build_model(cfg)
    ckpt_mod.load_model_only(ckpt, m)
    m.eval()
    tok = get_tokenizer()
    ids = tok.encode("The cat").ids
    with torch.no_grad():
        for _ in range(6):
            logits = m(torch.tensor([ids]))[0][0, -1, :50257]
            ids.append(int(logits.argmax()))
    assert tok.decode(ids) in printed, (tok.decode(ids), printed)


def test_summary_json(run20):
    """summary.json (also printed and logged at the end) agrees with metrics.jsonl and the files."""
    s = json.loads((run20 / "summary.json").read_text())
    rows = read_rows(run20)
    assert s["step"] == 20 and s["max_steps"] == 20 and s["tokens"] == 20 * 256 == rows[-1]["tokens"]
    assert s["loss"] == rows[-1]["loss"] and s["ppl"] == pytest.approx(math.exp(rows[-1]["loss"]))
    assert s["val_loss"] == rows[-1]["val_loss"] and s["val_ppl"] == rows[-1]["val_ppl"]
    assert s["steps_this_run"] == 20 and 0 < s["train_s"] <= s["wall_s"]
    assert s["tokens_per_s"] == pytest.approx(20 * 256 / s["train_s"])
    assert s["mfu"] is None and s["device"] == "cpu" and s["world_size"] == 1  # no known peak on a CPU
    assert s["peak_mem_kind"].startswith("host RSS") and 0.05 < s["peak_mem_gb"] < 64
    assert Path(s["metrics"]) == run20 / "metrics.jsonl" and Path(s["run_dir"]) == run20
    assert Path(s["checkpoint"]) == latest_checkpoint(run20 / "checkpoints") == run20 / "checkpoints" / "step_0000020"
    assert s["commands"]["sample"] == f"python scripts/sample.py {run20} --max-new-tokens 200"
    assert s["commands"]["resume"].startswith("python train.py ")
    assert s["commands"]["resume"].endswith(f"run_dir={run20} resume=auto max_steps=40")


def test_summary_lines():
    from longctx.trainer.metrics import next_commands, summary_lines

    cmds = next_commands(Path("/r/my run"), 2, 100, ["experiment=quickstart", "run_dir=/r/old", "max_steps=100",
                                                     "data.paths=[a b/*.txt]", "resume=auto"])
    assert cmds["resume"] == ("torchrun --standalone --nproc_per_node=2 train.py experiment=quickstart "
                              "'data.paths=[a b/*.txt]' run_dir='/r/my run' resume=auto max_steps=200")
    assert cmds["sample"] == "python scripts/sample.py '/r/my run' --max-new-tokens 200"
    s = {"step": 100, "max_steps": 100, "tokens": 204800, "wall_s": 125.0, "steps_this_run": 50, "train_s": 100.0,
         "loss": 3.5, "ppl": math.exp(3.5), "val_loss": 3.75, "val_ppl": math.exp(3.75), "tokens_per_s": 1024.0,
         "world_size": 2, "device": "cuda:0", "mfu": 0.4567, "peak_mem_gb": 12.345, "peak_mem_kind": "GPU",
         "metrics": "/r/my run/metrics.jsonl", "log": None, "checkpoint": None, "run_dir": "/r/my run",
         "commands": cmds}
    text = "\n".join(summary_lines(s))
    for want in ("step 100/100", "204.8k tokens", "wall 2m05s", "50 steps in this run", "train loss 3.5000 (ppl 33.12)",
                 "val loss 3.7500 (ppl 42.52)", "1.0k tok/s over 2 process(es) on cuda:0", "MFU 45.7%",
                 "peak memory 12.35 GB", "checkpoint: none", cmds["resume"], cmds["sample"]):
        assert want in text, want
