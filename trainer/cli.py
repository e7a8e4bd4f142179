"""The command line's side of train.py: checks that need no config object, made before Hydra
starts (so a typo or an unwritable run_dir is one line and no folder), and the cleanup that
leaves nothing behind when a run is stopped by a config or data error.

    check_group_choices(argv, ...)  `model=gpt2_huge` -> one line naming the options
    check_override_keys(argv, ...)  `train.lrr=1` -> `error: train.lrr: no such setting; did you mean train.lr?`;
                                    `train.lr=abc` -> `error: train.lr='abc' must be a number` (the schema,
                                    trainer/config.py: types while composing, ranges after)
    check_run_dir_writable(argv)    run_dir on a read-only/immutable folder, a file, or empty -> one line
    only_hydra_files(run_dir)       the run dir holds nothing but what Hydra just made (.hydra/, train.log)
    remove_run_dir(run_dir)         removes it and the empty folders above it that Hydra made
"""
from __future__ import annotations

import difflib
import os
import re
import shutil
import tempfile
from pathlib import Path

from longctx.trainer import ConfigError
from longctx.trainer.config import as_config, error_line
from omegaconf import OmegaConf


def check_override_keys(argv: list[str], config_dir: Path, groups: tuple[str, ...]) -> None:
    """`train.lrr=1` -> one line naming the unknown key and the nearest known ones (Hydra's own
    message is five lines and suggests +train.lrr=1, which would add the typo as a new key)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf.errors import ConfigAttributeError, ValidationError

    overrides = [a for a in argv if "=" in a and not a.lstrip("+~").startswith("hydra")]
    if not overrides or any(a.startswith("-") for a in argv):  # flags (--multirun, -cn, ...): Hydra's call
        return
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            try:
                composed = compose(config_name="config", overrides=overrides)
            except Exception as e:  # noqa: BLE001 - an unknown key or a wrong type is reworded, Hydra reports the rest
                cause = e.__cause__
                if isinstance(cause, ValidationError) and not isinstance(cause, ConfigAttributeError):
                    raise ConfigError(error_line(cause)) from None  # `train.lr=abc`: the key and the type
                m = re.search(r"Could not override '([^']+)'", str(e))
                if m is None:
                    return
            else:
                as_config(composed, strict=True)  # ranges and allowed values (ConfigError, one line)
                return
            key = m.group(1)
            chosen = [a for a in overrides if a.split("=", 1)[0].lstrip("+") in groups]
            known = _dotted_keys(OmegaConf.to_container(compose(config_name="config", overrides=chosen)))
    finally:
        GlobalHydra.instance().clear()
    close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"{key}: no such setting{hint} (every setting is listed in configs/; +{key}=... adds a new key)")


def _dotted_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _dotted_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def _group_options(config_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def check_group_choices(argv: list[str], config_dir: Path, groups: tuple[str, ...]) -> None:
    """`model=gpt2_huge` -> one line naming the bad option and the valid ones (before Hydra's own,
    longer message). Sweeps are checked option by option: `model=gpt2_tiny,gpt2_small`,
    `model=choice(...)`, `model=glob(gpt2_*)` (must match at least one option); a malformed
    override is left to Hydra's parser, which names it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    parser = None
    for arg in argv:
        key = arg.lstrip("+~").partition("=")[0].partition("@")[0]
        if arg.startswith("-") or "=" not in arg or key not in groups:
            continue  # flags (-m, --multirun, --cfg job) and plain keys
        parser = parser or OverridesParser.create()
        try:
            override = parser.parse_override(arg)
        except Exception:  # Hydra reports the syntax error itself
            continue
        options = _group_options(config_dir, key)
        value = override.value()
        if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
            if not value.filter(options):
                raise ConfigError(f"{arg} matches no option; choose from: {', '.join(options)}")
            continue
        if override.is_sweep_override():
            try:
                choices = list(override.sweep_string_iterator())
            except Exception:  # nested sweeps (choice(a,b),c): Hydra expands and checks them
                continue
        else:
            choices = [value]
        for choice in choices:
            if choice is None or choice in ("null", ""):
                continue
            if not isinstance(choice, str) or choice not in options:
                raise ConfigError(f"{key}={choice} is not an option; choose one of: {', '.join(options)}")


HYDRA_FILES = {".hydra", "train.log"}  # what Hydra puts in the run dir before train() starts
_dirs_before: set[str] = set()  # folders on the run dir's path that existed before Hydra ran (see __main__)


def only_hydra_files(run_dir: str) -> bool:
    p = Path(run_dir)
    return not p.exists() or {q.name for q in p.iterdir()} <= HYDRA_FILES


def remove_run_dir(run_dir: str) -> None:
    """Undo what this run created: the run dir (just its contents if it existed before) and the
    empty folders above it that Hydra made (e.g. outputs/<date>/), up to one that existed before."""
    p = Path(os.path.abspath(run_dir))
    if str(p) in _dirs_before:
        for q in p.iterdir():
            shutil.rmtree(q, ignore_errors=True) if q.is_dir() else q.unlink(missing_ok=True)
        return
    shutil.rmtree(p, ignore_errors=True)
    for q in p.parents if _dirs_before else ():  # (in-process callers made their folders themselves)
        if str(q) in _dirs_before or q == Path.cwd() or not q.is_dir() or any(q.iterdir()):
            break
        q.rmdir()


def _run_dir_arg(argv: list[str]) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0].lstrip("+") == "run_dir" and "=" in a]
    return values[-1] if values else None


def check_run_dir_writable(argv: list[str]) -> None:
    """`run_dir=` on a read-only or immutable folder (or a file): one line before Hydra touches it.
    Also records which folders on its path exist already (so a failed run removes only its own)."""
    arg = _run_dir_arg(argv)
    if arg is not None and not arg.strip():
        raise ConfigError("run_dir is empty; give a folder, e.g. run_dir=outputs/my_run")
    target = Path(os.path.abspath(os.path.expanduser(arg or os.path.join("outputs", "x"))))
    _dirs_before.update(str(q) for q in (target, *target.parents) if q.is_dir())
    if "${" in str(target):
        return  # an interpolation: Hydra resolves it
    existing = next(q for q in (target, *target.parents) if q.exists())
    if not existing.is_dir():
        raise ConfigError(f"run_dir={target}: {existing} is a file, not a folder; pick another run_dir")
    try:
        fd, tmp = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"run_dir={target}: cannot write in {existing} ({e.strerror}); pick a writable "
                          f"folder, e.g. run_dir=$HOME/runs/my_run") from None
