"""FSDP2 scaling benchmark: tokens/s per GPU, scaling efficiency and memory per GPU.

One command measures every (model, seq_len) case on 1, 2, 4 ... GPUs (each case in its own
torchrun job) and prints the table; JSON goes to --out:

    python scripts/bench_fsdp.py --nproc 1,2,4 --out bench_fsdp.json     # 4 GPUs: ~5-7 min

Cases (bf16 autocast + FSDP2 MixedPrecisionPolicy(bf16 params, fp32 reduce), attention=flash):
    gpt2_medium @ 4096   and   gpt2_small @ 16384     on every N in --nproc
    gpt2_xl     @ 8192   with activation checkpointing (full), on N = 4 (--xl-nproc)

Work per GPU is fixed (weak scaling, as when the global batch grows with the GPUs or the
accumulation shrinks): micro_batch = 16384 // seq_len sequences (16k tokens), --accum
micro-steps (gradient reduction on the last only, as train.py does), one AdamW step.
    tokens/s per GPU   = micro_batch x seq_len x accum / step time
    scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU)
                       = tokens/s per GPU on N / tokens/s per GPU on 1
Data are random tokens (no data preparation on the GPU box; speed does not depend on them).

CPU smoke run (gloo, 2 processes, toy size, a few seconds per case):
    python scripts/bench_fsdp.py --smoke
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPU_CASES = [  # (model, seq_len, activation_checkpointing)
    ("gpt2_medium", 4096, "none"),
    ("gpt2_small", 16384, "none"),
]
XL_CASE = ("gpt2_xl", 8192, "full")
SMOKE_CASES = [("gpt2_tiny", 128, "none"), ("gpt2_tiny", 128, "full")]


# ---------------------------------------------------------------------------------------------------
# worker: one case on the processes of one torchrun job
# ---------------------------------------------------------------------------------------------------
def worker(a) -> None:
    import torch
    from omegaconf import OmegaConf

    from model import build_model
    from trainer.distributed import barrier, destroy, init_distributed, reduce_metrics
    from trainer.parallelize import clip_grad_norm, grad_sync, parallelize

    d = init_distributed(a.device, timeout_s=600)
    cuda = d.device.type == "cuda"
    mcfg = OmegaConf.load(ROOT / "configs" / "model" / f"{a.model}.yaml")
    low = "bf16" if cuda else "fp32"  # CPU: fp32 (no fast bf16 matmuls on this path)
    cfg = OmegaConf.create({
        "model": mcfg, "attention": {"impl": a.attention}, "seq_len": a.seq_len, "compile": a.compile,
        "parallel": {"name": "fsdp", "activation_checkpointing": a.ac, "param_dtype": low,
                     "reduce_dtype": "fp32", "reshard_after_forward": True},
    })
    torch.manual_seed(0)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(d.device)
    with torch.device(d.device):
        model = build_model(cfg)
    n_params, fpt = model.num_params(), model.flops_per_token(a.seq_len)
    model = parallelize(model, cfg, d)
    opt = torch.optim.AdamW(model.optim_groups(0.1), lr=1e-4, betas=(0.9, 0.95), fused=cuda or None)
    mb = a.micro_batch or max(1, 16384 // a.seq_len)
    g = torch.Generator(device=d.device).manual_seed(1000 + d.rank)
    x = torch.randint(0, int(mcfg.vocab_size), (a.accum, mb, a.seq_len + 1), device=d.device, generator=g)

    def step():
        for i in range(a.accum):
            with grad_sync(model, i == a.accum - 1):
                with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cuda):
                    _, loss = model(x[i, :, :-1], x[i, :, 1:])
                (loss / a.accum).backward()
        clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize(d.device)

    result = {"ok": False}
    try:
        for _ in range(a.warmup):
            step()
        sync()
        barrier()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            loss = step()
        sync()
        dt = (time.perf_counter() - t0) / a.steps
        tokens = mb * a.seq_len * a.accum
        if cuda:
            mem = torch.cuda.max_memory_allocated(d.device) / 2**30
            res = torch.cuda.max_memory_reserved(d.device) / 2**30
        else:
            import resource
            mem = res = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (RSS)
        red_max = reduce_metrics({"step_s": dt, "mem": mem, "res": res}, d.device, op="max")
        red_avg = reduce_metrics({"loss": loss.detach().float()}, d.device, op="avg")
        peak = None
        try:
            from trainer.metrics import peak_flops
            peak = peak_flops(d.device)
        except Exception:  # noqa: BLE001
            pass
        tps = tokens / red_max["step_s"]  # the slowest rank sets the pace
        result = {
            "ok": True, "step_s": red_max["step_s"], "tokens_per_step_per_gpu": tokens,
            "tokens_per_s_per_gpu": tps, "tokens_per_s": tps * d.world_size,
            "mfu": (tps * fpt / peak) if peak else None,
            "max_mem_alloc_gib": red_max["mem"], "max_mem_reserved_gib": red_max["res"],
            "loss": red_avg["loss"], "params": n_params, "micro_batch": mb,
        }
    except torch.OutOfMemoryError as e:
        result = {"ok": False, "error": "out of memory: " + str(e).splitlines()[0][:200]}
    if d.is_main:
        result.update(
            model=a.model, seq_len=a.seq_len, nproc=d.world_size, ac=a.ac, attention=a.attention,
            compile=a.compile, accum=a.accum, device=torch.cuda.get_device_name(d.device) if cuda else "cpu",
            torch=torch.__version__,
        )
        Path(a.result).write_text(json.dumps(result))
    destroy()


# ---------------------------------------------------------------------------------------------------
# driver: loop over cases and process counts, one torchrun per run, then the table
# ---------------------------------------------------------------------------------------------------
def run_case(model, seq_len, ac, nproc, a, tmp: Path) -> dict:
    res = tmp / f"{model}_{seq_len}_{ac}_{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, "--worker", "--model", model, "--seq-len", str(seq_len), "--ac", ac,
           "--attention", a.attention, "--device", a.device, "--accum", str(a.accum),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--result", str(res)]
    if a.micro_batch:
        cmd += ["--micro-batch", str(a.micro_batch)]
    if a.compile:
        cmd += ["--compile"]
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast
    t0 = time.time()
    print(f"[bench_fsdp] {model} seq_len={seq_len} ac={ac} on {nproc} ... ", end="", flush=True)
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.run_timeout)
        ok = p.returncode == 0 and res.is_file()
        out = json.loads(res.read_text()) if res.is_file() else {}
        if not ok and not out.get("error"):
            lines = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
            pats = (re.compile(r"^\S*(Error|Exception)\b.*: "), re.compile(r"(Signal|exitcode|Killed)"))
            err = next((ln for pat in pats for ln in lines if pat.search(ln)), lines[-1] if lines else "?")
            out = {"ok": False, "error": f"exit {p.returncode}: {err[:300]}"}
    except subprocess.TimeoutExpired:
        out = {"ok": False, "error": f"timed out after {a.run_timeout}s"}
    out.update(model=model, seq_len=seq_len, ac=ac, nproc=nproc, wall_s=round(time.time() - t0, 1))
    print(f"{out.get('tokens_per_s_per_gpu', 0):,.0f} tok/s/GPU" if out.get("ok") else out.get("error"),
          f"({out['wall_s']} s)", flush=True)
    return out


def table(rows: list[dict]) -> str:
    base = {(r["model"], r["seq_len"], r["ac"]): r["tokens_per_s_per_gpu"]
            for r in rows if r.get("ok") and r["nproc"] == 1}
    head = (f"| {'model':<12} | {'seq_len':>7} | {'AC':<4} | {'GPUs':>4} | {'tok/s/GPU':>10} | {'tok/s total':>11} "
            f"| {'scaling eff.':>12} | {'MFU':>5} | {'mem/GPU GiB':>11} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['model']:<12} | {r['seq_len']:>7} | {r['ac']:<4} | {r['nproc']:>4} | "
                         f"failed: {r.get('error', '?')[:80]} |")
            continue
        b = base.get((r["model"], r["seq_len"], r["ac"]))
        eff = f"{r['tokens_per_s_per_gpu'] / b:.3f}" if b else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        lines.append(f"| {r['model']:<12} | {r['seq_len']:>7} | {r['ac']:<4} | {r['nproc']:>4} | "
                     f"{r['tokens_per_s_per_gpu']:>10,.0f} | {r['tokens_per_s']:>11,.0f} | {eff:>12} | {mfu:>5} | "
                     f"{r['max_mem_alloc_gib']:>11.2f} |")
        r["scaling_efficiency"] = (r["tokens_per_s_per_gpu"] / b) if b else None
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", default=None, help="comma list of process counts (default: 1,2,4 up to the GPUs)")
    ap.add_argument("--cases", default=None,
                    help="comma list of model:seq_len[:ac] (default: gpt2_medium:4096,gpt2_small:16384)")
    ap.add_argument("--xl-nproc", type=int, default=4, help="run gpt2_xl:8192:full on this many GPUs (0: skip)")
    ap.add_argument("--attention", default="flash", choices=["flash", "sdpa", "naive"])
    ap.add_argument("--accum", type=int, default=2, help="micro-steps per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=0, help="sequences per micro-step (0: 16384 // seq_len)")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernel compilation, allocator)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
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
        a.device, a.attention, a.steps, a.warmup, a.xl_nproc = "cpu", "sdpa", 2, 1, 0
        a.micro_batch = a.micro_batch or 2
        a.nproc = a.nproc or "1,2"
        cases = SMOKE_CASES
    else:
        cases = GPU_CASES
        if a.cases:
            cases = []
            for c in a.cases.split(","):
                parts = c.split(":")
                cases.append((parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "none"))
    ngpu = torch.cuda.device_count() if a.device != "cpu" else 0
    if a.nproc:
        nprocs = [int(n) for n in a.nproc.split(",")]
    else:
        nprocs = [n for n in (1, 2, 4, 8) if n <= max(ngpu, 1)]
    if a.device != "cpu" and ngpu == 0:
        sys.exit("error: no CUDA GPU visible; run with --smoke (CPU, gloo) or on a GPU machine")
    if ngpu and max(nprocs) > ngpu:
        sys.exit(f"error: --nproc {a.nproc} asks for {max(nprocs)} GPUs but {ngpu} are visible")

    t0 = time.time()
    rows = []
    with __import__("tempfile").TemporaryDirectory() as tmp:
        for model, seq_len, ac in cases:
            for n in nprocs:
                rows.append(run_case(model, seq_len, ac, n, a, Path(tmp)))
        if a.xl_nproc and (ngpu >= a.xl_nproc):
            rows.append(run_case(*XL_CASE, a.xl_nproc, a, Path(tmp)))
        elif a.xl_nproc and not a.smoke:
            print(f"[bench_fsdp] skipping {XL_CASE[0]}@{XL_CASE[1]}: needs {a.xl_nproc} GPUs, {ngpu} visible")
    text = table(rows)
    print()
    print(text)
    print(f"\ntotal wall time {time.time() - t0:.0f} s")
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if ngpu else "cpu",
        "settings": {k: getattr(a, k) for k in ("attention", "accum", "micro_batch", "steps", "warmup", "compile")},
        "rows": rows,
        "table": text,
    }
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")
    if not all(r.get("ok") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
