"""Token files are verified against what was recorded when they were written: CRC-32 per chunk of
token bytes, every id < 50257. Bad bytes (size unchanged) are found before training: rebuilt
(data.rebuild=auto) or refused in one line (never); a passed check is remembered per file version."""
import json
import os
import shutil

import longctx.data.tokenfile as tf
import numpy as np
import pytest
from longctx.data import VOCAB_SIZE, CacheError, load_data, prepare_data
from longctx.data.tokenfile import HEADER_BYTES, TokenWriter, verify_tokens

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


@pytest.fixture
def cfg(tmp_path):
    root = tmp_path / "text"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        (root / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS, 400)) + "\n")
    return {"name": "local", "paths": [str(root)], "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.25,
            "num_proc": 1, "progress": False}


def _flip(path, index, value=None):
    """Overwrite token `index` (keeps the size; mtime and ctime change as with any write)."""
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 2 * index)
        old = int.from_bytes(f.read(2), "little")
        f.seek(HEADER_BYTES + 2 * index)
        f.write(int(old ^ 0x0101 if value is None else value).to_bytes(2, "little"))


def _recompute_checksum(folder, split):
    """Make meta.json agree with the bytes (as a buggy tool that wrote bad ids and their CRC would)."""
    meta = json.loads((folder / "meta.json").read_text())
    ids = np.fromfile(folder / f"{split}.bin", dtype="<u2", offset=HEADER_BYTES)
    w = TokenWriter(folder / "scratch.bin", meta["tokenizer"])
    w.write(ids)
    meta["checksums"][split] = w.checksum()
    w.abort()
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("split", ["train", "val"])
def test_flipped_bytes_refused_or_rebuilt(cfg, split):
    folder = prepare_data(cfg)
    good = (folder / f"{split}.bin").read_bytes()
    size = len(good)
    _flip(folder / f"{split}.bin", 37)
    assert (folder / f"{split}.bin").stat().st_size == size
    with pytest.raises(CacheError, match=rf"{split}.bin: checksum mismatch in bytes 256\.\.{size} \(chunk 1 of 1\)") as e:
        prepare_data({**cfg, "rebuild": "never"})
    assert "\n" not in str(e.value) and "data.rebuild=auto" in str(e.value)
    td = load_data(cfg)  # rebuild=auto: rebuilt, identical to the first build
    assert (folder / f"{split}.bin").read_bytes() == good and len(td.train) > 0


@pytest.mark.parametrize("bad_id", [VOCAB_SIZE, 50303, 65535])
def test_ids_outside_the_vocabulary_refused(cfg, bad_id):
    folder = prepare_data(cfg)
    _flip(folder / "train.bin", 5, bad_id)
    _recompute_checksum(folder, "train")  # the checksum matches: only the id-range check can see it
    with pytest.raises(CacheError, match=rf"train.bin: token 5 has id {bad_id}, not below the vocabulary size 50257"):
        prepare_data({**cfg, "rebuild": "never"})
    assert int(load_data(cfg).train[5]) < VOCAB_SIZE  # auto: rebuilt


def test_writer_refuses_ids_outside_the_vocabulary(tmp_path):
    w = TokenWriter(tmp_path / "t.bin", "00" * 32, VOCAB_SIZE)
    with pytest.raises(ValueError, match="token id 50257 is not below the vocabulary size 50257"):
        w.write(np.array([1, 50257], dtype=np.uint16))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_chunked_checksums_name_the_bad_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(tf, "CHUNK_BYTES", 64)  # 32 tokens per CRC
    ids = np.arange(1000, dtype=np.uint16)
    with TokenWriter(tmp_path / "t.bin", "00" * 32, VOCAB_SIZE) as w:
        for part in np.array_split(ids, 7):  # writes that straddle chunk boundaries
            w.write(part)
    sums = w.checksum()
    assert len(sums["crc32"]) == 32 and sums["max_id"] == 999  # ceil(2000 / 64)
    import zlib
    raw = ids.astype("<u2").tobytes()
    assert sums["crc32"] == [zlib.crc32(raw[i:i + 64]) for i in range(0, len(raw), 64)]
    tf._verified_here.clear()
    (tmp_path / "verified.json").unlink()
    assert verify_tokens(tmp_path / "t.bin", sums, VOCAB_SIZE, threads=2) is None
    _flip(tmp_path / "t.bin", 100)  # token 100 = byte 200 = chunk 4 (1-based)
    assert "chunk 4 of 32" in verify_tokens(tmp_path / "t.bin", sums, VOCAB_SIZE)


def test_verified_once_per_file_version(cfg, monkeypatch):
    folder = prepare_data(cfg)
    stamp = json.loads((folder / "verified.json").read_text())
    assert set(stamp) == {"train.bin", "val.bin"}  # stamped by the writer: no re-read after a build
    calls = []
    real = tf._check_chunk
    monkeypatch.setattr(tf, "_check_chunk", lambda *a: calls.append(a[1]) or real(*a))
    tf._verified_here.clear()
    load_data(cfg)
    assert calls == []  # same size, mtime, ctime, inode: not hashed again
    # a copy of the folder (another inode and ctime, even with the mtime kept) is hashed once
    copy = folder.parent / "copy"
    shutil.copytree(folder, copy, copy_function=shutil.copy2)
    sums = json.loads((copy / "meta.json").read_text())["checksums"]["train"]
    assert verify_tokens(copy / "train.bin", sums, VOCAB_SIZE) is None and calls == [0]
    assert verify_tokens(copy / "train.bin", sums, VOCAB_SIZE) is None and calls == [0]
    # a changed file with its old mtime put back is still caught (ctime cannot be set back)
    st = os.stat(copy / "train.bin")
    _flip(copy / "train.bin", 3)
    os.utime(copy / "train.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    tf._verified_here.clear()
    assert "checksum mismatch" in verify_tokens(copy / "train.bin", sums, VOCAB_SIZE)


def test_cache_without_checksums_is_rebuilt(cfg):
    folder = prepare_data(cfg)
    meta = json.loads((folder / "meta.json").read_text())
    meta["version"] = 1
    del meta["checksums"]
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="meta.json version 1, expected 2"):
        prepare_data({**cfg, "rebuild": "never"})
    assert "checksums" in json.loads((prepare_data(cfg) / "meta.json").read_text())


def test_batches_never_carry_ids_outside_the_vocabulary(cfg):
    """A file changed under a running job: the batch says so instead of an IndexError in the model."""
    td = load_data(cfg)
    path = td.folder / "train.bin"
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES)
        f.write(np.full(len(td.train), 50300, dtype="<u2").tobytes())
    with pytest.raises(CacheError, match="token id 50300 is not below the vocabulary size 50257.*data.rebuild=always"):
        td.train_batch(0, seed=0, seq_len=16, micro_batch=2)


def test_binary_and_non_utf8_files_skipped_with_a_count(cfg, tmp_path, caplog):
    root = tmp_path / "text"
    (root / "blob.txt").write_bytes(bytes(range(256)) * 4)  # NUL bytes
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 20)
    with caplog.at_level("WARNING"):
        folder = prepare_data(cfg)
    assert "skipped 2 of 10 files that are not UTF-8 text" in caplog.text
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["skipped_files"]["count"] == 2 and sum(meta["documents"].values()) == 8
    assert sorted(os.path.basename(p) for p in meta["skipped_files"]["paths"]) == ["blob.txt", "latin1.txt"]
    # nothing but binaries: refused in one line, before any cache folder exists
    only = tmp_path / "bin"
    only.mkdir()
    for i in range(3):
        (only / f"b{i}.txt").write_bytes(b"\x00\xff" * 100)
    with pytest.raises(ValueError, match="none of the 3 non-empty files is UTF-8 text") as e:
        prepare_data({**cfg, "paths": [str(only)], "cache_dir": str(tmp_path / "c2")})
    assert "\n" not in str(e.value) and not (tmp_path / "c2").exists()
