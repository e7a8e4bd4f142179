"""Flat uint16 token files with a small header, written atomically, read with numpy.memmap.

Layout of `train.bin` / `val.bin` (little endian):

    bytes 0..255   header: magic b"LCTOKENS", version u32, dtype code u32 (1 = uint16),
                   token count u64, sha256 of the tokenizer (32 raw bytes), zero padding
    bytes 256..    count uint16 token ids

so a valid file is exactly 256 + 2 * count bytes. A file is written under a temporary name in
its own folder and renamed over the final name only once complete (os.replace is atomic on
POSIX), so readers never see a half-written file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

MAGIC = b"LCTOKENS"
VERSION = 1
DTYPE_CODES = {1: np.dtype("<u2")}
DTYPE_CODE = 1
HEADER_BYTES = 256
_HEADER = struct.Struct("<8sIIQ32s")  # magic, version, dtype code, count, tokenizer sha256
TMP_SUFFIX = ".tmp"


class CacheError(RuntimeError):
    """A token file or cache folder is missing, incomplete or does not match what is expected."""


def _pack_header(count: int, tokenizer_fp: str) -> bytes:
    head = _HEADER.pack(MAGIC, VERSION, DTYPE_CODE, count, bytes.fromhex(tokenizer_fp))
    return head + b"\0" * (HEADER_BYTES - len(head))


def read_header(path: Path) -> dict:
    """Parse and check the header of a token file; raises CacheError on anything unexpected."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise CacheError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise CacheError(f"{path}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
    magic, version, dtype_code, count, tok = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CacheError(f"{path}: not a token file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise CacheError(f"{path}: token file version {version}, this code reads version {VERSION}")
    if dtype_code not in DTYPE_CODES:
        raise CacheError(f"{path}: unknown dtype code {dtype_code}")
    expected = HEADER_BYTES + count * DTYPE_CODES[dtype_code].itemsize
    if size != expected:
        raise CacheError(f"{path}: size {size} bytes but the header says {count} tokens ({expected} bytes)")
    return {"count": count, "tokenizer": tok.hex(), "dtype": DTYPE_CODES[dtype_code]}


def open_tokens(path: Path, tokenizer_fp: str | None = None) -> np.memmap:
    """Read-only memmap of the token ids after checking header, size and (optionally) tokenizer."""
    head = read_header(path)
    if tokenizer_fp is not None and head["tokenizer"] != tokenizer_fp:
        raise CacheError(
            f"{path}: made with tokenizer {head['tokenizer'][:12]}, expected {tokenizer_fp[:12]}"
        )
    if head["count"] == 0:
        return np.zeros(0, dtype=head["dtype"])  # np.memmap refuses empty maps
    return np.memmap(path, dtype=head["dtype"], mode="r", offset=HEADER_BYTES, shape=(head["count"],))


class TokenWriter:
    """Stream token ids into `path` atomically.

    Tokens go to a temporary file next to `path`; `commit()` writes the final count into the
    header, fsyncs and renames it into place. `abort()` (or an exception inside a `with` block)
    deletes the temporary file, so a crash never leaves a partial `path` behind.
    """

    def __init__(self, path: Path, tokenizer_fp: str):
        self.path = Path(path)
        self.tokenizer_fp = tokenizer_fp
        self.count = 0
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=TMP_SUFFIX)
        self.tmp = Path(tmp)
        self._f = os.fdopen(fd, "wb")
        self._f.write(_pack_header(0, tokenizer_fp))  # count is filled in by commit()

    def write(self, ids) -> None:
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.dtype != np.uint16:
            if arr.min() < 0 or arr.max() > np.iinfo(np.uint16).max:
                raise ValueError(f"token ids out of uint16 range [{arr.min()}, {arr.max()}]")
            arr = arr.astype(np.uint16)
        self._f.write(arr.astype("<u2", copy=False).tobytes())
        self.count += int(arr.size)

    def commit(self) -> Path:
        self._f.seek(0)
        self._f.write(_pack_header(self.count, self.tokenizer_fp))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp(folder: Path) -> None:
    """Delete temporary files left by a process killed mid-write (call while holding the lock)."""
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
