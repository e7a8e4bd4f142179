"""Every `python train.py ...` / `torchrun ... train.py ...` command shown in README.md, docs/*.md and
the configs' comments runs at toy size (tests/commands.py says how it is shrunk), and every option
of every config group runs through train.py. A documented command that breaks fails here.

Commands that cannot run on a CPU machine without internet are listed in COMPOSE_ONLY with the
reason; their config is still composed (a typo fails) and, for OpenWebText, the offline one-line
error is checked. Everything runs in this process (Hydra compose + train.run, as main() does),
except the torchrun commands: one `torchrun --nproc_per_node=2` launch runs all of them in order.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from longctx import train as train_mod
from tests import commands as C

ROOT = C.ROOT
GROUPS = ("model", "data", "attention", "parallel", "logger", "experiment")
LAYOUTS = ("dense", "local", "strided", "fixed", "butterfly", "bigbird", "longformer")
LAYOUT_TOY = "attention.window_blocks=1 attention.stride=2 attention.random_blocks=1 max_steps=1 eval_tokens=0"

OWT = "data=openwebtext (internet); the offline one-line error is checked"
# (a part of the command, why it is only composed here)
COMPOSE_ONLY = [
    ("python train.py data=openwebtext", "downloads OpenWebText (internet); the offline one-line error is checked"),
    ("experiment=gpt2_small_owt_1k", OWT),
    ("experiment=gpt2_small_owt_2k", OWT),
    ("experiment=gpt2_small_owt_4k", OWT),
    ("experiment=gpt2_small_owt_8k", OWT),
    ("experiment=gpt2_small_owt_16k", OWT),
    ("experiment=gpt2_medium_owt", OWT),
    ("init_from=gpt2 ", "downloads GPT-2's weights from the Hugging Face Hub (internet)"),
    ("torchrun --nnodes=2", "two nodes meeting at a rendezvous host (node001:29500)"),
    ("sbatch ", "a SLURM cluster (scripts/slurm_train.sh runs torchrun on each node)"),
    (" -m ", ("a Hydra multirun: every job is composed here; tests/trainer/test_sweeps.py runs -m sweeps "
              "(a,b / choice / range / glob) through train.py")),
]
# shown in prose as patterns with a placeholder, not as commands to type
TEMPLATES = {"python train.py ... seq_len=N", "python train.py ... model.backend=ours|hf_eager|hf_sdpa",
             "python train.py ... attention=flash|block_sparse attention.layout=..."}
OPENWEBTEXT = {("data", "openwebtext"), ("experiment", "gpt2_small_owt_1k"), ("experiment", "gpt2_small_owt_2k"),
               ("experiment", "gpt2_small_owt_4k"), ("experiment", "gpt2_small_owt_8k"),
               ("experiment", "gpt2_small_owt_16k"), ("experiment", "gpt2_medium_owt")}
OFFLINE_LINE = "could not download the Hugging Face dataset 'Skylion007/openwebtext'"


def _reason(cmd: C.Command) -> str | None:
    hits = [why for part, why in COMPOSE_ONLY if part in " ".join(cmd.text.split()) + " "]
    assert len(hits) <= 1, f"{cmd.source}: matches several COMPOSE_ONLY entries"
    return hits[0] if hits else None


def _unique(cmds: list[C.Command]) -> list[C.Command]:
    seen, out = set(), []
    for c in cmds:
        key = (c.launcher, c.nnodes, c.multirun, tuple(c.overrides))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _write_corpus(folder: Path) -> None:
    """What README's data=local command names: corpus/**/*.txt and notes.md (relative paths)."""
    rng = random.Random(0)
    words = ["the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "to", "big", "red", "small", "house", "tree", "bird", "sings", "every", "morning"]
    for i in range(8):
        p = folder / "corpus" / f"part{i % 2}" / f"doc{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(40)) + "\n")
    (folder / "notes.md").write_text("# Notes\n\n" + "Some notes about the cat.\n" * 50)


def _key(cmd: C.Command, cfg, shared_run_dirs: set[str]) -> str:
    """What a run depends on: the launcher and the composed toy config; run_dir only when another
    documented command uses the same one (a resume chain)."""
    from omegaconf import OmegaConf

    conf = OmegaConf.to_container(cfg, resolve=False)
    if C._get(cmd.overrides, "run_dir") not in shared_run_dirs:
        conf.pop("run_dir")
    return json.dumps([cmd.launcher, cmd.world, conf], sort_keys=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """All runs, once. cwd is a fresh folder (the commands' relative run_dir and data.paths resolve
    there). Commands whose toy config is the same as an earlier one's (e.g. `python train.py` and
    `python train.py data=stdlib`) are composed and compared, and run once."""
    base = tmp_path_factory.mktemp("docs_cmds")
    _write_corpus(base)
    cache = str(base / "cache")
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    os.chdir(base)
    os.environ.pop("TRITON_INTERPRET", None)  # a CPU user: flash/block_sparse take their CPU fallbacks
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    out = {"docs": [], "layouts": {}, "composed": [], "same_as": [], "templates": [], "base": base}
    try:
        docs = _unique(C.documented_commands())
        runnable = []
        for cmd in docs:
            why = _reason(cmd)
            if cmd.template:
                out["templates"].append(cmd)
                continue
            if why is None:
                runnable.append(cmd)
                continue
            overrides = cmd.overrides + (["parallel=fsdp"] if cmd.launcher == "sbatch" else [])
            for job in C.sweep_jobs(overrides) if cmd.multirun else [overrides]:  # as documented, not shrunk
                train_mod.check_group_choices(job)
                out["composed"].append({"cmd": cmd, "why": why, "data": C.compose(job).data.name})

        explicit = [C._get(c.overrides, "run_dir") for c in runnable]
        shared = {d for d in explicit if d and explicit.count(d) > 1}
        plan, seen, covered = [], {}, set()
        for i, cmd in enumerate(runnable):
            cfg, overrides, choices = C.toy_config(cmd, cache, run_dir=f"outputs/run_{i}")
            covered |= set(choices.items())
            key = _key(cmd, cfg, shared)
            if key in seen:
                out["same_as"].append((cmd, seen[key]))
                continue
            seen[key] = cmd
            plan.append((cmd, cfg, overrides, choices))
        # every option of every group: the ones no documented command uses run on their own
        for group in GROUPS:
            for option in sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml")):
                if (group, option) in covered or (group, option) in OPENWEBTEXT:
                    continue  # (OpenWebText: test_openwebtext_offline_is_one_line_and_leaves_nothing)
                launch = "torchrun --nproc_per_node=2 train.py" if option in ("ddp", "fsdp") else "python train.py"
                cmd = C.parse(f"{launch} {group}={option}", f"option {group}={option}")
                plan.append((cmd, *C.toy_config(cmd, cache, run_dir=f"outputs/option_{group}_{option}")))
        out["plan"] = plan

        # torchrun commands first (docs/distributed.md's r1 resume chain ends with a python command)
        tr = [p for p in plan if p[0].launcher == "torchrun"]
        spec = base / "torchrun_cmds.json"
        spec.write_text(json.dumps([{"source": c.source, "text": c.text, "overrides": o} for c, _, o, _ in tr]))
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={C.TORCHRUN_PROCS}", str(ROOT / "tests" / "commands.py"),
                               str(spec), str(base / "torchrun_out.json")],
                              cwd=base, env=env, capture_output=True, text=True, timeout=600, check=False)
        results = json.loads((base / "torchrun_out.json").read_text()) if proc.returncode == 0 else []
        for r, (_, _, _, choices) in zip(results, tr):
            r["choices"] = choices
        out["torchrun"] = {"proc": proc, "cmds": [c for c, *_ in tr], "results": results}

        for cmd, cfg, overrides, choices in [p for p in plan if p[0].launcher == "python"]:
            r = C.run_command(cmd, cache, cfg=cfg)
            out["docs"].append({"cmd": cmd, **r, "overrides": overrides, "choices": choices})
        for layout in LAYOUTS:  # 5 blocks of 16 (the last partial): layout parameters scaled to match
            cmd = C.parse(f"python train.py attention=block_sparse attention.layout={layout} {LAYOUT_TOY}",
                          f"layout {layout}")
            out["layouts"][layout] = C.run_command(cmd, cache, run_dir=f"outputs/layout_{layout}")
        yield out
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)


def test_commands_are_found():
    docs = _unique(C.documented_commands())
    texts = [" ".join(c.text.split()) for c in docs]
    assert "python train.py experiment=quickstart" in texts  # README's first command
    assert any(c.launcher == "torchrun" and "parallel=fsdp" in c.overrides for c in docs)
    assert len(docs) >= 20, texts
    for part, _ in COMPOSE_ONLY:  # no stale entry
        assert any(part in t for t in texts), f"COMPOSE_ONLY entry {part!r} matches no documented command"


def test_same_toy_config_runs_once(work):
    """Documented commands that differ only in what the toy size overrides (seq_len, logger, a
    run_dir nothing else uses) ran once; the pairs are listed so that this is visible."""
    pairs = [(a.text, b.text) for a, b in work["same_as"]]
    assert ("python train.py data=stdlib", "python train.py model=gpt2_small seq_len=4096") in pairs, pairs
    ran = {d["cmd"].text for d in work["docs"]} | {c.text for c in work["torchrun"]["cmds"]}
    assert all(b in ran for _, b in pairs)


def test_python_commands_run(work):
    failed = [f"{d['cmd'].source}: {d['cmd'].text} -> exit {d['code']}" for d in work["docs"] if d["code"] != 0]
    assert not failed, failed
    for d in work["docs"]:
        s, want = d["summary"], int(next(o for o in d["overrides"][::-1] if o.startswith("max_steps=")).split("=")[1])
        assert s["step"] == want and Path(s["checkpoint"]).name == f"step_{want:07d}", (d["cmd"].source, s)
        assert s["loss"] is not None and s["loss"] > 0, d["cmd"].source


def test_torchrun_commands_run(work):
    t = work["torchrun"]
    assert t["proc"].returncode == 0, t["proc"].stderr[-4000:]
    assert [r["source"] for r in t["results"]] == [c.source for c in t["cmds"]]
    for r in t["results"]:
        assert r["code"] == 0, r
        s = r["summary"]
        assert s["world_size"] == C.TORCHRUN_PROCS and s["step"] >= 1 and s["checkpoint"], r
    # docs/distributed.md: saved by 2 processes at step 2, resumed by 2 to step 4, then by 1 to step 5
    r1 = [d["summary"] for d in work["docs"] if "run_dir=outputs/r1" in d["cmd"].text]
    assert r1 and r1[0]["step"] == 5 and r1[0]["steps_this_run"] == 1


def test_compose_only_commands(work):
    """Listed in COMPOSE_ONLY: composed (above, a typo would have failed) and never silently dropped;
    the prose patterns with placeholders are exactly TEMPLATES."""
    composed = {" ".join(c["cmd"].text.split()) for c in work["composed"]}
    docs = _unique(C.documented_commands())
    assert {" ".join(c.text.split()) for c in docs if _reason(c) and not c.template} == composed
    assert any(c["data"] == "openwebtext" for c in work["composed"])
    sweeps = [c for c in work["composed"] if c["cmd"].multirun]
    assert len(sweeps) == 3 + 3 + 1 * 2 * 3  # README's 3 seq_lens, reproduce.md's 3 and glob(gpt2_s*) x 2 x 3 seeds
    assert {" ".join(c.text.replace("\\|", "|").split()) for c in work["templates"]} == TEMPLATES


def test_every_group_option_runs(work):
    ran = {}
    for d in work["docs"] + work["torchrun"]["results"]:
        for g, o in d["choices"].items():
            ran[(g, o)] = ran.get((g, o), False) or d["code"] == 0
    options = {(g, p.stem) for g in GROUPS for p in (ROOT / "configs" / g).glob("*.yaml")}
    for option in OPENWEBTEXT:  # checked by test_openwebtext_offline_is_one_line_and_leaves_nothing
        assert option in options and C.compose(["=".join(option)]).data.name == "openwebtext", option
    missing = sorted(o for o in options - OPENWEBTEXT if not ran.get(o))  # (OpenWebText ones cannot run)
    assert not missing, f"options that did not run through train.py: {missing}"


@pytest.mark.parametrize("option", sorted(f"{g}={o}" for g, o in OPENWEBTEXT))
def test_openwebtext_offline_is_one_line_and_leaves_nothing(work, option, capsys, monkeypatch):
    base = work["base"]
    monkeypatch.chdir(base)
    C.offline(monkeypatch)
    cache = base / "owt_cache"
    r = C.run_command(C.parse(f"python train.py {option}", option), str(cache), run_dir=str(base / "owt_run"))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert r["code"] == 2 and len(err) == 1 and OFFLINE_LINE in err[0], err
    assert not (base / "owt_run").exists() and (not cache.exists() or list(cache.iterdir()) == [])


def test_every_block_sparse_layout_trains(work):
    """configs/attention/block_sparse.yaml's layouts through train.py with blocks of 16 on the CPU path
    (reference attention with the same block mask). Same seed and batches: a layout that keeps every
    causal block must give the dense layout's loss exactly, any other layout a different loss."""
    from longctx.kernels import build_block_mask_from_config
    from omegaconf import OmegaConf

    dense = work["layouts"]["dense"]["summary"]["loss"]
    for layout, r in work["layouts"].items():
        assert r["code"] == 0, layout
        assert "attention.layout=" + layout in r["overrides"] and "attention.block_size=16" in r["overrides"]
        cfg = C.compose(r["overrides"])
        mask = build_block_mask_from_config(cfg.attention, cfg.seq_len, cfg.model.n_head)
        keeps_all = mask.causal_density == 1.0
        assert (r["summary"]["loss"] == dense) == keeps_all, (layout, mask, r["summary"]["loss"], dense)
        assert OmegaConf.select(cfg, "attention.impl") == "block_sparse"
    assert set(work["layouts"]) == set(LAYOUTS)
    sparse = [k for k, r in work["layouts"].items() if r["summary"]["loss"] != dense]
    assert len(sparse) >= 5, sparse  # at this toy size most layouts do drop blocks
