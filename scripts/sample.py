#!/usr/bin/env python
"""Generate text from a training checkpoint.

    python scripts/sample.py outputs/quickstart                     # newest checkpoint of a run dir
    python scripts/sample.py outputs/run1/checkpoints/step_0005000 --prompt "def main(" \\
        --max-new-tokens 200 --temperature 0.8 --top-k 200 --num-samples 3

The checkpoint (torch.distributed.checkpoint, written by any number of GPUs) is loaded into a
plain single-process model built from the config saved next to it; attention runs as sdpa
unless --attention says otherwise (our flash kernel needs a GPU).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import ConfigError
from trainer.checkpoint import load_model_only, resolve_resume


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint folder step_XXXXXXX")
    ap.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="<= 0: greedy")
    ap.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens (0: all)")
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--attention", default=None, help="attention impl (default: the run's on CUDA, sdpa on CPU)")
    args = ap.parse_args(argv)

    from data import EOT_ID, get_tokenizer
    from model import build_model

    if not Path(args.path).exists():
        print(f"error: {args.path} does not exist; give a run directory or a checkpoint folder", file=sys.stderr)
        return 2
    try:
        ckpt = resolve_resume(args.path, Path(args.path))
        if ckpt is None:
            raise ConfigError(f"{args.path}: no checkpoint found")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = OmegaConf.load(ckpt / "config.yaml")
    impl = args.attention or (cfg.attention.impl if device.type == "cuda" else "sdpa")
    cfg.attention.impl = impl
    model = build_model(cfg)
    meta = load_model_only(ckpt, model)
    model.to(device).eval()
    print(f"# {ckpt} (step {meta['step']}, model={cfg.model.get('name')}, attention={impl}, device={device})",
          file=sys.stderr)

    tok = get_tokenizer()
    ids = tok.encode(args.prompt).ids or [EOT_ID]
    torch.manual_seed(args.seed)
    x = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False))
    with ctx:
        out = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None)
    for i, row in enumerate(out.tolist()):
        if i:
            print("\n" + "-" * 60)
        print(tok.decode(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
