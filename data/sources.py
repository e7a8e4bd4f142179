"""Where the text comes from: the Python standard library, the user's files, or a Hugging Face dataset.

A file source (`stdlib`, `local`) is a sorted list of documents; each document is one file, or one
line of a .jsonl file. Its validation split is a seeded-hash choice of whole documents holding
`val_fraction` of the bytes (at least one document, never all): the same files and seed always
give the same split, whatever order the files are listed in.
The Hugging Face source (`openwebtext`) is split the way the FlashAttention training code does:
`train_test_split(test_size=0.0005, seed=2357, shuffle=True)`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# stdlib: every .py file under sysconfig's stdlib folder, tests included (about 30 MB on CPython 3.11);
# folders of installed third-party packages and bytecode caches are not the standard library.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
LOCAL_DIR_EXTENSIONS = (".txt", ".md", ".py", ".jsonl")  # files taken from a folder given in paths


def _unit_hash(seed: int, salt: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{salt}\0{key}".encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Doc:
    """One document: a whole file (line is None) or one line of a .jsonl file."""

    path: str  # absolute path of the file
    key: str  # stable name used for the split hash (relative for stdlib, absolute for local)
    line: int | None = None  # 1-based line number in a .jsonl file
    nbytes: int = 0


@dataclass
class FileSource:
    """Documents read from files on disk (the `stdlib` and `local` sources)."""

    name: str
    docs: list[Doc]
    text_field: str = "text"
    description: dict = field(default_factory=dict)  # JSON-able: what the fingerprint covers

    def fingerprint(self) -> dict:
        return self.description

    def read(self, doc: Doc, cache: dict | None = None) -> str:
        if doc.line is None:
            with open(doc.path, "rb") as f:
                return f.read().decode("utf-8", errors="replace")
        lines = cache.get(doc.path) if cache is not None else None
        if lines is None:
            with open(doc.path, "rb") as f:
                lines = f.read().decode("utf-8", errors="replace").split("\n")
            if cache is not None:
                cache.clear()  # keep only the current .jsonl file in memory
                cache[doc.path] = lines
        return _jsonl_text(lines[doc.line - 1], doc.path, doc.line, self.text_field)

    def text_docs(self) -> tuple[list[Doc], list[str]]:
        """(documents of the files that are UTF-8 text, paths of the files that are not).

        Not text: a NUL byte anywhere or bytes that do not decode as UTF-8 (binaries, Latin-1,
        UTF-16, ...); such a file would otherwise be tokenised as mojibake. Reads each file once
        and parses the .jsonl lines, so a bad line stops here rather than half-way through a build.
        """
        by_path: dict[str, list[Doc]] = {}
        for d in self.docs:
            by_path.setdefault(d.path, []).append(d)
        keep, skipped = [], []
        for path, docs in by_path.items():
            with open(path, "rb") as f:
                raw = f.read()
            try:
                if b"\0" in raw:
                    raise UnicodeError
                text = raw.decode("utf-8")
            except UnicodeError:
                skipped.append(path)
                continue
            if docs[0].line is not None:  # .jsonl: one document per line
                lines = text.split("\n")
                for d in docs:
                    _jsonl_text(lines[d.line - 1], path, d.line, self.text_field)
            keep.extend(docs)
        return keep, skipped

    def iter_texts(self, docs: list[Doc]) -> Iterator[str]:
        cache: dict = {}
        for d in docs:
            yield self.read(d, cache)


def _jsonl_text(line: str, path: str, lineno: int, text_field: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or text_field not in obj:
        raise ValueError(f"{path}:{lineno}: no '{text_field}' field (set data.text_field to the text key)")
    text = obj[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{path}:{lineno}: field '{text_field}' is {type(text).__name__}, expected a string")
    return text


def split_docs(docs: list[Doc], val_fraction: float, seed: int) -> tuple[list[Doc], list[Doc]]:
    """(train, val), both in the original order.

    Documents are ranked by a seeded hash of their key; val takes them in that order until it
    holds at least `val_fraction` of the bytes (so its size tracks the fraction even when file
    sizes vary a lot), with at least one document and never all of them.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    n = len(docs)
    if n < 2:
        raise ValueError(
            f"need at least 2 non-empty documents to make a train and a validation split, found {n}"
        )
    ranked = sorted(range(n), key=lambda i: (_unit_hash(seed, "val", docs[i].key), docs[i].key))
    target = val_fraction * sum(d.nbytes for d in docs)
    val_idx: set[int] = set()
    taken = 0
    for i in ranked[: n - 1]:
        if val_idx and taken >= target:
            break
        val_idx.add(i)
        taken += docs[i].nbytes
    return [d for i, d in enumerate(docs) if i not in val_idx], [
        d for i, d in enumerate(docs) if i in val_idx
    ]


def _subset(items: list, max_items: int | None, seed: int, key) -> list:
    """A seeded, order-preserving random subset of at most max_items items (all when None)."""
    if max_items is None or max_items >= len(items):
        return items
    if max_items < 2:
        raise ValueError(f"data.max_files must be >= 2 (one train and one validation file), got {max_items}")
    keep = set(sorted(range(len(items)), key=lambda i: _unit_hash(seed, "subset", key(items[i])))[:max_items])
    return [x for i, x in enumerate(items) if i in keep]


def _listing_digest(entries: list[tuple[str, int, int]]) -> str:
    h = hashlib.sha256()
    for name, size, mtime_ns in entries:
        h.update(f"{name}\t{size}\t{mtime_ns}\n".encode())
    return h.hexdigest()


def stdlib_source(root: str | None, max_files: int | None, seed: int) -> FileSource:
    """The running interpreter's standard library .py files, in sorted (deterministic) order."""
    root_path = Path(root or sysconfig.get_paths()["stdlib"]).resolve()
    if not root_path.is_dir():
        raise ValueError(f"data.root: standard library folder {root_path} does not exist")
    files: list[tuple[str, str]] = []  # (relative posix path, absolute path)
    for dirpath, dirnames, filenames in os.walk(root_path):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS)
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                full = os.path.join(dirpath, fn)
                files.append((Path(full).relative_to(root_path).as_posix(), full))
    files.sort()
    if not files:
        raise ValueError(f"no .py files under the standard library folder {root_path}")
    files = _subset(files, max_files, seed, key=lambda f: f[0])
    docs, listing = [], []
    for rel, full in files:
        st = os.stat(full)
        docs.append(Doc(path=full, key=rel, nbytes=st.st_size))
        listing.append((rel, st.st_size, st.st_mtime_ns))
    desc = {
        "source": "stdlib",
        "root": str(root_path),
        "files": len(docs),
        "bytes": sum(d.nbytes for d in docs),
        "listing_sha256": _listing_digest(listing),
        "max_files": max_files,
    }
    return FileSource("stdlib", docs, description=desc)


def _base_dir() -> Path:
    """Where relative paths are meant from: the launch folder, even if Hydra changed directory."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd

        if HydraConfig.initialized():
            return Path(get_original_cwd())
    except (ImportError, ValueError):  # hydra missing or not running
        pass
    return Path.cwd()


def local_source(paths, text_field: str, max_files: int | None, seed: int) -> FileSource:
    """The user's files: globs (** allowed) or folders; .jsonl files give one document per line."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [str(p) for p in (paths or [])]
    if not paths:
        raise ValueError("data=local needs files: data.paths='[corpus/**/*.txt,notes.md]' (globs or folders)")
    base = _base_dir()
    found: set[str] = set()
    for pat in paths:
        pat_abs = os.path.expanduser(pat)
        if not os.path.isabs(pat_abs):
            pat_abs = str(base / pat_abs)
        matches = sorted(glob.glob(pat_abs, recursive=True))
        if not matches:
            raise ValueError(f"data.paths: '{pat}' matches no files (relative paths are from {base})")
        for m in matches:
            if os.path.isdir(m):
                for dirpath, dirnames, filenames in os.walk(m):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    found.update(
                        os.path.join(dirpath, f) for f in filenames if f.endswith(LOCAL_DIR_EXTENSIONS)
                    )
            elif os.path.isfile(m):
                found.add(m)
    files = sorted(os.path.abspath(f) for f in found)
    if not files:
        raise ValueError(f"data.paths {paths}: no {'/'.join(LOCAL_DIR_EXTENSIONS)} files found")
    files = _subset(files, max_files, seed, key=lambda f: f)
    docs, listing = [], []
    for f in files:
        st = os.stat(f)
        listing.append((f, st.st_size, st.st_mtime_ns))
        if f.endswith(".jsonl"):
            with open(f, "rb") as fh:
                for i, raw in enumerate(fh, start=1):
                    if raw.strip():
                        docs.append(Doc(path=f, key=f"{f}:{i}", line=i, nbytes=len(raw)))
        elif st.st_size > 0:
            docs.append(Doc(path=f, key=f, nbytes=st.st_size))
    desc = {
        "source": "local",
        "paths": paths,
        "files": len(files),
        "bytes": sum(x[1] for x in listing),
        "listing_sha256": _listing_digest(listing),
        "text_field": text_field,
        "max_files": max_files,
    }
    return FileSource("local", docs, text_field=text_field, description=desc)
