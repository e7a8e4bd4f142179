#!/usr/bin/env python
"""Long-document classification on one GPU, end to end, sized to finish within 8 minutes (H200, gpt2_small).

    python scripts/gpu/longdoc_gpu.py RUN_DIR --out OUT      # RUN_DIR: a train.py run (init_from), or none
    python scripts/gpu/longdoc_gpu.py none --out OUT --smoke # toy sizes (checks the code path; GPU or CPU)

Runs, each as the command a user would type (its output in OUT/<step>.log):
  1. python scripts/bench_longdoc.py: fine-tuning tokens/s of our classifier (flash attention) against
     Hugging Face GPT2ForSequenceClassification (sdpa) at 512..4096, the same step function
  2. python scripts/eval_longdoc.py task=offline init_from=RUN_DIR ...  (the pretrained model; positions
     tiled beyond the run's seq_len)                                  -> OUT/pretrained/results.*
  3. the same from a random init (model=gpt2_small)                  -> OUT/random/results.*
then writes OUT/longdoc_gpu.json and prints a table last. Defaults (--train-per-class 160, 3 epochs,
batch 16, lengths 512..8192) are sized to finish inside 8 minutes on an H200; a step that would start
after --budget-s seconds is skipped (and reported as skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import benchkit as bk  # noqa: E402


def run(name: str, cmd: list[str], out: Path, timeout: float) -> int:
    t0 = time.perf_counter()
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    with open(out / f"{name}.log", "w") as f:
        try:
            proc = subprocess.run(cmd, check=False, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    tail = (out / f"{name}.log").read_text().strip().splitlines()[-3:]
    print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f}s; " + " / ".join(tail)[-400:], flush=True)
    return rc


def tiny_hf(path: Path) -> None:
    """A small random GPT-2 saved by transformers (the smoke run's stand-in for a pretrained model)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a train.py run dir / checkpoint to start from, or none")
    ap.add_argument("--out", default=os.environ.get("OUT", "longdoc_out"))
    ap.add_argument("--seq-lens", default="512,1024,2048,4096,8192")
    ap.add_argument("--bench-seq-lens", default="512,1024,2048,4096")
    ap.add_argument("--model", default="gpt2_small")
    ap.add_argument("--train-per-class", type=int, default=160)
    ap.add_argument("--test-per-class", type=int, default=40)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr-pretrained", type=float, default=2e-4)
    ap.add_argument("--lr-random", type=float, default=5e-4)
    ap.add_argument("--budget-s", type=float, default=440, help="do not start a step after this many seconds")
    ap.add_argument("--steps", default="bench,pretrained,random", help="which steps to run")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: 4 stdlib packages, lengths 128/256, "
                    "gpt2_tiny, a tiny random transformers GPT-2 as the 'pretrained' model")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.train_per_class, args.test_per_class, args.batch_size = "128,256", 16, 8, 8

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t0 = time.perf_counter()
    common = ["task=offline", "logger=none", "device=auto", "progress=false", "log_every=20",
              f"epochs={args.epochs}", f"train.batch_size={args.batch_size}",
              f"task.train_per_class={args.train_per_class}", f"task.test_per_class={args.test_per_class}",
              f"cache_dir={out / 'cache'}"]
    bench = [py, "scripts/bench_longdoc.py", "--seq-lens", args.bench_seq_lens, "--model", args.model,
             "--out", str(out / "bench.json")]
    lens = args.seq_lens
    init = args.run_dir
    if args.smoke:
        common += ["task.packages=[json,http,logging,urllib]", "task.doc_tokens=256", "task.max_doc_tokens=256"]
        bench.append("--smoke")
        init = str(out / "tiny_hf")
        if "pretrained" in args.steps.split(","):
            tiny_hf(Path(init))
    plan = [("bench", bench)]
    if init.lower() != "none":
        plan.append(("pretrained", [py, "scripts/eval_longdoc.py", *common, f"init_from={init}",
                                    f"seq_lens=[{lens}]", f"train.lr={args.lr_pretrained}",
                                    f"out_dir={out / 'pretrained'}"]))
    plan.append(("random", [py, "scripts/eval_longdoc.py", *common, f"model={args.model if not args.smoke else 'gpt2_tiny'}",
                            f"seq_lens=[{lens}]", f"train.lr={args.lr_random}", f"out_dir={out / 'random'}"]))
    plan = [(n, c) for n, c in plan if n in args.steps.split(",")]
    status = {}
    for name, cmd in plan:
        elapsed = time.perf_counter() - t0
        if elapsed > args.budget_s:
            status[name] = f"skipped (budget {args.budget_s:.0f}s spent)"
            print(f"== {name}: skipped, {elapsed:.0f}s > --budget-s {args.budget_s:.0f}", flush=True)
            continue
        rc = run(name, cmd, out, timeout=max(60.0, args.budget_s + 30 - elapsed))
        status[name] = "ok" if rc == 0 else f"exit {rc}"

    summary = {"status": status, "wall_s": time.perf_counter() - t0, "args": vars(args)}
    for name in ("pretrained", "random"):
        p = out / name / "results.json"
        summary[name] = json.loads(p.read_text()) if p.is_file() else []
    p = out / "bench.json"
    summary["bench"] = json.loads(p.read_text()) if p.is_file() else []
    bk.write_json(out / "longdoc_gpu.json", summary)

    print(f"\nstatus: {status}; wall {summary['wall_s']:.0f}s")
    if summary["bench"]:
        from bench_longdoc import table

        print("\nfine-tuning tokens/s (bench_longdoc.py, gpt2 sizes, bf16, one GPU):")
        print(table(summary["bench"]), end="")
    print("\noffline task, micro-F1 / macro-F1 (%) on the test split; tokens/s of the fine-tuning:")
    rows = {n: {} for n in sorted({r["seq_len"] for k in ("pretrained", "random") for r in summary[k]})}
    for k in ("pretrained", "random"):
        for r in summary[k]:
            rows[r["seq_len"]][k] = r

    def f1(r):
        return f"{100 * r['micro_f1']:.1f} / {100 * r['macro_f1']:.1f}" if r else "-"

    def tps(r):
        return f"{r['tokens_per_s'] / 1e3:.0f}k" if r else "-"

    def majority(d):
        r = d.get("pretrained") or d.get("random")
        return f"{100 * r['majority_micro_f1']:.1f}" if r else "-"
    print(bk.table(["seq_len", "pretrained", "random init", "majority", "pretrained tok/s", "random tok/s"],
                   [[n, f1(d.get("pretrained")), f1(d.get("random")), majority(d), tps(d.get("pretrained")),
                     tps(d.get("random"))] for n, d in rows.items()], markdown=True))
    return 0 if all(v == "ok" for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
