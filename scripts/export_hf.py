#!/usr/bin/env python
"""Export a training checkpoint as a Hugging Face GPT-2 folder.

    python scripts/export_hf.py outputs/run1 exported/run1            # newest checkpoint of a run dir
    python scripts/export_hf.py outputs/run1/checkpoints/step_0005000 exported/run1-5k

The checkpoint (torch.distributed.checkpoint, saved by any number of GPUs with DDP or FSDP) is
loaded into a plain single-process model on the CPU, built from the config saved next to it; DCP
reshards on load, so no process group is needed. OUT_DIR then holds config.json (n_positions = the
run's seq_len) and model.safetensors, which `transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR)`
and `GPT.from_pretrained(OUT_DIR)` load with the same logits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import ConfigError


def export(path: str | Path, out_dir: str | Path) -> Path:
    """Checkpoint (or run dir) -> Hugging Face folder; returns out_dir. ConfigError on bad input."""
    from omegaconf import OmegaConf

    from model import build_model
    from model.hf import PretrainedError
    from trainer.checkpoint import load_model_only, resolve_resume

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; give a run directory or a checkpoint folder (step_XXXXXXX)")
    ckpt = resolve_resume(str(path), path)
    if ckpt is None or not (ckpt / "config.yaml").is_file():
        raise ConfigError(f"{path}: no checkpoint with a config.yaml found")
    cfg = OmegaConf.load(ckpt / "config.yaml")
    cfg.attention.impl = "sdpa"  # the weights do not depend on it; no block mask to build
    model = build_model(cfg)
    load_model_only(ckpt, model)
    try:
        model.save_pretrained(out_dir)
    except PretrainedError as e:
        raise ConfigError(str(e)) from None
    return Path(out_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint folder step_XXXXXXX")
    ap.add_argument("out_dir", help="folder to write config.json + model.safetensors into")
    args = ap.parse_args(argv)
    try:
        out = export(args.path, args.out_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
