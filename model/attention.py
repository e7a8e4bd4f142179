"""Attention dispatch: one function, four implementations, one layout.

All take q, k, v of shape (B, N, H, D) -- the layout the fused qkv projection produces as
strided views, with no transpose or copy -- and return (B, N, H, D).

  flash        our Triton FlashAttention (kernels.flash_attention)
  block_sparse the same kernel with a block mask (kernels/block_mask.py builds the mask)
  sdpa         torch.nn.functional.scaled_dot_product_attention (PyTorch's fused kernels)
  naive        kernels.reference_attention: materialises the N x N scores (the paper's baseline)

Attention-probability dropout is not supported (our kernel has none); models use dropout on
the embeddings and the residual branches only.

Which one runs is decided once, when the model is built (`resolve`): without a CUDA GPU the
Triton kernel can only run through Triton's (very slow) interpreter, which is for tests. So on a
machine without CUDA, unless TRITON_INTERPRET=1, `attention.cpu_fallback` decides: sdpa (the
default) runs `sdpa` for `flash` and the reference attention with the same mask for `block_sparse`,
and says so in one log line per process; error stops with one line instead.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch
import torch.nn.functional as F

from longctx import kernels

log = logging.getLogger(__name__)

IMPLS = ("flash", "block_sparse", "sdpa", "naive")
FALLBACKS = ("sdpa", "error")
_fallback_logged: set[str] = set()  # impls whose CPU fallback was already announced


def _flash(q, k, v, causal, block_mask):
    return kernels.flash_attention(q, k, v, causal=causal)


def _block_sparse(q, k, v, causal, block_mask):
    return kernels.flash_attention(q, k, v, causal=causal, block_mask=block_mask)


def _sdpa(q, k, v, causal, block_mask):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal)  # (B, H, N, D)
    return y.transpose(1, 2)


def _naive(q, k, v, causal, block_mask):
    return kernels.reference_attention(q, k, v, causal=causal, block_mask=block_mask)


# impl -> function(q, k, v, causal, block_mask); block_mask is None except for block_sparse (and
# its fallback, the reference attention with the same mask)
ATTENTION: dict[str, Callable] = {"flash": _flash, "block_sparse": _block_sparse, "sdpa": _sdpa, "naive": _naive}


def resolve(impl: str, cpu_fallback: str = "sdpa", device: str | torch.device | None = None) -> str:
    """The implementation that runs on `device` (None: cuda if available): `impl`, or its fallback
    where our Triton kernel cannot run (not CUDA, no TRITON_INTERPRET=1). ValueError, one line, for an
    unknown impl or cpu_fallback=error on such a machine."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {', '.join(IMPLS)}")
    if cpu_fallback not in FALLBACKS:
        raise ValueError(f"attention.cpu_fallback={cpu_fallback!r}: use sdpa or error")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if impl not in ("flash", "block_sparse") or torch.device(device).type in ("cuda", "meta") \
            or os.environ.get("TRITON_INTERPRET") == "1":
        return impl
    if cpu_fallback == "error":
        raise ValueError(f"attention={impl} needs a CUDA GPU (or TRITON_INTERPRET=1 for tests); use "
                         f"attention.cpu_fallback=sdpa to run a fallback on this machine, or attention=sdpa")
    fallback = "sdpa" if impl == "flash" else "naive"
    if impl not in _fallback_logged:
        _fallback_logged.add(impl)
        log.warning(f"attention={impl} needs a CUDA GPU (or TRITON_INTERPRET=1 for tests); using "
                    + ("attention=sdpa instead on this machine" if impl == "flash" else
                       "the reference attention with the same block mask instead"))
    return fallback


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str, causal: bool = True,
           block_mask=None) -> torch.Tensor:
    """Scaled dot-product attention softmax(q k^T / sqrt(D)) v with an already resolved impl;
    q, k, v, out: (B, N, H, D). (The model looks its function up once: CausalSelfAttention.)"""
    if impl == "block_sparse" and block_mask is None:
        raise ValueError("attention=block_sparse needs a block_mask (build_model makes one from "
                         "cfg.attention); got None")
    return ATTENTION[impl](q, k, v, causal, block_mask)
