"""Standard attention: materialises the scores S and probabilities P (softmax in fp32).

This is the correctness oracle for the Triton kernels (call it on float64 inputs) and the
"standard attention" baseline of the paper's benchmarks. Layout as flash_attention:
q (B, Nq, H, D), k and v (B, Nk, H, D) -> out (B, Nq, H, D).
"""
from __future__ import annotations

import torch


def causal_mask(nq: int, nk: int, device=None) -> torch.Tensor:
    """Boolean (Nq, Nk) mask, True where query i may attend to key j.

    Causal alignment is bottom-right (as FlashAttention >= 2.1): query i sits at key position
    i + (Nk - Nq), so the last query sees every key. With Nq > Nk the first Nq - Nk query rows
    see no key at all; their output is 0.
    """
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i + (nk - nq)


def reference_attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
                        mask: torch.Tensor | None = None, block_mask=None) -> torch.Tensor:
    """softmax(q k^T * scale) v with the score matrix materialised.

    mask: optional boolean tensor broadcastable to (B, H, Nq, Nk), True = keep.
    block_mask: optional kernels block mask; expanded to its element mask.
    Rows with no kept key give 0 (not NaN). Computes in fp32 (or fp64 for fp64 inputs) and
    returns the input dtype.
    """
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qt, kt, vt = (t.transpose(1, 2).to(ct) for t in (q, k, v))  # (B, H, N, D)
    s = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    keep = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & causal_mask(Nq, Nk, q.device)
    keep = keep.expand(B, H, Nq, Nk)
    if mask is not None:
        keep = keep & mask.to(q.device)
    if block_mask is not None:
        keep = keep & block_mask.to_dense_mask(Nq, Nk).to(q.device)[None]
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.matmul(p, vt)
    return out.transpose(1, 2).to(q.dtype)
