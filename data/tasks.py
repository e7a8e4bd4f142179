"""Long-document classification tasks for scripts/eval_longdoc.py: `load_task(task_cfg) -> Task`.

Tasks (configs/task/*.yaml):
  offline   the default; no download. Python source code labelled by the package it belongs to
            (default: ten sub-packages of the installed torch, present wherever this project runs).
            Built so that length helps (see `offline_texts`): comments, docstrings and imports are
            removed, every document is a window that starts at a random offset deep inside the
            package's concatenated files, and train and test windows come from disjoint files.
  ecthr_a   LexGLUE ECtHR task A through `datasets` (coastalcph/lex_glue, ecthr_a): European Court
            of Human Rights cases (facts paragraphs), multi-label (10 articles; some cases have none),
            as in the FlashAttention paper. 9,000 train / 1,000 test cases.
  arxiv     arXiv papers (full text, median ~13k GPT-2 tokens), single-label, 11 subject classes
            (mteb/ArxivClassification: the "arxiv-classification" set of He et al. 2019, as parquet).
  mimic     MIMIC-III discharge summaries with ICD-9 codes, multi-label, from files the user holds
            (PhysioNet credentialed access; nothing is downloaded): see `docs/longdoc.md` for the format.
  local     the user's jsonl files: one object per line with `text` and `label` (single-label) or
            `labels` (a list: multi-label).

Every task becomes train/test lists of token-id arrays (GPT-2 BPE, at most max_doc_tokens each)
and a boolean label matrix, cached under <cache_dir>/longdoc-<task>-<key>/ (key = hash of the task
settings, the source listing and the tokenizer), written atomically (temp folder, then rename).
"""
from __future__ import annotations

import ast
import contextlib
import csv
import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TASKS = ("offline", "ecthr_a", "arxiv", "mimic", "local")
CACHE_VERSION = 1


class TaskError(ValueError):
    """A task that cannot be built (unknown name, missing files or labels, offline hub); one line."""


@dataclass
class Split:
    docs: list[np.ndarray]     # uint16 token ids per document
    labels: np.ndarray         # (n_docs, n_labels) bool

    def __len__(self) -> int:
        return len(self.docs)


@dataclass
class Task:
    name: str
    multi_label: bool
    label_names: list[str]
    train: Split
    test: Split
    info: dict = field(default_factory=dict)  # source description, class counts, cache folder

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _get(cfg, key, default=None):
    v = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if v is None else v


def _plain(cfg) -> dict:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    return dict(cfg)


# ------------------------------------------------------------------------------- checks (cheap)
def check_task(tcfg) -> None:
    """Everything about the task settings that can be checked without building it (one line each)."""
    name = str(_get(tcfg, "name", ""))
    if name not in TASKS:
        raise TaskError(f"task={name or '?'} is not a task; choose one of: {', '.join(TASKS)}")
    if name in ("local", "mimic"):
        for split in ("train", "test"):
            p = _get(tcfg, f"{split}_file")
            if not p:
                raise TaskError(f"task={name} needs task.{split}_file=PATH (a .jsonl{' or CAML .csv' if name == 'mimic' else ''} file)")
            if not Path(os.path.expanduser(str(p))).is_file():
                raise TaskError(f"task.{split}_file={p}: no such file")
    if name == "offline":
        pkgs = list(_get(tcfg, "packages", []))
        if len(pkgs) < 2:
            raise TaskError("task=offline needs at least 2 task.packages (one class each)")
        for key in ("doc_tokens", "train_per_class", "test_per_class"):
            v = _get(tcfg, key)
            if not isinstance(v, int) or v < 1:
                raise TaskError(f"task.{key}={v!r} must be a positive integer")
        for p in pkgs:
            if package_dir(str(p)) is None:
                raise TaskError(f"task.packages: {p} is not installed here; list packages this Python has "
                                f"(e.g. task.packages='[asyncio,email,unittest,xml,tkinter,idlelib]')")


# ------------------------------------------------------------------------------- offline source
def package_dir(name: str) -> Path | None:
    """Folder (or single .py file) of an installed package or sub-package, found without importing it."""
    parts = name.split(".")
    spec = importlib.util.find_spec(parts[0])
    if spec is None:
        return None
    if spec.submodule_search_locations:
        base = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin and spec.origin.endswith(".py"):
        return Path(spec.origin) if len(parts) == 1 else None
    else:
        return None
    p = base.joinpath(*parts[1:])
    if p.is_dir():
        return p
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


class _Strip(ast.NodeTransformer):
    """Drop imports and docstrings (comments vanish in ast.unparse); keep bodies non-empty."""

    def _body(self, body: list) -> list:
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        body = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom))]
        return body or [ast.Pass()]

    def generic_visit(self, node):
        super().generic_visit(node)
        for attr in ("body", "orelse", "finalbody"):
            seq = getattr(node, attr, None)
            if isinstance(seq, list) and (attr == "body" or seq):
                kept = self._body(seq) if attr == "body" else \
                    [n for n in seq if not isinstance(n, (ast.Import, ast.ImportFrom))] or [ast.Pass()]
                setattr(node, attr, kept)
        return node


def strip_source(src: str) -> str | None:
    """Python source without comments, docstrings and import statements (None if it does not parse).

    ast.unparse also normalises quotes, spacing and line breaks, so formatting habits of a
    package are no cue either."""
    try:
        tree = ast.parse(src)
        return ast.unparse(_Strip().visit(tree))
    except (SyntaxError, ValueError, RecursionError):
        return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None  # a standard-library package


def _unit_hash(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "big")


def offline_listing(tcfg) -> dict[str, list[tuple[str, Path]]]:
    """{package: [(relative path, absolute path)]} of the .py files of each configured package;
    a package nested in another listed one is left out of the outer one."""
    pkgs = [str(p) for p in _get(tcfg, "packages", [])]
    dirs = {}
    for name in pkgs:
        d = package_dir(name)
        if d is None:
            raise TaskError(f"task.packages: {name} is not installed here; list packages this Python has "
                            f"(e.g. task.packages='[asyncio,email,unittest,xml,tkinter,idlelib]')")
        dirs[name] = d.resolve()
    out = {}
    for name, d in dirs.items():
        inner = [o for n, o in dirs.items() if n != name and o != d and d in o.parents]
        files = [d] if d.is_file() else sorted(p for p in d.rglob("*.py") if "__pycache__" not in p.parts
                                                and not any(o == p or o in p.parents for o in inner))
        out[name] = [(p.relative_to(d.parent).as_posix(), p) for p in files]
    return out


def _read_stripped(path: str) -> str | None:
    return strip_source(Path(path).read_text(encoding="utf-8", errors="replace"))


def offline_texts(tcfg, listing, progress: bool = True):
    """Per package and split, the stripped sources of its files.

    Files are split train/test by a seeded hash of their path: the test files take about
    task.test_fraction of the package's bytes. Returns {package: {"train": [texts], "test": [texts]}}.
    Stripping (ast) runs in task.num_proc processes (null: up to 8, one per core).
    """
    from tqdm.auto import tqdm

    seed, frac = int(_get(tcfg, "split_seed", 0)), float(_get(tcfg, "test_fraction", 0.3))
    if not 0 < frac < 1:
        raise TaskError(f"task.test_fraction={frac} must be in (0, 1)")
    jobs = [(name, rel, str(p)) for name, files in listing.items() for rel, p in files]
    procs = int(_get(tcfg, "num_proc", 0) or min(8, os.cpu_count() or 1))
    with tqdm(total=len(jobs), unit="file", desc="offline task: stripping sources", disable=not progress) as bar:
        if procs > 1 and len(jobs) > 100:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(procs) as pool:
                stripped = []
                for s in pool.map(_read_stripped, [j[2] for j in jobs], chunksize=8):
                    stripped.append(s)
                    bar.update(1)
        else:
            stripped = []
            for j in jobs:
                stripped.append(_read_stripped(j[2]))
                bar.update(1)
    by_pkg: dict[str, list] = {name: [] for name in listing}
    for (name, rel, _), s in zip(jobs, stripped):
        if s and len(s) > 200:
            by_pkg[name].append((rel, s))
    out = {}
    for name, texts in by_pkg.items():
        ranked = sorted(texts, key=lambda t: (_unit_hash(seed, "test", t[0]), t[0]))
        target, taken, test = frac * sum(len(s) for _, s in texts), 0, []
        for rel, s in ranked[:-1]:  # at least one train file
            if test and taken >= target:
                break
            test.append((rel, s))
            taken += len(s)
        test_keys = {r for r, _ in test}
        train = [t for t in ranked if t[0] not in test_keys]
        out[name] = {"train": [s for _, s in train], "test": [s for _, s in test]}
    return out


def offline_windows(streams: dict, tcfg) -> tuple[dict, dict]:
    """Documents: for each package and split, `*_per_class` windows of doc_tokens tokens at seeded
    random offsets in the package's token stream (its files concatenated in a seeded order, EOT
    between files). Returns ({split: [arrays]}, {split: [class index]})."""
    doc = int(_get(tcfg, "doc_tokens"))
    seed = int(_get(tcfg, "split_seed", 0))
    docs, labels = {"train": [], "test": []}, {"train": [], "test": []}
    for c, name in enumerate(streams):
        for split in ("train", "test"):
            n = int(_get(tcfg, f"{split}_per_class"))
            stream = streams[name][split]
            if len(stream) < doc + 1:
                raise TaskError(f"task=offline: package {name} has only {len(stream):,} {split} tokens, fewer than "
                                f"task.doc_tokens={doc}; lower doc_tokens / test_fraction or drop the package")
            rng = random.Random(_unit_hash(seed, "windows", name, split))
            for _ in range(n):
                start = rng.randrange(0, len(stream) - doc + 1)
                docs[split].append(np.array(stream[start:start + doc], dtype=np.uint16))
                labels[split].append([c])
    return docs, labels


# ------------------------------------------------------------------------------- other sources
@contextlib.contextmanager
def _offline_if_unreachable(timeout: float = 5.0):
    """If the Hub cannot be reached (no DNS / no route, tried once with a timeout), run the block in
    Hugging Face offline mode: load_dataset then answers from its cache, or fails at once, instead of
    retrying for half a minute. The previous mode is restored afterwards."""
    import socket
    import sys
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield
        return
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # for modules imported inside the block
    patched = []
    for mod, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                      ("datasets.config", "HF_DATASETS_OFFLINE")):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, attr):
            patched.append((m, attr, getattr(m, attr)))
            setattr(m, attr, True)
    try:
        yield
    finally:
        for m, attr, old in patched:
            setattr(m, attr, old)
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _hf_rows(tcfg, split: str):
    """(texts, raw labels, label names or None) of one split of a Hugging Face dataset."""
    path, name = str(_get(tcfg, "hf_path")), _get(tcfg, "hf_name")
    try:
        with _offline_if_unreachable():
            import datasets

            ds = datasets.load_dataset(path, name, split=split, revision=_get(tcfg, "hf_revision"),
                                       cache_dir=_get(tcfg, "hf_cache_dir"))
    except Exception as e:  # noqa: BLE001  (offline, unknown dataset, missing package: one answer)
        detail = " ".join(str(e).split())[:160]
        raise TaskError(f"could not download the Hugging Face dataset {path}{'/' + name if name else ''} "
                        f"({type(e).__name__}: {detail}); without internet use task=offline or task=local "
                        f"(jsonl files), or load it once on a machine with internet and copy the "
                        f"datasets cache (task.hf_cache_dir); the datasets package comes with "
                        f"pip install 'longctx-gpt[data]'") from None
    tf, lf = str(_get(tcfg, "text_field", "text")), str(_get(tcfg, "label_field", "label"))
    for f in (tf, lf):
        if f not in ds.column_names:
            raise TaskError(f"{path} {split}: no column {f!r} (columns: {', '.join(ds.column_names)}); "
                            f"set task.text_field / task.label_field")
    feat = ds.features[lf]
    feat = getattr(feat, "feature", feat)
    names = list(getattr(feat, "names", None) or []) or None
    texts = ["\n".join(t) if isinstance(t, list) else str(t) for t in ds[tf]]
    return texts, list(ds[lf]), names


def _file_rows(path: str, text_field: str):
    """(texts, raw labels, multi_label) of a .jsonl file (text + label | labels) or a CAML-style
    MIMIC .csv (TEXT column, LABELS column of ';'-separated codes)."""
    p = Path(os.path.expanduser(path))
    texts, labels, kinds = [], [], set()
    if p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "TEXT" not in reader.fieldnames or "LABELS" not in reader.fieldnames:
                raise TaskError(f"{p}: a MIMIC .csv needs TEXT and LABELS columns (CAML's train_50.csv format)")
            for row in reader:
                texts.append(row["TEXT"])
                labels.append([c for c in row["LABELS"].split(";") if c])
        return texts, labels, True
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise TaskError(f"{p}:{i}: no string field {text_field!r} (the document text)")
            if "labels" in obj:
                if not isinstance(obj["labels"], list):
                    raise TaskError(f"{p}:{i}: 'labels' must be a list (multi-label); use 'label' for one label")
                kinds.add("labels")
                labels.append(obj["labels"])
            elif "label" in obj:
                kinds.add("label")
                labels.append(obj["label"])
            else:
                raise TaskError(f"{p}:{i}: no 'label' (single-label) or 'labels' (multi-label) field")
            texts.append(obj[text_field])
    if not texts:
        raise TaskError(f"{p}: no documents")
    if len(kinds) > 1:
        raise TaskError(f"{p}: mixes 'label' and 'labels' rows; use one kind per task")
    return texts, labels, kinds == {"labels"}


def _label_matrix(raw: list, names: list[str], where: str, strict: bool) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    m = np.zeros((len(raw), len(names)), dtype=bool)
    for r, lab in enumerate(raw):
        for x in (lab if isinstance(lab, list) else [lab]):
            j = index.get(str(x))
            if j is None:
                if strict:
                    raise TaskError(f"{where}: label {x!r} (document {r + 1}) does not occur in the train split")
                continue  # multi-label: codes outside the kept label set are dropped
            m[r, j] = True
    return m


def _sort_key(x: str):
    return (0, int(x), "") if x.lstrip("-").isdigit() else (1, 0, x)


# ------------------------------------------------------------------------------- build + cache
def _tokenize(texts: list[str], max_tokens: int, desc: str, progress: bool) -> list[np.ndarray]:
    from tqdm.auto import tqdm

    from .tokenizer import get_tokenizer

    tok = get_tokenizer()
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)
    out = []
    with tqdm(total=len(texts), unit="doc", desc=desc, disable=not progress) as bar:
        for i in range(0, len(texts), 256):
            # characters beyond ~8 per token of max_tokens can never be reached: cut before encoding
            batch = [t[:max_tokens * 8] for t in texts[i:i + 256]]
            for e in fast(batch):
                out.append(np.asarray(e.ids[:max_tokens], dtype=np.uint16))
            bar.update(len(batch))
    return out


def _build(tcfg, progress: bool) -> tuple[dict, dict, list[str], bool, dict]:
    name = str(tcfg["name"])
    max_tokens = int(_get(tcfg, "max_doc_tokens", 16384))
    if name == "offline":
        listing = offline_listing(tcfg)
        texts = offline_texts(tcfg, listing, progress)
        from .tokenizer import EOT_ID, get_tokenizer

        tok = get_tokenizer()
        fast = getattr(tok, "encode_batch_fast", tok.encode_batch)
        seed = int(_get(tcfg, "split_seed", 0))
        from tqdm.auto import tqdm

        streams = {}
        for pkg, splits in tqdm(texts.items(), unit="package", desc="offline task: tokenizing", disable=not progress):
            streams[pkg] = {}
            for split, ts in splits.items():
                ts = list(ts)
                random.Random(_unit_hash(seed, "order", pkg, split)).shuffle(ts)
                ids: list[int] = []
                for e in fast(ts):
                    ids.extend(e.ids)
                    ids.append(EOT_ID)
                streams[pkg][split] = ids
        docs, raw = offline_windows(streams, tcfg)
        names = list(texts)
        labels = {s: _label_matrix([[names[c] for c in r] for r in raw[s]], names, "offline", True) for s in raw}
        info = {"packages": {p: {"files": len(listing[p]), "train_tokens": len(streams[p]["train"]),
                                 "test_tokens": len(streams[p]["test"])} for p in names},
                "package_dirs": {p: str(package_dir(p)) for p in names},
                "versions": {t: _version(t) for t in sorted({p.split(".")[0] for p in names})}}
        return docs, labels, names, False, info
    if name in ("ecthr_a", "arxiv"):
        rows = {s: _hf_rows(tcfg, str(_get(tcfg, f"{s}_split", s))) for s in ("train", "test")}
        multi = bool(_get(tcfg, "multi_label", False))
        hf_names = rows["train"][2]
        seen = sorted({str(x) for lab in rows["train"][1] for x in (lab if isinstance(lab, list) else [lab])},
                      key=_sort_key)
        keys = [str(i) for i in range(len(hf_names))] if hf_names else seen
        labels = {s: _label_matrix(rows[s][1], keys, f"{tcfg['hf_path']} {s}", strict=not multi) for s in rows}
        names = [str(n) for n in hf_names] if hf_names else keys
        docs = {s: _tokenize(rows[s][0], max_tokens, f"{name}: tokenizing {s}", progress) for s in rows}
        return docs, labels, names, multi, {"hf_path": tcfg["hf_path"], "hf_name": _get(tcfg, "hf_name")}
    # local / mimic: files
    tf = str(_get(tcfg, "text_field", "text"))
    rows = {s: _file_rows(str(tcfg[f"{s}_file"]), tf) for s in ("train", "test")}
    multi = rows["train"][2]
    if rows["test"][2] != multi:
        raise TaskError(f"task.train_file is {'multi' if multi else 'single'}-label but task.test_file is not; use "
                        f"the same kind ('labels' lists or one 'label') in both")
    counts = Counter(str(x) for lab in rows["train"][1] for x in (lab if isinstance(lab, list) else [lab]))
    top = _get(tcfg, "top_k_labels")
    names = sorted(counts, key=_sort_key) if not top else \
        sorted((n for n, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:int(top)]), key=_sort_key)
    if len(names) < (1 if multi else 2):
        raise TaskError(f"{tcfg['train_file']}: needs at least {1 if multi else 2} different labels, found {len(names)}")
    labels = {s: _label_matrix(rows[s][1], names, str(tcfg[f"{s}_file"]), strict=not multi) for s in rows}
    docs = {s: _tokenize(rows[s][0], max_tokens, f"{name}: tokenizing {s}", progress) for s in rows}
    return docs, labels, names, multi, {"train_file": str(tcfg["train_file"]), "test_file": str(tcfg["test_file"])}


def _fingerprint(tcfg) -> dict:
    """What the cached task depends on: its settings, the tokenizer and the source files."""
    from .tokenizer import tokenizer_fingerprint

    fp = {"version": CACHE_VERSION, "task": {k: v for k, v in sorted(_plain(tcfg).items())
                                             if k not in ("hf_cache_dir", "progress", "num_proc")},
          "tokenizer": tokenizer_fingerprint()}
    name = str(tcfg["name"])
    if name == "offline":
        h = hashlib.sha256()
        for pkg, files in offline_listing(tcfg).items():
            for rel, p in files:
                st = p.stat()
                h.update(f"{pkg}\t{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        fp["listing"] = h.hexdigest()
    elif name in ("local", "mimic"):
        fp["files"] = [[str(Path(os.path.expanduser(str(tcfg[f"{s}_file"]))).resolve()), st.st_size, st.st_mtime_ns]
                       for s in ("train", "test") for st in [Path(os.path.expanduser(str(tcfg[f"{s}_file"]))).stat()]]
    return fp


def _save(folder: Path, docs: dict, labels: dict, names: list[str], multi: bool, info: dict, fp: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        arrays = {}
        for s in ("train", "test"):
            lens = np.array([len(d) for d in docs[s]], dtype=np.int64)
            arrays[f"{s}_tokens"] = np.concatenate(docs[s]) if docs[s] else np.zeros(0, np.uint16)
            arrays[f"{s}_offsets"] = np.concatenate([[0], np.cumsum(lens)])
            arrays[f"{s}_labels"] = labels[s]
        np.savez(tmp / "task.npz", **arrays)
        meta = {"label_names": names, "multi_label": multi, "info": info, "fingerprint": fp}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # inside the temp folder
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open(folder: Path, name: str) -> Task:
    meta = json.loads((folder / "meta.json").read_text())
    with np.load(folder / "task.npz") as z:
        splits = {}
        for s in ("train", "test"):
            tok, off = z[f"{s}_tokens"], z[f"{s}_offsets"]
            splits[s] = Split([tok[off[i]:off[i + 1]] for i in range(len(off) - 1)], z[f"{s}_labels"].astype(bool))
    info = dict(meta["info"], cache=str(folder))
    return Task(name, bool(meta["multi_label"]), list(meta["label_names"]), splits["train"], splits["test"], info)


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def load_task(tcfg, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Task:
    """Build the task once (tokenized, cached) or open its cache; TaskError (one line) on bad input."""
    check_task(tcfg)
    name = str(tcfg["name"])
    root = Path(os.path.expanduser(str(cache_dir or _get(tcfg, "cache_dir") or "~/.cache/longctx")))
    fp = _fingerprint(tcfg)
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    folder = root / f"longdoc-{name}-{key}"
    with _locked(root / f".longdoc-{name}-{key}.lock"):
        if not (folder / "meta.json").is_file():
            log.info(f"task {name}: building {folder} (once; later runs read the cache)")
            docs, labels, names, multi, info = _build(tcfg, progress)
            for s in ("train", "test"):
                if len(docs[s]) == 0:
                    raise TaskError(f"task={name}: the {s} split is empty")
            _save(folder, docs, labels, names, multi, info, fp)
        return _open(folder, name)
