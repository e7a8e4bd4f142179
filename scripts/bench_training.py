#!/usr/bin/env python
"""GPT-2 training speed: tokens/s, MFU and peak memory versus sequence length and attention.

    python scripts/bench_training.py --out docs/bench_training.json          # one GPU, the full table
    python scripts/bench_training.py --quick                                 # CPU smoke test (seconds)
    python scripts/bench_training.py --seq-lens 1024,4096 --impls flash,hf_sdpa --steps 20

Every configuration (model x seq_len x implementation) runs in a fresh subprocess, so an
out-of-memory error, a crash or a hang costs only that row (reported as OOM / crash / timeout)
and peak-memory numbers do not leak between rows. A training step is the real one of train.py
on one device: forward + backward at `micro_batch` sequences (batch tokens = micro_batch x
seq_len, 16k by default: 16 @ 1k ... 1 @ 16k), gradient clipping at 1.0, fused AdamW, bf16
autocast, random tokens. `--warmup` untimed steps, then `--steps` timed ones between
torch.cuda.synchronize() calls.

Implementations: flash (ours, Triton), sdpa (PyTorch), naive (the standard attention that
materialises the scores), and, when `transformers` is importable, Hugging Face GPT2LMHeadModel
with attn_implementation eager (hf_eager) and sdpa (hf_sdpa), same sizes (n_positions = seq_len,
dropout 0), loss through its `labels=` path. MFU = flops_per_token x tokens/s / peak bf16
FLOP/s of the GPU, with the model's FLOPs formula (GPT.flops_per_token: 6N + attention, causal)
for every row, so the column compares speed at equal work.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OURS = ("flash", "sdpa", "naive")
HF = {"hf_eager": "eager", "hf_sdpa": "sdpa"}
ALL_IMPLS = OURS + tuple(HF)


# ----------------------------------------------------------------------------------- one case
def run_case(case: dict) -> dict:
    """Run one configuration in this process; returns the measurements."""
    import torch
    from omegaconf import OmegaConf

    from model import build_model
    from trainer.metrics import peak_flops

    device = torch.device(case["device"])
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    mcfg = OmegaConf.load(ROOT / "configs" / "model" / f"{case['model']}.yaml")
    cfg = OmegaConf.create({"model": mcfg, "seq_len": case["seq_len"], "attention": {"impl": case["impl"]
                            if case["impl"] in OURS else "sdpa"}})
    ours = build_model(cfg)  # also the FLOPs reference for the Hugging Face rows
    flops_per_token = ours.flops_per_token(case["seq_len"])
    if case["impl"] in HF:
        from transformers import GPT2Config, GPT2LMHeadModel

        hcfg = GPT2Config(vocab_size=int(mcfg.vocab_size), n_positions=case["seq_len"], n_embd=int(mcfg.n_embd),
                          n_layer=int(mcfg.n_layer), n_head=int(mcfg.n_head), resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0)
        del ours
        model = GPT2LMHeadModel._from_config(hcfg, attn_implementation=HF[case["impl"]])

        def loss_fn(x, y):
            return model(input_ids=x, labels=x).loss
    else:
        model = ours

        def loss_fn(x, y):
            return model(x, y)[1]

    model.to(device).train()
    if case.get("compile"):
        model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda) if cuda else torch.optim.AdamW(params, lr=1e-4)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    B, T = case["micro_batch"], case["seq_len"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (B, T + 1), generator=gen)
    x, y = x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)

    def step():
        with amp:
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(case["warmup"]):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(case["steps"]):
        loss = step()
    sync()
    dt = time.perf_counter() - t0
    tps = B * T * case["steps"] / dt
    peak = peak_flops(device)
    return {
        "status": "ok",
        "tokens_per_s": tps,
        "step_ms": 1e3 * dt / case["steps"],
        "mfu": flops_per_token * tps / peak if peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
        "loss": float(loss.detach()),
        "flops_per_token": flops_per_token,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
    }


def _worker(case_json: str) -> int:
    case = json.loads(case_json)
    try:
        result = run_case(case)
    except Exception as e:  # noqa: BLE001
        import torch

        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        result = {"status": "OOM" if oom else "error", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                  if str(e) else type(e).__name__}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------- driver
def _spawn(case: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # real kernels (the interpreter is for tests)
    cmd = [sys.executable, __file__, "--_case", json.dumps(case)]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"no result within {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"status": "crash", "reason": f"exit {p.returncode}: {tail[:200]}"}


def _env() -> dict:
    import torch

    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, check=False,
                                     text=True).stdout.strip() or None
    except OSError:
        pass
    return info


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ["model", "seq_len", "batch", "impl", "status", "tokens/s", "MFU", "peak GB", "ms/step", "vs hf_eager"]
    base = {(r["model"], r["seq_len"]): r.get("tokens_per_s") for r in rows if r["impl"] == "hf_eager"
            and r.get("status") == "ok"}
    lines = []
    for r in rows:
        b = base.get((r["model"], r["seq_len"]))
        ratio = r["tokens_per_s"] / b if b and r.get("status") == "ok" else None
        lines.append([r["model"], str(r["seq_len"]), str(r["micro_batch"]), r["impl"], r["status"],
                      _fmt(r.get("tokens_per_s"), ",.0f"), _fmt(None if r.get("mfu") is None else 100 * r["mfu"], ".1f"),
                      _fmt(r.get("peak_mem_gb"), ".1f"), _fmt(r.get("step_ms"), ".0f"), _fmt(ratio, ".2f")])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.rjust(w) if i in (1, 2, 5, 6, 7, 8, 9) else c.ljust(w) for i, (c, w) in
                      enumerate(zip(line, widths))) for line in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2_small", help="configs/model/<name>.yaml")
    ap.add_argument("--seq-lens", default=None, help="comma list (default 1024,2048,4096,8192,16384; --quick: 64,128)")
    ap.add_argument("--impls", default=",".join(ALL_IMPLS), help=f"comma list of {', '.join(ALL_IMPLS)}")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="micro_batch = max(1, batch_tokens // seq_len)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (all rows)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: gpt2_tiny, seq_len 64/128, 1+2 steps")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._case is not None:
        return _worker(args._case)

    import torch

    if args.quick:
        args.model, args.batch_tokens, args.warmup, args.steps = "gpt2_tiny", 256, 1, 2
        args.seq_lens = args.seq_lens or "64,128"
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    impls = [s for s in args.impls.split(",") if s]
    bad = [s for s in impls if s not in ALL_IMPLS]
    if bad:
        print(f"error: unknown --impls {','.join(bad)}; choose from {', '.join(ALL_IMPLS)}", file=sys.stderr)
        return 2
    if not (ROOT / "configs" / "model" / f"{args.model}.yaml").is_file():
        print(f"error: --model {args.model}: no configs/model/{args.model}.yaml", file=sys.stderr)
        return 2
    try:
        import transformers  # noqa: F401

        have_hf = True
    except ImportError:
        have_hf = False
    seq_lens = [int(s) for s in (args.seq_lens or "1024,2048,4096,8192,16384").split(",") if s]

    rows = []
    for T in seq_lens:
        for impl in impls:
            case = {"model": args.model, "seq_len": T, "micro_batch": max(1, args.batch_tokens // T), "impl": impl,
                    "device": device, "warmup": args.warmup, "steps": args.steps, "compile": args.compile}
            if impl in HF and not have_hf:
                res = {"status": "skipped", "reason": "transformers is not importable"}
            else:
                t0 = time.time()
                res = _spawn(case, args.timeout)
                print(f"[{time.time() - t0:6.1f}s] {args.model} seq_len={T} batch={case['micro_batch']} {impl}: "
                      f"{res['status']}" + (f" {res['tokens_per_s']:,.0f} tok/s" if res["status"] == "ok" else
                                            f" ({res.get('reason', '')})"), flush=True)
            rows.append({**case, **res})
            if args.out:
                _write(args.out, rows, args)
    print()
    print(table(rows))
    if args.out:
        _write(args.out, rows, args)
        print(f"\nwrote {args.out}")
    return 0


def _write(path: str, rows: list[dict], args) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({"env": _env(), "args": {k: v for k, v in vars(args).items() if k != "_case"},
                               "results": rows}, indent=2) + "\n")
    os.replace(tmp, p)


if __name__ == "__main__":
    sys.exit(main())
