"""Attention dispatch: one function, four implementations, one layout.

All take q, k, v of shape (B, N, H, D) -- the layout the fused qkv projection produces as
strided views, with no transpose or copy -- and return (B, N, H, D).

  flash        our Triton FlashAttention (kernels.flash_attention)
  block_sparse the same kernel with a block mask (kernels/block_mask.py builds the mask)
  sdpa         torch.nn.functional.scaled_dot_product_attention (PyTorch's fused kernels)
  naive        kernels.reference_attention: materialises the N x N scores (the paper's baseline)

Attention-probability dropout is not supported (our kernel has none); models use dropout on
the embeddings and the residual branches only.

Without a CUDA GPU the Triton kernel can only run through Triton's (very slow) interpreter,
which is for tests. So on non-CUDA tensors, unless TRITON_INTERPRET=1, `flash` falls back to
`sdpa` and `block_sparse` to the reference attention with the same mask; each fallback logs one
line, once per process.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from longctx import kernels

log = logging.getLogger(__name__)

IMPLS = ("flash", "block_sparse", "sdpa", "naive")
_fallback_logged: set[str] = set()  # impls whose CPU fallback was already announced


def _log_once(impl: str, msg: str) -> None:
    if impl not in _fallback_logged:
        _fallback_logged.add(impl)
        log.warning(msg)


def _kernel_unavailable(t: torch.Tensor) -> bool:
    """True when the Triton kernel cannot run on t: not on CUDA and no interpreter."""
    return t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str, causal: bool = True,
           block_mask=None) -> torch.Tensor:
    """Scaled dot-product attention softmax(q k^T / sqrt(D)) v; q, k, v, out: (B, N, H, D)."""
    if impl == "flash" and _kernel_unavailable(q):
        _log_once("flash", "attention=flash needs a CUDA GPU (or TRITON_INTERPRET=1 for tests); "
                           "using attention=sdpa instead on this machine")
        impl = "sdpa"
    if impl == "block_sparse" and _kernel_unavailable(q):
        _log_once("block_sparse", "attention=block_sparse needs a CUDA GPU (or TRITON_INTERPRET=1); "
                                  "using the reference attention with the same block mask instead")
        return kernels.reference_attention(q, k, v, causal=causal, block_mask=block_mask)

    if impl == "flash":
        return kernels.flash_attention(q, k, v, causal=causal)
    if impl == "block_sparse":
        if block_mask is None:
            raise ValueError("attention=block_sparse needs a block_mask (build_model makes one from "
                             "cfg.attention); got None")
        return kernels.flash_attention(q, k, v, causal=causal, block_mask=block_mask)
    if impl == "sdpa":
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal)  # (B, H, N, D)
        return y.transpose(1, 2)
    if impl == "naive":
        return kernels.reference_attention(q, k, v, causal=causal)
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {', '.join(IMPLS)}")
