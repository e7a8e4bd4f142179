"""scripts/bench_training.py on the CPU at a toy size, end to end: worker processes that warm up
together and are timed one by one, variants, a Hugging Face row (when transformers is
installed), JSON and the table. The numbers mean nothing on a CPU; the code paths are the GPU ones."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_training", ROOT / "scripts" / "bench_training.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_quick_end_to_end(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "b.json"
    rc = bench.main(["--quick", "--impls", "sdpa,hf_sdpa", "--seq-lens", "64",
                     "--variant", "plainloss:loss_chunk_tokens=0,defer=0",
                     "--set", "compile=false", "--only", "hf_sdpa=64", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["complete"] is True
    rows = {r["name"]: r for r in data["results"]}
    assert set(rows) == {"sdpa/plainloss", "hf_sdpa"}
    r = rows["sdpa/plainloss"]
    assert r["status"] == "ok", r
    assert r["tokens_per_s"] > 0 and r["micro_batch"] == 2 and r["accum"] == 2 and r["mfu"] is None
    assert "train.micro_batch=2" in r["overrides"] and r["compile"] == "False" and r["loss_chunk_tokens"] == 0
    assert r["defer"] is False
    assert 9 < r["loss"] < 12  # ~ln(50257): an untrained model on random tokens
    hf_ok = "ok" if importlib.util.find_spec("transformers") else "skipped"
    assert rows["hf_sdpa"]["status"] == hf_ok, rows["hf_sdpa"]  # model.backend=hf_sdpa, same train_step
    text = capsys.readouterr().out
    assert "hf_sdpa" in text and "tokens/s" in text


def test_bench_rejects_unknown_impl(capsys):
    assert _load().main(["--impls", "flashy", "--quick"]) == 2
    assert "flashy" in capsys.readouterr().err
