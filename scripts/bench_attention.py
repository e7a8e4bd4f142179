"""Attention speed and memory versus sequence length (the FlashAttention paper's Figure 3).

Compares, on the same random inputs:
  ours            kernels.flash_attention (Triton)
  naive           kernels.reference_attention (materialised scores, fp32 softmax)
  sdpa_flash      torch SDPA, FLASH_ATTENTION backend (FlashAttention-2 kernels)
  sdpa_efficient  torch SDPA, EFFICIENT_ATTENTION backend (memory-efficient)
  sdpa_cudnn      torch SDPA, CUDNN_ATTENTION backend
  flex            torch FlexAttention, torch.compile'd, causal BlockMask built once (None if not causal)
  sdpa_math       torch SDPA MATH backend (only when asked for, and in --smoke)
SDPA and flex take (B, H, N, D): they get transposed views of our (B, N, H, D) tensors and give a
transposed view back, as a user of our layout would call them.

What is measured per (preset, causal, N, method), median over timed calls after warm-up:
  fwd      out = f(q, k, v) with q, k, v requiring grad (so the forward saves what backward needs)
  bwd      torch.autograd.grad(out, (q, k, v), dO, retain_graph=True) on one saved forward graph
           (--bwd derived, or a backend that refuses a second backward: bwd = fwd+bwd - fwd,
           marked "derived" in the JSON)
  fwd+bwd  torch.autograd.grad(f(q, k, v), (q, k, v), dO)
  TFLOP/s  forward FLOPs 4*B*H*N^2*D (halved when causal); backward 2.5x, fwd+bwd 3.5x of that
  mem      torch.cuda.max_memory_allocated during one fwd+bwd minus memory allocated before it
           (q, k, v and dO already exist, so they are not counted)
  check    (N <= --check-max-n) relative error of out, dq, dk, dv on batch 0, heads 0-1 against a
           float64 reference_attention; flagged when above --check-tol
Sequence lengths keep B*N constant (see the presets). After an OOM (or crash) of a method, its
larger N in the same table are not tried. Each case runs in a worker process, so a CUDA crash
costs that case only; --max-minutes bounds the whole run.

  python scripts/bench_attention.py --quick --bwd derived --max-minutes 5.3 --out $OUT/attention.json --markdown
  python scripts/bench_attention.py --smoke --out /tmp/attn.json                   # CPU toy run
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

METHODS = ["ours", "naive", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flex"]
EXTRA_METHODS = ["sdpa_math"]
SMOKE_METHODS = METHODS + EXTRA_METHODS

# batch = min(max_batch, tokens // N) (at least 1): B*N constant once N is large enough.
PRESETS = {
    # ANCHORS' first table: H100, H=32, D=128, B=8 up to 16k (B*N = 131072 from there on, B=2 at 64k)
    "h100_d128": {"heads": 32, "headdim": 128, "max_batch": 8, "tokens": 131072},
    # ANCHORS' second table: GPT-2's head dim, H=16, D=64, B*N = 131072
    "d64": {"heads": 16, "headdim": 64, "max_batch": None, "tokens": 131072},
    "smoke": {"heads": 2, "headdim": 32, "max_batch": 1, "tokens": 128},
}
ALL_SEQLENS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
QUICK_SEQLENS = [1024, 4096, 16384, 65536]
SMOKE_SEQLENS = [64, 128]

ARGS = None     # parsed arguments (worker)
DEVICE = "cpu"  # set by the worker's setup


def batch_for(preset: dict, n: int) -> int:
    b = max(1, preset["tokens"] // n)
    return min(b, preset["max_batch"]) if preset["max_batch"] else b


# ------------------------------------------------------------------------------ the methods
def _causal_mod(b, h, q_idx, kv_idx):  # module level: one function object, so compiled code is reused
    return q_idx >= kv_idx


_FLEX = {}


def _flex_fn(cuda: bool):
    """flex_attention compiled once per process (dynamic=False: one specialisation per shape)."""
    if "fn" not in _FLEX:
        import torch
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    return _FLEX["fn"]


def make_forward(method: str, q, k, v, causal: bool):
    """A closure computing the method's output in our (B, N, H, D) layout. Raises if unavailable."""
    import torch
    import torch.nn.functional as F
    n = q.shape[1]
    if method == "ours":
        from kernels import flash_attention
        return lambda: flash_attention(q, k, v, causal=causal)
    if method == "naive":
        from kernels import reference_attention
        return lambda: reference_attention(q, k, v, causal=causal)
    if method.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        name = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}[method]
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            raise NotImplementedError(f"SDPBackend.{name} not available in torch {torch.__version__}")
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # views, no copy

        def sdpa():
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            return o.transpose(1, 2)
        return sdpa
    if method == "flex":
        from torch.nn.attention.flex_attention import create_block_mask
        cuda = bl.is_cuda(q.device)
        block_mask = (create_block_mask(_causal_mod, None, None, n, n, device=q.device)
                      if causal else None)
        fn = _flex_fn(cuda)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return lambda: fn(qt, kt, vt, block_mask=block_mask).transpose(1, 2)
    raise ValueError(f"unknown method {method!r}")


# ------------------------------------------------------------------------------- one case
def correctness(fwd, q, k, v, dout, causal: bool, heads: int = 2) -> dict:
    """Relative errors of out, dq, dk, dv on batch 0, heads [0, heads) vs a float64 reference."""
    import torch
    from kernels import reference_attention
    hc = min(heads, q.shape[2])
    out = fwd()
    errs = {}
    try:
        grads = torch.autograd.grad(out, (q, k, v), dout)
    except NotImplementedError:  # e.g. FlexAttention has no backward on CPU: check the forward only
        grads = None
    ref_in = [t[:1, :, :hc].detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, causal=causal)
    errs["out"] = bl.rel_err(out[:1, :, :hc], ref)
    if grads is not None:
        ref_g = torch.autograd.grad(ref, ref_in, dout[:1, :, :hc].double())
        for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_g):
            errs[name] = bl.rel_err(g[:1, :, :hc], rg)
    else:
        errs["grads"] = "not checked (no backward on this device)"
    del out, grads
    return errs


def _measure(case: dict, res: dict, stage: dict) -> None:
    import torch
    a = ARGS
    dtype = getattr(torch, bl.DTYPES[res["dtype"]])
    b, n, h, d, causal = case["batch"], case["n"], case["heads"], case["headdim"], case["causal"]
    gen = torch.Generator(device=DEVICE).manual_seed(a.seed * 1_000_003 + n)
    shape = (b, n, h, d)
    q, k, v, dout = (torch.randn(shape, device=DEVICE, dtype=dtype, generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    timing = dict(warmup_ms=a.warmup_ms, rep_ms=a.rep_ms, min_reps=a.min_reps,
                  min_warmup=0 if a.smoke else 1)

    stage["name"] = "setup"
    fwd = make_forward(case["method"], q, k, v, causal)
    stage["name"] = "first call"
    t = time.perf_counter()
    out = fwd()
    bl._sync(DEVICE)
    res["first_call_s"] = round(time.perf_counter() - t, 3)  # includes torch.compile for flex
    del out

    if n <= a.check_max_n:
        stage["name"] = "check"
        errs = correctness(fwd, q, k, v, dout, causal)
        res["check"] = errs
        worst = max((e for e in errs.values() if isinstance(e, float)), default=0.0)
        res["check_ok"] = bool(worst <= a.check_tol)
        if not res["check_ok"]:
            res["reason"] = f"check FAILED: max rel. err {worst:.2e} > {a.check_tol:g}"

    def fwd_bwd():
        return torch.autograd.grad(fwd(), (q, k, v), dout)

    if "check" not in res or bl.is_cuda(DEVICE):
        stage["name"] = "fwd+bwd warm-up"
        fwd_bwd()  # compiles flex's backward; the cost stays out of the timings below
    stage["name"] = "memory"
    res["mem_bytes"] = bl.peak_extra_bytes(fwd_bwd, DEVICE)

    stage["name"] = "fwd"
    res["fwd"] = bl.time_fn(fwd, DEVICE, **timing)
    stage["name"] = "fwd+bwd"
    res["fwdbwd"] = bl.time_fn(fwd_bwd, DEVICE, **timing)
    stage["name"] = "bwd"
    if a.bwd == "derived":
        res["bwd"] = {"ms": max(res["fwdbwd"]["ms"] - res["fwd"]["ms"], 0.0), "derived": True}
        return
    out = fwd()
    try:
        res["bwd"] = bl.time_fn(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                DEVICE, **timing)
    except Exception as exc:
        if bl.classify_error(exc)[0] == "OOM":
            raise
        # a backend that cannot run backward twice on one graph: derive it
        res["bwd"] = {"ms": max(res["fwdbwd"]["ms"] - res["fwd"]["ms"], 0.0), "derived": True,
                      "why": bl.short(repr(exc), 120)}
    del out


def run_case(case: dict) -> dict:
    res = dict(case)
    res.update(status="ok", reason="")
    b, n, h, d = case["batch"], case["n"], case["heads"], case["headdim"]
    res["flops_fwd"] = 4.0 * b * h * n * n * d / (2.0 if case["causal"] else 1.0)
    if not ARGS.smoke and not bl.is_cuda(DEVICE):
        res.update(status="n/a", reason="no CUDA device")
        return res
    stage = {"name": "start"}
    t0 = time.perf_counter()
    try:
        _measure(case, res, stage)
    except Exception as exc:
        status, reason = bl.classify_error(exc)
        if case["method"] == "flex" and status == "error" and stage["name"] in ("setup", "first call"):
            status, reason = "n/a", bl.short(f"flex compile failed: {reason}", 160)
        if status == "OOM" and not bl.is_cuda(DEVICE):
            status = "error"
        res.update(status=status, reason=reason, failed_in=stage["name"])
    bl.free_memory()
    res["case_s"] = round(time.perf_counter() - t0, 2)
    for mode, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)):
        if isinstance(res.get(mode), dict):
            res[mode]["tflops"] = bl.tflops(res["flops_fwd"] * mult, res[mode]["ms"])
    bl.log(case_line(res))
    return res


def case_line(r: dict) -> str:
    head = (f"{r['group']:<22} N={r['n']:<6} B={r['batch']:<4} {r['method']:<15}")
    parts = []
    for mode, label in (("fwd", "fwd"), ("bwd", "bwd"), ("fwdbwd", "f+b")):
        m = r.get(mode)
        if isinstance(m, dict):
            parts.append(f"{label} {m['ms']:8.3f} ms {bl.fmt_tf(m.get('tflops')):>5} TF/s")
    if r.get("mem_bytes") is not None:
        parts.append(f"mem {r['mem_bytes'] / 1e9:5.2f} GB")
    if "check" in r:
        errs = [e for e in r["check"].values() if isinstance(e, float)]
        parts.append(f"err {max(errs):.1e}" + ("" if r.get("check_ok", True) else " FLAGGED"))
    if r["status"] != "ok":
        parts.append(f"{r['status']}: {r.get('reason', '')}" +
                     (f" (in {r['failed_in']})" if r.get("failed_in") else ""))
    parts.append(f"[{r.get('case_s', 0):.1f} s]")
    return head + " | ".join(parts)


# -------------------------------------------------------------------------------- reporting
def group_key(preset: str, causal: bool) -> str:
    return f"{preset}/{'causal' if causal else 'noncausal'}"


def cell_status(r: dict | None) -> str | None:
    if r is None:
        return "-"
    if r["status"] == "ok":
        return None
    return {"n/a": "n/a", "OOM": "OOM", "skipped": "skip", "crash": "crash", "timeout": "timeout",
            "error": "error"}.get(r["status"], r["status"])


def tf(r, mode):
    m = r.get(mode) if r else None
    return m.get("tflops") if isinstance(m, dict) else None


def ms(r, mode):
    m = r.get(mode) if r else None
    return m.get("ms") if isinstance(m, dict) else None


def build_tables(results: list[dict], methods: list[str]) -> list[dict]:
    """Per group: TFLOP/s table (fwd / fwd+bwd (mem)), ms table (fwd / bwd / fwd+bwd), notes."""
    groups = []
    for g in dict.fromkeys(r["group"] for r in results):
        rs = [r for r in results if r["group"] == g]
        first = rs[0]
        by = {(r["n"], r["method"]): r for r in rs}
        ns = sorted({r["n"] for r in rs})
        tf_rows, ms_rows = [], []
        for n in ns:
            b = next(r["batch"] for r in rs if r["n"] == n)
            tr, mr = [str(n), str(b)], [str(n), str(b)]
            for m in methods:
                r = by.get((n, m))
                st = cell_status(r)
                flag = "" if (r is None or r.get("check_ok", True)) else " (!)"
                if st is not None and tf(r, "fwd") is None:
                    tr.append(st)
                    mr.append(st)
                    continue
                mem = f" ({bl.fmt_gb(r.get('mem_bytes'))})" if r.get("mem_bytes") is not None else ""
                tail = "" if st is None else f" [{st}]"
                tr.append(f"{bl.fmt_tf(tf(r, 'fwd'))} / {bl.fmt_tf(tf(r, 'fwdbwd'))}{mem}{flag}{tail}")
                mr.append(f"{bl.fmt(ms(r, 'fwd'), '.3g')} / {bl.fmt(ms(r, 'bwd'), '.3g')} / "
                          f"{bl.fmt(ms(r, 'fwdbwd'), '.3g')}{flag}{tail}")
            tf_rows.append(tr)
            ms_rows.append(mr)
        notes = {}
        for r in rs:
            if r["status"] != "ok" or not r.get("check_ok", True):
                key = (r["method"], r["status"], r.get("reason", ""))
                notes.setdefault(key, []).append(r["n"])
        note_lines = [f"{m} N={','.join(map(str, ns_))}: {st}: {why}" for (m, st, why), ns_ in notes.items()]
        title = (f"{g}: H={first['heads']}, D={first['headdim']}, {first['dtype']}, "
                 f"{'causal' if first['causal'] else 'non-causal'}")
        groups.append({"group": g, "title": title, "headers": ["N", "B", *methods],
                       "tflops_rows": tf_rows, "ms_rows": ms_rows, "notes": note_lines,
                       "targets": target_rows(by, ns, methods)})
    return groups


def target_rows(by: dict, ns: list[int], methods: list[str]) -> list[list[str]]:
    """Issue 2's targets at N >= 4096: ours >= flex and >= 1.2 x sdpa_flash (fwd and fwd+bwd)."""
    if "ours" not in methods:
        return []
    rows = []
    for n in ns:
        if n < 4096:
            continue
        o = by.get((n, "ours"))
        if not o or o["status"] != "ok":
            continue
        row = [str(n)]
        for mode in ("fwd", "fwdbwd"):
            for peer, mult in (("flex", 1.0), ("sdpa_flash", 1.2), ("sdpa_cudnn", None)):
                p = by.get((n, peer))
                if tf(p, mode) and tf(o, mode):
                    ratio = tf(o, mode) / ((mult or 1.0) * tf(p, mode))
                    verdict = "" if mult is None else (" ok" if ratio >= 1 else " MISS")
                    row.append(f"{ratio:.2f}{verdict}")
                else:
                    row.append("-")
        fa = by.get((n, "sdpa_flash"))
        if o.get("mem_bytes") and fa and fa.get("mem_bytes"):
            ratio = o["mem_bytes"] / fa["mem_bytes"]
            row.append(f"{ratio:.2f} {'ok' if ratio <= 1 else 'MISS'}")
        else:
            row.append("-")
        rows.append(row)
    return rows


TARGET_HEADERS = ["N", "fwd ours/flex", "fwd ours/(1.2 sdpa_flash)", "fwd ours/cudnn", "f+b ours/flex",
                  "f+b ours/(1.2 sdpa_flash)", "f+b ours/cudnn", "mem ours/sdpa_flash"]


def render(groups: list[dict], env: dict, markdown: bool) -> str:
    table = bl.markdown_table if markdown else bl.text_table
    out = []
    for g in groups:
        if markdown:
            out.append(f"#### {g['title']}\n\nforward / forward+backward TFLOP/s (peak extra memory)\n")
        else:
            out.append(f"== {g['title']}: fwd / fwd+bwd TFLOP/s (peak extra memory)")
        out.append(table(g["headers"], g["tflops_rows"]))
        out.append("\nms: fwd / bwd / fwd+bwd\n" if markdown else "-- ms: fwd / bwd / fwd+bwd")
        out.append(table(g["headers"], g["ms_rows"]))
        if g["targets"]:
            out.append("\ntargets (issue 2: ratio >= 1 is ok, memory ratio <= 1; cuDNN for information)\n"
                       if markdown else
                       "-- targets (issue 2: ratio >= 1 is ok, memory ratio <= 1; cuDNN for information)")
            out.append(table(TARGET_HEADERS, g["targets"]))
        if g["notes"]:
            out.append("\nnotes:\n" if markdown else "-- notes:")
            out.append("\n".join(("- " if markdown else "  ") + ln for ln in g["notes"]))
        out.append("")
    return "\n".join(out)


def env_header(env: dict, markdown: bool) -> str:
    keys = ["date", "gpu", "torch", "triton", "cudnn", "cuda", "python", "git_commit", "device"]
    line = ", ".join(f"{k} {env.get(k)}" for k in keys if k in env)
    return (f"_{line}_\n\n`{bl.command_line()}`\n" if markdown else f"env: {line}\ncommand: {bl.command_line()}")


def plots(results: list[dict], methods: list[str], out: Path) -> list[str]:
    written = []
    for g in dict.fromkeys(r["group"] for r in results):
        rs = [r for r in results if r["group"] == g]
        first = rs[0]
        def series(getter):
            return {m: [(r["n"], getter(r)) for r in rs if r["method"] == m] for m in methods}
        panels = [
            {"title": "forward", "ylabel": "time (ms)", "series": series(lambda r: ms(r, "fwd"))},
            {"title": "forward + backward", "ylabel": "time (ms)", "series": series(lambda r: ms(r, "fwdbwd"))},
            {"title": "peak extra memory (fwd+bwd)", "ylabel": "GB",
             "series": series(lambda r: r["mem_bytes"] / 1e9 if r.get("mem_bytes") else None)},
        ]
        path = out.with_name(f"{out.stem}_{g.replace('/', '_')}.png")
        bs = sorted({r["batch"] for r in rs})
        title = (f"attention, H={first['heads']}, D={first['headdim']}, {first['dtype']}, "
                 f"{'causal' if first['causal'] else 'non-causal'}, B={bs[-1]}..{bs[0]} (B*N constant at large N)")
        why = bl.plot_lines(path, title, panels)
        if why is None:
            written.append(str(path))
        else:
            bl.log(f"plot {path.name} not written: {why}")
    return written


# ------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="all", choices=["all", "h100_d128", "d64"],
                   help="h100_d128: H=32, D=128, B=8 (B*N<=131072); d64: H=16, D=64, B*N=131072")
    p.add_argument("--heads", type=int, help="override the preset's H")
    p.add_argument("--headdim", type=int, help="override the preset's D")
    p.add_argument("--tokens", type=int, help="override the preset's B*N")
    p.add_argument("--max-batch", type=int, help="override the preset's largest B")
    p.add_argument("--causal", default="both", choices=["both", "causal", "noncausal"])
    p.add_argument("--seqlens", default=None, help=f"comma list (default {ALL_SEQLENS[0]}..{ALL_SEQLENS[-1]})")
    p.add_argument("--quick", action="store_true", help=f"N in {QUICK_SEQLENS}")
    p.add_argument("--methods", default=None,
                   help=f"comma list out of {METHODS + EXTRA_METHODS} (default: {','.join(METHODS)})")
    p.add_argument("--bwd", choices=["direct", "derived"], default="direct",
                   help="direct: time autograd.grad on a retained forward graph; derived: "
                        "bwd = fwd+bwd - fwd (no extra measurement, ~30%% less time)")
    p.add_argument("--check-max-n", type=int, default=4096, help="correctness check up to this N")
    p.add_argument("--check-tol", type=float, default=2e-2, help="flag relative errors above this")
    bl.add_common_args(p, out_default="bench_out/attention.json", max_minutes=6.0)
    return p


def parse_args(argv):
    p = build_parser()
    a = p.parse_args(argv)
    bl.check_budget_args(p, a)
    methods = bl.parse_list(a.methods, str) if a.methods else (SMOKE_METHODS if a.smoke else METHODS)
    bad = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if bad or not methods:
        p.error(f"--methods: unknown {bad}; choose from {METHODS + EXTRA_METHODS}")
    a.method_list = list(dict.fromkeys(methods))
    try:
        seqlens = (bl.parse_list(a.seqlens) if a.seqlens else
                   SMOKE_SEQLENS if a.smoke else QUICK_SEQLENS if a.quick else ALL_SEQLENS)
    except ValueError:
        p.error(f"--seqlens must be a comma list of integers, got {a.seqlens!r}")
    if not seqlens or any(n < 1 for n in seqlens):
        p.error(f"--seqlens must be positive integers, got {seqlens}")
    a.seqlen_list = sorted(set(seqlens))
    a.dtype = a.dtype or ("fp32" if a.smoke else "bf16")
    for name in ("heads", "headdim", "tokens", "max_batch"):
        val = getattr(a, name)
        if val is not None and val < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {val}")
    if a.headdim is not None and a.headdim > 256:
        p.error(f"--headdim must be <= 256, got {a.headdim}")
    return p, a


def make_cases(a) -> list[dict]:
    names = ["smoke"] if a.smoke else (["h100_d128", "d64"] if a.preset == "all" else [a.preset])
    causals = {"both": [True, False], "causal": [True], "noncausal": [False]}[a.causal]
    cases = []
    for causal in causals:          # causal tables first: they are the anchors' main comparison
        for name in names:
            pre = dict(PRESETS[name])
            for key in ("heads", "headdim", "tokens", "max_batch"):
                if getattr(a, key) is not None:
                    pre[key] = getattr(a, key)
            for n in a.seqlen_list:
                for m in a.method_list:
                    cases.append({"id": len(cases), "group": group_key(name, causal), "preset": name,
                                  "n": n, "batch": batch_for(pre, n), "heads": pre["heads"],
                                  "headdim": pre["headdim"], "causal": causal, "dtype": a.dtype,
                                  "method": m})
    return cases


def main(argv=None) -> int:
    global ARGS, DEVICE
    argv = list(sys.argv[1:] if argv is None else argv)
    p, a = parse_args(argv)
    ARGS = a
    if a._worker:  # a worker process: run the job's cases and report through its results file
        def setup():
            global DEVICE
            info = bl.worker_setup(a.smoke)
            DEVICE = info["device"]
            return info
        return bl.worker_main(a._worker, run_case, setup)

    t0 = time.time()
    bl.set_clock(t0)
    bl.cuda_available_or_exit(p, a)
    out = Path(a.out)
    cases = make_cases(a)
    deadline = t0 + a.max_minutes * 60.0 - 10.0  # keep ~10 s for tables and plots
    bl.log(f"bench_attention: {len(cases)} cases ({len(a.seqlen_list)} N x {len(a.method_list)} methods x "
           f"{len({c['group'] for c in cases})} tables), budget {a.max_minutes:g} min -> {out}")
    meta = {"script": "scripts/bench_attention.py", "command": bl.command_line(),
            "settings": {k: v for k, v in vars(a).items() if not k.startswith("_")},
            "flops": "fwd = 4*B*H*N^2*D (/2 causal); bwd = 2.5x fwd; fwd+bwd = 3.5x fwd",
            "memory": "max_memory_allocated during one fwd+bwd minus memory allocated before (q, k, v, dO)",
            "timing": "median over timed calls after warm-up; CUDA events on GPU, perf_counter on CPU; "
                      "bwd timed on one retained forward graph"}

    def save(results: dict, env: dict, final: bool = False):
        rows = [results[str(c["id"])] for c in cases if str(c["id"]) in results]
        bl.write_json(out, bl.clean_floats({**meta, "env": env, "complete": final, "results": rows}))

    def setup_inproc():
        global DEVICE
        info = bl.worker_setup(a.smoke)
        DEVICE = info["device"]
        return info

    with_tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_attention.{os.getpid()}"
    results, env = bl.run_cases(
        cases, script=str(Path(__file__).resolve()), argv=argv, run_case=run_case, setup=setup_inproc,
        isolate=not a.no_isolate, t0=t0, deadline=deadline, case_timeout=a.case_timeout,
        on_result=save, tmpdir=with_tmp)
    rows = [results[str(c["id"])] for c in cases]
    groups = build_tables(rows, a.method_list)
    pngs = [] if a.no_plot else plots(rows, a.method_list, out)
    data = bl.clean_floats({**meta, "env": env, "complete": True, "tables": groups, "plots": pngs,
                            "results": rows})
    bl.write_json(out, data)
    if a.markdown is not None:
        md = Path(a.markdown) if a.markdown else out.with_suffix(".md")
        bl.write_text(md, f"### Attention benchmark\n\n{env_header(env, True)}\n{render(groups, env, True)}")
    bl.collect_worker_logs(with_tmp, out.with_suffix(".worker.log"))
    _cleanup(with_tmp)
    print()
    print(env_header(env, False))
    print(render(groups, env, False))
    n_ok = sum(r["status"] == "ok" for r in rows)
    flagged = [r for r in rows if not r.get("check_ok", True)]
    print(f"{n_ok}/{len(rows)} cases ok; {len(flagged)} correctness flags; "
          f"elapsed {time.time() - t0:.0f} s; wrote {out}" + (f", {len(pngs)} PNG" if pngs else ""))
    return 0


def _cleanup(path: Path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
