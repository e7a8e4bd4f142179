"""Attention kernels: the Triton FlashAttention, block-sparse masks, and the reference attention."""
from .reference import causal_mask, reference_attention

try:  # the Triton kernel; importable on any machine that has triton
    from .flash import flash_attention
except ImportError as exc:  # pragma: no cover - only while the kernel module is being written
    _err = exc

    def flash_attention(*args, **kwargs):
        raise ImportError(f"kernels.flash could not be imported: {_err}")

__all__ = ["flash_attention", "reference_attention", "causal_mask"]
