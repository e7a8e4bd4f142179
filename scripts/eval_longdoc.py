#!/usr/bin/env python
"""Long-document classification: F1 against context length (the FlashAttention paper's Table 5).

    python scripts/eval_longdoc.py task=offline init_from=outputs/run1 'seq_lens=[512,1024,2048,4096,8192]'
    python scripts/eval_longdoc.py task=ecthr_a init_from=gpt2 'seq_lens=[512,1024,2048,4096,8192,16384]'
    python scripts/eval_longdoc.py model=gpt2_tiny device=cpu 'seq_lens=[128,256]' ...   (random init)
    torchrun --standalone --nproc_per_node=8 scripts/eval_longdoc.py parallel=fsdp ...

For each length L in seq_lens: a fresh model (init_from's weights with the position table
extended to L, or a random init of model=) gets a linear head on the state at the last real token
(model/classify.py: exact under causal attention with right padding), is fine-tuned on the task's
train split (documents cut to L tokens, or long_docs=chunk), then scores the test split:
micro-F1, macro-F1 (+ accuracy when single-label), fine-tuning tokens/s and peak GPU memory, next
to the majority-class baseline. Rows go to <out_dir>/results.json (rewritten atomically after each
length), with results.md (table) and results.png (F1 against length). A length already in
results.json with the same settings is not run again, so an interrupted run continues where it
stopped. Settings: configs/eval_longdoc.yaml and configs/task/*.yaml; tasks: data/tasks.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk  # noqa: E402  (puts the repository on sys.path too)

ROOT = bk.REPO

from longctx.trainer import ConfigError
from longctx.trainer.distributed import all_reduce, broadcast_object, destroy, init_distributed, is_distributed
from longctx.trainer.init import apply_init_from, load_init
from longctx.trainer.logger import build_logger, resolve_mode
from longctx.trainer.metrics import peak_flops, progress_line
from longctx.trainer.optim import Precision, build_optimizer
from longctx.trainer.parallelize import clip_grad_norm, grad_sync, parallel_name, parallelize
from longctx.trainer.schedule import build_schedule

log = logging.getLogger("eval_longdoc")

RESULTS = "results.json"
PAD_MULTIPLE = 64  # batches are padded to their longest document, rounded up to this (kernel-friendly)


# ---- settings ------------------------------------------------------------------------------------
def _pos_int(v, key: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{key}={v!r} must be a positive integer")
    return v


def setup_of(cfg) -> dict:
    """What a results row depends on; rows of another setup in out_dir are an error, not reused."""
    c = OmegaConf.to_container(cfg, resolve=True)
    task = {k: v for k, v in c["task"].items() if k not in ("hf_cache_dir", "cache_dir")}
    train = {k: v for k, v in c["train"].items() if k not in ("micro_batch", "micro_batch_tokens", "eval_micro_batch")}
    model = {k: c["model"].get(k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "dropout")}
    keys = ("init_from", "init_positions", "pool", "long_docs", "seed", "epochs", "max_steps", "train_examples", "test_examples")
    setup = {"task": task, "train": train, "model": model, **{k: c.get(k) for k in keys}}
    if c.get("long_docs") == "chunk":
        setup["max_chunks"] = c.get("max_chunks")
    return setup


def read_results(out_dir: Path) -> list[dict]:
    p = Path(out_dir) / RESULTS
    if not p.is_file():
        return []
    try:
        rows = json.loads(p.read_text())
        assert isinstance(rows, list)
        return rows
    except (json.JSONDecodeError, AssertionError) as e:
        raise ConfigError(f"{p} is not a results list ({e}); move it away or use another out_dir") from None


def check_settings(cfg, world_size: int):
    """Every one-line error before any work. Returns (seq_lens, init source, rows already done)."""
    from longctx.data.tasks import TaskError, check_task
    from longctx.model import build_model

    lens = list(cfg.seq_lens) if OmegaConf.is_list(cfg.seq_lens) or isinstance(cfg.seq_lens, list) else [cfg.seq_lens]
    if not lens:
        raise ConfigError("seq_lens is empty; e.g. 'seq_lens=[512,1024,2048]'")
    lens = [_pos_int(v, "seq_lens entry") for v in lens]
    if len(set(lens)) != len(lens):
        raise ConfigError(f"seq_lens={lens} lists a length twice")
    try:
        check_task(cfg.task)
    except TaskError as e:
        raise ConfigError(str(e)) from None
    if str(cfg.long_docs) not in ("truncate", "chunk"):
        raise ConfigError(f"long_docs={cfg.long_docs!r}: use truncate or chunk")
    if str(cfg.pool) not in ("mean", "last"):
        raise ConfigError(f"pool={cfg.pool!r}: use mean or last")
    _pos_int(cfg.max_chunks, "max_chunks")
    if cfg.max_steps is None:
        if not isinstance(cfg.epochs, (int, float)) or cfg.epochs <= 0:
            raise ConfigError(f"epochs={cfg.epochs!r} must be a positive number (or set max_steps)")
    else:
        _pos_int(cfg.max_steps, "max_steps")
    bs = _pos_int(cfg.train.batch_size, "train.batch_size")
    if bs % world_size:
        raise ConfigError(f"train.batch_size={bs} is not a multiple of the {world_size} processes; "
                          f"use {max(world_size, bs // world_size * world_size)}")
    for key in ("micro_batch", "eval_micro_batch"):
        if cfg.train[key] != "auto":
            _pos_int(cfg.train[key], f"train.{key}")
    for key in ("train_examples", "test_examples"):
        if cfg[key] is not None:
            _pos_int(cfg[key], key)
    if str(cfg.train.precision) not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision={cfg.train.precision!r}: use bf16, fp16 or fp32")
    if str(cfg.logger.get("name")) == "wandb":
        resolve_mode(str(cfg.logger.get("mode", "auto")))
    if str(cfg.model.get("backend", "ours")) != "ours":
        raise ConfigError(f"model.backend={cfg.model.backend}: eval_longdoc fine-tunes our GPT (model.backend=ours); "
                          f"scripts/bench_longdoc.py compares against Hugging Face's GPT2ForSequenceClassification")
    positions = str(cfg.init_positions)
    if positions not in ("tile", "interpolate", "none"):
        raise ConfigError(f"init_positions={positions!r}: use tile, interpolate or none")
    with open_dict(cfg):  # trainer.init validates init_positions as tile | interpolate
        cfg.init_positions = "tile" if positions == "none" else positions
    source = apply_init_from(cfg)
    with open_dict(cfg):
        cfg.init_positions = positions
    if source is not None and positions == "none":
        past = [n for n in lens if n > source.seq_len]
        if past:
            raise ConfigError(f"seq_len {past[0]} is past the {source.seq_len} positions of init_from={source.name}; "
                              f"set init_positions=tile or interpolate to extend them, or drop the length")
    build_schedule(OmegaConf.merge(_trainer_view(cfg), {"max_steps": 1}))
    try:
        for n in lens:
            with torch.device("meta"):
                build_model(_trainer_view(_with_seq_len(cfg, n)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    rows = read_results(Path(cfg.out_dir))
    setup = setup_of(cfg)
    other = [r for r in rows if r.get("setup") != setup]
    if other:
        old = other[0].get("setup") or {}
        diff = sorted(k for k in set(old) | set(setup) if old.get(k) != setup.get(k))
        raise ConfigError(f"{Path(cfg.out_dir) / RESULTS} holds results of other settings (they differ in: "
                          f"{', '.join(diff) or '?'}); use another out_dir, or move that file away")
    return lens, source, rows


def _trainer_view(cfg):
    """cfg as train.py's schema (trainer.config.Config) sees it: the root and train.* keys it
    defines, for the trainer and model builders, which type their config. This script's own keys
    (seq_lens, task, pool, train.batch_size, train.head_lr_scale, ...) stay out, and so do unset
    (null) values such as max_steps before it is known."""
    import dataclasses

    from longctx.trainer.config import Config, OptimConfig

    c = OmegaConf.to_container(cfg, resolve=True)
    root = {f.name for f in dataclasses.fields(Config)}
    train = {f.name for f in dataclasses.fields(OptimConfig)} - {"micro_batch"}  # ours: documents, not sequences
    view = {k: v for k, v in c.items() if k in root and k != "train" and v is not None}  # None: schema default
    if view.get("init_positions") == "none":  # ours (an error past the positions, checked here): not train.py's
        del view["init_positions"]
    return OmegaConf.create({**view, "train": {k: v for k, v in c["train"].items() if k in train}})


def _with_seq_len(cfg, n: int):
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    c.seq_len = n
    return c


# ---- batches -------------------------------------------------------------------------------------
def step_examples(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The global batch of optimizer step `step`: positions step*B .. (step+1)*B of the stream of
    seeded permutations of the n train documents (epoch e uses permutation (seed, e))."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[i]))  # small n: cheap enough to recompute
    return out


def make_batch(docs, seq_len: int, long_docs: str, max_chunks: int):
    """Right-padded (S, N) ids, (S,) real lengths, (S,) document index (chunk mode) or None."""
    from longctx.data.tokenizer import EOT_ID

    seqs, owner = [], []
    for j, d in enumerate(docs):
        d = d if len(d) else [EOT_ID]  # an empty document still has one position to pool at
        if long_docs == "chunk":
            d = d[:seq_len * max_chunks]
            pieces = [d[i:i + seq_len] for i in range(0, len(d), seq_len)]
        else:
            pieces = [d[:seq_len]]
        seqs += pieces
        owner += [j] * len(pieces)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    n = min(seq_len, -(-int(lengths.max()) // PAD_MULTIPLE) * PAD_MULTIPLE)
    x = torch.full((len(seqs), n), EOT_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.as_tensor(s.astype("int64") if hasattr(s, "astype") else s)
    doc = torch.tensor(owner, dtype=torch.long) if long_docs == "chunk" else None
    return x, lengths, doc


def _auto(v, tokens: int, seq_len: int, per: int = 1) -> int:
    return max(1, tokens // (seq_len * per)) if v == "auto" else int(v)


def _subset(n: int, k: int | None, seed: int, salt: int) -> list[int]:
    if k is None or k >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 7919 + salt)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


# ---- one length ------------------------------------------------------------------------------------
def majority_baseline(train_labels, test_labels) -> dict:
    """Predict, for every test document, the commonest label set of the train split (single-label:
    the most frequent class)."""
    from collections import Counter

    from longctx.model.classify import scores

    rows = [tuple(r.nonzero()[0].tolist()) for r in train_labels]
    best = min(Counter(rows).items(), key=lambda kv: (-kv[1], kv[0]))[0]
    pred = torch.zeros(test_labels.shape, dtype=torch.bool)
    pred[:, list(best)] = True
    s = scores(pred, torch.as_tensor(test_labels))
    return {"majority_micro_f1": s["micro_f1"], "majority_macro_f1": s["macro_f1"], "majority_accuracy": s["accuracy"]}


def single_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy; labels is the (docs, labels) one-hot boolean matrix."""
    return F.cross_entropy(logits.float(), labels.float().argmax(dim=1), reduction="sum")


def multi_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed binary cross-entropy over every (document, label)."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum")


def finetune_step(model, micro_batches, optimizer, prec, loss_fn, denom: int, grad_clip):
    """One optimizer step of fine-tuning (what eval_longdoc runs, and what bench_longdoc.py times).

    micro_batches yields (ids (S, N), lengths (S,), doc (S,) or None, n_docs, labels (n_docs, C));
    each micro-batch's summed loss is divided by denom (this rank's documents per step, so that after
    the gradient average over ranks the step minimises the mean loss of the global batch); gradients
    are reduced over ranks on the last micro-batch only. Returns (loss tensor, grad norm tensor, tokens)."""
    loss_sum, tokens = None, 0
    batches = list(micro_batches) if not isinstance(micro_batches, list) else micro_batches
    for m, (x, lengths, doc, n_docs, y) in enumerate(batches):
        with grad_sync(model, m == len(batches) - 1):
            with prec.autocast():
                logits = model(x, lengths, doc, n_docs)
            loss = loss_fn(logits, y) / denom
            prec.backward(loss)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        tokens += x.numel()
    prec.unscale(optimizer)
    grad_norm = clip_grad_norm(model, grad_clip)
    prec.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, tokens


def run_length(cfg, task, seq_len: int, source, dist, logger, wandb_step: int, train_ids, test_ids) -> dict:
    """Fine-tune at seq_len and score the test split; returns the results row (on every rank)."""
    from longctx.model import build_model
    from longctx.model.classify import GPTClassifier, predict, scores

    lcfg = _with_seq_len(cfg, seq_len)  # the trainer's builders get _trainer_view(lcfg)
    world, rank = dist.world_size, dist.rank
    multi = task.multi_label
    t = cfg.train
    per = int(cfg.max_chunks) if cfg.long_docs == "chunk" else 1
    micro = min(_auto(t.micro_batch, int(t.micro_batch_tokens), seq_len, per), int(t.batch_size) // world)
    eval_micro = 2 * micro if t.eval_micro_batch == "auto" else int(t.eval_micro_batch)
    B = int(t.batch_size)
    steps = int(cfg.max_steps or math.ceil(float(cfg.epochs) * len(train_ids) / B))
    with open_dict(lcfg):
        lcfg.max_steps = steps
        if lcfg.init_positions == "none":  # checked: no length goes past the checkpoint's positions
            lcfg.init_positions = "tile"

    torch.manual_seed(cfg.seed)  # the same initial weights (and head) on every rank and for every length
    tcfg = _trainer_view(lcfg)
    gpt = build_model(tcfg)
    load_init(gpt, source, lcfg)
    model = GPTClassifier(gpt, task.num_labels, dropout=float(t.dropout), head_lr_scale=float(t.head_lr_scale),
                          pool=str(cfg.pool))
    model = parallelize(model.to(dist.device), tcfg, dist)
    optimizer = build_optimizer(model, tcfg, dist.device)
    prec = Precision(str(t.precision), dist.device, sharded=parallel_name(tcfg) == "fsdp")
    schedule = build_schedule(tcfg)
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout differs per rank
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    flops_tok = model.flops_per_token(seq_len) if hasattr(model, "flops_per_token") else None
    peak = peak_flops(dist.device)
    per_rank = B // world
    accum = -(-per_rank // micro)
    log.info(f"seq_len {seq_len}: {len(train_ids)} train docs, {steps} steps of {B} docs "
             f"(micro-batch {micro} x accum {accum} x {world} GPUs), head over {task.num_labels} labels")

    loss_fn = multi_label_loss if multi else single_label_loss

    def micro_batches(step: int):
        mine = step_examples(step, B, len(train_ids), int(cfg.seed))[rank::world]
        for m in range(accum):
            ids = [train_ids[i] for i in mine[m * micro:(m + 1) * micro]]
            x, lengths, doc = make_batch([task.train.docs[i] for i in ids], seq_len, str(cfg.long_docs),
                                         int(cfg.max_chunks))
            y = torch.as_tensor(task.train.labels[ids])
            yield (x.to(dist.device), lengths.to(dist.device), None if doc is None else doc.to(dist.device),
                   len(ids), y.to(dist.device))

    model.train()
    t_begin = time.perf_counter()
    tokens = torch.zeros((), dtype=torch.float64)
    t_start = t_last = time.perf_counter()
    last_step, row = 0, {}
    for step in range(steps):
        lr = schedule.apply(optimizer, step)
        loss_sum, grad_norm, n_tok = finetune_step(model, micro_batches(step), optimizer, prec, loss_fn, per_rank,
                                                   t.grad_clip)
        tokens += n_tok
        done = step + 1
        if step == 0 and steps > 1:  # tokens/s leaves out the first step (kernel compilation / autotuning)
            if dist.device.type == "cuda":
                torch.cuda.synchronize(dist.device)
            tokens.zero_()
            t_start = t_last = time.perf_counter()
            last_step = 1
        if done == steps or (cfg.log_every and done % int(cfg.log_every) == 0):
            all_reduce(loss_sum, "avg")
            now = time.perf_counter()
            tok = all_reduce(tokens.clone().to(dist.device), "sum").item()
            tps = tok / max(now - t_start, 1e-9) if tok else 0.0
            row = {"step": done, "loss": loss_sum.item(), "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_s": tps, "mfu": flops_tok * tps / (peak * world) if peak and flops_tok else None,
                   "mem_gb": torch.cuda.max_memory_allocated(dist.device) / 1e9 if dist.device.type == "cuda" else None,
                   "eta_s": (steps - done) * (now - t_last) / max(done - last_step, 1)}
            t_last, last_step = now, done
            log.info(f"[L={seq_len}] " + progress_line(row, steps))
            logger.log({f"train/{k}": v for k, v in row.items() if k not in ("eta_s", "step")} | {"seq_len": seq_len},
                       step=wandb_step + done)
    if dist.device.type == "cuda":
        torch.cuda.synchronize(dist.device)
    timed_s = time.perf_counter() - t_start  # steps 2.. (all of them when there is only one)
    train_s = time.perf_counter() - t_begin
    total_tokens = all_reduce(tokens.clone().to(dist.device), "sum").item()

    # ---- score the test split: each rank a share, padded to equal size (FSDP needs every rank in every forward)
    model.eval()
    t0 = time.perf_counter()
    share = -(-len(test_ids) // world)
    mine = list(range(rank, len(test_ids), world))
    mine += [mine[-1] if mine else 0] * (share - len(mine))
    out = []
    with torch.no_grad():
        for i in range(0, share, eval_micro):
            ids = mine[i:i + eval_micro]
            x, lengths, doc = make_batch([task.test.docs[test_ids[j]] for j in ids], seq_len,
                                         str(cfg.long_docs), int(cfg.max_chunks))
            doc = doc.to(dist.device) if doc is not None else None
            with prec.autocast():
                out.append(model(x.to(dist.device), lengths.to(dist.device), doc, len(ids)).float().cpu())
    logits = torch.cat(out)[:len(range(rank, len(test_ids), world))]
    gathered = [(rank, logits)]
    if is_distributed():
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (rank, logits))
    full = torch.zeros(len(test_ids), task.num_labels)
    for r, lg in gathered:
        full[r::world][:len(lg)] = lg
    eval_s = time.perf_counter() - t0
    gold = torch.as_tensor(task.test.labels[test_ids])
    s = scores(predict(full, multi), gold)
    mem = None
    if dist.device.type == "cuda":
        mem = all_reduce(torch.tensor(torch.cuda.max_memory_allocated(dist.device) / 1e9, device=dist.device), "max").item()
    lens = torch.tensor([len(task.test.docs[j]) for j in test_ids])
    cap = seq_len * (int(cfg.max_chunks) if cfg.long_docs == "chunk" else 1)
    result = {"seq_len": seq_len, "micro_f1": s["micro_f1"], "macro_f1": s["macro_f1"]}
    if not multi:
        result["accuracy"] = s["accuracy"]
    result.update({
        "train_examples": len(train_ids), "test_examples": len(test_ids), "steps": steps, "batch_size": B,
        "final_train_loss": row.get("loss"), "tokens_per_s": total_tokens / timed_s, "train_s": train_s,
        "eval_s": eval_s, "peak_mem_gb": mem, "world_size": world, "micro_batch": micro,
        "test_tokens_mean": float(lens.clamp(max=cap).float().mean()),
        "test_truncated_frac": float((lens > cap).float().mean()),
        "device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else "cpu",
        "attention": str(cfg.attention.impl),
    })
    del model, optimizer
    if dist.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---- outputs -----------------------------------------------------------------------------------
def write_outputs(out_dir: Path, rows: list[dict], task_name: str, multi: bool) -> None:
    """results.json, results.md and results.png, each written to a temp name and renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["seq_len"])
    bk.write_json(out_dir / RESULTS, rows)
    bk.write_text(out_dir / "results.md", results_table(rows, task_name, multi))
    plot_results(rows, out_dir / "results.png", task_name)


def results_table(rows: list[dict], task_name: str, multi: bool) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    head = ["seq_len", "micro-F1", "macro-F1"] + ([] if multi else ["accuracy"]) + \
        ["majority micro/macro-F1", "train/test docs", "test docs cut", "tokens/s", "peak mem"]
    cells = [[r["seq_len"], pct(r["micro_f1"]), pct(r["macro_f1"]), *([] if multi else [pct(r.get("accuracy"))]),
              f"{pct(r.get('majority_micro_f1'))} / {pct(r.get('majority_macro_f1'))}",
              f"{r['train_examples']} / {r['test_examples']}", f"{100 * r.get('test_truncated_frac', 0):.0f}%",
              f"{r['tokens_per_s'] / 1e3:.1f}k", "-" if r.get("peak_mem_gb") is None else f"{r['peak_mem_gb']:.1f} GB"]
             for r in rows]
    return f"Long-document classification, task={task_name} (F1 in %)\n\n{bk.table(head, cells, markdown=True)}\n"


def plot_results(rows: list[dict], path: Path, task_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["seq_len"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [100 * r["micro_f1"] for r in rows], "o-", label="micro-F1")
    ax.plot(x, [100 * r["macro_f1"] for r in rows], "s-", label="macro-F1")
    if rows and rows[0].get("majority_micro_f1") is not None:
        ax.axhline(100 * rows[0]["majority_micro_f1"], color="gray", ls="--", lw=1, label="majority micro-F1")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in x])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("F1 (%)")
    ax.set_title(f"long-document classification: {task_name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    bk.save_figure(fig, path)


# ---- entry -------------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> list[dict]:
    """Run every length of cfg.seq_lens not yet in <out_dir>/results.json; returns all rows."""
    from longctx.data.tasks import TaskError, load_task

    dist = init_distributed(str(cfg.device), timeout_s=cfg.parallel.get("timeout_s"))
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    out_dir = Path(str(cfg.out_dir))
    lens, source, rows = check_settings(cfg, dist.world_size)
    setup = setup_of(cfg)
    todo = [n for n in lens if n not in {r["seq_len"] for r in rows}]
    for n in sorted(set(lens) - set(todo)):
        log.info(f"seq_len {n}: already in {out_dir / RESULTS}, not run again")
    if not todo:
        if dist.is_main and rows:
            print(results_table(sorted(rows, key=lambda r: r["seq_len"]), rows[0].get("task", "?"),
                                "accuracy" not in rows[0]), end="")
        return rows

    problem, task = None, None
    if dist.is_main:  # rank 0 builds the task cache first; the others then read it
        try:
            task = load_task(cfg.task, cfg.cache_dir, progress=bool(cfg.progress))
        except TaskError as e:
            problem = str(e)
    problem = broadcast_object(problem)
    if problem:
        raise ConfigError(problem)
    if task is None:
        task = load_task(cfg.task, cfg.cache_dir, progress=False)
    train_ids = _subset(len(task.train), cfg.train_examples, int(cfg.seed), 1)
    test_ids = _subset(len(task.test), cfg.test_examples, int(cfg.seed), 2)
    if task.multi_label and not task.train.labels[train_ids].any():
        raise ConfigError(f"task={task.name}: no train document has a label; check task.label_field")
    base = majority_baseline(task.train.labels[train_ids], task.test.labels[test_ids])
    log.info(f"task {task.name}: {len(train_ids)} train / {len(test_ids)} test docs, {task.num_labels} labels "
             f"({'multi' if task.multi_label else 'single'}-label); majority baseline micro-F1 "
             f"{100 * base['majority_micro_f1']:.1f}, macro-F1 {100 * base['majority_macro_f1']:.1f}")

    logger = build_logger(cfg, out_dir, dist.is_main, resuming=bool(rows))
    wandb_step = sum(int(r.get("steps", 0)) for r in rows)
    try:
        for k, n in enumerate(todo):
            log.info(f"[{k + 1}/{len(todo)}] seq_len {n}")
            row = run_length(cfg, task, n, source, dist, logger, wandb_step, train_ids, test_ids)
            wandb_step += row["steps"]
            row.update(base, task=task.name, labels=task.num_labels, init=cfg.init_from or f"random {cfg.model.get('name')}",
                       date=time.strftime("%Y-%m-%d"), torch=torch.__version__, setup=setup)
            rows = [r for r in rows if r["seq_len"] != n] + [row]
            if dist.is_main:
                write_outputs(out_dir, rows, task.name, task.multi_label)
            acc = f", accuracy {100 * row['accuracy']:.1f}" if "accuracy" in row else ""
            log.info(f"seq_len {n}: micro-F1 {100 * row['micro_f1']:.1f}, macro-F1 {100 * row['macro_f1']:.1f}{acc} "
                     f"(majority {100 * base['majority_micro_f1']:.1f}); {row['tokens_per_s'] / 1e3:.1f}k tokens/s, "
                     f"{row['train_s']:.0f}s")
            logger.log({"longdoc/micro_f1": row["micro_f1"], "longdoc/macro_f1": row["macro_f1"], "seq_len": n,
                        "longdoc/tokens_per_s": row["tokens_per_s"]}, step=wandb_step)
    except BaseException:
        logger.finish(exit_code=1)
        raise
    logger.finish()
    if dist.is_main:
        log.info(f"wrote {out_dir / RESULTS}, results.md, results.png")
        print(results_table(sorted(rows, key=lambda r: r["seq_len"]), task.name, task.multi_label), end="")
    return sorted(rows, key=lambda r: r["seq_len"])


def _remove_if_empty(out_dir: str) -> None:
    """A run stopped by a settings error leaves no out_dir behind (unless it held more than Hydra's files)."""
    p = Path(out_dir)
    if p.is_dir() and {c.name for c in p.iterdir()} <= {".hydra", "eval_longdoc.log"}:
        import shutil

        shutil.rmtree(p, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval_longdoc")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
            _remove_if_empty(str(cfg.out_dir))
        sys.exit(2)
    finally:
        destroy()


def check_cli_choices(argv: list[str]) -> None:
    """`task=imdb` / `model=gpt2_huge` on the command line: one line naming the options (before Hydra's
    longer message). train.py's check covers model / attention / parallel / logger."""
    from longctx import train as train_mod

    train_mod.check_group_choices([a for a in argv if not a.lstrip("+").startswith("task=")])
    options = sorted(p.stem for p in (ROOT / "configs" / "task").glob("*.yaml"))
    for a in argv:
        key, _, value = a.lstrip("+").partition("=")
        if key == "task" and value not in options:
            raise ConfigError(f"task={value} is not a task; choose one of: {', '.join(options)}")


if __name__ == "__main__":
    try:
        check_cli_choices(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
