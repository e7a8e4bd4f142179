"""Smoke tests of the attention benchmarks on the CPU (Triton interpreter, toy sizes).

They run the scripts' real code paths (worker processes, crash recovery, time budget, JSON,
tables, PNG) on sizes that take seconds; the numbers themselves mean nothing on a CPU.
"""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import bench_attention  # noqa: E402
import bench_block_sparse  # noqa: E402

KERNEL_PRESENT = importlib.util.find_spec("longctx.kernels.flash") is not None
STATUSES = {"ok", "OOM", "n/a", "error", "crash", "timeout", "skipped"}


def _finite_numbers(obj, path="$"):
    if isinstance(obj, float):
        assert math.isfinite(obj), f"{path} = {obj}"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite_numbers(v, f"{path}[{i}]")


def _check_timed(r, modes):
    for mode in modes:
        m = r[mode]
        assert m["ms"] > 0 and m["reps"] >= 1, (r["method"], mode, m)


CRASHING_WORKER = """
import os, sys
sys.path.insert(0, {scripts!r})
import bench_attention
real = bench_attention.make_forward


def make_forward(method, *args, **kwargs):
    if method == "sdpa_math":
        os._exit(3)  # the worker dies mid-case, as after a CUDA illegal memory access
    return real(method, *args, **kwargs)


bench_attention.make_forward = make_forward
sys.exit(bench_attention.main())
"""


def test_bench_attention_smoke_with_a_crashing_worker(tmp_path, monkeypatch, capsys):
    # Workers run a copy of the script whose sdpa_math cases kill the process: that case is
    # reported as a crash, its larger N is skipped, a fresh worker runs everything else.
    wrapper = tmp_path / "crashing_bench_attention.py"
    wrapper.write_text(CRASHING_WORKER.format(scripts=str(REPO / "scripts")))
    monkeypatch.setattr(bench_attention, "__file__", str(wrapper))  # the worker command runs this file
    out = tmp_path / "attn.json"
    rc = bench_attention.main(["--smoke", "--seqlens", "48,64", "--out", str(out), "--markdown"])
    assert rc == 0
    data = json.loads(out.read_text())
    _finite_numbers(data)
    assert data["complete"] is True
    assert data["env"]["device"] in ("cpu", "cuda") and data["env"]["torch"]
    res = data["results"]
    assert len(res) == 2 * 2 * len(bench_attention.SMOKE_METHODS)  # causal x N x methods
    assert {r["status"] for r in res} <= STATUSES
    by = {(r["group"], r["n"], r["method"]): r for r in res}
    for causal in ("smoke/causal", "smoke/noncausal"):
        for n in (48, 64):
            for m in ("naive", "sdpa_flash"):  # run on any machine
                r = by[(causal, n, m)]
                assert r["status"] == "ok", r
                _check_timed(r, ("fwd", "bwd", "fwdbwd"))
                assert r["check_ok"] and r["check"]["out"] < 1e-4 and r["check"]["dq"] < 1e-4
            if KERNEL_PRESENT:
                r = by[(causal, n, "ours")]
                assert r["status"] == "ok", r
                _check_timed(r, ("fwd", "bwd", "fwdbwd"))
                assert r["check_ok"], r["check"]
                assert max(r["check"][k] for k in ("out", "dq", "dk", "dv")) < 1e-4
            else:
                assert by[(causal, n, "ours")]["status"] in ("n/a", "error")
    # the first sdpa_math case of each table crashes, the later one is skipped
    crashed = [r for r in res if r["method"] == "sdpa_math" and r["status"] == "crash"]
    assert [(r["group"], r["n"]) for r in crashed] == [("smoke/causal", 48), ("smoke/noncausal", 48)]
    assert crashed[0]["reason"].startswith("worker died (exit 3)")
    assert by[("smoke/causal", 64, "sdpa_math")]["reason"] == "skipped (crash at N=48)"
    # tables, markdown, plots
    assert len(data["tables"]) == 2 and data["tables"][0]["tflops_rows"]
    md = out.with_suffix(".md").read_text()
    assert "| N | B | ours | naive |" in md
    assert data["plots"] and all(Path(p).stat().st_size > 1000 for p in data["plots"])
    assert "cases ok" in capsys.readouterr().out


@pytest.mark.parametrize("layout,n,density", [("local", "128", "1/2"), ("bigbird", "512", "1/4")])
def test_bench_block_sparse_smoke(tmp_path, layout, n, density):
    out = tmp_path / "bs.json"
    rc = bench_block_sparse.main(["--smoke", "--seqlens", n, "--densities", density, "--no-isolate",
                                  "--layout", layout, "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    _finite_numbers(data)
    assert data["complete"] is True
    res = {r["method"]: r for r in data["results"]}
    assert set(res) == {"dense", "ours", "flex"}
    # flex's converted block mask has the same full/partial blocks as create_block_mask's
    assert res["flex"]["check"]["flex_blocks_match"] is True
    if res["flex"]["status"] != "ok":
        assert res["flex"]["status"] == "n/a"
    assert 0 < res["ours"]["density"] < 1 and res["ours"]["window_blocks"] >= 0
    if KERNEL_PRESENT:
        for m in ("dense", "ours"):
            assert res[m]["status"] == "ok", res[m]
            _check_timed(res[m], ("fwd", "fwdbwd"))
            assert res[m]["check_ok"] and res[m]["check"]["out"] < 1e-4
    table = data["table"]
    assert table["rows"] and table["rows"][0][2] == density
    assert data["plots"] and Path(data["plots"][0]).stat().st_size > 1000


def test_time_budget_skips_instead_of_running(tmp_path):
    out = tmp_path / "b.json"
    rc = bench_attention.main(["--smoke", "--max-minutes", "0.01", "--no-isolate", "--no-plot",
                               "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    assert res and all(r["status"] == "skipped" and r["reason"] == "skipped (time budget)" for r in res)


def test_flex_block_mask_conversion_matches_layout():
    torch = pytest.importorskip("torch")
    from longctx.kernels import block_mask as kbm
    bm = kbm.bigbird_mask(640, 640, window_blocks=1, global_blocks=1, random_blocks=1, seed=3,
                          block_m=64, block_n=64, causal=True)
    fbm = bench_attention.to_flex_block_mask(bm, "cpu")
    assert bench_attention.flex_structure_matches(bm, fbm, "cpu")
    kept = torch.zeros(10, 10, dtype=torch.bool)
    for num, idx in ((fbm.kv_num_blocks, fbm.kv_indices), (fbm.full_kv_num_blocks, fbm.full_kv_indices)):
        for r in range(10):
            kept[r, idx[0, 0, r, : int(num[0, 0, r])].long()] = True
    assert torch.equal(kept, bm.layout[0])


def test_bad_arguments_fail_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        bench_attention.main(["--smoke", "--methods", "ours,bogus"])
    assert e.value.code == 2 and "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_block_sparse.main(["--smoke", "--densities", "2"])
