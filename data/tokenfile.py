"""Flat uint16 token files with a small header, written atomically, read with numpy.memmap.

Layout of `train.bin` / `val.bin` (little endian):

    bytes 0..255   header: magic b"LCTOKENS", version u32, dtype code u32 (1 = uint16),
                   token count u64, sha256 of the tokenizer (32 raw bytes), zero padding
    bytes 256..    count uint16 token ids

so a valid file is exactly 256 + 2 * count bytes. A file is written under a temporary name in
its own folder and renamed over the final name only once complete (os.replace is atomic on
POSIX), so readers never see a half-written file.

Checksums: while `TokenWriter` streams the ids it computes a CRC-32 of every CHUNK_BYTES (16 MiB)
of token bytes (the header is checked field by field instead) and the largest id; the caller
records them (data/prepare.py puts them in meta.json). `verify_tokens` recomputes them, chunks
in parallel threads (zlib and numpy release the GIL), and checks every id < the vocabulary size,
so a file whose bytes changed after it was written (bit rot, a bad copy, a stray write: the size
and header can still look right) is found before training instead of as an IndexError at step N.
CRC-32 detects accidental corruption, which is what it is for here (not tampering). Cost, measured
2026-11-22 on this project's 2-core CPU machine (zlib 1.2.13): CRC-32 alone 2.9 GB/s per core
(sha256 1.1, sha1 1.2, blake2b 0.5); the whole check (read from the page cache + CRC + max id)
1.2-1.5 GB per CPU-second, so OpenWebText's 9B tokens (18 GB) cost ~12-15 CPU-seconds, spread over
up to 8 threads, plus reading the file once from disk. Writing pays the same ~0.7 s/GB during
tokenising (hours), i.e. nothing noticeable. A passed check is remembered in `verified.json` next
to the file, keyed by size, mtime, ctime and inode (ctime cannot be set back by cp -p / rsync /
touch), so a file is hashed once after it is written or copied, not at every start (0.2 ms then).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"LCTOKENS"
VERSION = 1
DTYPE_CODES = {1: np.dtype("<u2")}
DTYPE_CODE = 1
HEADER_BYTES = 256
_HEADER = struct.Struct("<8sIIQ32s")  # magic, version, dtype code, count, tokenizer sha256
TMP_SUFFIX = ".tmp"
CHECKSUM = "crc32"
CHUNK_BYTES = 1 << 24  # 16 MiB of token bytes per CRC: ~1100 CRCs for 18 GB, 16 MiB buffers per thread
STAMP = "verified.json"


class CacheError(RuntimeError):
    """A token file or cache folder is missing, incomplete or does not match what is expected."""


def _default_mode(fd: int) -> None:
    """mkstemp makes 0600 files; a cache is shared (other users, other jobs): 0666 minus the umask."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.fchmod(fd, 0o666 & ~mask)
    except (AttributeError, OSError):  # not POSIX
        pass


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

    def __init__(self, path: Path, tokenizer_fp: str, vocab_size: int | None = None):
        self.path = Path(path)
        self.tokenizer_fp = tokenizer_fp
        self.vocab_size = vocab_size  # ids must be < this (None: any uint16)
        self.count = 0
        self.max_id = -1
        self._crcs: list[int] = []
        self._crc, self._fill = 0, 0  # CRC and length of the chunk being written
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=TMP_SUFFIX)
        _default_mode(fd)
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
        top = int(arr.max())
        if self.vocab_size is not None and top >= self.vocab_size:
            raise ValueError(f"token id {top} is not below the vocabulary size {self.vocab_size}")
        buf = memoryview(arr.astype("<u2", copy=False).tobytes())
        self._f.write(buf)
        while len(buf):  # CRC per CHUNK_BYTES of the token bytes, as they stream past
            take = min(len(buf), CHUNK_BYTES - self._fill)
            self._crc = zlib.crc32(buf[:take], self._crc)
            self._fill += take
            buf = buf[take:]
            if self._fill == CHUNK_BYTES:
                self._crcs.append(self._crc)
                self._crc, self._fill = 0, 0
        self.count += int(arr.size)
        self.max_id = max(self.max_id, top)

    def checksum(self) -> dict:
        """What `verify_tokens` checks: {"algo", "chunk_bytes", "crc32": [...], "max_id"}."""
        crcs = self._crcs + ([self._crc] if self._fill else [])
        return {"algo": CHECKSUM, "chunk_bytes": CHUNK_BYTES, "crc32": crcs, "max_id": self.max_id}

    def commit(self) -> Path:
        self._f.seek(0)
        self._f.write(_pack_header(self.count, self.tokenizer_fp))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        _remember(self.path, self.checksum(), self.vocab_size)  # just written: no need to re-read it
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
    _default_mode(fd)
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


# ------------------------------------------------------------------------------------ verification
def _stat_key(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sums_digest(checksum: dict) -> str:
    return hashlib.sha256(json.dumps(checksum, sort_keys=True).encode()).hexdigest()[:16]


_verified_here: set[tuple] = set()  # (path, stat key, digest) passed in this process (read-only folders)


def _read_stamp(folder: Path) -> dict:
    try:
        stamp = json.loads((folder / STAMP).read_text())
        return stamp if isinstance(stamp, dict) else {}
    except (OSError, ValueError):
        return {}


_buffers = threading.local()  # one reusable read buffer per thread (no page faults per chunk)


def _check_chunk(path: Path, i: int, chunk_bytes: int, count: int, vocab_size: int | None) -> tuple[int, int]:
    """(crc32, first bad id position or -1) of chunk i of the token bytes."""
    start = i * chunk_bytes
    n = min(chunk_bytes, count * 2 - start)
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < chunk_bytes:
        buf = _buffers.buf = bytearray(chunk_bytes)
    view = memoryview(buf)[:n]
    with open(path, "rb", buffering=0) as f:
        f.seek(HEADER_BYTES + start)
        got = f.readinto(view)
    view = view[:got]
    bad = -1
    if vocab_size is not None and got:
        ids = np.frombuffer(view[: got - got % 2], dtype="<u2")
        if int(ids.max()) >= vocab_size:
            bad = start // 2 + int(np.argmax(ids >= vocab_size))
    return zlib.crc32(view), bad


def verify_tokens(path: Path, checksum: dict | None, vocab_size: int | None = None, *,
                  threads: int | None = None) -> str | None:
    """None if the token bytes of `path` match `checksum` (from `TokenWriter.checksum()`) and every
    id is < vocab_size; else a one-line reason. Call `read_header`/`open_tokens` first (size checks).

    A file that passed is remembered (verified.json in its folder, and in this process) by its size,
    mtime, ctime and inode, so it is not hashed again until it changes.
    """
    path = Path(path)
    if not isinstance(checksum, dict) or checksum.get("algo") != CHECKSUM or not isinstance(
            checksum.get("crc32"), list) or not isinstance(checksum.get("chunk_bytes"), int):
        return f"{path.name}: no {CHECKSUM} checksum recorded (made by an older version of this code)"
    try:
        key = _stat_key(path)
    except OSError as e:
        return f"{path}: cannot read ({e.strerror})"
    digest = _sums_digest(dict(checksum, vocab_size=vocab_size))
    memo = (str(path.absolute()), tuple(key), digest)
    if memo in _verified_here or _read_stamp(path.parent).get(path.name) == {"stat": key, "sums": digest}:
        _verified_here.add(memo)
        return None
    count = (key[0] - HEADER_BYTES) // 2
    chunk, crcs = checksum["chunk_bytes"], checksum["crc32"]
    n_chunks = -(-count * 2 // chunk) if count else 0
    if n_chunks != len(crcs):
        return f"{path.name}: {len(crcs)} checksums recorded for {n_chunks} chunks of {chunk} bytes"
    t0 = time.perf_counter()
    if key[0] > 1 << 30:
        log.info("data: verifying %s (%.1f GB; once per file, remembered in %s)", path, key[0] / 1e9, STAMP)
    workers = max(1, min(threads or os.cpu_count() or 1, 8, n_chunks))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda i: _check_chunk(path, i, chunk, count, vocab_size), range(n_chunks)))
    for i, ((crc, bad), want) in enumerate(zip(results, crcs)):
        if crc != want:
            lo = HEADER_BYTES + i * chunk
            return (f"{path.name}: checksum mismatch in bytes {lo}..{min(lo + chunk, key[0])} (chunk {i + 1} of "
                    f"{n_chunks}): the file changed after it was written")
        if bad >= 0:
            return f"{path.name}: token {bad} has id {_id_at(path, bad)}, not below the vocabulary size {vocab_size}"
    dt = time.perf_counter() - t0
    if key[0] > 1 << 30:
        log.info("data: %s verified in %.1f s (%.2f GB/s)", path.name, dt, key[0] / 1e9 / max(dt, 1e-9))
    _remember(path, checksum, vocab_size)
    return None


def _remember(path: Path, checksum: dict, vocab_size: int | None) -> None:
    """Record that `path`, as it is now, matches `checksum` (see verify_tokens)."""
    key, digest = _stat_key(path), _sums_digest(dict(checksum, vocab_size=vocab_size))
    _verified_here.add((str(path.absolute()), tuple(key), digest))
    try:  # best effort: a read-only cache folder is verified again by the next process
        stamp = _read_stamp(path.parent)
        stamp[path.name] = {"stat": key, "sums": digest}
        write_json_atomic(path.parent / STAMP, stamp)
    except OSError:
        pass


def _id_at(path: Path, index: int) -> int:
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES + 2 * index)
        return int.from_bytes(f.read(2), "little")
