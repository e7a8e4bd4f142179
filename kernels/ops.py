"""FlashAttention as torch.library custom ops: what autograd and torch.compile see.

    longctx::flash_attn_fwd(q, k, v, causal, sm_scale, dot_prec, mask_id, deterministic) -> (o, lse)
    longctx::flash_attn_bwd(do, q, k, v, o, lse, causal, sm_scale, dot_prec, mask_id, deterministic)
        -> (dq, dk, dv)

Each op runs the launch code of kernels/flash.py (`_flash_fwd`, `_flash_bwd`) as it is.
Registered with a fake (meta) implementation, which gives output shapes, dtypes and strides
without running anything, and with an autograd formula (forward saves q, k, v, o and the
log-sum-exp; backward calls the backward op). So torch.compile traces a model that calls
`flash_attention` into one graph, with no break around attention: Inductor fuses the LayerNorm,
bias, GELU and residual code on both sides and calls our kernels in between.

A block-sparse layout crosses the op boundary as an int (`mask_id`, -1 = dense), the key of the
BlockMask in a process-wide table (`register_mask`): an op schema takes tensors and scalars, not
Python objects, and which compressed lists a launch needs (per-row lists, grouped lists of a
given tile split, ...) is decided by the launch code inside the op, at run time, so the op hands
it the mask itself. BlockMasks are immutable, so an id always means the same layout; a compiled
graph holds the id as a constant (another mask, another id: dynamo recompiles).

dot_prec "auto" (fp32 inputs without an explicit precision) reads
torch.get_float32_matmul_precision() when the op runs, not when it is traced. deterministic (the
backward variant, see flash_attention; an argument of the forward op too, so that its autograd
formula can hand it on): -1 = the launch code's default, 0 / 1 = False / True.

The ops only run the kernels; argument checks happen in `flash_attention` before the call.

Eager calls (not under torch.compile) skip the ops and run `_FlashAttnFn`, a plain autograd.Function
over the same launch code: the custom-op dispatch (schema defaults, redispatch through the autograd
key, the registered formula) costs about 0.25 ms of host time per forward+backward on torch 2.13 and
0.6 ms on the GPU image's torch 2.11, which is all of a small call's time (a head-dim-128 1k call at
B = 8 is 1.2 ms on the GPU; docs/benchmarks.md 1k). Under torch.compile the ops are what dynamo sees.
"""
import torch

from . import flash as _flash

Tensor = torch.Tensor

__all__ = ["flash_attn", "flash_attn_bwd", "flash_attn_fwd", "register_mask"]

_MASKS: dict = {}  # mask_id -> BlockMask (held for the life of the process; masks are few and small)


def _register_mask(block_mask) -> int:
    """The op-level id of `block_mask` (a BlockMask; no mask is -1, decided by the caller)."""
    key = id(block_mask)
    if _MASKS.setdefault(key, block_mask) is not block_mask:  # pragma: no cover (ids are never reused: held)
        raise RuntimeError("block mask table out of sync")
    return key


# Under torch.compile the id must be a constant of the graph. torch >= 2.13 folds this call whether the
# mask is a closure constant or an input of the compiled frame (a per-block compiled GPT block receives
# it as a forward argument); torch 2.11 refuses a frame input ("BlockMask is not a constant"), so there
# the id is taken outside the graph: one graph break per block-sparse call (dense calls never get here).
if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 13):
    register_mask = torch.compiler.assume_constant_result(_register_mask)
else:  # pragma: no cover (the GPU image's torch)
    register_mask = torch.compiler.disable(_register_mask)


def _mask(mask_id: int):
    return None if mask_id < 0 else _MASKS[mask_id]


def _prec(dot_prec: str, q: Tensor) -> str:
    return _flash._dot_precision(q.dtype, None) if dot_prec == "auto" else dot_prec


def _det(deterministic: int) -> bool | None:
    return None if deterministic < 0 else bool(deterministic)


def _dense(t: Tensor) -> Tensor:
    """Outputs must have the strides the fake implementation promises (contiguous)."""
    return t if t.is_contiguous() else t.contiguous()


def _run_fwd(q, k, v, causal, sm_scale, block_mask, dot_prec):
    """(o, lse) by the launch code: what the forward op and the eager Function both run."""
    o, lse = _flash._flash_fwd(q, k, v, causal, sm_scale, block_mask, _prec(dot_prec, q))
    return _dense(o), _dense(lse)


def _run_bwd(do, q, k, v, o, lse, causal, sm_scale, block_mask, dot_prec, deterministic):
    """(dq, dk, dv) by the launch code: what the backward op and the eager Function both run."""
    grads = _flash._flash_bwd(do, q, k, v, o, lse, causal, sm_scale, block_mask, _prec(dot_prec, q),
                              deterministic=_det(deterministic))
    return tuple(_dense(g) for g in grads)


# ------------------------------------------------------------------------------------- forward
@torch.library.custom_op("longctx::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, sm_scale: float, dot_prec: str,
                   mask_id: int, deterministic: int) -> tuple[Tensor, Tensor]:
    return _run_fwd(q, k, v, causal, sm_scale, _mask(mask_id), dot_prec)


@flash_attn_fwd.register_fake
def _(q, k, v, causal, sm_scale, dot_prec, mask_id, deterministic):
    B, Nq, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, Nq), dtype=torch.float32)


# ------------------------------------------------------------------------------------ backward
@torch.library.custom_op("longctx::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                   sm_scale: float, dot_prec: str, mask_id: int,
                   deterministic: int) -> tuple[Tensor, Tensor, Tensor]:
    return _run_bwd(do, q, k, v, o, lse, causal, sm_scale, _mask(mask_id), dot_prec, deterministic)


@flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, causal, sm_scale, dot_prec, mask_id, deterministic):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


# ------------------------------------------------------------------------------------ autograd
def _setup_context(ctx, inputs, output):
    q, k, v, *args = inputs  # args: causal, sm_scale, dot_prec, mask_id, deterministic
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.args = args


def _backward(ctx, do, dlse):
    # lse is an output for the backward only; nothing downstream differentiates it (dlse is None)
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, *ctx.args)
    return (dq, dk, dv) + (None,) * len(ctx.args)


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ eager
class _FlashAttnFn(torch.autograd.Function):
    """The ops' forward, backward and autograd formula as one autograd.Function, for eager calls."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, block_mask, dot_prec, deterministic):
        o, lse = _run_fwd(q, k, v, causal, sm_scale, block_mask, dot_prec)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (causal, sm_scale, block_mask, dot_prec, deterministic)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return _run_bwd(do, q, k, v, o, lse, *ctx.args) + (None,) * len(ctx.args)


# ------------------------------------------------------------------------------------ entry
def flash_attn(q: Tensor, k: Tensor, v: Tensor, causal: bool, sm_scale: float, block_mask, dot_prec: str,
               deterministic: bool | None = None) -> Tensor:
    """o = attention(q, k, v) through the ops; `block_mask` a kernels.BlockMask or None.

    Arguments as `_flash_fwd`'s (already checked by `flash_attention`; dot_prec may also be
    "auto"), and the backward variant `deterministic` (None: the launch code's default).
    """
    det = -1 if deterministic is None else int(bool(deterministic))
    if not torch.compiler.is_compiling():  # eager: no custom-op dispatch (see the module docstring)
        return _FlashAttnFn.apply(q, k, v, causal, sm_scale, block_mask, dot_prec, det)
    mask_id = -1 if block_mask is None else register_mask(block_mask)
    o, _ = flash_attn_fwd(q, k, v, causal, sm_scale, dot_prec, mask_id, det)
    return o
