#!/usr/bin/env python
"""FSDP2 scaling of train.py's own step: tokens/s per GPU, scaling efficiency, memory per GPU.

    python scripts/bench_fsdp.py --nproc 1,2,4 --out bench_out/fsdp.json     # ~3-4 min on 4 H200s
    python scripts/bench_fsdp.py --smoke                                     # CPU, gloo, toy size

For each case (--cases model:seq_len[:activation_checkpointing], default gpt2_medium:4096) and
each GPU count N (--nproc), one `torchrun --nproc_per_node=N` job builds what
`torchrun ... train.py parallel=fsdp model=... seq_len=...` builds (the Hydra config composed
from configs/ with the same overrides, plus any --set KEY=VALUE: parallelize -> compile ->
FSDP2 with its prefetch, AdamW, precision) and times `trainer.step.train_step` at each global
batch of --global-batches (default: train.py's default 524,288 tokens per step, and 131,072):
the model is set up once per job, warm-up steps first (compilation), then --steps timed steps
per batch size. The global batch stays fixed while N changes (strong scaling, as train.py does:
accumulation = global / (micro_batch x seq_len x N)), so

    tokens/s per GPU   = global batch tokens / step time / N
    scaling efficiency = tokens/s per GPU on N / tokens/s per GPU on 1

Data are random tokens through the trainer's prefetcher (no corpus needed on the GPU box).
The table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk  # noqa: E402

ROOT = bk.REPO

GPU_CASES = [("gpt2_medium", 4096, "none")]
SMOKE_CASES = [("gpt2_tiny", 128, "none")]
DEFAULT_BATCHES = "524288,131072"


# ---------------------------------------------------------------------------------------------------
# worker: one case on the processes of one torchrun job, every global batch size
# ---------------------------------------------------------------------------------------------------
def worker(a) -> None:
    import torch
    from bench_training import compose, random_batches, setup

    from longctx import train as train_mod
    from longctx.trainer.distributed import barrier, destroy, init_distributed, reduce_metrics
    from longctx.trainer.metrics import peak_flops
    from longctx.trainer.step import train_step

    d = init_distributed(a.device, timeout_s=600)
    cuda = d.device.type == "cuda"
    base = [f"model={a.model}", f"seq_len={a.seq_len}", f"attention={a.attention}", "parallel=fsdp",
            f"parallel.activation_checkpointing={a.ac}", "logger=none", f"device={d.device.type}", *a.set]
    if a.micro_batch:
        base.append(f"train.micro_batch={a.micro_batch}")
    rows, model = [], None
    for i, gbt in enumerate(int(b) for b in a.global_batches.split(",")):
        cfg = compose([*base, f"train.global_batch_tokens={gbt}"])
        row = {"global_batch_tokens": gbt}
        try:
            if model is None:
                model, opt, prec, mb, accum, fpt = setup(cfg, d)
            else:  # the same model and optimizer; only the accumulation changes
                mb, accum = train_mod.check_config(cfg, d.world_size, d.device)
            warmup = a.warmup  # every batch size: a new accumulation count re-warms the allocator
            batches = random_batches(cfg, d, mb, accum, range(warmup + a.steps), seed=i)
            with train_mod.collect_garbage_every(cfg.gc_every) as gc_tick:  # train.py's GC policy
                t0 = time.perf_counter()
                for s in range(warmup):
                    train_step(model, batches, opt, prec, accum=accum, grad_clip=cfg.train.grad_clip, step=s)
                    gc_tick(s + 1)
                    if s == 0 and i == 0:
                        row["first_step_s"] = time.perf_counter() - t0
                if cuda:
                    torch.cuda.synchronize(d.device)
                    torch.cuda.reset_peak_memory_stats(d.device)
                barrier()
                t0 = time.perf_counter()
                for s in range(warmup, warmup + a.steps):
                    loss, _ = train_step(model, batches, opt, prec, accum=accum, grad_clip=cfg.train.grad_clip,
                                         step=s)
                    gc_tick(s + 1)
                dt = (time.perf_counter() - t0) / a.steps
            mem = torch.cuda.max_memory_allocated(d.device) / 2**30 if cuda else None
            red = reduce_metrics({"step_s": dt, "mem": mem or 0.0}, d.device, op="max")  # the slowest rank
            peak = peak_flops(d.device)
            tps = gbt / red["step_s"] / d.world_size
            row.update(ok=True, step_s=red["step_s"], accum=accum, micro_batch=mb, tokens_per_s_per_gpu=tps,
                       tokens_per_s=tps * d.world_size, mfu=tps * fpt / peak if peak else None,
                       max_mem_alloc_gib=red["mem"] if cuda else None, loss=loss)
        except torch.OutOfMemoryError as e:
            row.update(ok=False, error="out of memory: " + str(e).splitlines()[0][:200])
            torch.cuda.empty_cache()
        except Exception as e:
            if model is None:
                raise
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        rows.append(row)
    if d.is_main:
        device = torch.cuda.get_device_name(d.device) if cuda else "cpu"
        Path(a.result).write_text(json.dumps({"rows": rows, "device": device, "torch": torch.__version__,
                                              "compile": str(cfg.get("compile"))}))
    destroy()


# ---------------------------------------------------------------------------------------------------
# driver: one torchrun job per (case, GPU count), then the table
# ---------------------------------------------------------------------------------------------------
def run_job(model, seq_len, ac, nproc, a, tmp: Path) -> list[dict]:
    res = tmp / f"{model}_{seq_len}_{ac}_{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, "--worker", "--model", model, "--seq-len", str(seq_len), "--ac", ac,
           "--attention", a.attention, "--device", a.device, "--global-batches", a.global_batches,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--result", str(res)]
    if a.micro_batch:
        cmd += ["--micro-batch", str(a.micro_batch)]
    for s in a.set:
        cmd += ["--set", s]
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast
    env.pop("TRITON_INTERPRET", None)
    t0 = time.time()
    print(f"[bench_fsdp] {model} seq_len={seq_len} ac={ac} on {nproc} ... ", end="", flush=True)
    info = {"model": model, "seq_len": seq_len, "ac": ac, "nproc": nproc}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.run_timeout, check=False)
        if res.is_file():
            out = json.loads(res.read_text())
            rows = [{**info, **r, "device": out["device"], "torch": out["torch"], "compile": out["compile"]}
                    for r in out["rows"]]
        else:
            lines = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
            pats = (re.compile(r"^\S*(Error|Exception)\b.*: "), re.compile(r"(Signal|exitcode|Killed)"))
            err = next((ln for pat in pats for ln in lines if pat.search(ln)), lines[-1] if lines else "?")
            rows = [{**info, "ok": False, "error": f"exit {p.returncode}: {err[:300]}"}]
    except subprocess.TimeoutExpired:
        rows = [{**info, "ok": False, "error": f"timed out after {a.run_timeout}s"}]
    wall = round(time.time() - t0, 1)
    for r in rows:
        r["wall_s"] = wall
    print(", ".join(f"{r['global_batch_tokens']:,}: {r['tokens_per_s_per_gpu']:,.0f} tok/s/GPU" if r.get("ok")
                    else r.get("error", "?") for r in rows), f"({wall} s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown, one row per (case, GPU count, global batch); scaling efficiency against 1 GPU."""
    base = {(r["model"], r["seq_len"], r["ac"], r["global_batch_tokens"]): r["tokens_per_s_per_gpu"]
            for r in rows if r.get("ok") and r["nproc"] == 1}
    lines = []
    for r in rows:
        gb = r.get("global_batch_tokens", 0)
        lead = [r["model"], r["seq_len"], r["ac"], f"{gb:,}", r["nproc"]]
        if not r.get("ok"):
            lines.append([*lead, f"failed: {r.get('error', '?')[:100]}"])
            continue
        b = base.get((r["model"], r["seq_len"], r["ac"], gb))
        r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / b if b else None
        lines.append([*lead, r["accum"], f"{r['tokens_per_s_per_gpu']:,.0f}", f"{r['tokens_per_s']:,.0f}",
                      bk.fmt(r["scaling_efficiency"], ".3f", "n/a"), f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a",
                      bk.fmt(r.get("max_mem_alloc_gib"), ".2f", "n/a")])
    return bk.table(["model", "seq_len", "AC", "global batch", "GPUs", "accum", "tok/s/GPU", "tok/s total",
                     "scaling eff.", "MFU", "mem/GPU GiB"], lines, markdown=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", default=None, help="comma list of process counts (default: 1,2,4 up to the GPUs)")
    ap.add_argument("--cases", default=None, help="comma list of model:seq_len[:ac] (default: gpt2_medium:4096)")
    ap.add_argument("--global-batches", default=DEFAULT_BATCHES, help="tokens per optimizer step, comma list")
    ap.add_argument("--attention", default="flash", choices=["flash", "sdpa", "naive"])
    ap.add_argument("--micro-batch", type=int, default=0, help="train.micro_batch (0: auto = 16384 // seq_len)")
    bk.add_step_args(ap, steps=3, warmup=2, set_help="e.g. parallel.prefetch=0, compile=false, "
                     "parallel.reshard_after_forward=false")
    ap.add_argument("--run-timeout", type=int, default=300, help="seconds per torchrun job")
    ap.add_argument("--out", default="bench_fsdp.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, 1 and 2 processes, gpt2_tiny at 128")
    # worker-only
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ac", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:
        return worker(a)

    import torch

    if a.smoke:
        a.device, a.attention, a.steps, a.warmup = "cpu", "sdpa", 1, 1
        a.micro_batch = a.micro_batch or 2
        a.nproc = a.nproc or "1,2"
        a.global_batches = a.global_batches if a.global_batches != DEFAULT_BATCHES else "1024,512"
        cases = SMOKE_CASES
    else:
        cases = GPU_CASES
    if a.cases:
        cases = []
        for c in a.cases.split(","):
            parts = c.split(":")
            cases.append((parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "none"))
    ngpu = torch.cuda.device_count() if a.device != "cpu" else 0
    nprocs = [int(n) for n in a.nproc.split(",")] if a.nproc else [n for n in (1, 2, 4, 8) if n <= max(ngpu, 1)]
    if a.device != "cpu" and ngpu == 0:
        sys.exit("error: no CUDA GPU visible; run with --smoke (CPU, gloo) or on a GPU machine")
    if ngpu and max(nprocs) > ngpu:
        sys.exit(f"error: --nproc {a.nproc} asks for {max(nprocs)} GPUs but {ngpu} are visible")

    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, seq_len, ac in cases:
            for n in nprocs:
                rows += run_job(model, seq_len, ac, n, a, Path(tmp))
    text = table(rows)
    bk.write_json(a.out, {"date": bk.env_info(False)["date"], "command": bk.command_line(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name(0) if ngpu else "cpu",
                          "settings": {k: getattr(a, k) for k in ("attention", "global_batches", "micro_batch",
                                                                  "steps", "warmup", "set")},
                          "rows": rows, "table": text})
    print(f"\nwrote {a.out}; total wall time {time.time() - t0:.0f} s\n")
    print(text)
    if not all(r.get("ok") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
