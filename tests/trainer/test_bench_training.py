"""scripts/bench_training.py on the CPU at a toy size: one case in-process, one through a worker
subprocess, the table. The numbers mean nothing on a CPU; the code paths are the GPU ones."""
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


def test_bench_case_and_table(tmp_path):
    bench = _load()
    case = {"model": "gpt2_tiny", "seq_len": 32, "micro_batch": 2, "impl": "naive", "device": "cpu",
            "warmup": 1, "steps": 1, "compile": False}
    res = bench.run_case(case)
    assert res["status"] == "ok" and res["tokens_per_s"] > 0 and res["mfu"] is None
    res2 = bench._spawn({**case, "impl": "sdpa"}, timeout=120)  # the isolated-worker path
    assert res2["status"] == "ok", res2
    rows = [{**case, **res}, {**case, "impl": "hf_eager", "status": "skipped"}]
    text = bench.table(rows)
    assert "naive" in text and "skipped" in text
    out = tmp_path / "b.json"

    class A:
        pass

    bench._write(str(out), rows, A())
    assert json.loads(out.read_text())["results"][0]["impl"] == "naive"


def test_bench_rejects_unknown_impl(capsys):
    assert _load().main(["--impls", "flashy", "--quick"]) == 2
    assert "flashy" in capsys.readouterr().err
