#!/usr/bin/env python
"""Bag-of-tokens baseline for a long-document task: does a longer prefix carry more evidence?

    python scripts/longdoc_bow.py --task offline --seq-lens 128,512,2048,8192 --out bench_out/bow.json
    python scripts/longdoc_bow.py --task local --set train_file=tr.jsonl --set test_file=te.jsonl

For each length L: every document's first L tokens -> token counts -> log(1 + count), L2-normalised
(tokens seen in fewer than 3 train documents dropped) -> a linear classifier (softmax for
single-label, one sigmoid per label for multi-label) trained to convergence with L-BFGS and a small
L2 penalty; then micro/macro-F1 (+ accuracy) on the test split (model/classify.py `scores`). No GPU,
no neural network: a cheap check that a task rewards length before spending GPU time on it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def features(docs, length: int, vocab: int = 50257) -> torch.Tensor:
    x = torch.zeros(len(docs), vocab)
    for i, d in enumerate(docs):
        ids = torch.from_numpy(np.asarray(d[:length], dtype=np.int64))
        x[i].index_add_(0, ids, torch.ones(len(ids)))
    return x


def bow_scores(task, length: int, l2: float = 1e-4, iters: int = 200) -> dict:
    from longctx.model.classify import predict, scores

    xtr, xte = features(task.train.docs, length), features(task.test.docs, length)
    keep = (xtr > 0).sum(0) >= 3
    xtr, xte = (F.normalize(torch.log1p(x[:, keep]), dim=1) for x in (xtr, xte))
    ytr = torch.as_tensor(task.train.labels)
    w = torch.zeros(xtr.shape[1], task.num_labels, requires_grad=True)
    b = torch.zeros(task.num_labels, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def logits(x):
        return 10 * x @ w + b  # inputs are unit vectors: the factor 10 lets L-BFGS reach sharp posteriors

    def closure():
        opt.zero_grad()
        z = logits(xtr)
        loss = F.binary_cross_entropy_with_logits(z, ytr.float()) if task.multi_label else \
            F.cross_entropy(z, ytr.float().argmax(1))
        loss = loss + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        s = scores(predict(logits(xte), task.multi_label), torch.as_tensor(task.test.labels))
    return {"seq_len": length, **s, "features": int(keep.sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="offline", help="a configs/task/ name")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a task setting")
    ap.add_argument("--seq-lens", default="128,256,512,1024,2048,4096,8192")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--iters", type=int, default=200, help="L-BFGS iterations per length")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import yaml
    from omegaconf import OmegaConf

    from longctx.data.tasks import TaskError, load_task

    path = ROOT / "configs" / "task" / f"{args.task}.yaml"
    if not path.is_file():
        print(f"error: --task {args.task} is not a task in configs/task/", file=sys.stderr)
        return 2
    tcfg = OmegaConf.create(yaml.safe_load(path.read_text()))
    for kv in args.set:
        k, _, v = kv.partition("=")
        OmegaConf.update(tcfg, k, yaml.safe_load(v), force_add=True)
    try:
        task = load_task(tcfg, args.cache_dir or os.environ.get("LONGCTX_CACHE", "~/.cache/longctx"))
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    print(f"task {task.name}: {len(task.train)} train / {len(task.test)} test docs, {task.num_labels} labels")
    for n in (int(v) for v in args.seq_lens.split(",")):
        r = bow_scores(task, n, iters=args.iters)
        rows.append(r)
        print(f"seq_len {n:6d}: micro-F1 {100 * r['micro_f1']:.1f}  macro-F1 {100 * r['macro_f1']:.1f}  "
              f"accuracy {100 * r['accuracy']:.1f}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print("| seq_len | micro-F1 | macro-F1 | accuracy |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq_len']} | {100 * r['micro_f1']:.1f} | {100 * r['macro_f1']:.1f} | {100 * r['accuracy']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
