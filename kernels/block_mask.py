"""Block-sparse attention layouts: the `block_mask=` argument of `flash_attention`.

A `BlockMask` says which (query block, key block) tiles of the attention matrix the kernel
computes. The kernel keeps or skips whole tiles; inside a kept tile every element is computed,
except that a causal mask also masks the elements above the diagonal inside diagonal tiles.

Geometry (all block indices are 0-based):
    nMb = ceil(seq_q / block_m) query blocks, nNb = ceil(seq_k / block_n) key blocks,
    layout: bool (Hm, nMb, nNb), Hm = 1 (one layout for every head) or H (one per head).
    The last block of each axis may be partial; its missing elements do not exist.

Causal alignment is bottom-right, as the dense kernel and `reference_attention`: query i sits at
key position i + (seq_k - seq_q). Block (mb, nb) lies strictly above the diagonal (every element
masked) when nb * block_n > (mb + 1) * block_m - 1 + seq_k - seq_q; builders called with
causal=True drop exactly those blocks and keep every diagonal block.

Patterns (local, strided, fixed, butterfly, BigBird, Longformer) are defined on a square grid of
key blocks of size block_n, "pattern row i, pattern column j". A query at position q belongs to
pattern row (q + seq_k - seq_q) // block_n (clamped to [0, nNb - 1]); query block mb keeps key
block nb when any of its queries' pattern rows keeps column nb. With seq_q == seq_k and
block_m == block_n this is exactly the pattern: query block i <-> pattern row i.

Compressed lists (what the Triton kernel iterates over), built once on the CPU and cached per
device by `BlockMask.lists(device)`:
    row_count (Hm, nMb)      int32  number of kept key blocks of each query block
    row_idx   (Hm, nMb, R)   int32  their indices, ascending; R = max(1, max row_count);
                                    entries past row_count repeat the last valid index (0 for
                                    an empty row)
    col_count (Hm, nNb)      int32  number of kept query blocks of each key block
    col_idx   (Hm, nNb, C)   int32  their indices, ascending; C = max(1, max col_count); padded
                                    the same way
Head h of the attention uses layout index h when Hm == H and index 0 when Hm == 1.
"""
from __future__ import annotations

import functools
import math
import operator
import os
import tempfile
from typing import Callable, Iterable, Mapping

import torch

__all__ = [
    "BlockMask",
    "dense_block_mask",
    "local_mask",
    "strided_mask",
    "fixed_mask",
    "butterfly_mask",
    "bigbird_mask",
    "longformer_mask",
    "from_dense_mask",
    "from_block_fn",
    "build_block_mask_from_config",
    "save_layout_png",
    "LAYOUTS",
]

DEFAULT_BLOCK = 128
LAYOUTS = ("dense", "local", "strided", "fixed", "butterfly", "bigbird", "longformer")


# ----------------------------------------------------------------------------------------------
# validation helpers: one-line ValueErrors that name the parameter and the valid range
# ----------------------------------------------------------------------------------------------
def _int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)  # int, numpy / torch integer scalars; not 2.5 or "2"
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


def _block_size(name: str, value) -> int:
    value = _int(name, value)
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (16, 32, 64, 128, ...), got {value}")
    return value


def _seqs(seq_q, seq_k) -> tuple[int, int]:
    seq_q = _int("seq_q", seq_q, 1)
    seq_k = seq_q if seq_k is None else _int("seq_k", seq_k, 1)
    return seq_q, seq_k


def _grid(seq_q: int, seq_k: int, block_m: int, block_n: int) -> tuple[int, int]:
    return -(-seq_q // block_m), -(-seq_k // block_n)


def _above_diagonal(n_mb: int, n_nb: int, seq_q: int, seq_k: int, block_m: int,
                    block_n: int) -> torch.Tensor:
    """bool (nMb, nNb): True for blocks strictly above the (bottom-right aligned) diagonal."""
    mb = torch.arange(n_mb)[:, None]
    nb = torch.arange(n_nb)[None, :]
    return nb * block_n > (mb + 1) * block_m - 1 + (seq_k - seq_q)


def _causal_elements(seq_q: int, seq_k: int) -> torch.Tensor:
    i = torch.arange(seq_q)[:, None]
    j = torch.arange(seq_k)[None, :]
    return j <= i + (seq_k - seq_q)


def _compress(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hm, R, C) bool -> count (Hm, R) int32, idx (Hm, R, max(1, max count)) int32.

    idx lists the True columns of each row in ascending order; entries past count repeat the
    last valid index (0 for an empty row), so a kernel may load them without a bounds mask.
    """
    count = layout.sum(dim=-1, dtype=torch.int32)
    width = max(1, int(count.max()) if count.numel() else 0)
    # A stable sort of "not kept" puts the kept columns first, in ascending order.
    order = torch.sort((~layout).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    pos = torch.arange(width, device=layout.device).view(1, 1, width)
    last = order.gather(-1, (count.long() - 1).clamp(min=0).unsqueeze(-1))
    last = torch.where(count.unsqueeze(-1) > 0, last, torch.zeros_like(last))
    idx = torch.where(pos < count.unsqueeze(-1).long(), order, last)
    return count.contiguous(), idx.to(torch.int32).contiguous()


def _on_cpu(fn):
    """Run `fn` with the CPU as the default device for new tensors.

    A layout is CPU metadata whatever the caller's default device is: a model built under
    `with torch.device("meta")` (train.py checks a config that way) or `torch.set_default_device
    ("cuda")` still gets a real CPU layout; the kernel's lists are copied to the GPU by `lists()`.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.device("cpu"):
            return fn(*args, **kwargs)
    return wrapper


def _device_key(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ----------------------------------------------------------------------------------------------
# BlockMask
# ----------------------------------------------------------------------------------------------
class BlockMask:
    """Immutable block-sparse layout for `flash_attention(..., block_mask=...)`.

    Build it with one of the builders of this module (or directly from a layout tensor).

    Attributes (read-only):
        layout   bool CPU tensor (Hm, nMb, nNb) (a copy: the mask itself cannot be changed)
        block_m, block_n  block sizes the mask was built for (the kernel runs each block as one or more of
                          its own tiles, so any power of two >= 16 works)
        seq_q, seq_k      sequence lengths it was built for
        causal   True when built with causal=True: blocks strictly above the diagonal were
                 dropped and the kernel must also mask inside diagonal blocks (call it with
                 causal=True; `check(..., causal=False)` refuses a causal mask)
        n_heads  Hm (1 = shared by all heads), n_blocks_m = nMb, n_blocks_n = nNb, shape
        nnz      number of kept blocks (summed over Hm)
        max_row, max_col  largest row_count / col_count
        density         kept blocks / all Hm * nMb * nNb blocks (the fraction of the full,
                        non-causal tile grid the kernel computes)
        causal_density  kept blocks on or below the diagonal / blocks on or below the diagonal
                        (the fraction of a dense *causal* kernel's work; for a causal mask every
                        kept block is on or below the diagonal)
    """

    __slots__ = ("_layout", "_block_m", "_block_n", "_seq_q", "_seq_k", "_causal", "_cpu_lists",
                 "_lists", "_nnz")

    @_on_cpu
    def __init__(self, layout: torch.Tensor, *, block_m: int = DEFAULT_BLOCK,
                 block_n: int = DEFAULT_BLOCK, seq_q: int, seq_k: int | None = None,
                 causal: bool = False):
        block_m = _block_size("block_m", block_m)
        block_n = _block_size("block_n", block_n)
        seq_q, seq_k = _seqs(seq_q, seq_k)
        if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
            got = layout.dtype if isinstance(layout, torch.Tensor) else type(layout).__name__
            raise ValueError(f"layout must be a bool tensor of shape (Hm, nMb, nNb), got {got}")
        if layout.dim() == 2:
            layout = layout.unsqueeze(0)
        n_mb, n_nb = _grid(seq_q, seq_k, block_m, block_n)
        if layout.dim() != 3 or tuple(layout.shape[1:]) != (n_mb, n_nb) or layout.shape[0] < 1:
            raise ValueError(
                f"layout must have shape (Hm, {n_mb}, {n_nb}) = (heads, ceil({seq_q}/{block_m}), "
                f"ceil({seq_k}/{block_n})), got {tuple(layout.shape)}")
        layout = layout.detach().to("cpu", copy=True).contiguous()
        causal = bool(causal)
        if causal:  # a causal mask never lists a block the kernel would mask entirely
            layout &= ~_above_diagonal(n_mb, n_nb, seq_q, seq_k, block_m, block_n)
        set_ = object.__setattr__
        set_(self, "_layout", layout)
        set_(self, "_block_m", block_m)
        set_(self, "_block_n", block_n)
        set_(self, "_seq_q", seq_q)
        set_(self, "_seq_k", seq_k)
        set_(self, "_causal", causal)
        set_(self, "_cpu_lists", None)
        set_(self, "_lists", {})
        set_(self, "_nnz", int(layout.sum()))

    def __setattr__(self, name, value):
        raise AttributeError("BlockMask is immutable; build a new one")

    # -- geometry ---------------------------------------------------------------------------
    layout = property(lambda self: self._layout.clone(), doc="bool (Hm, nMb, nNb), a copy")
    block_m = property(lambda self: self._block_m)
    block_n = property(lambda self: self._block_n)
    seq_q = property(lambda self: self._seq_q)
    seq_k = property(lambda self: self._seq_k)
    causal = property(lambda self: self._causal)
    n_heads = property(lambda self: self._layout.shape[0], doc="Hm: 1 (shared) or H")
    n_blocks_m = property(lambda self: self._layout.shape[1])
    n_blocks_n = property(lambda self: self._layout.shape[2])
    shape = property(lambda self: tuple(self._layout.shape))
    nnz = property(lambda self: self._nnz)

    @property
    def density(self) -> float:
        """Kept blocks / all Hm * nMb * nNb blocks (1.0 for dense, ~0.5 for dense causal)."""
        return self._nnz / self._layout.numel()

    @property
    @_on_cpu
    def causal_density(self) -> float:
        """Kept blocks on/below the diagonal / blocks on/below the diagonal (1.0 = dense causal)."""
        lower = ~_above_diagonal(self.n_blocks_m, self.n_blocks_n, self._seq_q, self._seq_k,
                                 self._block_m, self._block_n)
        total = int(lower.sum()) * self.n_heads
        return int((self._layout & lower).sum()) / total if total else 0.0

    # -- compressed lists -------------------------------------------------------------------
    def lists(self, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row_count, row_idx, col_count, col_idx), contiguous int32 tensors on `device`.

        row_count (Hm, nMb), row_idx (Hm, nMb, max(1, max_row)): kept key blocks per query
        block, ascending, padded with the last valid index (0 for empty rows).
        col_count (Hm, nNb), col_idx (Hm, nNb, max(1, max_col)): kept query blocks per key
        block, ascending, padded the same way. Built once, cached per device.
        """
        key = _device_key(device)
        cached = self._lists.get(key)
        if cached is None:
            if self._cpu_lists is None:
                row_count, row_idx = _compress(self._layout)
                col_count, col_idx = _compress(self._layout.transpose(1, 2))
                object.__setattr__(self, "_cpu_lists", (row_count, row_idx, col_count, col_idx))
            cached = tuple(t.to(key).contiguous() for t in self._cpu_lists)
            self._lists[key] = cached
        return cached

    def split_counts(self, device="cpu", causal: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(row_full (Hm, nMb), col_masked (Hm, nNb)) int32 on `device`, for the kernel's fast path.

        row_full: how many leading entries of each row list need no element mask (the whole
        block lies on or below the causal diagonal, when causal, and inside seq_k); since the
        lists are ascending these are a prefix. col_masked: how many leading entries of each
        column list cross the causal diagonal (0 when not causal); the rest need no mask.
        `causal` is the attention call's flag (default: the mask's own).
        """
        causal = self._causal if causal is None else bool(causal)
        key = (_device_key(device), causal)
        cached = self._lists.get(key)
        if cached is None:
            n_mb, n_nb = self._layout.shape[1], self._layout.shape[2]
            mb = torch.arange(n_mb, device="cpu")[:, None]
            nb = torch.arange(n_nb, device="cpu")[None, :]
            last_col = (nb + 1) * self._block_n - 1
            full = (last_col < self._seq_k).expand(n_mb, n_nb)
            crosses = torch.zeros(n_mb, n_nb, dtype=torch.bool, device="cpu")
            if causal:
                crosses = last_col > mb * self._block_m + (self._seq_k - self._seq_q)
                full = full & ~crosses
            row_full = (self._layout & full).sum(-1, dtype=torch.int32)
            col_masked = (self._layout & crosses).sum(-2, dtype=torch.int32)
            cached = (row_full.to(key[0]).contiguous(), col_masked.to(key[0]).contiguous())
            self._lists[key] = cached
        return cached

    @_on_cpu
    def column_order(self, device, batch_heads: int, n_heads: int, n_columns: int, split: int = 1,
                     group: int = 1) -> torch.Tensor | None:
        """Launch order of a backward over key columns of block_n / split keys (n_columns of them),
        each program taking `group` consecutive columns: int32 (batch_heads * P,) on `device`, P =
        ceil(n_columns / group) programs per head; entry p = bh * P + c for the p-th program to start
        (program c takes columns c * group ...; head bh % n_heads). None when that is the natural
        order (no heavy program).

        Heavy programs first, the rest in the natural order (bh, then c ascending). A program is
        heavy when its columns keep more than twice the mean number of query blocks (BigBird's global
        key block: every query block keeps it). Started last, one such program ran alone after every
        other had finished: at 64k keys its 1024 query blocks took as long as the rest of the layout's
        backward (docs/benchmarks.md 2e). Natural order keeps the programs running side by side on
        neighbouring key blocks of one head, whose query blocks stay in L2. Built once per (device,
        sizes), cached.
        """
        key = ("column_order", _device_key(device), int(batch_heads), int(n_heads), int(n_columns),
               int(split), int(group))
        cached = self._lists.get(key, False)
        if cached is False:
            count = self.lists("cpu")[2].to(torch.int64)  # (Hm, nNb)
            heads = torch.arange(batch_heads) % n_heads
            per_column = count[heads if self.n_heads > 1 else torch.zeros_like(heads)]
            per_column = per_column[:, torch.arange(n_columns) // split]
            n_programs = -(-n_columns // group)
            padded = torch.nn.functional.pad(per_column, (0, n_programs * group - n_columns))
            weight = padded.view(batch_heads, n_programs, group).sum(-1).reshape(-1)  # natural order
            heavy = weight > 2 * weight.double().mean()
            first = torch.nonzero(heavy).flatten()
            first = first[torch.sort(weight[first], descending=True, stable=True).indices]
            order = torch.cat([first, torch.nonzero(~heavy).flatten()])
            cached = None
            if len(first):
                cached = order.to(torch.int32).to(_device_key(device)).contiguous()
            self._lists[key] = cached
        return cached

    @property
    def max_row(self) -> int:
        return int(self.lists("cpu")[0].max())

    @property
    def max_col(self) -> int:
        return int(self.lists("cpu")[2].max())

    # -- checks and conversions -------------------------------------------------------------
    def _describe(self) -> str:
        heads = "1 shared head" if self.n_heads == 1 else f"{self.n_heads} heads"
        return (f"block {self._block_m}x{self._block_n} for {self._seq_q}x{self._seq_k} "
                f"({self.n_blocks_m}x{self.n_blocks_n} blocks, {heads}"
                f"{', causal' if self._causal else ''})")

    def check(self, seq_q: int, seq_k: int | None = None, n_heads: int | None = None,
              block_m: int | None = None, block_n: int | None = None, *,
              causal: bool | None = None) -> None:
        """Raise ValueError unless this mask fits an attention call of these sizes.

        Requirements: the same block sizes; the same block grid (ceil(seq/block) on both axes);
        Hm == 1 or Hm == n_heads; for a causal mask the same diagonal offset seq_k - seq_q (it
        decides which blocks were dropped) and, when `causal` is given, a causal call.
        Arguments left as None are not checked (block sizes default to the mask's own).
        """
        seq_k = seq_q if seq_k is None else seq_k
        bm = self._block_m if block_m is None else block_m
        bn = self._block_n if block_n is None else block_n
        problems = []
        if (bm, bn) != (self._block_m, self._block_n):
            problems.append("a different block size")
        try:
            n_mb, n_nb = _grid(int(seq_q), int(seq_k), int(bm), int(bn))
        except (TypeError, ValueError, ZeroDivisionError):
            raise ValueError(f"check() needs positive integer sizes, got seq_q={seq_q!r}, "
                             f"seq_k={seq_k!r}, block {bm!r}x{bn!r}") from None
        if not problems and (n_mb, n_nb) != (self.n_blocks_m, self.n_blocks_n):
            problems.append("a different number of blocks")
        if (not problems and self._causal
                and seq_k - seq_q != self._seq_k - self._seq_q):
            problems.append("a different causal diagonal (seq_k - seq_q)")
        if n_heads is not None and self.n_heads not in (1, n_heads):
            problems.append(f"{n_heads} heads (a per-head mask needs exactly that many)")
        if causal is not None and self._causal and not causal:
            problems.append("causal=False (this mask was built causal)")
        if problems:
            want = f"seq_q={seq_q}, seq_k={seq_k}, block_m={bm}, block_n={bn}"
            if n_heads is not None:
                want += f", n_heads={n_heads}"
            call = f"block {bm}x{bn} for {seq_q}x{seq_k}"
            if n_heads is not None:
                call += f" with {n_heads} heads"
            raise ValueError(
                f"block mask was built with {self._describe()} but the kernel was called with "
                f"{call}: {'; '.join(problems)}; rebuild it with {want}")

    @_on_cpu
    def to_dense_mask(self, seq_q: int | None = None, seq_k: int | None = None) -> torch.Tensor:
        """Element mask bool (Hm, seq_q, seq_k) on the CPU: True where attention is computed.

        Every element of a kept block is True, intersected with the (bottom-right) causal
        element mask when the mask is causal. Sizes default to the ones it was built for.
        """
        seq_q = self._seq_q if seq_q is None else seq_q
        seq_k = self._seq_k if seq_k is None else seq_k
        self.check(seq_q, seq_k)
        dense = self._layout.repeat_interleave(self._block_m, dim=1)[:, :seq_q]
        dense = dense.repeat_interleave(self._block_n, dim=2)[:, :, :seq_k]
        if self._causal:
            dense = dense & _causal_elements(seq_q, seq_k)
        return dense.contiguous()

    def as_causal(self) -> "BlockMask":
        """This layout with blocks strictly above the diagonal dropped, causal=True."""
        if self._causal:
            return self
        return BlockMask(self._layout, block_m=self._block_m, block_n=self._block_n,
                         seq_q=self._seq_q, seq_k=self._seq_k, causal=True)

    def _combine(self, other, op) -> "BlockMask":
        if not isinstance(other, BlockMask):
            return NotImplemented
        same = (self._block_m, self._block_n, self._seq_q, self._seq_k)
        if same != (other._block_m, other._block_n, other._seq_q, other._seq_k):
            raise ValueError(f"cannot combine block masks of different geometry: "
                             f"{self._describe()} and {other._describe()}")
        if 1 not in (self.n_heads, other.n_heads) and self.n_heads != other.n_heads:
            raise ValueError(f"cannot combine block masks with {self.n_heads} and "
                             f"{other.n_heads} heads")
        return BlockMask(op(self._layout, other._layout), block_m=self._block_m,
                         block_n=self._block_n, seq_q=self._seq_q, seq_k=self._seq_k,
                         causal=self._causal or other._causal)

    def __or__(self, other):
        """Union of two layouts of the same geometry (causal if either is)."""
        return self._combine(other, torch.logical_or)

    def __and__(self, other):
        """Intersection of two layouts of the same geometry (causal if either is)."""
        return self._combine(other, torch.logical_and)

    def __repr__(self) -> str:
        return (f"BlockMask(shape={self.shape}, block={self._block_m}x{self._block_n}, "
                f"seq={self._seq_q}x{self._seq_k}, causal={self._causal}, "
                f"density={self.density:.4f}, causal_density={self.causal_density:.4f})")


# ----------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------
def _pattern_to_layout(pattern: torch.Tensor, seq_q: int, seq_k: int, block_m: int,
                       block_n: int) -> torch.Tensor:
    """Square pattern (Hm, nNb, nNb) on key blocks -> layout (Hm, nMb, nNb) (module docstring).

    Query block mb covers pattern rows lo..hi (the key blocks its queries' aligned positions
    fall in); it keeps the union of those rows.
    """
    n_mb, n_nb = _grid(seq_q, seq_k, block_m, block_n)
    off = seq_k - seq_q
    mb = torch.arange(n_mb)
    first = mb * block_m + off
    last = torch.clamp((mb + 1) * block_m, max=seq_q) - 1 + off
    lo = torch.div(first, block_n, rounding_mode="floor").clamp(0, n_nb - 1)
    hi = torch.div(last, block_n, rounding_mode="floor").clamp(0, n_nb - 1)
    csum = torch.nn.functional.pad(pattern.to(torch.int32).cumsum(dim=1), (0, 0, 1, 0))
    return (csum[:, hi + 1] - csum[:, lo]) > 0


def _finish(pattern: torch.Tensor, seq_q: int, seq_k: int, block_m: int, block_n: int,
            causal: bool) -> BlockMask:
    if pattern.dim() == 2:
        pattern = pattern.unsqueeze(0)
    layout = _pattern_to_layout(pattern, seq_q, seq_k, block_m, block_n)
    return BlockMask(layout, block_m=block_m, block_n=block_n, seq_q=seq_q, seq_k=seq_k,
                     causal=causal)


def _setup(seq_q, seq_k, block_m, block_n):
    seq_q, seq_k = _seqs(seq_q, seq_k)
    block_m = _block_size("block_m", block_m)
    block_n = _block_size("block_n", block_n)
    n = _grid(seq_q, seq_k, block_m, block_n)[1]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return seq_q, seq_k, block_m, block_n, n, i, j


@_on_cpu
def dense_block_mask(seq_q: int, seq_k: int | None = None, *, block_m: int = DEFAULT_BLOCK,
                     block_n: int = DEFAULT_BLOCK, causal: bool = False) -> BlockMask:
    """Every block kept (with causal=True: every block on or below the diagonal).

    The kernel run with it gives exactly the dense kernel's result.
    """
    seq_q, seq_k = _seqs(seq_q, seq_k)
    block_m = _block_size("block_m", block_m)
    block_n = _block_size("block_n", block_n)
    n_mb, n_nb = _grid(seq_q, seq_k, block_m, block_n)
    return BlockMask(torch.ones(1, n_mb, n_nb, dtype=torch.bool), block_m=block_m,
                     block_n=block_n, seq_q=seq_q, seq_k=seq_k, causal=causal)


@_on_cpu
def local_mask(seq_q: int, seq_k: int | None = None, *, window_blocks: int,
               block_m: int = DEFAULT_BLOCK, block_n: int = DEFAULT_BLOCK,
               causal: bool = False) -> BlockMask:
    """Sliding window in blocks: pattern row i keeps key blocks j with |i - j| <= window_blocks.

    On n x n blocks (seq_q == seq_k, block_m == block_n) row i keeps
    min(i + w, n - 1) - max(i - w, 0) + 1 blocks (causal: i - max(i - w, 0) + 1); the layout is
    symmetric. window_blocks=0 keeps the block diagonal only. For seq_q != seq_k the window is
    centred on the key blocks each query block's aligned positions fall in.
    """
    seq_q, seq_k, block_m, block_n, n, i, j = _setup(seq_q, seq_k, block_m, block_n)
    w = _int("window_blocks", window_blocks, 0)
    return _finish((i - j).abs() <= w, seq_q, seq_k, block_m, block_n, causal)


@_on_cpu
def strided_mask(seq_q: int, seq_k: int | None = None, *, stride: int,
                 block_m: int = DEFAULT_BLOCK, block_n: int = DEFAULT_BLOCK,
                 causal: bool = False) -> BlockMask:
    """Sparse-Transformer-style strided layout in blocks, with s = stride:

    pattern row i keeps key block j when |i - j| < s (a local window; with causal=True exactly
    the s blocks i - s + 1 .. i) or when j % s == s - 1 (every s-th "summary" column: blocks
    s - 1, 2s - 1, ...). stride=1 keeps every block. Note: Child et al.'s element-level strided
    pattern uses the diagonals (i - j) % s == 0 for its second head; at block granularity we use
    summary columns instead, so that every row reaches the whole past in O(n / s) blocks.
    """
    seq_q, seq_k, block_m, block_n, n, i, j = _setup(seq_q, seq_k, block_m, block_n)
    s = _int("stride", stride, 1)
    pattern = ((i - j).abs() < s) | (j % s == s - 1)
    return _finish(pattern, seq_q, seq_k, block_m, block_n, causal)


@_on_cpu
def fixed_mask(seq_q: int, seq_k: int | None = None, *, stride: int, summary: int = 1,
               block_m: int = DEFAULT_BLOCK, block_n: int = DEFAULT_BLOCK,
               causal: bool = False) -> BlockMask:
    """Sparse Transformer "fixed" layout in blocks (Child et al. 2019), s = stride, c = summary:

    pattern row i keeps key block j when i // s == j // s (its own chunk of s blocks) or when
    j % s >= s - c (the last c blocks of every chunk: the summary blocks). Requires
    1 <= summary <= stride.
    """
    seq_q, seq_k, block_m, block_n, n, i, j = _setup(seq_q, seq_k, block_m, block_n)
    s = _int("stride", stride, 1)
    c = _int("summary", summary, 1, s)
    pattern = (i // s == j // s) | (j % s >= s - c)
    return _finish(pattern, seq_q, seq_k, block_m, block_n, causal)


@_on_cpu
def butterfly_mask(seq_q: int, seq_k: int | None = None, *, block_m: int = DEFAULT_BLOCK,
                   block_n: int = DEFAULT_BLOCK, causal: bool = False) -> BlockMask:
    """Flat block butterfly (Pixelated Butterfly; the FlashAttention paper's block-sparse runs).

    Pattern row i keeps key block j when i == j or j == i XOR 2**k for some k in
    range(ceil(log2 n)), n = number of key blocks: the support of the sum of the butterfly
    factor matrices of sizes 2, 4, ..., 2**ceil(log2 n). Symmetric. With n a power of two every
    row keeps 1 + log2(n) blocks; otherwise the pattern of the next power of two is cut to
    n x n (partners j >= n are dropped).
    """
    seq_q, seq_k, block_m, block_n, n, i, j = _setup(seq_q, seq_k, block_m, block_n)
    levels = max(0, math.ceil(math.log2(n))) if n > 1 else 0
    x = i ^ j
    pattern = x == 0
    for k in range(levels):
        pattern = pattern | (x == (1 << k))
    return _finish(pattern, seq_q, seq_k, block_m, block_n, causal)


def _head_generator(seed: int, head: int) -> torch.Generator:
    # Head 0 of a per-head mask uses the same stream as the shared (n_heads=None) mask.
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + head * 0xBF58476D1CE4E5B9)
                                         % (2 ** 63))


@_on_cpu
def bigbird_mask(seq_q: int, seq_k: int | None = None, *, window_blocks: int = 1,
                 global_blocks: int = 1, random_blocks: int = 1, seed: int = 0,
                 block_m: int = DEFAULT_BLOCK, block_n: int = DEFAULT_BLOCK,
                 causal: bool = False, n_heads: int | None = None) -> BlockMask:
    """BigBird-like layout (Zaheer et al. 2020) in blocks:

    pattern row i keeps key block j when |i - j| <= window_blocks (window), or i < global_blocks
    or j < global_blocks (the first global_blocks block rows and columns are global), plus
    `random_blocks` further key blocks per row, drawn without replacement from the blocks not
    already kept (with causal=True only from blocks j <= i, so no random block is wasted above
    the diagonal); fewer when not enough remain. The draw is a CPU torch.Generator seeded from
    `seed` (and the head): same seed, same mask on every machine. n_heads=None: one layout for
    all heads; n_heads=H: H layouts with independent random blocks (head 0 equals the shared
    layout).
    """
    seq_q, seq_k, block_m, block_n, n, i, j = _setup(seq_q, seq_k, block_m, block_n)
    w = _int("window_blocks", window_blocks, 0)
    g = _int("global_blocks", global_blocks, 0)
    r = _int("random_blocks", random_blocks, 0)
    seed = _int("seed", seed, 0)
    heads = 1 if n_heads is None else _int("n_heads", n_heads, 1)
    base = ((i - j).abs() <= w) | (i < g) | (j < g)
    candidates = ~base
    if causal:
        candidates &= j <= i
    patterns = []
    for h in range(heads):
        pattern = base.clone()
        if r > 0 and n > 0:
            scores = torch.rand(n, n, generator=_head_generator(seed, h))
            scores = torch.where(candidates, scores, torch.full_like(scores, -1.0))
            top = scores.topk(min(r, n), dim=1)
            pick = torch.zeros_like(pattern)
            pick.scatter_(1, top.indices, top.values >= 0)
            pattern |= pick
        patterns.append(pattern)
    return _finish(torch.stack(patterns), seq_q, seq_k, block_m, block_n, causal)


@_on_cpu
def longformer_mask(seq_q: int, seq_k: int | None = None, *, window_blocks: int,
                    global_tokens: Iterable[int] = (0,), block_m: int = DEFAULT_BLOCK,
                    block_n: int = DEFAULT_BLOCK, causal: bool = False) -> BlockMask:
    """Longformer-like layout (Beltagy et al. 2020): sliding window + global tokens.

    The window is `local_mask(window_blocks)`. `global_tokens` are positions in the key sequence
    (0 <= t < seq_k; the query with that position is query t - (seq_k - seq_q)): the key block
    holding a global token is kept for every query block (everyone attends to it) and the query
    block holding it keeps every key block (it attends to everyone). Whole blocks are kept: the
    kernel computes the other tokens of those blocks too. Non-causal with seq_q == seq_k and
    block_m == block_n the layout is symmetric.
    """
    seq_q, seq_k, block_m, block_n, n, i, j = _setup(seq_q, seq_k, block_m, block_n)
    w = _int("window_blocks", window_blocks, 0)
    if isinstance(global_tokens, torch.Tensor):
        global_tokens = global_tokens.flatten().tolist()
    elif isinstance(global_tokens, (int,)) and not isinstance(global_tokens, bool):
        global_tokens = [global_tokens]
    tokens = [_int("global_tokens entry", t, 0, seq_k - 1) for t in global_tokens]
    layout = _pattern_to_layout(((i - j).abs() <= w).unsqueeze(0), seq_q, seq_k, block_m, block_n)
    off = seq_k - seq_q
    for t in tokens:
        layout[:, :, t // block_n] = True
        if 0 <= t - off < seq_q:
            layout[:, (t - off) // block_m, :] = True
    return BlockMask(layout, block_m=block_m, block_n=block_n, seq_q=seq_q, seq_k=seq_k,
                     causal=causal)


@_on_cpu
def from_dense_mask(mask: torch.Tensor, block_m: int = DEFAULT_BLOCK,
                    block_n: int = DEFAULT_BLOCK, *, causal: bool = False) -> BlockMask:
    """Block layout of an element mask: a block is kept when any of its elements is True.

    mask: bool (Nq, Nk) (shared by all heads), (H, Nq, Nk) (per head) or (1, H, Nq, Nk).
    Only the block layout is kept, not the element mask: the kernel computes every element of
    a kept block, so the result equals attention under `to_dense_mask()`, which equals `mask`
    only when `mask` is block-aligned. With causal=True the mask is first intersected with the
    causal element mask (bottom-right aligned).
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (True = attend), got {got}")
    if mask.dim() == 4 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3 or min(mask.shape) < 1:
        raise ValueError(f"mask must have shape (Nq, Nk), (H, Nq, Nk) or (1, H, Nq, Nk), "
                         f"got {tuple(mask.shape)}")
    block_m = _block_size("block_m", block_m)
    block_n = _block_size("block_n", block_n)
    hm, seq_q, seq_k = mask.shape
    mask = mask.detach().to("cpu")
    if causal:
        mask = mask & _causal_elements(seq_q, seq_k)
    n_mb, n_nb = _grid(seq_q, seq_k, block_m, block_n)
    padded = torch.nn.functional.pad(mask, (0, n_nb * block_n - seq_k, 0, n_mb * block_m - seq_q))
    layout = padded.view(hm, n_mb, block_m, n_nb, block_n).any(dim=4).any(dim=2)
    return BlockMask(layout, block_m=block_m, block_n=block_n, seq_q=seq_q, seq_k=seq_k,
                     causal=causal)


@_on_cpu
def from_block_fn(fn: Callable, seq_q: int, seq_k: int | None = None, *,
                  block_m: int = DEFAULT_BLOCK, block_n: int = DEFAULT_BLOCK,
                  causal: bool = False, n_heads: int | None = None) -> BlockMask:
    """Layout from a predicate on block indices of the (nMb, nNb) grid.

    fn(q_block, k_block) -> bool, or fn(head, q_block, k_block) -> bool when n_heads is given.
    fn is first called once with broadcastable int64 index tensors (q_block (nMb, 1), k_block
    (1, nNb), head (H, 1, 1)), as FlexAttention's mask functions are; if that raises or does not
    give a bool result of a broadcastable shape, it is called once per block with Python ints.
    """
    seq_q, seq_k = _seqs(seq_q, seq_k)
    block_m = _block_size("block_m", block_m)
    block_n = _block_size("block_n", block_n)
    heads = None if n_heads is None else _int("n_heads", n_heads, 1)
    if not callable(fn):
        raise ValueError(f"fn must be callable as fn(q_block, k_block) -> bool, got {fn!r}")
    n_mb, n_nb = _grid(seq_q, seq_k, block_m, block_n)
    shape = (1 if heads is None else heads, n_mb, n_nb)
    qb = torch.arange(n_mb).view(n_mb, 1)
    kb = torch.arange(n_nb).view(1, n_nb)
    layout = None
    try:
        out = fn(qb, kb) if heads is None else fn(torch.arange(heads).view(heads, 1, 1), qb, kb)
        out = torch.as_tensor(out)
        if out.dtype == torch.bool:
            layout = torch.broadcast_to(out, shape).clone()
    except Exception:  # noqa: BLE001 - not vectorisable: fall back to scalar calls below
        layout = None
    if layout is None:
        layout = torch.zeros(shape, dtype=torch.bool)
        for h in range(shape[0]):
            for m in range(n_mb):
                for k in range(n_nb):
                    layout[h, m, k] = bool(fn(m, k) if heads is None else fn(h, m, k))
    return BlockMask(layout, block_m=block_m, block_n=block_n, seq_q=seq_q, seq_k=seq_k,
                     causal=causal)


# ----------------------------------------------------------------------------------------------
# config and visualisation
# ----------------------------------------------------------------------------------------------
def _cfg_get(cfg, key, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


@_on_cpu
def build_block_mask_from_config(attn_cfg, seq_len: int, n_heads: int, *,
                                 causal: bool = True, seq_k: int | None = None) -> BlockMask:
    """BlockMask from the `attention` config group (configs/attention/block_sparse.yaml).

    Keys: layout (dense|local|strided|fixed|butterfly|bigbird|longformer), block_size (or
    block_m / block_n), and the layout's parameters: window_blocks (local, bigbird,
    longformer), stride (strided, fixed), summary (fixed), global_blocks, random_blocks, seed,
    per_head (bigbird), global_tokens (longformer). Keys a layout does not use are ignored.
    The GPT model is causal, hence causal=True.
    """
    layout = str(_cfg_get(attn_cfg, "layout", "local")).lower()
    if layout not in LAYOUTS:
        raise ValueError(f"attention.layout must be one of {'|'.join(LAYOUTS)}, got {layout!r}")
    block = _block_size("attention.block_size", _cfg_get(attn_cfg, "block_size", DEFAULT_BLOCK))
    geo = dict(block_m=_block_size("attention.block_m", _cfg_get(attn_cfg, "block_m", block)),
               block_n=_block_size("attention.block_n", _cfg_get(attn_cfg, "block_n", block)),
               causal=causal)
    n_heads = _int("n_heads", n_heads, 1)
    seq = (seq_len, seq_k)
    get = lambda key, default=None: _cfg_get(attn_cfg, key, default)  # noqa: E731
    if layout == "dense":
        return dense_block_mask(*seq, **geo)
    if layout == "local":
        return local_mask(*seq, window_blocks=get("window_blocks", 1), **geo)
    if layout == "strided":
        return strided_mask(*seq, stride=get("stride", 8), **geo)
    if layout == "fixed":
        return fixed_mask(*seq, stride=get("stride", 8), summary=get("summary", 1), **geo)
    if layout == "butterfly":
        return butterfly_mask(*seq, **geo)
    if layout == "bigbird":
        return bigbird_mask(*seq, window_blocks=get("window_blocks", 1),
                            global_blocks=get("global_blocks", 1),
                            random_blocks=get("random_blocks", 1), seed=get("seed", 0),
                            n_heads=n_heads if bool(get("per_head", False)) else None, **geo)
    tokens = get("global_tokens", [0])
    if isinstance(tokens, (int, str)):
        tokens = [tokens]
    return longformer_mask(*seq, window_blocks=get("window_blocks", 1),
                           global_tokens=list(tokens), **geo)


def save_layout_png(mask: BlockMask, path, head: int = 0, *, title: str | None = None) -> str:
    """Save layout[head] as a PNG (black = computed block) and return the path.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change); the file is
    written under a temporary name and renamed, so a failure leaves no partial file.
    """
    if not isinstance(mask, BlockMask):
        raise ValueError(f"mask must be a BlockMask, got {type(mask).__name__}")
    head = _int("head", head, 0, mask.n_heads - 1)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("save_layout_png needs matplotlib: pip install 'longctx-gpt[plots]'") from None

    path = os.fspath(path)
    grid = mask._layout[head].to(torch.uint8).numpy()
    n_mb, n_nb = grid.shape
    side = min(12.0, max(4.0, 0.02 * max(n_mb, n_nb) + 3.0))
    fig = Figure(figsize=(side * min(1.5, max(0.67, n_nb / n_mb)) + 1.0, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
    ax.set_xlabel(f"key block ({mask.block_n} tokens)")
    ax.set_ylabel(f"query block ({mask.block_m} tokens)")
    ax.set_title(title or (f"{mask.seq_q}x{mask.seq_k}, block {mask.block_m}x{mask.block_n}, "
                           f"head {head}{' (shared)' if mask.n_heads == 1 else ''}\n"
                           f"density {mask.density:.3f}, causal density "
                           f"{mask.causal_density:.3f}{', causal' if mask.causal else ''}"),
                 fontsize=10)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".layout-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
