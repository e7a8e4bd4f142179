"""Weights & Biases logging (rank 0 only); `wandb` is imported only when it is used.

logger.mode:
  auto      online when logged in (WANDB_API_KEY set, or `wandb login` wrote ~/.netrc), otherwise
            offline with one line saying so (sync later with `wandb sync <run_dir>/wandb/offline-run-*`)
  online | offline | disabled   as wandb's own modes; WANDB_MODE in the environment wins over auto.
An online start that fails (no network) falls back to offline instead of stopping the run.
The W&B run id is kept in <run_dir>/wandb_run_id so a resumed run continues the same W&B run.
"""
from __future__ import annotations

import importlib.util
import logging
import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

from longctx.trainer import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")


class NullLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> tuple[str, str | None]:
    """(wandb mode, a note to print or None)."""
    if mode not in MODES:
        raise ConfigError(f"logger.mode={mode!r}: use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode, None
    env = os.environ.get("WANDB_MODE")
    if env:
        return ("disabled" if env == "dryrun" else env), None
    if _logged_in():
        return "online", None
    return "offline", "wandb: not logged in, logging offline (run `wandb login` for online; logger.mode=disabled to turn off)"


class WandbLogger:
    def __init__(self, cfg, run_dir: Path, resuming: bool):
        from longctx.trainer.config import as_group, to_dict

        lcfg = as_group("logger", cfg.logger)
        mode, note = resolve_mode(lcfg.mode)
        if note:
            log.info(note)
        import wandb  # lazy: only runs that log to W&B pay for the import

        self.wandb = wandb
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if resuming and id_file.exists() else secrets.token_hex(4)
        kw = {"project": lcfg.project, "entity": lcfg.entity,
              "name": lcfg.run_name or Path(run_dir).name, "group": lcfg.group,
              "tags": list(lcfg.tags), "dir": str(run_dir), "id": run_id, "resume": "allow",
              "config": to_dict(cfg)}
        try:
            self.run = wandb.init(mode=mode, **kw)
        except Exception as e:
            if mode != "online":
                raise
            log.info(f"wandb: online start failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                     f"logging offline instead")
            self.run = wandb.init(mode="offline", **kw)
        if mode != "disabled":
            id_file.write_text(run_id + "\n")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None and k != "step"}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def build_logger(cfg, run_dir: Path, is_main: bool, resuming: bool):
    """The run's logger from cfg.logger (a LoggerConfig; a DictConfig is typed first)."""
    from longctx.trainer.config import as_group

    lcfg = as_group("logger", cfg.logger)
    if not is_main or lcfg.name == "none" or lcfg.mode == "disabled":
        return NullLogger()
    if wandb_missing(lcfg.mode):
        log.info("wandb: not installed, logging to metrics.jsonl only "
                 "(pip install 'longctx-gpt[wandb]' for W&B; logger=none silences this)")
        return NullLogger()
    return WandbLogger(cfg, run_dir, resuming)


def wandb_missing(mode: str) -> bool:
    """wandb is an optional extra: True when it is wanted (mode auto) but not installed, so the run
    logs locally; an explicit online/offline mode without it is a one-line ConfigError."""
    if mode == "disabled" or importlib.util.find_spec("wandb") is not None:
        return False
    if mode != "auto":
        raise ConfigError(f"logger.mode={mode} needs wandb, which is not installed: "
                          f"pip install 'longctx-gpt[wandb]' (or logger=none)")
    return True
