"""scripts/reproduce.py at --scale smoke on the CPU: every table through the real commands
(train.py, bench_attention.py, eval_longdoc.py as subprocesses), a failed row, continuing after an
interruption, the paper-scale commands, the memory-probe arithmetic and bad input.

One smoke run of `all` is shared by the assertions (module fixture); the numbers mean nothing on a
CPU, the code paths are the GPU ones."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import reproduce

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def state(out: Path, table: str) -> dict:
    return json.loads((out / table / f"{table}.json").read_text())


def last_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`reproduce.py all --scale smoke` where table4's ctx64 is interrupted after 2 of its 4 steps (its
    checkpoint stays, the row is left unfinished) and ctx128 fails (a bad learning rate)."""
    base = tmp_path_factory.mktemp("repro")
    mp = pytest.MonkeyPatch()
    mp.setenv("LONGCTX_CACHE", str(base / "cache"))  # token cache of this module only
    real_rows, real_run = reproduce.Table4.rows, reproduce.run_process

    def rows_with_a_bad_one(self, ctx):
        rows = real_rows(self, ctx)
        rows[1].argv = [*rows[1].argv, "train.lr=-1"]
        return rows

    def interrupted_after_two_steps(argv, log_path, *a, **kw):
        if log_path.name != "ctx64.log":
            return real_run(argv, log_path, *a, **kw)
        rc, tail, _ = real_run([*argv, "max_steps=2", "train.decay_steps=4"], log_path, *a, **kw)
        return rc, tail, "interrupted"  # as if Ctrl-C had stopped it there

    mp.setattr(reproduce.Table4, "rows", rows_with_a_bad_one)
    mp.setattr(reproduce, "run_process", interrupted_after_two_steps)
    rc = reproduce.main(["all", "--scale", "smoke", "--out", str(base / "out")])
    mp.setattr(reproduce.Table4, "rows", real_rows)
    mp.setattr(reproduce, "run_process", real_run)
    yield {"out": base / "out", "rc": rc}
    mp.undo()


def test_every_table_written_with_real_commands(smoke):
    out = smoke["out"]
    assert smoke["rc"] == reproduce.EXIT_STOPPED  # one row left unfinished (and one failed) on purpose
    for table in reproduce.TABLE_ORDER:
        st = state(out, table)
        assert st["scale"] == "smoke" and st["env"]["torch"] and st["env"]["date"]
        md = (out / table / f"{table}.md").read_text()
        assert "## Commands" in md and "## Protocol" in md
        for key, row in st["rows"].items():
            assert row["status"] in ("done", "failed", "skipped") or (table, key) == ("table4", "ctx64"), row
            if row["status"] == "failed":
                assert row["error"] and "\n" not in row["error"]
        if any(r["status"] == "done" for r in st["rows"].values()):
            assert (out / table / f"{table}.png").stat().st_size > 5000, table

    # table 4: the failed row is marked with the error's line, the others ran; results = metrics.jsonl
    t4 = state(out, "table4")
    assert {k: r["status"] for k, r in t4["rows"].items()} == {"ctx64": "pending", "ctx128": "failed", "ctx256": "done"}
    assert "train.lr" in t4["rows"]["ctx128"]["error"] and t4["rows"]["ctx128"]["error"].startswith("error:")
    assert (out / "table4" / "runs" / "ctx64" / "checkpoints" / "step_0000002").is_dir()  # kept to continue
    for key in ("ctx256",):
        row, run_dir = t4["rows"][key], out / "table4" / "runs" / key
        assert row["command"].startswith("python train.py ") and f"run_dir={run_dir} resume=auto" in row["command"]
        m = last_metrics(run_dir)
        assert row["result"]["val_loss"] == m["val_loss"] and row["result"]["tokens"] == 4 * 1024 == m["tokens"]
        assert row["result"]["train_s"] > 0 and row["result"]["tokens_per_s"] > 0
        assert not (run_dir / "checkpoints").exists()  # pruned once recorded: the out dir stays small
    md = (out / "table4" / "table4.md").read_text()
    assert "| 64 | not run yet |" in md and "| 128 | failed: error:" in md and "4096, 17.5, 3.6" in md

    # table 2: every backend through the same train.py, the speed-up column against ours
    t2 = state(out, "table2")
    assert list(t2["rows"]) == ["small_ours", "small_hf_eager", "small_hf_sdpa"]
    assert "model.backend=hf_eager" in t2["rows"]["small_hf_eager"]["command"]
    for key, row in t2["rows"].items():
        if key == "small_ours" or HAS_TRANSFORMERS:
            assert row["status"] == "done", row
            assert row["result"]["tokens"] == 3 * 512
        else:
            assert row["status"] == "failed" and "needs transformers" in row["error"]
    md = (out / "table2" / "table2.md").read_text()
    assert "HF 9.5 days (3.5x)" in md and "1.00x" in md

    # block-sparse: three layouts trained; the GPU memory probes are skipped (not passed) on a CPU
    bs = state(out, "blocksparse")
    for layout in ("dense", "local", "bigbird"):
        assert bs["rows"][layout]["status"] == "done", bs["rows"][layout]
        assert bs["rows"][f"probe_{layout}"]["status"] == "skipped"
    assert "attention.layout=bigbird" in bs["rows"]["bigbird"]["command"]
    md = (out / "blocksparse" / "blocksparse.md").read_text()
    assert "| local | 0." in md and "n/a: no GPU memory" in md

    # figure 3: bench_attention.py's own JSON, read back per N and method
    f3 = state(out, "figure3")["rows"]["bench"]
    assert f3["status"] == "done", f3
    assert set(f3["result"]["by_n"]) == {"32", "64"}
    assert f3["result"]["by_n"]["64"]["naive"]["status"] == "ok"
    assert (out / "figure3" / "bench" / "attention.json").is_file()

    # table 5: eval_longdoc.py when present; otherwise a clean failed row
    t5 = state(out, "table5")["rows"]["offline"]
    if not (ROOT / "scripts" / "eval_longdoc.py").is_file():
        assert t5["status"] == "failed" and "scripts/eval_longdoc.py not found" in t5["error"]


def test_continue_after_interruption(smoke, capsys):
    """The same command again: the finished row is skipped, the failed one reruns, and the interrupted
    ctx64 continues from its step-2 checkpoint (resume=auto in its fixed run_dir) to step 4."""
    out = smoke["out"]
    rc = reproduce.main(["table4", "--scale", "smoke", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    assert "[table4 3/3] ctx256: done earlier, skipped" in text
    assert "ctx64: continuing from its newest checkpoint" in text
    last_attempt = (out / "table4" / "logs" / "ctx64.log").read_text().split("\n==== ")[-1]
    assert "resumed from" in last_attempt and "step_0000002 (step 2)" in last_attempt
    assert "step 3/4" in last_attempt and "step 1/4" not in last_attempt
    steps = [json.loads(x)["step"] for x in (out / "table4/runs/ctx64/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the two attempts together, no step twice
    st = state(out, "table4")
    assert all(r["status"] == "done" for r in st["rows"].values())
    assert st["rows"]["ctx64"]["result"]["val_loss"] == last_metrics(out / "table4/runs/ctx64")["val_loss"]
    assert st["rows"]["ctx64"]["attempts"] == 2 and st["rows"]["ctx256"]["attempts"] == 1
    assert st["rows"]["ctx128"]["attempts"] == 2 and "train.lr=-1" not in st["rows"]["ctx128"]["command"]
    assert (out / "table4" / "table4.png").stat().st_size > 5000
    md = (out / "table4" / "table4.md").read_text()
    assert "| 64 | **" in md and "1024, 18.2, 2.7" in md and "Trend: perplexity" in md


def test_paper_and_small_commands_compose(tmp_path, capsys):
    """Every training command of --scale paper and small is a valid train.py config (presets exist)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    assert reproduce.main(["all", "--scale", "paper", "--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "torchrun --standalone --nproc_per_node=8 train.py experiment=gpt2_small_owt_16k" in printed
    assert "scripts/eval_longdoc.py task=ecthr_a init_from=gpt2" in printed
    env = {"gpu": "test GPU", "gpu_mem_bytes": 141e9}
    for scale, corpus in (("paper", None), ("small", reproduce.small_corpus(524288))):
        ctx = reproduce.Ctx(scale, tmp_path, [], 8 if scale == "paper" else 1, env, corpus)
        for name in ("table4", "table2", "blocksparse"):
            for row in reproduce.TABLES[name].rows(ctx):
                if row.argv is None:
                    continue
                over = row.argv[row.argv.index("train.py") + 1:]
                GlobalHydra.instance().clear()
                with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
                    cfg = compose(config_name="config", overrides=over)
                assert cfg.resume == "auto" and str(cfg.run_dir).endswith(f"{name}/runs/{row.key}")
                if scale == "paper":
                    assert cfg.data.name == "openwebtext" and cfg.train.global_batch_tokens == 524288
                if name == "table4":
                    assert cfg.seq_len == row.label["seq_len"]
    GlobalHydra.instance().clear()


def test_probe_estimate_and_failure_lines():
    gpu, seq, micro, a = 141e9, 8192, 2, 0.9e6  # 0.9 MB of activations per token
    p = reproduce.gpt2_params(12, 768, seq)
    assert reproduce.gpt2_params(12, 768, 1024) == 124_475_904  # gpt2_small as configs/model says
    peak = reproduce.BYTES_PER_PARAM * p + a * micro * seq
    est = reproduce.estimate_max_context(peak, micro * seq, seq, 1, 12, 768, gpu)
    assert est["act_bytes_per_token"] == pytest.approx(a)
    L = est["estimate"]  # at L the modelled memory meets the usable share of the GPU
    used = reproduce.BYTES_PER_PARAM * reproduce.gpt2_params(12, 768, L) + a * L
    assert used == pytest.approx(reproduce.USABLE_MEMORY * gpu, rel=1e-5)
    assert est["probe_len"] % 8192 == 0 and L - 8192 < est["probe_len"] <= L

    ctx = reproduce.Ctx("small", Path("/tmp/x"), [], 1, {"gpu_mem_bytes": gpu}, None)
    probe = next(r for r in reproduce.BlockSparse().rows(ctx) if r.key == "probe_local")
    argv, why = probe.make_argv({"local": {"mem_gb": peak / 1e9, "micro_batch": micro}})
    assert why is None and f"seq_len={est['probe_len']}" in argv and "attention.layout=local" in argv
    assert {"max_steps=1", "train.micro_batch=1", "eval_tokens=0", "parallel=single"} <= set(argv)
    assert probe.make_argv({})[0] is None  # the training row must finish first
    oom = "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB\n"
    assert probe.expect_failure(oom) == {"fits": False, "error": oom.splitlines()[-1]}
    assert probe.expect_failure("error: seq_len=0 must be a positive integer\n") is None
    cpu = reproduce.Ctx("smoke", Path("/tmp/x"), [], 1, {}, None)
    with pytest.raises(reproduce.SkipRow):
        next(r for r in reproduce.BlockSparse().rows(cpu) if r.key == "probe_dense").make_argv({"dense": {}})
    assert reproduce.error_line("x\nTraceback\n  File y\nValueError: bad thing\n\n") == "ValueError: bad thing"


def test_metrics_summary_and_overrides(tmp_path):
    """train_summary against hand-computed values; `--set max_steps=N` (the last key=) is what a row reaches."""
    rows = [{"step": 2, "loss": 5.0, "tokens": 200, "tokens_per_s": 10.0, "mfu": None, "mem_gb": 1.5},
            {"step": 4, "loss": 4.0, "tokens": 400, "tokens_per_s": 20.0, "mfu": None, "mem_gb": 2.5,
             "val_loss": 4.5, "val_ppl": 90.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    s = reproduce.train_summary(tmp_path, 4)
    assert s["train_s"] == pytest.approx(200 / 10 + 200 / 20)  # 2 steps of 100 tokens at each speed
    assert s["tokens_per_s"] == 20.0 and s["mem_gb"] == 2.5 and s["val_ppl"] == 90.0 and s["tokens"] == 400
    with pytest.raises(reproduce.RowError, match="stopped at step 4 of 6"):
        reproduce.train_summary(tmp_path, 6)
    assert reproduce._arg_int(["x", "max_steps=136", "log_every=4", "max_steps=3"], "max_steps") == 3


def test_bad_input_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["table9", "--scale", "smoke"])
    assert e.value.code == 2 and "unknown table 'table9'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        reproduce.main(["table4", "--scale", "small", "--set", "nonsense"])
    assert e.value.code == 2 and "--set 'nonsense': expected KEY=VALUE" in capsys.readouterr().err
    (tmp_path / "table4").mkdir()
    (tmp_path / "table4" / "table4.json").write_text(json.dumps({"scale": "small", "rows": {}}))
    with pytest.raises(SystemExit) as e:
        reproduce.main(["table4", "--scale", "smoke", "--out", str(tmp_path), "--dry-run"])
    assert "holds a --scale small reproduction" in str(e.value.code)


@pytest.mark.parametrize("table", ["table4", "table2", "blocksparse"])
def test_committed_results_render(table, tmp_path):
    """The GPU results under docs/results/reproduce/ (TABLE.json, the state a run continues from)
    still render to the committed TABLE.md byte for byte, and to a plot."""
    st = json.loads((ROOT / "docs/results/reproduce" / f"{table}.json").read_text())
    ctx = reproduce.Ctx(st["scale"], tmp_path, [], 1, st["env"])
    md = reproduce.render(reproduce.TABLES[table], st, ctx)
    assert md == (ROOT / "docs/results/reproduce" / f"{table}.md").read_text()
    assert reproduce.TABLES[table].plot(st, tmp_path / "t.png") is None and (tmp_path / "t.png").stat().st_size > 5000
