"""The documented `python train.py ...` / `torchrun ... train.py ...` commands, found in README.md,
docs/*.md and the configs' comments, and how tests run them at toy size.

A command keeps its groups and options; only sizes and step counts are shrunk by overrides
appended after its own (SHRINK: a 2-layer width-64 model, seq_len 64, a few steps of 2 x 64 tokens per process,
a small slice of the corpus, device=cpu, logger=none). `max_steps=N` in a command becomes
ceil(N / 1000) so that resume chains (2000 -> 4000 -> 4100) still resume. torchrun commands run on
2 CPU processes (gloo) whatever --nproc_per_node says.

Run as a script (under torchrun) it executes a JSON list of commands one after the other in one
process group lifetime each (tests/test_docs_commands.py uses it; one launch for all of them):
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/commands.py cmds.json out.json
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TORCHRUN_PROCS = 2  # CPU processes for every torchrun command
SHRINK = {
    "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64,
    "seq_len": 64, "train.global_batch_tokens": 128, "train.micro_batch": "auto",
    "train.warmup_steps": 1, "eval_every": 0, "eval_tokens": 128, "ckpt_every": 0, "log_every": 1,
    "device": "cpu", "data.progress": "false", "data.num_proc": 1,
}
STDLIB_FILES = 6  # data=stdlib: a seeded subset of the standard library (all of it takes ~30 s to tokenise)
_CMD = re.compile(r"(python3? train\.py|torchrun\b.*?\btrain\.py|sbatch\b.*?slurm_train\.sh)(\s.*)?$")


@dataclass
class Command:
    source: str  # file:line
    text: str  # as documented
    launcher: str  # python | torchrun | sbatch
    overrides: list[str]
    nnodes: int = 1
    extra: list[str] = field(default_factory=list)  # the shrinking overrides appended
    multirun: bool = False  # -m / --multirun: a Hydra sweep (see sweep_jobs)

    @property
    def template(self) -> bool:
        """A pattern shown in prose, not a command: a placeholder value (`seq_len=N`, `layout=...`)
        or alternatives (`model.backend=ours|hf_eager|hf_sdpa`)."""
        return any(re.fullmatch(r"[A-Z]|\.\.\.|.*\|.*", o.split("=", 1)[-1]) for o in self.overrides)

    @property
    def world(self) -> int:
        return TORCHRUN_PROCS if self.launcher == "torchrun" else 1


def _candidates(path: Path) -> list[tuple[int, str]]:
    """(line, text) of code in a markdown file (fenced blocks, continuation lines joined; inline
    spans that start with a command) or of comment lines in a yaml file."""
    lines = path.read_text().splitlines()
    out = []
    if path.suffix == ".md":
        fenced, buf = False, ""
        for i, ln in enumerate(lines, 1):
            if ln.strip().startswith("```"):
                fenced = not fenced
                continue
            if fenced:
                text = buf + ln.strip()
                if text.endswith("\\"):
                    buf = text[:-1] + " "
                    continue
                buf = ""
                out.append((i, text))
            else:
                out += [(i, m.group(1)) for m in re.finditer(r"`([^`]+)`", ln)
                        if re.match(r"(python3? train\.py|torchrun )", m.group(1))]
    else:
        out += [(i, m.group(1)) for i, ln in enumerate(lines, 1) if (m := re.match(r"\s*#\s*(.*)", ln))]
    return out


def documented_commands() -> list[Command]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").rglob("*.yaml"))]
    cmds = []
    for path in files:
        for line, text in _candidates(path):
            for part in text.split("&&"):
                part = re.sub(r"\s(#|\().*$", "", part.strip()).strip()  # trailing comment / "(first run)"
                m = _CMD.search(part)
                if m:
                    cmds.append(parse(part[m.start():], f"{path.relative_to(ROOT)}:{line}"))
    return cmds


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of a Hydra -m sweep (a,b / choice / range / glob), as plain override lists."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    parser, axes = OverridesParser.create(), []
    for o in overrides:
        ov = parser.parse_override(o)
        key = ov.get_key_element()
        if not ov.is_sweep_override():
            axes.append([o])
        elif ov.value_type == ValueType.GLOB_CHOICE_SWEEP:
            axes.append([f"{key}={v}" for v in ov.value().filter(
                sorted(p.stem for p in (ROOT / "configs" / key).glob("*.yaml")))])
        else:
            axes.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
    return [list(job) for job in itertools.product(*axes)]


def parse(text: str, source: str = "") -> Command:
    tokens = [t for t in shlex.split(text) if t != "..."]  # "..." stands for "your other settings"
    launcher = {"python": "python", "python3": "python", "torchrun": "torchrun", "sbatch": "sbatch"}[tokens[0]]
    script = next(i for i, t in enumerate(tokens) if t.endswith(("train.py", "slurm_train.sh")))
    nnodes = 1
    for t in tokens[1:script]:
        if t.startswith("--nnodes="):
            nnodes = int(t.split("=")[1].split(":")[-1])
        if launcher == "sbatch" and t.startswith("--nodes="):
            nnodes = int(t.split("=")[1])
    args = tokens[script + 1:]
    multirun = any(a in ("-m", "--multirun") for a in args)
    return Command(source, text, launcher, [a for a in args if a not in ("-m", "--multirun")], nnodes,
                   multirun=multirun)


def _get(overrides: list[str], key: str):
    vals = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key]
    return vals[-1] if vals else None


def shrink(cmd: Command, cache_dir: str, run_dir: str | None = None) -> list[str]:
    """The command's overrides plus the ones that make it toy-sized (see the module docstring)."""
    extra = {**SHRINK, "data.cache_dir": cache_dir}
    extra["train.global_batch_tokens"] = 128 * cmd.world  # 2 sequences of 64 per process and step
    steps = _get(cmd.overrides, "max_steps")
    extra["max_steps"] = max(1, math.ceil(int(steps) / 1000)) if steps else 2
    if not any(o.startswith("logger=") for o in cmd.overrides):
        extra["logger"] = "none"  # the default logger=wandb would try to reach W&B
    if _get(cmd.overrides, "run_dir") is None and run_dir:
        extra["run_dir"] = run_dir  # (outputs/<time> would be shared by runs started in the same second)
    for key in ("eval_every", "eval_tokens", "ckpt_every", "log_every"):  # already small where a command sets them
        if _get(cmd.overrides, key) is not None:
            del extra[key]
    cmd.extra = [f"{k}={v}" for k, v in extra.items()]
    return cmd.overrides + cmd.extra


def finish_for_data(cfg) -> list[str]:
    """Shrinking that depends on the composed config (which source, which attention); applied to
    `cfg` in place (as these overrides would be) and returned as overrides."""
    from omegaconf import open_dict

    more = {}
    if cfg.data.name == "stdlib":
        more["data.max_files"] = STDLIB_FILES
    if cfg.attention.impl == "block_sparse":
        more["attention.block_size"] = 16  # blocks of the toy seq_len (the layout stays)
    with open_dict(cfg):
        for key, value in more.items():
            group, name = key.split(".")
            cfg[group][name] = value
    return [f"{k}={v}" for k, v in more.items()]


GROUPS = ("model", "data", "attention", "parallel", "logger", "experiment")


def compose(overrides: list[str], with_choices: bool = False):
    """The config train.py would get for these overrides; with_choices: (cfg, {group: option used})."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=with_choices)
    if not with_choices:
        return cfg
    choices = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def toy_config(cmd: Command, cache_dir: str, run_dir: str | None = None):
    """(config, overrides, {group: option}) of the command shrunk; a typo in a documented command
    (unknown group option or key) raises here."""
    from longctx import train as train_mod

    train_mod.check_group_choices(cmd.overrides)
    overrides = shrink(cmd, cache_dir, run_dir)
    cfg, choices = compose(overrides, with_choices=True)
    return cfg, overrides + finish_for_data(cfg), choices


def run_command(cmd: Command, cache_dir: str, run_dir: str | None = None, cfg=None) -> dict:
    """Run it in this process as train.py's main() would: {"code", "summary", "overrides", "choices"}."""
    from longctx import train as train_mod

    overrides = choices = None
    if cfg is None:
        cfg, overrides, choices = toy_config(cmd, cache_dir, run_dir)
    result = {}
    real_train = train_mod.train

    def keep_summary(*a, **k):
        result["summary"] = real_train(*a, **k)
        return result["summary"]

    train_mod.train = keep_summary
    try:
        code = train_mod.run(cfg, None)
    finally:
        train_mod.train = real_train
    return {"code": code, "summary": result.get("summary"), "overrides": overrides, "choices": choices}


def offline(monkeypatch):
    """No internet, deterministically: the Hub download fails the way `datasets` fails offline
    (HF_*_OFFLINE set after `datasets` was imported would be ignored, and a real attempt can
    wait for network timeouts)."""
    import pytest

    datasets = pytest.importorskip("datasets")

    def load_dataset(name, *a, **k):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def main(argv: list[str]) -> int:
    """Under torchrun: run the commands of argv[0] (JSON: [{"source", "text", "overrides"}], the
    overrides already shrunk by the parent) in order; rank 0 writes the results to argv[1]."""
    import logging

    import longctx.trainer.distributed as distributed

    destroy = distributed.destroy
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    distributed.destroy = lambda: None  # one process group for all the runs (a second init would hang)
    for item in json.loads(Path(argv[0]).read_text()):
        cmd = parse(item["text"], item["source"])
        r = run_command(cmd, "", cfg=compose(item["overrides"]))
        results.append({**item, "code": r["code"], "summary": r["summary"]})
        if r["code"]:
            break
    if int(os.environ.get("RANK", "0")) == 0:
        Path(argv[1]).write_text(json.dumps(results, indent=1, default=str))
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
