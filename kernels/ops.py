"""FlashAttention as torch.library custom ops: what autograd and torch.compile see.

    longctx::flash_attn_fwd(q, k, v, causal, sm_scale, dot_prec, <mask>) -> (o, lse)
    longctx::flash_attn_bwd(do, q, k, v, o, lse, causal, sm_scale, dot_prec, <mask>) -> (dq, dk, dv)
    <mask> = row_count, row_idx, row_full, col_count, col_idx, col_masked (all None when dense),
             block_m, block_n

Each op runs the Triton launch code of kernels/flash.py (`_flash_fwd`, `_flash_bwd`) as it is.
Registered with a fake (meta) implementation, which gives output shapes, dtypes and strides
without running anything, and with an autograd formula (forward saves q, k, v, o and the
log-sum-exp; backward calls the backward op). So torch.compile traces a model that calls
`flash_attention` into one graph, with no break around attention: Inductor fuses the LayerNorm,
bias, GELU and residual code on both sides and calls our kernels in between.

A block-sparse layout crosses the op boundary as its compressed lists (tensors) and block
sizes (ints), the types an op schema allows; `_ListMask` gives the launch code the part of the
`BlockMask` interface it reads (`lists`, `split_counts`, `block_m`, `block_n`). The
`split_counts` are those of the call's `causal` flag.

The ops only run the kernels; argument checks happen in `flash_attention` before the call.
"""
import typing

import torch

from . import flash as _flash

Tensor = torch.Tensor
OptTensor = typing.Optional[torch.Tensor]  # noqa: UP045  (op schemas are inferred from these at run time)

__all__ = ["flash_attn", "flash_attn_bwd", "flash_attn_fwd"]


class _ListMask:
    """The compressed lists of a BlockMask, as the launch code reads them."""

    __slots__ = ("_lists", "_split", "block_m", "block_n")

    def __init__(self, row_count, row_idx, row_full, col_count, col_idx, col_masked, block_m, block_n):
        self._lists = (row_count, row_idx, col_count, col_idx)
        self._split = (row_full, col_masked)
        self.block_m, self.block_n = int(block_m), int(block_n)

    def lists(self, device=None):
        return self._lists

    def split_counts(self, device=None, causal=None):
        return self._split


def _mask(row_count, row_idx, row_full, col_count, col_idx, col_masked, block_m, block_n):
    if row_count is None:
        return None
    return _ListMask(row_count, row_idx, row_full, col_count, col_idx, col_masked, block_m, block_n)


def _prec(dot_prec: str, q: Tensor) -> str:
    """"auto": fp32 dots follow torch.get_float32_matmul_precision() at run time (not at trace time)."""
    return _flash._dot_precision(q.dtype, None) if dot_prec == "auto" else dot_prec


def _dense(t: Tensor) -> Tensor:
    """Outputs must have the strides the fake implementation promises (contiguous)."""
    return t if t.is_contiguous() else t.contiguous()


# ------------------------------------------------------------------------------------- forward
@torch.library.custom_op("longctx::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, sm_scale: float, dot_prec: str,
                   row_count: OptTensor, row_idx: OptTensor, row_full: OptTensor, col_count: OptTensor,
                   col_idx: OptTensor, col_masked: OptTensor, block_m: int,
                   block_n: int) -> tuple[Tensor, Tensor]:
    mask = _mask(row_count, row_idx, row_full, col_count, col_idx, col_masked, block_m, block_n)
    o, lse = _flash._flash_fwd(q, k, v, causal, sm_scale, mask, _prec(dot_prec, q))
    return _dense(o), _dense(lse)


@flash_attn_fwd.register_fake
def _(q, k, v, causal, sm_scale, dot_prec, row_count, row_idx, row_full, col_count, col_idx, col_masked,
      block_m, block_n):
    B, Nq, H, _ = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((B, H, Nq), dtype=torch.float32)
    return o, lse


# ------------------------------------------------------------------------------------ backward
@torch.library.custom_op("longctx::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                   sm_scale: float, dot_prec: str, row_count: OptTensor, row_idx: OptTensor,
                   row_full: OptTensor, col_count: OptTensor, col_idx: OptTensor, col_masked: OptTensor,
                   block_m: int, block_n: int) -> tuple[Tensor, Tensor, Tensor]:
    mask = _mask(row_count, row_idx, row_full, col_count, col_idx, col_masked, block_m, block_n)
    dq, dk, dv = _flash._flash_bwd(do, q, k, v, o, lse, causal, sm_scale, mask, _prec(dot_prec, q))
    return _dense(dq), _dense(dk), _dense(dv)


@flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, causal, sm_scale, dot_prec, row_count, row_idx, row_full, col_count, col_idx,
      col_masked, block_m, block_n):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


# ------------------------------------------------------------------------------------ autograd
_MASK_ARGS = ("row_count", "row_idx", "row_full", "col_count", "col_idx", "col_masked", "block_m", "block_n")


def _setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale, dot_prec, *mask = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.sm_scale, ctx.dot_prec = causal, sm_scale, dot_prec
    ctx.mask = mask  # the list tensors are integer metadata: held as they are, never differentiated


def _backward(ctx, do, dlse):
    # lse is an output for the backward only; nothing downstream differentiates it (dlse is None)
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale, ctx.dot_prec, *ctx.mask)
    return (dq, dk, dv) + (None,) * (3 + len(_MASK_ARGS))


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ entry
def flash_attn(q: Tensor, k: Tensor, v: Tensor, causal: bool, sm_scale: float, block_mask, dot_prec: str) -> Tensor:
    """o = attention(q, k, v) through the op; `block_mask` a kernels.BlockMask or None.

    Arguments as `_flash_fwd`'s, already checked by `flash_attention`; dot_prec may also be "auto".
    """
    if block_mask is None:
        mask = (None,) * 6 + (0, 0)
    else:
        row_count, row_idx, col_count, col_idx = block_mask.lists(q.device)
        row_full, col_masked = block_mask.split_counts(q.device, causal)
        mask = (row_count, row_idx, row_full, col_count, col_idx, col_masked, block_mask.block_m, block_mask.block_n)
    o, _ = flash_attn_fwd(q, k, v, causal, sm_scale, dot_prec, *mask)
    return o
