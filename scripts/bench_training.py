#!/usr/bin/env python
"""GPT-2 training speed: tokens/s, MFU, peak memory vs sequence length, ours and peers, one run.

    python scripts/bench_training.py --out bench_out/training.json      # one GPU: the full table
    python scripts/bench_training.py --quick                            # CPU smoke (toy sizes)
    python scripts/bench_training.py --seq-lens 1024,16384 --impls flash,sdpa \\
        --variant eager:compile=false --variant blocks:compile=blocks --profile

What is timed is train.py's own step, `trainer.step.train_step`, on the model, parallelize()
(compile), optimizer and precision that train.py builds from the Hydra config: the config is
composed from configs/ with `model=... seq_len=... attention=... train.micro_batch=...
train.global_batch_tokens=...` plus any `--set KEY=VALUE` and the row's variant overrides, as
a user would type them after `python train.py`. Only the data differ: random tokens (speed does
not depend on them; no corpus needed on the GPU box), through the same prefetcher.

Rows: for each seq_len, `flash` (ours) and `sdpa` are attention=flash|sdpa (plus `naive`); the
Hugging Face rows (`hf_eager`, `hf_sdpa`) are `model.backend=hf_eager|hf_sdpa` (transformers'
GPT2LMHeadModel of the same sizes behind the same trainer, model/hf_baseline.py: same data,
train_step, precision and fused AdamW), with compile=false (as Hugging Face runs by default). Tokens per micro-batch:
--batch-tokens (16k: 16 x 1k ... 1 x 16k; one sequence beyond), tokens per step
--global-batch-tokens (accumulation = global / micro). MFU = GPT.flops_per_token(seq_len) x
tokens/s / peak bf16 FLOP/s, the same FLOPs formula for every row (causal attention counted).

Each row runs in its own process (an OOM or crash costs only that row; peak memory is per
row). Processes of a group (--concurrency) start together, compile and warm up concurrently
(torch.compile is CPU work), then are timed strictly one after another, the others idle with
their cached GPU memory released; Hugging Face and naive rows (25-80 GB) run alone, and a row
that runs out of memory beside others is retried alone.
`first_step_s` (the compile + warm-up step) is measured while the group compiles concurrently.
--profile adds a torch.profiler breakdown of one step per row (kernel time by category: attention,
matmul, loss, norm, elementwise, optimizer) and prints the top kernels.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk  # noqa: E402

ROOT = bk.REPO

OURS = ("flash", "sdpa", "naive")
HF = {"hf_eager": "eager", "hf_sdpa": "sdpa"}
ALL_IMPLS = OURS + tuple(HF)
# memory-hungry (full fp32 logits, materialised scores: 25-80 GB a row): never warmed up beside
# other rows. A row of a group that runs out of memory is retried alone (its OOM may be the others').
SOLO = ("hf_eager", "hf_sdpa", "naive")
# variant keys that are not train.py settings: loss_chunk_tokens=N (0: the plain full-logits loss),
# defer=0|1 (train_step's finiteness check: at once, with a sync per step, or one step later)
BENCH_KEYS = ("loss_chunk_tokens", "defer")
DEFAULT_SEQ_LENS = "1024,2048,4096,8192,16384,32768"


# ----------------------------------------------------------------------------------- set-up
def compose(overrides: list[str]):
    """The Hydra config train.py would see for `python train.py <overrides>`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def setup(cfg, dist, loss_chunk_tokens: int | None = None):
    """(model, optimizer, precision, micro_batch, accum, flops_per_token) as train.py builds them
    (model.backend=hf_* gives the Hugging Face baseline of model/hf_baseline.py)."""
    import torch

    from longctx import train as train_mod
    from longctx.model import build_model
    from longctx.trainer.optim import Precision, build_optimizer
    from longctx.trainer.parallelize import parallel_name, parallelize

    micro_batch, accum = train_mod.check_config(cfg, dist.world_size, dist.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(dist.device)
    flops_per_token = model.flops_per_token(cfg.seq_len)
    if loss_chunk_tokens is not None:
        model.loss_chunk_tokens = int(loss_chunk_tokens)
    model = parallelize(model, cfg, dist)
    optimizer = build_optimizer(model, cfg, dist.device)
    prec = Precision(str(cfg.train.precision), dist.device, sharded=parallel_name(cfg) == "fsdp")
    return model, optimizer, prec, micro_batch, accum, flops_per_token


def random_batches(cfg, dist, micro_batch: int, accum: int, steps, seed: int = 0):
    """DeviceBatches over random tokens: (step, micro_step) -> the same tokens on every run."""
    import torch

    from longctx.trainer.step import DeviceBatches

    vocab, T = int(cfg.model.vocab_size), int(cfg.seq_len)

    def fetch(step, micro):
        g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 97 + dist.rank)
        t = torch.randint(0, vocab, (micro_batch, T + 1), generator=g)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # as TokenData.train_batch: pinned, then copied

    return DeviceBatches(fetch, dist.device, steps, accum)


# ----------------------------------------------------------------------------------- profile
_CATEGORIES = (  # first match wins, on the lower-cased kernel name
    ("attention", ("_fwd_kernel", "_bwd_dkdv", "_bwd_dq", "_bwd_preprocess", "flash", "fmha", "sdpa", "attn")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_kernel", "clip")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "mm_", "addmm", "matmul")),
    ("loss", ("cross_entropy", "log_softmax", "nll", "logsumexp", "softmax")),
    ("norm", ("layer_norm", "layernorm")),
    ("embedding", ("embedding", "index", "gather", "scatter")),
    ("copy/cast", ("copy", "cast", "to_copy", "memcpy", "memset", "fill")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "elementwise/fused"


_SYNC_APIS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ",
              "cudaMemcpy(", "cuStreamSynchronize", "cuCtxSynchronize")


def profile_step(run_step, n_top: int = 12, trace: str | None = None) -> dict:
    """Kernel time of one step (CUDA) by category and the top kernels; the host calls that wait
    for the device (synchronisations: where the device may run dry) with their count and time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_step()
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    kernels, syncs = {}, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total  # us
        elif any(e.name.startswith(k) for k in _SYNC_APIS) or (e.name.startswith("cudaMemcpy") and
                                                                "Async" not in e.name):
            n, us = syncs.get(e.name, (0, 0.0))
            syncs[e.name] = (n + 1, us + e.cpu_time_total)
    total = sum(kernels.values()) or 1.0
    cats: dict[str, float] = {}
    for name, us in kernels.items():
        cats[categorize(name)] = cats.get(categorize(name), 0.0) + us
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:n_top]
    return {"kernel_ms": total / 1e3,
            "categories": {k: round(v / total, 4) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:90], "ms": round(us / 1e3, 3), "share": round(us / total, 4)} for n, us in top],
            "host_waits": {k: {"count": n, "ms": round(us / 1e3, 3)} for k, (n, us) in syncs.items()}}


# ----------------------------------------------------------------------------------- one row
def run_case(case: dict, ready=None) -> dict:
    """Set up one row, warm up, call ready() (the driver's turn), time; returns the measurements."""
    from longctx import train as train_mod
    from longctx.trainer.distributed import init_distributed

    dist = init_distributed(case["device"])
    cfg = compose(case["overrides"])
    model, opt, prec, mb, accum, fpt = setup(cfg, dist, case.get("loss_chunk_tokens"))
    # train.py's garbage-collection policy (gc_every) around the steps, as in its loop
    with train_mod.collect_garbage_every(cfg.gc_every) as gc_tick:
        return _time_steps(case, cfg, dist, model, opt, prec, mb, accum, fpt, gc_tick, ready)


def _time_steps(case, cfg, dist, model, opt, prec, mb, accum, fpt, gc_tick, ready) -> dict:
    import torch

    from longctx.trainer.metrics import peak_flops
    from longctx.trainer.step import train_step

    cuda = dist.device.type == "cuda"
    n_steps = case["warmup"] + case["steps"] + (1 if case.get("profile") else 0)
    batches = random_batches(cfg, dist, mb, accum, range(n_steps))
    grad_clip = cfg.train.grad_clip

    defer = case.get("defer")
    pending = [None]

    def one(step):
        pending[0] = train_step(model, batches, opt, prec, accum=accum, grad_clip=grad_clip, step=step,
                                pending=pending[0], defer=defer)
        gc_tick(step + 1)
        return pending[0]

    model.train()
    t0 = time.perf_counter()
    one(0).check()  # compilation (torch.compile, Triton) + the first step
    first_step_s = time.perf_counter() - t0
    for s in range(1, case["warmup"]):
        one(s)
    pending[0].check()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # idle while other rows are timed: hold no cached activations
    if ready is not None:
        ready()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dist.device)
    results = []
    t0 = time.perf_counter()
    for s in range(case["warmup"], case["warmup"] + case["steps"]):
        results.append(one(s))
    loss = results[-1].loss  # waits for the last step: every timed step is done
    dt = time.perf_counter() - t0
    tokens = mb * int(cfg.seq_len) * accum * case["steps"]
    tps = tokens / dt
    peak = peak_flops(dist.device)
    res = {
        "status": "ok", "tokens_per_s": tps, "step_ms": 1e3 * dt / case["steps"],
        "mfu": fpt * tps / peak if peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated(dist.device) / 1e9 if cuda else None,
        "first_step_s": first_step_s, "loss": loss, "micro_batch": mb, "accum": accum,
        "flops_per_token": fpt, "compile": str(cfg.get("compile")),
        "device_name": torch.cuda.get_device_name(dist.device) if cuda else platform.processor() or "cpu",
    }
    if case.get("profile") and cuda:
        res["profile"] = profile_step(lambda: one(n_steps - 1).check(), trace=case.get("trace"))
        # share of the timed step's wall time the device spent in kernels (the rest: it waited)
        res["profile"]["device_busy"] = round(res["profile"]["kernel_ms"] / res["step_ms"], 4)
    return res


def _worker() -> int:
    """A worker process (benchkit.serve): one case; an exception is that row's OOM / error."""
    def run(case, ready):
        try:
            return run_case(case, ready)
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()
            oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
            return {"status": "OOM" if oom else "error", "reason": f"{type(e).__name__}: {msg[0][:200] if msg else ''}"}
    return bk.serve(run)


# ----------------------------------------------------------------------------------- driver
def run_group(cases: list[dict], env: dict, logdir: Path, timeout: float) -> list[dict]:
    """Start a worker per case, wait until each is warm (or done), then time them one by one."""
    procs = []
    for c in cases:
        w = bk.Worker([sys.executable, __file__, "--_worker"], logdir / f"{c['key']}.log", env=env, cwd=ROOT)
        w.send(c)
        procs.append((w, time.time(), {}))

    def wait(w, t0, limit):  # the next message after the environment: ready, result, None (exit), "timeout"
        while isinstance(msg := w.recv(max(1.0, limit - (time.time() - t0))), dict) and "env" in msg:
            pass
        return msg

    def finish(w, t0, res, msg, what):
        w.stop()
        res.update(msg["result"] if isinstance(msg, dict) and "result" in msg else
                   {"status": "timeout", "reason": f"{what} within {timeout:.0f} s"} if msg == "timeout" else
                   {"status": "crash", "reason": f"exit {w.proc.returncode}: {w.tail(1)[:200] or '(no output)'}"})
        res["wall_s"] = round(time.time() - t0, 1)

    ready = []
    for w, t0, res in procs:
        msg = wait(w, t0, timeout)
        if isinstance(msg, dict) and msg.get("ready"):
            ready.append((w, t0, res))
        else:
            finish(w, t0, res, msg, "not warm")
    for w, t0, res in ready:
        w.send("go")
        finish(w, t0, res, wait(w, time.time(), timeout), "no result")
    return [res for _, _, res in procs]


def table(rows: list[dict]) -> str:
    head = ["seq_len", "batch", "row", "status", "tokens/s", "MFU", "peak GB", "ms/step", "1st step s",
            "loss", "vs sdpa", "vs hf_sdpa"]
    by = {(r["seq_len"], r["impl"], r["variant"]): r.get("tokens_per_s") for r in rows if r.get("status") == "ok"}
    lines = []
    for r in rows:
        ok = r.get("status") == "ok"
        # vs sdpa: the attention=sdpa row of the same variant (same trainer, compile, loss)
        sd, hf = by.get((r["seq_len"], "sdpa", r["variant"])), by.get((r["seq_len"], "hf_sdpa", "-"))
        tps = r.get("tokens_per_s") if ok else None
        lines.append([str(r["seq_len"]), f"{r.get('micro_batch', r['mb'])}x{r.get('accum', '?')}", r["name"],
                      r["status"] if ok else f"{r['status']}: {r.get('reason', '')[:60]}",
                      bk.fmt(tps, ",.0f"), bk.fmt(None if not ok or r.get("mfu") is None else 100 * r["mfu"], ".1f"),
                      bk.fmt(r.get("peak_mem_gb") if ok else None, ".1f"), bk.fmt(r.get("step_ms") if ok else None, ".0f"),
                      bk.fmt(r.get("first_step_s") if ok else None, ".1f"), bk.fmt(r.get("loss") if ok else None, ".4f"),
                      bk.fmt(tps / sd if tps and sd and r["impl"] != "sdpa" else None, ".2f"),
                      bk.fmt(tps / hf if tps and hf and r["impl"] != "hf_sdpa" else None, ".2f")])
    return bk.table(head, lines, left={2, 3})


def profile_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        cats = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["categories"].items())
        waits = ", ".join(f"{k.strip()} x{v['count']} {v['ms']:.1f} ms" for k, v in prof.get("host_waits", {}).items())
        out.append(f"[profile] {r['name']} seq_len={r['seq_len']}: {prof['kernel_ms']:.1f} ms of kernels/step "
                   f"(device busy {100 * prof.get('device_busy', 0):.0f}% of the timed step): {cats}; "
                   f"host waits: {waits or 'none'}")
        for k in prof["top"][:8]:
            out.append(f"    {100 * k['share']:5.1f}%  {k['ms']:8.2f} ms  {k['name']}")
    return "\n".join(out)


def _write(path: str, rows: list[dict], args, complete: bool) -> None:
    bk.write_json(path, {"env": {**bk.env_info(), "command": bk.command_line()}, "complete": complete,
                         "args": {k: v for k, v in vars(args).items() if k != "_worker"}, "results": rows})


def build_cases(args, device: str) -> list[dict]:
    """One case per (variant, impl, seq_len), in that order (the groups that warm up together
    follow it); HF rows take no variant. A variant NAME@impl+impl:... applies to those impls only."""
    seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    impls = args.impls.split(",")
    only_lens = {}
    for spec in args.only:
        impl, _, lens = spec.partition("=")
        only_lens[impl] = {int(x) for x in lens.split(",") if x}
    variants = []
    for v in args.variant or ["default:"]:
        head, _, spec = v.partition(":")
        name, _, only = head.partition("@")
        variants.append((name, [s for s in spec.split(",") if s], only.split("+") if only else None))
    named = len(variants) > 1 or variants[0][0] != "default"
    cases = []
    for vi, (vname, vset, only) in enumerate(variants):
        for impl in impls:
            if (impl in HF and vi > 0) or (only and impl not in only and impl not in HF):
                continue
            for T in seq_lens:
                if impl in only_lens and T not in only_lens[impl]:
                    continue
                # micro-batch: train.py's own choice (micro_batch=auto) unless --batch-tokens is given
                mb = max(1, args.batch_tokens // T) if args.batch_tokens else None
                unit = (mb or 1) * T  # the global batch: a whole number of micro-batches (or sequences)
                gbt = max(args.global_batch_tokens, unit) // unit * unit
                special = {k: int(v) for k, _, v in (s.partition("=") for s in vset) if k in BENCH_KEYS}
                hydra_sets = [s for s in vset if s.partition("=")[0] not in BENCH_KEYS] if impl not in HF else []
                attention = impl if impl in OURS else "sdpa"
                overrides = [f"model={args.model}", f"seq_len={T}", f"attention={attention}", "logger=none",
                             f"device={device}", f"train.global_batch_tokens={gbt}",
                             *([f"train.micro_batch={mb}"] if mb else []), *args.set, *hydra_sets]
                if impl in HF:  # Hugging Face as its users run it: uncompiled
                    overrides += [f"model.backend={impl}", "compile=false"]
                name = f"{impl}/{vname}" if named and impl not in HF else impl
                cases.append({"key": f"{T}_{name.replace('/', '-')}", "name": name, "impl": impl, "seq_len": T,
                              "variant": vname if impl not in HF else "-",
                              "mb": mb, "device": device, "overrides": overrides,
                              "loss_chunk_tokens": special.get("loss_chunk_tokens") if impl not in HF else None,
                              "defer": bool(special["defer"]) if "defer" in special else None,
                              "warmup": args.warmup, "steps": args.steps, "profile": args.profile,
                              "trace": str(Path(args.trace_dir) / f"{T}_{name.replace('/', '-')}.json")
                              if args.trace_dir and args.profile else None})
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2_small", help="configs/model/<name>.yaml")
    ap.add_argument("--seq-lens", default=None, help=f"comma list (default {DEFAULT_SEQ_LENS}; --quick: 64,128)")
    ap.add_argument("--impls", default="flash,sdpa,hf_eager,hf_sdpa", help=f"comma list of {', '.join(ALL_IMPLS)}")
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="tokens per micro-batch: micro_batch = this // seq_len (default: train.py's micro_batch=auto)")
    ap.add_argument("--global-batch-tokens", type=int, default=65536, help="tokens per optimizer step")
    ap.add_argument("--variant", action="append", default=None, metavar="NAME[@IMPL+IMPL]:K=V,K=V",
                    help="rows of our impls per variant, e.g. eager:compile=false, plain@flash:loss_chunk_tokens=0")
    ap.add_argument("--only", action="append", default=[], metavar="IMPL=LEN,LEN",
                    help="run this impl at these seq_lens only (e.g. hf_eager=1024,4096,16384)")
    bk.add_step_args(ap, steps=5, warmup=3, set_help="for our rows (e.g. compile=false, train.precision=fp16)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler breakdown of one extra step per row")
    ap.add_argument("--concurrency", type=int, default=4, help="rows compiling / warming up at once")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per row to get warm, and to be timed")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no new group after this long")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: gpt2_tiny, seq_len 64,128, 1+1 steps")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--logdir", default=None, help="keep each row's stderr log here (default: discarded)")
    ap.add_argument("--trace-dir", default=None, help="with --profile: a Chrome trace of each row's profiled step here")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        return _worker()

    import torch

    if args.quick:
        args.model, args.batch_tokens, args.global_batch_tokens = "gpt2_tiny", 128, 256
        args.warmup, args.steps = 1, 1
        args.seq_lens = args.seq_lens or "64,128"
    args.seq_lens = args.seq_lens or DEFAULT_SEQ_LENS
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    bad = [s for s in args.impls.split(",") if s not in ALL_IMPLS]
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

    if args.trace_dir:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
    cases = build_cases(args, device)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # real kernels (the interpreter is for tests)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # concurrent compiles share the CPUs: a few Inductor compile workers each
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) // max(1, args.concurrency))))
    solo = [[c] for c in cases if c["impl"] in SOLO]
    rest = [c for c in cases if c["impl"] not in SOLO]
    groups = [rest[i:i + args.concurrency] for i in range(0, len(rest), max(1, args.concurrency))] + solo
    rows, t_start, retried = [], time.time(), set()
    with tempfile.TemporaryDirectory() as tmp:
        logdir = args.logdir or tmp
        Path(logdir).mkdir(parents=True, exist_ok=True)
        for group in groups:
            todo = []
            for c in group:
                if c["impl"] in HF and not have_hf:
                    rows.append({**c, "status": "skipped", "reason": "transformers is not importable"})
                elif args.max_minutes and time.time() - t_start > 60 * args.max_minutes:
                    rows.append({**c, "status": "skipped", "reason": f"time budget ({args.max_minutes} min) spent"})
                else:
                    todo.append(c)
            if todo:
                for c, res in zip(todo, run_group(todo, env, Path(logdir), args.timeout)):
                    if res["status"] == "OOM" and len(todo) > 1 and c["key"] not in retried:
                        retried.add(c["key"])
                        groups.append([c])  # alone, later: was the memory its own or the group's?
                        print(f"[{time.time() - t_start:6.1f}s] seq_len={c['seq_len']} {c['name']}: OOM beside "
                              f"{len(todo) - 1} other rows; retried alone at the end", flush=True)
                        continue
                    if c["key"] in retried:
                        res["retried_alone"] = True
                    rows.append({**c, **res})
                    print(f"[{time.time() - t_start:6.1f}s] seq_len={c['seq_len']} {c['name']}: {res['status']}"
                          + (f" {res['tokens_per_s']:,.0f} tok/s, first step {res['first_step_s']:.1f}s"
                             if res["status"] == "ok" else f" ({res.get('reason', '')})"), flush=True)
            if args.out:
                _write(args.out, rows, args, complete=False)
    rows.sort(key=lambda r: (r["seq_len"], [c["key"] for c in cases].index(r["key"])))
    if args.out:
        _write(args.out, rows, args, complete=True)
        print(f"wrote {args.out}")
    prof = profile_table(rows)
    if prof:
        print(prof)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
