"""parallel=single|ddp|fsdp on the CPU with gloo: same losses for 1 and 2 processes, resharding
resume, activation checkpointing, compile, and the bad-input messages.

Tolerance: fp32 everywhere; 1 vs 2 processes differ only in the order of floating-point sums
(reduce-scatter / all-reduce of 2 halves vs one accumulation), measured ~1e-7 relative, so
losses and grad norms are compared with rtol=1e-5 over 5 (+3 resumed) AdamW steps.
compile=true: rtol=1e-4 (inductor fuses and reorders the arithmetic).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
ROOT = HERE.parent.parent
RTOL = 1e-5

sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402


def torchrun(nproc: int, *args: str, timeout: int = 300) -> dict:
    out = Path(args[args.index("--out") + 1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(out.read_text())


def in_process(*args: str) -> dict:
    """The 1-process run, without torchrun (WORLD_SIZE unset): the plain `python train.py` path."""
    assert "WORLD_SIZE" not in os.environ
    out = Path(args[args.index("--out") + 1])
    dist_worker.main(list(args))
    return json.loads(out.read_text())


def close(a, b, rtol=RTOL):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference: 8 uninterrupted single-process steps; an FSDP run on 2 saving after step 5."""
    d = tmp_path_factory.mktemp("parallel")
    ref = in_process("--steps", "8", "--out", str(d / "ref.json"))
    fsdp = torchrun(2, "--parallel", "fsdp", "--steps", "5", "--save", str(d / "ckpt"), "--out", str(d / "fsdp.json"))
    return {"dir": d, "ref": ref, "fsdp": fsdp}


def test_fsdp_two_processes_match_one(runs):
    ref, fsdp = runs["ref"], runs["fsdp"]
    assert fsdp["world_size"] == 2 and fsdp["accum"] == 2 and ref["accum"] == 4
    close(fsdp["losses"], ref["losses"][:5])
    close(fsdp["norms"], ref["norms"][:5])


def test_ddp_two_processes_match_one(runs, tmp_path):
    ddp = torchrun(2, "--parallel", "ddp", "--steps", "5", "--out", str(tmp_path / "ddp.json"))
    close(ddp["losses"], runs["ref"]["losses"][:5])
    close(ddp["norms"], runs["ref"]["norms"][:5])


def test_checkpoint_from_2_resumes_on_1(runs, tmp_path):
    r = in_process("--first-step", "5", "--steps", "3", "--load", str(runs["dir"] / "ckpt"),
                   "--out", str(tmp_path / "r1.json"))
    close(r["losses"], runs["ref"]["losses"][5:8])


def test_checkpoint_from_2_resumes_on_2(runs, tmp_path):
    r = torchrun(2, "--parallel", "fsdp", "--first-step", "5", "--steps", "3", "--load", str(runs["dir"] / "ckpt"),
                 "--out", str(tmp_path / "r2.json"))
    close(r["losses"], runs["ref"]["losses"][5:8])


def _cxx_missing() -> str | None:
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return None
    return "torch.compile on the CPU (inductor) needs a C++ compiler; none found (g++/c++/clang++)"


@pytest.mark.slow
@pytest.mark.skipif(_cxx_missing() is not None, reason=str(_cxx_missing()))
def test_compile_fsdp_selective_ac_matches(runs, tmp_path):
    """The full stack in its fixed order: selective AC -> compile per block -> FSDP2, on 2 processes."""
    r = torchrun(2, "--parallel", "fsdp", "--ac", "selective", "--compile", "--steps", "3",
                 "--out", str(tmp_path / "c.json"), timeout=600)
    close(r["losses"], runs["ref"]["losses"][:3], rtol=1e-4)


# ---- in-process pieces ---------------------------------------------------------------------------

def _loss_and_grads(ac: str, dropout: float = 0.1):
    from longctx.trainer.distributed import init_distributed
    from longctx.trainer.parallelize import parallelize

    model = dist_worker.tiny_model(dropout=dropout, n_layer=4)
    model = parallelize(model, {"parallel": {"name": "single", "activation_checkpointing": ac}}, init_distributed("cpu"))
    x = dist_worker.batch(0, 2)
    torch.manual_seed(7)  # dropout masks
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}
    return model, loss.detach(), grads


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_activation_checkpointing_changes_nothing(ac):
    """Same loss and gradients with recomputation (dropout on: the recompute replays the RNG)."""
    _, loss0, g0 = _loss_and_grads("none")
    model, loss1, g1 = _loss_and_grads(ac)
    wrapped = [type(b).__name__ == "CheckpointWrapper" for b in model.blocks]
    assert wrapped == ([True] * 4 if ac == "full" else [True, False, True, False])
    assert list(model.state_dict()) == list(dist_worker.tiny_model(n_layer=4).state_dict())  # names unchanged
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7, msg=k)


def test_parallel_without_torchrun_says_how_to_launch(monkeypatch):
    from longctx.trainer import ConfigError
    from longctx.trainer.distributed import init_distributed
    from longctx.trainer.parallelize import parallelize

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name in ("fsdp", "ddp"):
        with pytest.raises(ConfigError, match=rf"torchrun --standalone --nproc_per_node=N train.py parallel={name}"):
            parallelize(dist_worker.tiny_model(), {"parallel": {"name": name}}, init_distributed("cpu"))


def test_compile_mode_resolution():
    from longctx.trainer import ConfigError
    from longctx.trainer.parallelize import DEFAULT_COMPILE, compile_mode

    single, fsdp = {"name": "single"}, {"name": "fsdp"}
    assert compile_mode({"compile": "auto", "parallel": single}, "cpu") is None  # CPU: eager
    assert compile_mode({"compile": "auto", "parallel": single}, "cuda") == DEFAULT_COMPILE["single"]
    assert compile_mode({"compile": True, "parallel": fsdp}, "cpu") == "blocks"
    assert compile_mode({"compile": False, "parallel": single}, "cuda") is None
    assert compile_mode({"compile": "model", "parallel": single}, "cpu") == "model"
    assert compile_mode({"parallel": single}, "cuda") == DEFAULT_COMPILE["single"]  # no key: auto
    with pytest.raises(ConfigError, match="compile=model .* parallel=fsdp"):
        compile_mode({"compile": "model", "parallel": fsdp})
    with pytest.raises(ConfigError, match="compile='yes'"):
        compile_mode({"compile": "yes", "parallel": single})


def test_single_process_helpers():
    from longctx.trainer.distributed import all_reduce, barrier, init_distributed, reduce_metrics

    d = init_distributed("auto")
    assert (d.rank, d.world_size, d.is_main) == (0, 1, True)
    assert d.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "NCCL_NVLS_ENABLE" in os.environ  # set to 0 unless the user chose a value
    t = torch.tensor([2.0, 4.0])
    assert all_reduce(t, "avg").tolist() == [2.0, 4.0]
    assert reduce_metrics({"loss": torch.tensor(3.0), "n": 2}) == {"loss": 3.0, "n": 2.0}
    barrier()
    with pytest.raises(ValueError, match="op must be one of"):
        all_reduce(t, "prod")


def test_fsdp_options_reshard_and_cpu_offload(runs, tmp_path):
    """reshard_after_forward=true (re-shard after each forward; the default false runs in every other
    FSDP test), reshard_between_micro_steps=true (re-gather for every micro-step; the default keeps
    the gathered params through the step's 2 micro-steps in the other tests), cpu_offload=true and
    prefetching 2 blocks ahead change no number (on the CPU the offload policy's code path runs,
    though there is nothing to move). The default prefetch (1 block) runs in every other FSDP test."""
    r = torchrun(2, "--parallel", "fsdp", "--steps", "3", "--fsdp", "reshard_after_forward=true",
                 "--fsdp", "reshard_between_micro_steps=true",
                 "--fsdp", "cpu_offload=true", "--fsdp", "prefetch=2", "--ac", "full",
                 "--out", str(tmp_path / "o.json"))
    close(r["losses"], runs["ref"]["losses"][:3])


def test_fsdp_gathers_once_per_step_under_accumulation(tmp_path):
    """With gradient accumulation (4 micro-steps per rank here) and reshard_after_forward=false, the
    default keeps the gathered params from the first micro-step to the last backward: one all-gather
    per FSDP unit (3 blocks + root) and step, against one per unit and micro-step when
    reshard_between_micro_steps=true. Same losses either way."""
    counts = {}
    for between in ("false", "true"):
        r = torchrun(2, "--parallel", "fsdp", "--steps", "2", "--global-batch", "8", "--count-gathers",
                     "--fsdp", "reshard_after_forward=false", "--fsdp", f"reshard_between_micro_steps={between}",
                     "--out", str(tmp_path / f"g_{between}.json"))
        assert r["accum"] == 4
        counts[between] = r
    assert counts["false"]["all_gathers"] == 2 * 4
    assert counts["true"]["all_gathers"] == 2 * 4 * 4
    assert counts["false"]["losses"] == counts["true"]["losses"]


def test_collective_timeout_names_the_rank(tmp_path):
    """Rank 1 stalls past the 3 s timeout: rank 0's all_reduce fails with its rank in the message."""
    out = tmp_path / "hang"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(WORKER), "--hang-rank", "1", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    assert Path(f"{out}.rank0").is_file(), (p.stdout + p.stderr)[-3000:]
    msg = Path(f"{out}.rank0").read_text()
    assert msg.startswith("rank 0/2 on ") and "all_reduce(sum) failed" in msg, msg
    assert "parallel.timeout_s (now 3 s)" in msg, msg
