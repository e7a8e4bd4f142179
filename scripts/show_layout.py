"""Save a block-sparse attention layout as a PNG (black = block computed by the kernel).

    python scripts/show_layout.py --layout bigbird --seq-len 4096 --out layout.png
    python scripts/show_layout.py --layout fixed --stride 4 --summary 1 --seq-len 8192 \
        --block-size 64 --out fixed.png
Parameters not given take the defaults of configs/attention/block_sparse.yaml.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from longctx.kernels.block_mask import LAYOUTS, build_block_mask_from_config, save_layout_png  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "attention", "block_sparse.yaml")


def _defaults() -> dict:
    try:
        from omegaconf import OmegaConf
        return dict(OmegaConf.to_container(OmegaConf.load(CONFIG)))
    except Exception:  # noqa: BLE001 - config missing or omegaconf absent: builder defaults
        return {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", choices=LAYOUTS, default=None)
    p.add_argument("--seq-len", type=int, required=True, help="query (and key) length in tokens")
    p.add_argument("--seq-k", type=int, default=None, help="key length (default: --seq-len)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--window-blocks", type=int, default=None)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--summary", type=int, default=None)
    p.add_argument("--global-blocks", type=int, default=None)
    p.add_argument("--random-blocks", type=int, default=None)
    p.add_argument("--global-tokens", type=str, default=None, help="comma-separated positions")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=1, help="with --per-head (bigbird)")
    p.add_argument("--per-head", action="store_true", help="bigbird: random blocks per head")
    p.add_argument("--head", type=int, default=0, help="which head's layout to draw")
    p.add_argument("--no-causal", action="store_true", help="keep blocks above the diagonal")
    p.add_argument("--out", required=True, help="output PNG path")
    args = p.parse_args(argv)

    cfg = _defaults()
    overrides = {"layout": args.layout, "block_size": args.block_size,
                 "window_blocks": args.window_blocks, "stride": args.stride,
                 "summary": args.summary, "global_blocks": args.global_blocks,
                 "random_blocks": args.random_blocks, "seed": args.seed}
    if args.global_tokens is not None:
        try:
            overrides["global_tokens"] = [int(t) for t in args.global_tokens.split(",") if t.strip()]
        except ValueError:
            p.error(f"--global-tokens must be comma-separated integers, got {args.global_tokens!r}")
    if args.per_head:
        overrides["per_head"] = True
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    try:
        mask = build_block_mask_from_config(cfg, args.seq_len, args.n_heads,
                                            causal=not args.no_causal, seq_k=args.seq_k)
        path = save_layout_png(mask, args.out, head=args.head)
    except ValueError as exc:
        p.error(str(exc))
    print(f"{cfg.get('layout')}: {mask}")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
