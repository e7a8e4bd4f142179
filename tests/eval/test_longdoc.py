"""Long-document classification: exact last-token pooling, F1 against hand-computed values, the
tasks (offline, local, mimic csv, Hugging Face), eval_longdoc end to end with resume, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from longctx.data.tasks import TaskError, load_task, strip_source
from longctx.model import GPT, GPTConfig
from longctx.model.classify import GPTClassifier, predict, scores

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# four small standard-library packages: the offline task at toy size, built in about a second
SMALL = {"task.packages": "[json,http,logging,urllib]", "task.doc_tokens": 128, "task.max_doc_tokens": 128,
         "task.train_per_class": 12, "task.test_per_class": 6}


def _eval_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_longdoc", ROOT / "scripts" / "eval_longdoc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compose_eval(overrides: dict):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="eval_longdoc", overrides=[f"{k}={v}" for k, v in overrides.items()])


def tiny_overrides(tmp_path: Path, **kw) -> dict:
    o = {"model": "gpt2_tiny", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64, "attention": "sdpa",
         "device": "cpu", "logger": "none", "seq_lens": "[32,64]", "out_dir": str(tmp_path / "out"),
         "cache_dir": str(tmp_path.parent / "longdoc_cache"), "progress": False, "log_every": 4,
         "train.batch_size": 8, "epochs": 1, "train.lr": 1e-3, **SMALL}
    o.update(kw)
    return o


# ---- pooling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["last", "mean"])
def test_pooling_ignores_right_padding(pool):
    torch.manual_seed(0)
    clf = GPTClassifier(GPT(GPTConfig(seq_len=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32, attn_impl="sdpa")),
                        num_labels=3, pool=pool).eval()
    docs = [torch.randint(0, 97, (n,)) for n in (5, 17, 32)]
    x = torch.full((3, 32), 96)  # right padding with an arbitrary id
    for i, d in enumerate(docs):
        x[i, :len(d)] = d
    with torch.no_grad():
        batched = clf.pooled(x, torch.tensor([5, 17, 32]))
        for i, d in enumerate(docs):
            alone = clf.pooled(d[None], torch.tensor([len(d)]))  # no padding at all
            assert (batched[i] - alone[0]).abs().max() <= 1e-5
        # a different pad id changes nothing either
        x2 = x.clone()
        x2[0, 5:] = 3
        assert torch.equal(clf.pooled(x2, torch.tensor([5, 17, 32]))[0], batched[0])
        # chunk mode: a 40-token document as chunks of 16, 16, 8 -> the mean of the three pooled states
        d = torch.randint(0, 97, (40,))
        xs = torch.zeros(3, 16, dtype=torch.long)
        xs[0], xs[1], xs[2, :8] = d[:16], d[16:32], d[32:]
        logits = clf(xs, torch.tensor([16, 16, 8]), torch.tensor([0, 0, 0]), 1)
        parts = [clf.pooled(d[a:b][None], torch.tensor([b - a])) for a, b in ((0, 16), (16, 32), (32, 40))]
        assert torch.allclose(logits, clf.head(torch.cat(parts).mean(0, keepdim=True)), atol=1e-5)
        # against the trunk's hidden states written out here: the last real state, or their plain mean
        g = clf.gpt
        h = g.ln_f(g.blocks[1](g.blocks[0](g.wte(docs[1][None]) + g.wpe(torch.arange(17)))))[0]
        want = h[-1] if pool == "last" else h.sum(0) / 17
        assert (batched[1] - want).abs().max() <= 1e-5


# ---- scores -------------------------------------------------------------------------------------
def test_f1_multi_label_hand_computed():
    gold = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    pred = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    # label 0: TP 2 FP 0 FN 0 -> F1 1;  label 1: TP 1 FN 1 -> 2/3;  label 2: TP 0 FP 2 FN 1 -> 0;
    # label 3: never gold, never predicted -> left out of the macro mean.
    # micro: TP 3, FP 2, FN 2 -> 6 / 10.  No document has its exact label set -> accuracy 0.
    s = scores(pred, gold)
    assert s["micro_f1"] == pytest.approx(0.6)
    assert s["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert s["accuracy"] == 0.0
    assert scores(gold, gold) == {"micro_f1": 1.0, "macro_f1": 1.0, "accuracy": 1.0}


def test_f1_single_label_and_majority_hand_computed():
    gold = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2]), 3).bool()
    logits = torch.tensor([[3.0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 5, 0]])  # argmax 0, 2, 2, 1
    s = scores(predict(logits, multi_label=False), gold)
    # class 0: F1 1; class 1: TP 0 FP 1 FN 1 -> 0; class 2: TP 1 FP 1 FN 1 -> 0.5
    assert s["accuracy"] == pytest.approx(0.5) and s["micro_f1"] == pytest.approx(0.5)
    assert s["macro_f1"] == pytest.approx(0.5)
    assert predict(torch.tensor([[0.3, -0.1]]), multi_label=True).tolist() == [[True, False]]
    ev = _eval_module()
    train = np.eye(3, dtype=bool)[[0, 0, 1]]
    test = np.eye(3, dtype=bool)[[0, 1, 1, 2]]
    b = ev.majority_baseline(train, test)  # always class 0
    # class 0: TP 1 FP 3 -> 2/5; classes 1, 2: 0 -> macro 0.4 / 3; micro = accuracy = 1/4
    assert b["majority_micro_f1"] == pytest.approx(0.25) and b["majority_accuracy"] == pytest.approx(0.25)
    assert b["majority_macro_f1"] == pytest.approx(0.4 / 3)


# ---- tasks --------------------------------------------------------------------------------------
def test_strip_source_drops_imports_docstrings_comments():
    src = '"""Module doc."""\nimport os\nfrom x import y  # comment\n\nclass A:\n    """Doc."""\n    import z\n\n' \
          'def f(a):\n    """Doc."""\n    # a comment\n    return a + 1  # trailing\n\nif True:\n    import q\n'
    out = strip_source(src)
    assert "import" not in out and "doc" not in out.lower() and "comment" not in out and "#" not in out
    assert "def f(a):" in out and "return a + 1" in out and "class A:" in out
    compile(out, "<stripped>", "exec")  # still valid Python (empty bodies became `pass`)
    assert strip_source("def broken(:\n") is None


def test_offline_task_is_deterministic_balanced_and_split_by_file(tmp_path):
    from omegaconf import OmegaConf

    tcfg = OmegaConf.create({"name": "offline", "packages": ["json", "http", "logging", "urllib"], "doc_tokens": 128,
                             "max_doc_tokens": 128, "train_per_class": 12, "test_per_class": 6, "test_fraction": 0.3,
                             "split_seed": 0})
    a = load_task(tcfg, tmp_path / "c1", progress=False)
    b = load_task(tcfg, tmp_path / "c2", progress=False)  # built again from scratch
    assert a.label_names == ["json", "http", "logging", "urllib"] and not a.multi_label
    assert len(a.train) == 48 and len(a.test) == 24
    assert all(len(d) == 128 for d in a.train.docs + a.test.docs)
    assert (a.train.labels.sum(0) == 12).all() and (a.test.labels.sum(1) == 1).all()
    assert all(np.array_equal(x, y) for x, y in zip(a.train.docs + a.test.docs, b.train.docs + b.test.docs))
    # no test window shares a 32-token run with any train window (they come from disjoint files)
    grams = {tuple(d[i:i + 32]) for d in a.train.docs for i in range(97)}
    assert not any(tuple(d[i:i + 32]) in grams for d in a.test.docs for i in range(97))
    cached = load_task(tcfg, tmp_path / "c1", progress=False)  # from the cache
    assert all(np.array_equal(x, y) for x, y in zip(a.test.docs, cached.test.docs))


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_and_mimic_files(tmp_path):
    from omegaconf import OmegaConf

    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": f"doc {i} " * 20, "labels": [["a", "b"], ["b"], []][i % 3]}
                                         for i in range(9)])
    te = _jsonl(tmp_path / "te.jsonl", [{"text": "x y z", "labels": ["b", "zz"]}])
    t = load_task(OmegaConf.create({"name": "local", "train_file": tr, "test_file": te, "max_doc_tokens": 16}),
                  tmp_path / "c", progress=False)
    assert t.multi_label and t.label_names == ["a", "b"] and t.train.labels.sum(0).tolist() == [3, 6]
    assert t.test.labels.tolist() == [[False, True]]  # "zz" is not a train label: dropped
    assert max(len(d) for d in t.train.docs) == 16
    csv_file = tmp_path / "train_50.csv"
    csv_file.write_text('SUBJECT_ID,HADM_ID,TEXT,LABELS\n1,2,"chest pain, admitted",401.9;428.0\n3,4,"fever",401.9\n')
    m = load_task(OmegaConf.create({"name": "mimic", "train_file": str(csv_file), "test_file": str(csv_file),
                                    "top_k_labels": 1, "max_doc_tokens": 64}), tmp_path / "c", progress=False)
    assert m.label_names == ["401.9"] and m.test.labels[:, 0].all()


@pytest.mark.parametrize("rows, expect", [
    ([{"text": "a"}], "no 'label' (single-label) or 'labels' (multi-label) field"),
    ([{"body": "a", "label": 1}], "no string field 'text'"),
    ([{"text": "a", "label": "x"}, {"text": "b", "labels": ["x"]}], "mixes 'label' and 'labels'"),
])
def test_local_bad_files_one_line(tmp_path, rows, expect):
    from omegaconf import OmegaConf

    f = _jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(TaskError) as e:
        load_task(OmegaConf.create({"name": "local", "train_file": f, "test_file": f}), tmp_path / "c", progress=False)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_single_label_test_label_not_in_train(tmp_path):
    from omegaconf import OmegaConf

    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    te = _jsonl(tmp_path / "te.jsonl", [{"text": "c", "label": "w"}])
    with pytest.raises(TaskError, match="label 'w' .* does not occur in the train split"):
        load_task(OmegaConf.create({"name": "local", "train_file": tr, "test_file": te}), tmp_path / "c", progress=False)


def test_hub_task_mapping_and_offline_line(tmp_path, monkeypatch):
    """ecthr_a's layout (text = list of paragraphs, labels = list of ClassLabel ids) through a stand-in
    for datasets.load_dataset; then the real one offline: one line."""
    datasets = pytest.importorskip("datasets")
    from omegaconf import OmegaConf

    names = ["2", "3", "5"]
    feats = datasets.Features({"text": datasets.Sequence(datasets.Value("string")),
                               "labels": datasets.Sequence(datasets.ClassLabel(names=names))})
    data = {"train": {"text": [["para one", "para two"], ["x"], ["y"]], "labels": [[0, 2], [], [1]]},
            "test": {"text": [["z z"]], "labels": [[2]]}}
    calls = []

    def fake_load(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(data[split], features=feats)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    tcfg = OmegaConf.load(CONFIGS / "task" / "ecthr_a.yaml")
    t = load_task(tcfg, tmp_path / "c", progress=False)
    assert calls[0] == ("coastalcph/lex_glue", "ecthr_a", "train")
    assert t.multi_label and t.label_names == names
    assert t.train.labels.tolist() == [[True, False, True], [False, False, False], [False, True, False]]
    from longctx.data.tokenizer import get_tokenizer

    assert t.train.docs[0].tolist() == get_tokenizer().encode("para one\npara two").ids
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tcfg.hf_cache_dir = str(tmp_path / "hf")
    with pytest.raises(TaskError) as e:
        load_task(tcfg, tmp_path / "c2", progress=False)
    assert "could not download the Hugging Face dataset coastalcph/lex_glue/ecthr_a" in str(e.value)
    assert "task=offline" in str(e.value) and "\n" not in str(e.value)


# ---- eval_longdoc end to end ----------------------------------------------------------------------
def test_eval_longdoc_cli_random_init_two_lengths_and_resume(tmp_path):
    """`python scripts/eval_longdoc.py model=gpt2_tiny device=cpu 'seq_lens=[32,64]' ...` at toy size."""
    o = tiny_overrides(tmp_path)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "scripts" / "eval_longdoc.py"), *[f"{k}={v}" for k, v in o.items()]]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(o["out_dir"])
    rows = json.loads((out / "results.json").read_text())
    assert [r["seq_len"] for r in rows] == [32, 64]
    for r in rows:
        for k in ("micro_f1", "macro_f1", "accuracy", "train_examples", "test_examples", "majority_micro_f1",
                  "tokens_per_s", "peak_mem_gb", "steps"):
            assert k in r, k
        assert 0 <= r["macro_f1"] <= 1 and r["micro_f1"] == pytest.approx(r["accuracy"])  # single-label
        assert (r["train_examples"], r["test_examples"], r["steps"]) == (48, 24, 6)
        assert r["majority_micro_f1"] == pytest.approx(0.25)  # 4 balanced classes
    assert rows[0]["test_truncated_frac"] == 1.0 and rows[1]["test_truncated_frac"] == 1.0  # docs are 128 tokens
    assert "| 32 |" in (out / "results.md").read_text() and (out / "results.png").stat().st_size > 1000
    assert "tok/s" in proc.stderr + proc.stdout and "eta" in proc.stderr + proc.stdout  # progress lines

    # resume: both lengths are in results.json -> nothing runs; a third length would
    ev = _eval_module()
    cfg = compose_eval(o)
    ev_rows = ev.evaluate(cfg)
    assert [r["micro_f1"] for r in ev_rows] == [r["micro_f1"] for r in rows]


def test_eval_longdoc_from_our_run_dir_extends_positions(tiny_run, tmp_path, monkeypatch):
    """init_from=<a train.py run at seq_len 32>: 64 needs the tiled positions; with init_positions=none
    it is one line; the model weights are the run's."""
    ev = _eval_module()
    from longctx.trainer import ConfigError

    o = tiny_overrides(tmp_path, init_from=str(tiny_run), seq_lens="[64]", **{"train.batch_size": 24, "max_steps": 1})
    seen = {}
    real = ev.run_length

    def spy(cfg, task, seq_len, source, *a):
        seen["source"] = source
        return real(cfg, task, seq_len, source, *a)

    monkeypatch.setattr(ev, "run_length", spy)
    rows = ev.evaluate(compose_eval(o))
    assert seen["source"].kind == "run" and seen["source"].seq_len == 32
    assert rows[0]["seq_len"] == 64 and rows[0]["init"] == str(tiny_run) and rows[0]["steps"] == 1
    with pytest.raises(ConfigError, match="seq_len 64 is past the 32 positions of init_from"):
        ev.evaluate(compose_eval(dict(o, init_positions="none", out_dir=str(tmp_path / "o2"))))
    # long_docs=chunk: the 128-token documents as 2 chunks of 32 (positions of the run, no extension)
    rows = ev.evaluate(compose_eval(dict(o, long_docs="chunk", max_chunks=2, init_positions="none",
                                         seq_lens="[32]", out_dir=str(tmp_path / "o3"))))
    assert rows[0]["test_tokens_mean"] == 64 and rows[0]["test_truncated_frac"] == 1.0
    assert rows[0]["setup"]["max_chunks"] == 2


@pytest.mark.parametrize("kw, expect", [
    ({"task": "local"}, "task=local needs task.train_file=PATH"),
    ({"task": "mimic", "task.train_file": "/nonexistent/train_50.csv", "task.test_file": "/x"}, "no such file"),
    ({"seq_lens": "[64,64]"}, "lists a length twice"),
    ({"seq_lens": "[0]"}, "must be a positive integer"),
    ({"long_docs": "slide"}, "long_docs='slide'"),
    ({"train.batch_size": 0}, "train.batch_size=0"),
    ({"init_from": "gpt2"}, "could not be downloaded from the Hugging Face Hub"),
    ({"task.packages": "[json,no_such_pkg_xyz]"}, "no_such_pkg_xyz is not installed here"),
    ({"model.backend": "hf_sdpa"}, "eval_longdoc fine-tunes our GPT"),
])
def test_eval_longdoc_bad_input_one_line(tmp_path, monkeypatch, kw, expect):
    from longctx.trainer import ConfigError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ev = _eval_module()
    o = tiny_overrides(tmp_path, **kw)
    for k in [k for k in kw if k == "task"]:  # a task group choice drops the offline task's keys
        for key in SMALL:
            o.pop(key, None)
    with pytest.raises(ConfigError) as e:
        ev.evaluate(compose_eval(o))
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "out" / "results.json").exists()


def test_eval_longdoc_unknown_group_options_one_line():
    from longctx.trainer import ConfigError

    ev = _eval_module()
    with pytest.raises(ConfigError) as e:
        ev.check_cli_choices(["task=imdb", "seq_lens=[512]"])
    assert str(e.value) == "task=imdb is not a task; choose one of: arxiv, ecthr_a, local, mimic, offline"
    with pytest.raises(ConfigError, match="model=gpt2_huge is not an option"):
        ev.check_cli_choices(["task=offline", "model=gpt2_huge"])
    ev.check_cli_choices(["task=ecthr_a", "model=gpt2_tiny", "attention=sdpa"])


def test_longdoc_bow_toy(tmp_path):
    """`python scripts/longdoc_bow.py --task offline ...` at toy size."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("longdoc_bow", ROOT / "scripts" / "longdoc_bow.py")
    bow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bow)
    sets = [x for k, v in SMALL.items() for x in ("--set", f"{k.removeprefix('task.')}={v}")]
    out = tmp_path / "bow.json"
    assert bow.main(["--task", "offline", *sets, "--seq-lens", "32,128", "--iters", "30", "--cache-dir",
                     str(tmp_path.parent / "longdoc_cache"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["seq_len"] for r in rows] == [32, 128]
    assert all(0 <= r["micro_f1"] <= 1 and r["micro_f1"] == pytest.approx(r["accuracy"]) for r in rows)
    assert bow.main(["--task", "nope"]) == 2


def test_gpu_driver_smoke_bench_step(tmp_path):
    """`bash scripts/gpu/longdoc_gpu.sh none --smoke --steps bench` (the speed comparison, toy sizes):
    our classifier and Hugging Face GPT2ForSequenceClassification through the same step."""
    pytest.importorskip("transformers")
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu" / "longdoc_gpu.sh"), "none", "--smoke", "--steps", "bench"],
                          check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert {(r["impl"], r["seq_len"]) for r in rows} == {("ours", 64), ("hf_sdpa", 64)}
    assert all(r["tokens_per_s"] > 0 and r["loss"] == r["loss"] for r in rows)
    assert "| 64 | 4 |" in proc.stdout and "ours / hf_sdpa" in proc.stdout
    summary = json.loads((tmp_path / "out" / "longdoc_gpu.json").read_text())
    assert summary["status"] == {"bench": "ok"}
