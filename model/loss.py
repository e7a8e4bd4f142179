"""Cross-entropy over the (tied) lm_head without materialising the full logits.

    loss = mean over non-ignored positions t of  logsumexp(x_t W^T) - (x_t W^T)[target_t]

x: (T, C) final hidden states, W: (V, C) the lm_head weight. The plain way builds the (T, V)
logits in the autocast dtype, upcasts them to fp32 and keeps them for the backward: at T = 16k
tokens and V = 50304 that is 1.6 GB of bf16 logits plus 3.3 GB of fp32 copies, and about six
passes over them in eager PyTorch (upcast, log-softmax, gather; softmax gradient, cast back).

Here the tokens go in chunks of `chunk_tokens`. For each chunk: logits_c = x_c W^T (one
matmul, compute dtype), then `_chunk_loss_grad` reads them once for the log-sum-exp and once for
the gradient  dlogits_c = (softmax(logits_c) - onehot(target)) * scale  (fp32 math, stored in
the compute dtype, as autograd would store it), and at once dx_c = dlogits_c W and
dW += dlogits_c^T x_c. So the forward also does the backward's matmuls (the same FLOPs as the
plain way, no recompute) and only one chunk of logits exists at a time. `backward` multiplies
the stored dx, dW by the incoming gradient (1/grad_accum, say).

fp16 is the exception: a GradScaler's scale (up to 2^16) must enter dlogits before they are
rounded to fp16, or small probabilities flush to zero. So with fp16 the forward computes only
the loss and the backward recomputes each chunk's logits with the scaled gradient (one extra
logits matmul).

Numerics equal the plain path's: logits in the compute dtype (bf16 under autocast), softmax and
log-sum-exp in fp32 (fp64 for fp64 models), dlogits rounded to the compute dtype before the two
gradient matmuls; dW is summed over chunks in fp32 (fp64).

`compiled=True` runs `_chunk_loss_grad` through torch.compile (on CUDA: one fused reduction
and one pointwise kernel per chunk instead of about six passes).
"""
from __future__ import annotations

import torch

CHUNK_TOKENS = 4096  # 4096 x 50304 bf16 logits = 412 MB per chunk; the matmuls stay large

_compiled_chunk = None


def _chunk_loss_grad(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None,
                     ignore_index: int):
    """(sum of token losses, dlogits * scale in logits.dtype or None) for one chunk (n, V)."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(acc)
    lse = torch.logsumexp(z, dim=-1)
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0)
    z_t = z.gather(-1, t[:, None]).squeeze(-1)
    loss_sum = torch.where(valid, lse - z_t, 0.0).sum()
    if scale is None:
        return loss_sum, None
    row_scale = torch.where(valid, scale.to(acc), 0.0)[:, None]
    p = torch.exp(z - lse[:, None])  # softmax
    if torch.compiler.is_compiling():  # one fused pointwise kernel: the one-hot as a comparison
        hit = torch.arange(z.shape[-1], device=z.device)[None, :] == t[:, None]
        d = torch.where(hit, p - 1.0, p) * row_scale
    else:  # eager: subtract the one-hot in place (n elements), no (n, V) mask
        d = p.scatter_add_(-1, t[:, None], torch.full_like(z_t[:, None], -1.0)).mul_(row_scale)
    return loss_sum, d.to(logits.dtype)


def _chunk_fn(compiled: bool):
    global _compiled_chunk
    if not compiled:
        return _chunk_loss_grad
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_grad, dynamic=False)
    return _compiled_chunk


def _run_chunks(x, w, targets, ignore_index, chunk, scale, fn):
    """Loss sum over all chunks; with `scale`, also dx (T, C) in x.dtype and dW (V, C) in fp32/fp64."""
    T = x.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)
    loss_sum = torch.zeros((), dtype=acc, device=x.device)
    dx = torch.empty_like(x) if scale is not None else None
    dw = None
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        xc = x[s:e]
        part, d = fn(xc @ w.t(), targets[s:e], scale, ignore_index)
        loss_sum = loss_sum + part
        if d is not None:
            torch.mm(d, w, out=dx[s:e])
            dwc = d.t() @ xc
            dw = dwc.to(acc) if dw is None else dw.add_(dwc)
    return loss_sum, dx, dw


def _compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x.dtype, w.dtype)


class _LMHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, targets, cd, ignore_index, chunk, compiled):
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit from here on
            xc, wc = x.to(cd), w.to(cd)
            n_valid = (targets != ignore_index).sum()
            fn = _chunk_fn(compiled)
            ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
            ctx.recompute = cd == torch.float16
            if ctx.recompute:
                loss_sum, _, _ = _run_chunks(xc, wc, targets, ignore_index, chunk, None, fn)
                ctx.save_for_backward(xc, wc, targets, n_valid)
                ctx.ignore_index, ctx.chunk, ctx.compiled = ignore_index, chunk, compiled
            else:
                scale = 1.0 / n_valid.to(torch.promote_types(cd, torch.float32))
                loss_sum, dx, dw = _run_chunks(xc, wc, targets, ignore_index, chunk, scale, fn)
                ctx.save_for_backward(dx, dw)
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, g):
        none = (None,) * 5
        if ctx.recompute:  # fp16: the incoming gradient (loss scale) enters dlogits before rounding
            xc, wc, targets, n_valid = ctx.saved_tensors
            with torch.autocast(xc.device.type, enabled=False):
                _, dx, dw = _run_chunks(xc, wc, targets, ctx.ignore_index, ctx.chunk, g / n_valid,
                                        _chunk_fn(ctx.compiled))
            return dx.to(ctx.x_dtype), dw.to(ctx.w_dtype), *none
        dx, dw = ctx.saved_tensors
        return dx.to(ctx.x_dtype) * g, (dw * g).to(ctx.w_dtype), *none


def lm_head_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          ignore_index: int = -1, chunk_tokens: int = CHUNK_TOKENS,
                          compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of logits = x @ weight.T against targets, chunk by chunk.

    x: (T, C) (any leading shape is flattened), weight: (V, C), targets: int (T,) with
    `ignore_index` for positions that do not count. Returns a 0-d fp32 tensor (fp64 for fp64
    inputs), equal to F.cross_entropy(logits.float(), targets, ignore_index=ignore_index); the
    autocast dtype, when autocast is on, is the dtype of the logits matmuls.
    """
    x = x.reshape(-1, x.shape[-1])
    targets = targets.reshape(-1)
    if x.shape[0] != targets.shape[0]:
        raise ValueError(f"lm_head_cross_entropy: {x.shape[0]} hidden states but {targets.shape[0]} targets")
    chunk = max(1, int(chunk_tokens))
    cd = _compute_dtype(x, weight)  # the logits' dtype: the autocast dtype when autocast is on
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LMHeadCrossEntropy.apply(x, weight, targets, cd, ignore_index, chunk, compiled)
    with torch.autocast(x.device.type, enabled=False):
        n_valid = (targets != ignore_index).sum()
        loss_sum, _, _ = _run_chunks(x.to(cd), weight.to(cd), targets, ignore_index, chunk, None,
                                     _chunk_fn(compiled))
    return loss_sum / n_valid
