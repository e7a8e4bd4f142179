"""Attention kernels: the Triton FlashAttention (dense and block-sparse), block-sparse layouts, and
the reference (standard) attention that materialises the scores."""
if not __name__.startswith("longctx."):  # one name per module: see longctx/__init__.py
    raise ImportError("import this package as longctx.kernels (`from longctx.kernels import ...`), not as kernels")
from .block_mask import (
    LAYOUTS,
    BlockMask,
    bigbird_mask,
    build_block_mask_from_config,
    butterfly_mask,
    dense_block_mask,
    fixed_mask,
    from_block_fn,
    from_dense_mask,
    local_mask,
    longformer_mask,
    save_layout_png,
    strided_mask,
)
from .flash import clear_launch_config, flash_attention, set_kernel_options, set_launch_config
from .reference import causal_mask, reference_attention

__all__ = [
    "flash_attention", "reference_attention", "causal_mask", "set_launch_config", "clear_launch_config",
    "set_kernel_options",
    "BlockMask", "LAYOUTS", "dense_block_mask", "local_mask", "strided_mask", "fixed_mask", "butterfly_mask",
    "bigbird_mask", "longformer_mask", "from_dense_mask", "from_block_fn", "build_block_mask_from_config",
    "save_layout_png",
]
