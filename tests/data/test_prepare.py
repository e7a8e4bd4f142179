"""Preparing token files: content, cache reuse, corruption, crash safety, sources and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import longctx.data.prepare as prep
import numpy as np
import pytest
from longctx.data import EOT_ID, CacheError, DataError, get_tokenizer, load_data, prepare_data
from longctx.data.tokenfile import TokenWriter, open_tokens
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]

DOCS = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n" * 20,
    "b.md": "# Title\n\nSome *markdown* text with ünïcödé.\n" * 15,
    "sub/c.py": "def f(x):\n    return x + 1\n" * 30,
    "sub/d.txt": "Another document, short.\n",
    "e.txt": "Fifth file " * 40,
    "f.txt": "Sixth file\n" * 25,
}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for rel, text in DOCS.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (root / "skip.bin").write_bytes(b"\0\1")  # not a text extension: ignored inside a folder
    return root


def _cfg(tmp_path, corpus, **kw):
    cfg = dict(
        name="local",
        paths=[str(corpus)],
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.2,
        split_seed=0,
        num_proc=None,
        progress=False,
    )
    cfg.update(kw)
    return cfg


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_local_corpus_tokens_are_exact(tmp_path, corpus):
    folder = prepare_data(_cfg(tmp_path, corpus))
    assert {p.name for p in folder.iterdir()} >= {"train.bin", "val.bin", "meta.json"}
    meta = json.loads((folder / "meta.json").read_text())
    td = load_data(_cfg(tmp_path, corpus))
    assert meta["tokens"] == {"train": len(td.train), "val": len(td.val)}
    assert meta["documents"]["val"] >= 1 and sum(meta["documents"].values()) == len(DOCS)
    # every document appears once, in path order, followed by EOT, in exactly one split
    tok = get_tokenizer()
    val_keys = set(meta["val_documents"])
    expect = {"train": [], "val": []}
    for rel in sorted(str(corpus / r) for r in DOCS):
        split = "val" if rel in val_keys else "train"
        expect[split] += tok.encode(Path(rel).read_text()).ids + [EOT_ID]
    assert np.array_equal(td.train, expect["train"]) and np.array_equal(td.val, expect["val"])
    assert td.train.dtype == np.uint16 and int(td.train[-1]) == EOT_ID
    assert not list(folder.glob(".*.tmp"))


def test_cache_reused_without_rewriting(tmp_path, corpus, monkeypatch):
    cfg = _cfg(tmp_path, corpus)
    folder = prepare_data(cfg)
    before = _mtimes(folder)
    monkeypatch.setattr(prep, "_build_from_files", lambda *a, **k: pytest.fail("rebuilt a good cache"))
    assert prepare_data(cfg) == folder and load_data(cfg).folder == folder
    assert _mtimes(folder) == before


def test_changed_source_or_split_gets_new_folder(tmp_path, corpus):
    f1 = prepare_data(_cfg(tmp_path, corpus))
    assert prepare_data(_cfg(tmp_path, corpus, val_fraction=0.3)) != f1
    (corpus / "a.txt").write_text("changed")
    assert prepare_data(_cfg(tmp_path, corpus)) != f1


def test_split_is_stable_and_order_independent(tmp_path, corpus):
    m1 = json.loads((prepare_data(_cfg(tmp_path, corpus)) / "meta.json").read_text())
    globs = [str(corpus / "sub" / "*"), str(corpus / "*.txt"), str(corpus / "*.md")]  # other listing
    m2 = json.loads((prepare_data(_cfg(tmp_path, corpus, paths=globs)) / "meta.json").read_text())
    assert m1["val_documents"] == m2["val_documents"] and m1["tokens"] == m2["tokens"]


def _corrupt_truncate(folder):
    p = folder / "train.bin"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 2)


def _corrupt_magic(folder):
    with open(folder / "val.bin", "r+b") as f:
        f.write(b"NOTTOKEN")


def _corrupt_tokenizer(folder):
    with open(folder / "train.bin", "r+b") as f:
        f.seek(24)  # magic 8 + version 4 + dtype 4 + count 8
        f.write(b"\xab" * 32)


def _corrupt_meta(folder):
    (folder / "meta.json").unlink()


@pytest.mark.parametrize(
    "corrupt, what",
    [
        (_corrupt_truncate, "size"),
        (_corrupt_magic, "not a token file"),
        (_corrupt_tokenizer, "made with tokenizer"),
        (_corrupt_meta, "incomplete"),
    ],
)
def test_corrupt_cache_refused_or_rebuilt(tmp_path, corpus, corrupt, what, caplog):
    cfg = _cfg(tmp_path, corpus)
    folder = prepare_data(cfg)
    good = {n: (folder / n).read_bytes() for n in ("train.bin", "val.bin")}
    corrupt(folder)
    with pytest.raises(CacheError, match=what) as e:
        prepare_data({**cfg, "rebuild": "never"})
    assert "data.rebuild=auto" in str(e.value) and "\n" not in str(e.value)
    with caplog.at_level("WARNING"):
        assert prepare_data(cfg) == folder  # rebuild=auto
    assert "rebuilding" in caplog.text
    assert {n: (folder / n).read_bytes() for n in good} == good
    with pytest.raises(CacheError, match="made with tokenizer"):
        _corrupt_tokenizer(folder)
        open_tokens(folder / "train.bin", "00" * 32)


def test_missing_cache_with_rebuild_never(tmp_path, corpus):
    with pytest.raises(CacheError, match="is missing; data.rebuild=never.*scripts/prepare_data.py"):
        prepare_data(_cfg(tmp_path, corpus, rebuild="never"))


def test_rebuild_always(tmp_path, corpus, monkeypatch):
    folder = prepare_data(_cfg(tmp_path, corpus))
    calls = []
    real = prep._build_from_files
    monkeypatch.setattr(prep, "_build_from_files", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = _cfg(tmp_path, corpus, rebuild="always")
    assert prepare_data(cfg) == folder and calls == [1]
    assert load_data(cfg).folder == folder and calls == [1]  # load_data does not build a second time


def test_good_cache_in_read_only_folder(tmp_path, corpus, monkeypatch):
    folder = prepare_data(_cfg(tmp_path, corpus))
    (folder / ".lock").unlink()
    monkeypatch.setattr(prep, "_locked", lambda f: pytest.fail("took the lock for a good cache"))
    assert prepare_data(_cfg(tmp_path, corpus, rebuild="never")) == folder
    assert load_data(_cfg(tmp_path, corpus)).folder == folder


def test_crash_mid_write_leaves_no_partial_files(tmp_path, corpus, monkeypatch):
    cfg = _cfg(tmp_path, corpus)
    real_write = TokenWriter.write
    n = {"calls": 0}

    def flaky(self, ids):
        n["calls"] += 1
        real_write(self, ids)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(TokenWriter, "write", flaky)
    with pytest.raises(DataError, match=r"could not write the token files in .* \(disk full \(simulated\)\); free space"):
        prepare_data(cfg)
    folder = prep.cache_folder(cfg)
    assert n["calls"] == 1
    assert not folder.exists() and list((tmp_path / "cache").iterdir()) == []  # no folder, lock, .bin or temp
    monkeypatch.undo()
    # a process killed with SIGKILL cannot clean up: its temp files are removed by the next build
    folder.mkdir(parents=True)
    (folder / ".lock").touch()
    (folder / ".train.bin.abc123.tmp").write_bytes(b"junk")
    assert prepare_data(cfg) == folder and len(load_data(cfg).train) > 0
    assert not list(folder.glob(".*.tmp"))


def test_jsonl_documents(tmp_path):
    root = tmp_path / "j"
    root.mkdir()
    rows = [{"body": f"document number {i}"} for i in range(10)]
    (root / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cfg = dict(
        name="local",
        paths=[str(root / "*.jsonl")],
        text_field="body",
        cache_dir=str(tmp_path / "c"),
        val_fraction=0.1,
        progress=False,
    )
    meta = json.loads((prepare_data(cfg) / "meta.json").read_text())
    assert sum(meta["documents"].values()) == 10
    td = load_data(cfg)
    assert int((np.asarray(td.train) == EOT_ID).sum() + (np.asarray(td.val) == EOT_ID).sum()) == 10
    with pytest.raises(ValueError, match=r"x.jsonl:1: no 'text' field \(set data.text_field"):
        prepare_data({**cfg, "text_field": "text"})


def test_long_document_cut_keeps_ids(monkeypatch):
    text = "".join(f"line {i} of a long document\n\n  indented {i}\nx = {i}\n" for i in range(3000))
    monkeypatch.setattr(prep, "_PIECE_CHARS", 1000)
    pieces = prep._pieces(text)
    assert len(pieces) > 10 and "".join(pieces) == text
    tok = get_tokenizer()
    assert [i for p in pieces for i in tok.encode(p).ids] == tok.encode(text).ids


def test_stdlib_subset(tmp_path):
    cfg = dict(name="stdlib", max_files=4, cache_dir=str(tmp_path / "c"), val_fraction=0.1, progress=False)
    folder = prepare_data(cfg)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["source_fingerprint"]["files"] == 4 and sum(meta["documents"].values()) == 4
    assert meta["tokens"]["train"] > 0 and meta["tokens"]["val"] > 0
    assert prep.cache_folder(cfg) == folder and "site-packages" not in meta["val_documents"][0]


def test_openwebtext_offline_is_one_clear_line(tmp_path, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Skylion007/openwebtext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        prepare_data(dict(name="openwebtext", cache_dir=str(tmp_path / "c"), progress=False))
    msg = str(e.value)
    assert "\n" not in msg and "could not download" in msg and "Skylion007/openwebtext" in msg
    assert "data=stdlib" in msg and "data=local" in msg and "data.cache_dir" in msg
    assert list((tmp_path / "c").iterdir()) == []  # the failed build's folder and .lock are gone


def test_openwebtext_pipeline_on_a_fake_dataset(tmp_path, monkeypatch):
    import datasets

    texts = [f"web page {i} says hello" for i in range(2100)]
    seen = {}

    def fake(name, config=None, **kw):
        seen.update(name=name, **kw)
        return datasets.Dataset.from_dict({"text": texts})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    cfg = dict(name="openwebtext", cache_dir=str(tmp_path / "c"), num_proc=1, progress=False)
    folder = prepare_data(cfg)
    meta = json.loads((folder / "meta.json").read_text())
    assert seen["name"] == "Skylion007/openwebtext" and seen["split"] == "train"
    assert meta["documents"] == {"train": 2098, "val": 2}  # test_size=0.0005 of 2100, rounded up
    assert meta["source_fingerprint"]["split_seed"] == 2357
    td = load_data(cfg)  # cached: no second "download"
    assert int((np.asarray(td.val) == EOT_ID).sum()) == 2 and int(td.train[-1]) == EOT_ID
    tok = get_tokenizer()
    assert tok.decode(np.asarray(td.val[:-1]).tolist()).startswith("web page ")


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(name="wikipedia"), "data.name='wikipedia': use stdlib, local or openwebtext"),
        (dict(val_fraction=0.0), r"data.val_fraction=0.0 must be a number > 0 and < 1"),
        (dict(val_fraction=1.5), r"data.val_fraction=1.5 must be a number > 0 and < 1"),
        (dict(max_files=1), "data.max_files=1 must be an integer >= 2"),
        (dict(num_proc=0), "data.num_proc=0 must be an integer >= 1"),
        (dict(rebuild="sometimes"), "data.rebuild='sometimes': use auto, always or never"),
        (dict(paths=[]), "data=local needs files"),
        (dict(paths=["/nonexistent/*.txt"]), "matches no files"),
    ],
)
def test_bad_config(tmp_path, corpus, kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        prepare_data(_cfg(tmp_path, corpus, **kw))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists()  # nothing written before the error


def test_single_document_is_refused(tmp_path):
    (tmp_path / "one.txt").write_text("only one")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="at least 2 non-empty documents"):
        prepare_data(dict(name="local", paths=[str(tmp_path / "*.txt")], cache_dir=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists()  # refused before a cache folder (or its .lock) exists


def test_config_files(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))
    for name in ("stdlib", "local", "openwebtext"):
        path = REPO / "configs" / "data" / f"{name}.yaml"
        cfg = OmegaConf.load(path)
        assert cfg.name == name and cfg.cache_dir == str(tmp_path)
        keys = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith((" ", "#"))]
        assert all("#" in ln for ln in keys), f"{path}: every key needs a comment"
    monkeypatch.delenv("LONGCTX_CACHE")
    assert OmegaConf.load(REPO / "configs/data/stdlib.yaml").cache_dir == "~/.cache/longctx"


def test_prepare_script(tmp_path, corpus):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mini.yaml").write_text("defaults:\n  - _self_\n  - data: stdlib\n")
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "prepare_data.py"),
        "-cd",
        str(tmp_path / "cfg"),
        "-cn",
        "mini",
        "data=local",
        f"data.paths=[{corpus}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    out = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "data=local prepared in" in out.stdout and "train.bin" in out.stdout and "tokens" in out.stdout
    bad = subprocess.run(
        cmd[:-4] + ["data.paths=[nope/*.txt]", f"hydra.run.dir={tmp_path / 'run'}"],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 1 and "error: data.paths: 'nope/*.txt' matches no files" in bad.stderr


def test_unwritable_cache_dir_is_one_line(tmp_path, corpus):
    (tmp_path / "f").write_text("a file, not a folder")
    with pytest.raises(DataError, match=r"cannot create the data cache folder .*; set data.cache_dir") as e:
        prepare_data(_cfg(tmp_path, corpus, cache_dir=str(tmp_path / "f" / "c")))
    assert "\n" not in str(e.value)


def test_token_files_readable_by_others(tmp_path, corpus):
    """A shared cache: files get 0666 minus the umask (mkstemp alone would make them 0600)."""
    old = os.umask(0o022)
    try:
        folder = prepare_data(_cfg(tmp_path, corpus))
    finally:
        os.umask(old)
    for name in ("train.bin", "val.bin", "meta.json", "verified.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o644, name
