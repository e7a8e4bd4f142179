"""Text sources, the GPT-2 tokenizer, cached token files and batch sampling.

Usage (see docs/architecture.md for the contracts):

    from longctx.data import prepare_data, load_data
    folder = prepare_data(cfg.data)    # rank 0 first, then barrier
    data = load_data(cfg.data)         # TokenData: .train / .val uint16 memmaps
    x, y = data.train_batch(step, seed=cfg.seed, seq_len=1024, micro_batch=8,
                            micro_step=m, grad_accum=4, rank=r, world_size=w)
    for x, y in data.val_batches(seq_len, micro_batch, eval_tokens, rank, world_size): ...
"""
if not __name__.startswith("longctx."):  # one name per module: see longctx/__init__.py
    raise ImportError("import this package as longctx.data (`from longctx.data import ...`), not as data")

from .loader import TokenData, ValPlan, load_data
from .prepare import DataError, cache_folder, check_cache, check_data_config, prepare_data
from .tokenfile import CacheError
from .tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer, tokenizer_fingerprint

__all__ = [
    "EOT_ID",
    "VOCAB_SIZE",
    "CacheError",
    "DataError",
    "TokenData",
    "ValPlan",
    "cache_folder",
    "check_cache",
    "check_data_config",
    "get_tokenizer",
    "load_data",
    "prepare_data",
    "tokenizer_fingerprint",
]
