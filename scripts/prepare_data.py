"""Tokenise a corpus into the data cache ahead of training (e.g. before a GPU job).

    python scripts/prepare_data.py data=stdlib
    python scripts/prepare_data.py data=local 'data.paths=[corpus/**/*.txt]'
    python scripts/prepare_data.py data=openwebtext data.cache_dir=/big/disk/longctx

Prints the cache folder, its files and token counts. Running it again returns at once.
"""

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data import CacheError, DataError, prepare_data  # noqa: E402


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.getLogger("data").setLevel(logging.INFO)
    try:
        folder = prepare_data(cfg.data)
    except (ValueError, CacheError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    meta = json.loads((folder / "meta.json").read_text())
    print(f"data={meta['source']} prepared in {folder}")
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        n = meta["tokens"][split]
        print(f"  {split:5s} {path}  {n:,} tokens  {meta['documents'][split]:,} documents")
    built = f"tokenizer {meta['tokenizer'][:12]}, built in {meta['build_seconds']} s"
    print(f"  meta  {folder / 'meta.json'}  ({built})")


if __name__ == "__main__":
    main()
