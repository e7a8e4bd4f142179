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
costs that case only; --max-minutes bounds the whole run. The harness is scripts/benchkit.py;
bench_block_sparse.py and kernel_lab.py use this file's methods and measurement.

  python scripts/bench_attention.py --quick --bwd derived --max-minutes 5.3 --out $OUT/attention.json --markdown
  python scripts/bench_attention.py --smoke --out /tmp/attn.json                   # CPU toy run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk  # noqa: E402

METHODS = ["ours", "naive", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flex"]
EXTRA_METHODS = ["sdpa_math"]
SMOKE_METHODS = METHODS + EXTRA_METHODS
SDPA = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
        "sdpa_math": "MATH"}
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


# ---------------------------------------------------------------------------------- the methods
def make_inputs(b, n, h, d, dtype, device, seed=0):
    """q, k, v (requiring grad) and dO of shape (B, N, H, D), standard normal."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn((b, n, h, d), device=device, dtype=dtype, generator=g) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def _causal_mod(b, h, q_idx, kv_idx):  # one module-level object: compiled flex code is reused
    return q_idx >= kv_idx


_FLEX = {}


def flex_fn(cuda: bool):
    """flex_attention, compiled once per process on a GPU (dynamic=False: one specialisation per shape)."""
    if cuda not in _FLEX:
        import torch
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX[cuda] = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    return _FLEX[cuda]


def to_flex_block_mask(bm, device):
    """Our causal BlockMask -> a FlexAttention BlockMask keeping the same blocks: kept blocks entirely
    on or below the diagonal are flex "full" blocks (no mask_mod call), the other kept blocks (on the
    diagonal) "partial" blocks with the causal mask_mod; the same block sizes."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    layout = bm.layout  # (Hm, nMb, nNb) on the CPU; the small index tensors move to `device` at the end
    n_q, n_k = bm.seq_q, bm.seq_k
    q_first = torch.arange(layout.shape[1])[:, None] * bm.block_m + (n_k - n_q)  # bottom-right aligned
    k_last = torch.clamp((torch.arange(layout.shape[2])[None, :] + 1) * bm.block_n, max=n_k) - 1
    full_pos = k_last <= q_first  # every (q, k) of the block has k <= q

    def compress(sel):  # kept column indices first (ascending) and their count per row, int32 (1, Hm, nMb, .)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return sel.sum(-1, dtype=torch.int32)[None].contiguous().to(device), order[None].contiguous().to(device)

    return FlexBlockMask.from_kv_blocks(*compress(layout & ~full_pos), *compress(layout & full_pos),
                                        BLOCK_SIZE=(bm.block_m, bm.block_n), mask_mod=_causal_mod,
                                        seq_lengths=(n_q, n_k))


def flex_structure_matches(bm, flex_bm, device) -> bool:
    """Does flex_bm keep the same full / partial blocks as create_block_mask on the element mask?"""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    layout, bmm, bnn = bm.layout.to(device), bm.block_m, bm.block_n
    ref = create_block_mask(lambda b, h, q, kv: layout[0, q // bmm, kv // bnn] & (q >= kv), None, None,
                            bm.seq_q, bm.seq_k, device=device, BLOCK_SIZE=(bmm, bnn))

    def dense(num, idx):
        out = torch.zeros(num.shape[2], layout.shape[-1], dtype=torch.bool)
        for r, (c, row) in enumerate(zip(num[0, 0].tolist(), idx[0, 0].cpu().long())):
            out[r, row[:c]] = True
        return out

    return all(torch.equal(dense(getattr(ref, f"{p}kv_num_blocks"), getattr(ref, f"{p}kv_indices")),
                           dense(getattr(flex_bm, f"{p}kv_num_blocks"), getattr(flex_bm, f"{p}kv_indices")))
               for p in ("", "full_"))


def make_forward(method: str, q, k, v, causal: bool, block_mask=None):
    """A closure computing the method's output in our (B, N, H, D) layout; raises if unavailable."""
    import torch
    if method == "ours":
        from longctx.kernels import flash_attention
        return lambda: flash_attention(q, k, v, causal=causal, block_mask=block_mask)
    if method == "naive":
        from longctx.kernels import reference_attention
        return lambda: reference_attention(q, k, v, causal=causal, block_mask=block_mask)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # views, no copy
    if method in SDPA:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, SDPA[method], None)
        if backend is None:
            raise NotImplementedError(f"SDPBackend.{SDPA[method]} not available in torch {torch.__version__}")

        def sdpa():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        return sdpa
    if method == "flex":
        from torch.nn.attention.flex_attention import create_block_mask
        cuda = bk.is_cuda(q.device)
        if block_mask is not None:
            if not cuda:
                raise NotImplementedError("FlexAttention needs CUDA here (eager flex ignores the block structure "
                                          "and has no backward on CPU)")
            fbm = to_flex_block_mask(block_mask, q.device)
        else:
            n = q.shape[1]
            fbm = create_block_mask(_causal_mod, None, None, n, n, device=q.device) if causal else None
        fn = flex_fn(cuda)
        return lambda: fn(qt, kt, vt, block_mask=fbm).transpose(1, 2)
    raise ValueError(f"unknown method {method!r}")


def check_errors(fwd, q, k, v, do, causal: bool, block_mask=None, heads: int | None = 2,
                 batch: int | None = 1) -> dict:
    """Relative errors of out, dq, dk, dv on the first `batch` batches and `heads` heads (None: all)
    against kernels.reference_attention in float64, the kernel tests' oracle."""
    import torch
    from longctx.kernels import reference_attention
    out = fwd()
    try:
        grads = torch.autograd.grad(out, (q, k, v), do)
    except NotImplementedError:  # e.g. FlexAttention has no backward on a CPU: the forward only
        grads = None
    part = (slice(0, batch), slice(None), slice(0, heads))
    ref_in = [t[part].detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, causal=causal, block_mask=block_mask)
    errs = {"out": bk.rel_err(out[part], ref)}
    if grads is None:
        return {**errs, "grads": "not checked (no backward on this device)"}
    ref_grads = torch.autograd.grad(ref, ref_in, do[part].double())
    return {**errs, **{name: bk.rel_err(g[part], rg) for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads)}}


# --------------------------------------------------------------------------------- one case
def measure(res: dict, method: str, a, device, *, causal: bool, block_mask=None, bwd: str = "none") -> dict:
    """Fill the result row `res` (a case: batch, n, heads, headdim, dtype) for `method`: first call,
    check (N <= a.check_max_n), peak memory of one fwd+bwd, fwd and fwd+bwd times, bwd per `bwd`
    (direct | derived | none); status / reason / failed_in when something raised."""
    import torch
    b, n, h, d = res["batch"], res["n"], res["heads"], res["headdim"]
    timing = dict(warmup_ms=a.warmup_ms, rep_ms=a.rep_ms, min_reps=a.min_reps, min_warmup=0 if a.smoke else 1)
    stage, t0 = "setup", time.perf_counter()
    try:
        q, k, v, do = make_inputs(b, n, h, d, getattr(torch, bk.DTYPES[res["dtype"]]), device, a.seed * 1_000_003 + n)
        if method == "flex" and block_mask is not None and n <= a.check_max_n:
            same = flex_structure_matches(block_mask, to_flex_block_mask(block_mask, device), device)
            res.update(check={"flex_blocks_match": same}, check_ok=same)
        fwd = make_forward(method, q, k, v, causal, block_mask)

        def fwd_bwd():
            return torch.autograd.grad(fwd(), (q, k, v), do)

        stage = "first call"
        t = time.perf_counter()
        fwd()
        bk.sync(device)
        res["first_call_s"] = round(time.perf_counter() - t, 3)  # includes torch.compile for flex
        if n <= a.check_max_n:
            stage = "check"
            errs = res.setdefault("check", {})
            errs.update(check_errors(fwd, q, k, v, do, causal, block_mask))
            worst = max((e for e in errs.values() if isinstance(e, float)), default=0.0)
            res["check_ok"] = bool(worst <= a.check_tol and errs.get("flex_blocks_match", True))
            if not res["check_ok"]:
                res["reason"] = f"check FAILED: max rel. err {worst:.2e} > {a.check_tol:g}" + (
                    "" if errs.get("flex_blocks_match", True) else "; flex blocks differ from the layout")
        if "check" not in res or bk.is_cuda(device):
            stage = "fwd+bwd warm-up"
            fwd_bwd()  # compiles flex's backward; the cost stays out of the timings below
        stage = "memory"
        res["mem_bytes"] = bk.peak_extra_bytes(fwd_bwd, device)
        stage = "fwd"
        res["fwd"] = bk.time_fn(fwd, device, **timing)
        stage = "fwd+bwd"
        res["fwdbwd"] = bk.time_fn(fwd_bwd, device, **timing)
        stage = "bwd"
        derived = {"ms": max(res["fwdbwd"]["ms"] - res["fwd"]["ms"], 0.0), "derived": True}
        if bwd == "derived":
            res["bwd"] = derived
        elif bwd == "direct":
            out = fwd()
            try:
                res["bwd"] = bk.time_fn(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), device,
                                        **timing)
            except Exception as exc:  # a backend that cannot run backward twice on one graph: derive it
                if bk.classify_error(exc)[0] == "OOM":
                    raise
                res["bwd"] = {**derived, "why": bk.short(repr(exc), 120)}
            del out
    except Exception as exc:
        status, reason = bk.classify_error(exc)
        if method == "flex" and status == "error" and stage in ("setup", "first call"):
            status, reason = "n/a", bk.short(f"flex failed to compile/run: {reason}", 160)
        if status == "OOM" and not bk.is_cuda(device):
            status = "error"
        res.update(status=status, reason=reason, failed_in=stage)
    bk.free_memory()
    res["case_s"] = round(time.perf_counter() - t0, 2)
    return res


def case_line(r: dict, tf_key: str = "tflops", lead: str = "") -> str:
    parts = [lead] if lead else []
    for mode, label in (("fwd", "fwd"), ("bwd", "bwd"), ("fwdbwd", "f+b")):
        if isinstance(r.get(mode), dict):
            parts.append(f"{label} {r[mode]['ms']:8.3f} ms {bk.fmt_tf(r[mode].get(tf_key)):>5} TF/s")
    if r.get("mem_bytes") is not None:
        parts.append(f"mem {r['mem_bytes'] / 1e9:5.2f} GB")
    errs = [e for e in r.get("check", {}).values() if isinstance(e, float)]
    if errs or "check" in r:
        parts.append((f"err {max(errs):.1e}" if errs else "checked") + ("" if r.get("check_ok", True) else " FLAGGED"))
    if r["status"] != "ok":
        parts.append(f"{r['status']}: {r.get('reason', '')}" + (f" (in {r['failed_in']})" if r.get("failed_in") else ""))
    parts.append(f"[{r.get('case_s', 0):.1f} s]")
    return f"{r['group']:<22} N={r['n']:<6} B={r['batch']:<4} {r['method']:<15}" + " | ".join(parts)


def device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_case(case: dict, a) -> dict:
    b, n, h, d = case["batch"], case["n"], case["heads"], case["headdim"]
    res = {**case, "status": "ok", "reason": "", "flops_fwd": 4.0 * b * h * n * n * d / (2.0 if case["causal"] else 1.0)}
    if not a.smoke and device() == "cpu":
        return {**res, "status": "n/a", "reason": "no CUDA device"}
    measure(res, case["method"], a, device(), causal=case["causal"], bwd=a.bwd)
    for mode, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)):
        if isinstance(res.get(mode), dict):
            res[mode]["tflops"] = bk.tflops(res["flops_fwd"] * mult, res[mode]["ms"])
    bk.log(case_line(res))
    return res


# -------------------------------------------------------------------------------- reporting
def _get(r, mode, key):
    m = r.get(mode) if r else None
    return m.get(key) if isinstance(m, dict) else None


STATUS_CELL = {"skipped": "skip"}
TARGET_HEADERS = ["N", "fwd ours/flex", "fwd ours/(1.2 sdpa_flash)", "fwd ours/cudnn", "f+b ours/flex",
                  "f+b ours/(1.2 sdpa_flash)", "f+b ours/cudnn", "mem ours/sdpa_flash"]


def build_tables(results: list[dict], methods: list[str]) -> list[dict]:
    """Per group: TFLOP/s (fwd / fwd+bwd (mem)) and ms (fwd / bwd / fwd+bwd) rows, targets, notes."""
    groups = []
    for g in dict.fromkeys(r["group"] for r in results):
        rs = [r for r in results if r["group"] == g]
        by = {(r["n"], r["method"]): r for r in rs}
        ns = sorted({r["n"] for r in rs})
        tf_rows, ms_rows = [], []
        for n in ns:
            b = str(next(r["batch"] for r in rs if r["n"] == n))
            tr, mr = [str(n), b], [str(n), b]
            for m in methods:
                r = by.get((n, m))
                st = "-" if r is None else None if r["status"] == "ok" else STATUS_CELL.get(r["status"], r["status"])
                if st is not None and _get(r, "fwd", "tflops") is None:
                    tr.append(st)
                    mr.append(st)
                    continue
                tail = ("" if r.get("check_ok", True) else " (!)") + ("" if st is None else f" [{st}]")
                mem = f" ({bk.fmt_gb(r['mem_bytes'])})" if r.get("mem_bytes") is not None else ""
                tr.append(f"{bk.fmt_tf(_get(r, 'fwd', 'tflops'))} / {bk.fmt_tf(_get(r, 'fwdbwd', 'tflops'))}{mem}{tail}")
                mr.append(" / ".join(bk.fmt(_get(r, mode, "ms"), ".3g") for mode in ("fwd", "bwd", "fwdbwd")) + tail)
            tf_rows.append(tr)
            ms_rows.append(mr)
        first = rs[0]
        title = (f"{g}: H={first['heads']}, D={first['headdim']}, {first['dtype']}, "
                 f"{'causal' if first['causal'] else 'non-causal'}")
        groups.append({"group": g, "title": title, "headers": ["N", "B", *methods], "tflops_rows": tf_rows,
                       "ms_rows": ms_rows, "notes": bk.failure_notes(rs, lambda r: f"N={r['n']}"),
                       "targets": target_rows(by, ns) if "ours" in methods else []})
    return groups


def target_rows(by: dict, ns: list[int]) -> list[list[str]]:
    """Issue 2's targets at N >= 4096: ours >= flex and >= 1.2 x sdpa_flash (fwd and fwd+bwd);
    memory ours <= sdpa_flash; cuDNN for information."""
    rows = []
    for n in ns:
        o = by.get((n, "ours"))
        if n < 4096 or not o or o["status"] != "ok":
            continue
        row = [str(n)]
        for mode in ("fwd", "fwdbwd"):
            for peer, mult in (("flex", 1.0), ("sdpa_flash", 1.2), ("sdpa_cudnn", None)):
                mine, theirs = _get(o, mode, "tflops"), _get(by.get((n, peer)), mode, "tflops")
                ratio = mine / ((mult or 1.0) * theirs) if mine and theirs else None
                row.append("-" if ratio is None else f"{ratio:.2f}" + ("" if mult is None else " ok" if ratio >= 1
                                                                        else " MISS"))
        fa = by.get((n, "sdpa_flash")) or {}
        ratio = o["mem_bytes"] / fa["mem_bytes"] if o.get("mem_bytes") and fa.get("mem_bytes") else None
        rows.append(row + ["-" if ratio is None else f"{ratio:.2f} {'ok' if ratio <= 1 else 'MISS'}"])
    return rows


def render(groups: list[dict], markdown: bool) -> str:
    def head(text):
        return f"\n{text}\n" if markdown else f"-- {text}"
    out = []
    for g in groups:
        out.append(f"#### {g['title']}\n\nforward / forward+backward TFLOP/s (peak extra memory)\n" if markdown else
                   f"== {g['title']}: fwd / fwd+bwd TFLOP/s (peak extra memory)")
        out += [bk.table(g["headers"], g["tflops_rows"], markdown), head("ms: fwd / bwd / fwd+bwd"),
                bk.table(g["headers"], g["ms_rows"], markdown)]
        if g["targets"]:
            out += [head("targets (issue 2: ratio >= 1 is ok, memory ratio <= 1; cuDNN for information)"),
                    bk.table(TARGET_HEADERS, g["targets"], markdown)]
        if g["notes"]:
            out += [head("notes:"), "\n".join(("- " if markdown else "  ") + ln for ln in g["notes"])]
        out.append("")
    return "\n".join(out)


def plots(results: list[dict], methods: list[str], out: Path) -> list[str]:
    written = []
    for g in dict.fromkeys(r["group"] for r in results):
        rs = [r for r in results if r["group"] == g]

        def series(get):
            return {m: [(r["n"], get(r)) for r in rs if r["method"] == m] for m in methods}
        panels = [{"title": "forward", "ylabel": "time (ms)", "series": series(lambda r: _get(r, "fwd", "ms"))},
                  {"title": "forward + backward", "ylabel": "time (ms)",
                   "series": series(lambda r: _get(r, "fwdbwd", "ms"))},
                  {"title": "peak extra memory (fwd+bwd)", "ylabel": "GB",
                   "series": series(lambda r: r["mem_bytes"] / 1e9 if r.get("mem_bytes") else None)}]
        path = out.with_name(f"{out.stem}_{g.replace('/', '_')}.png")
        bs, r0 = sorted({r["batch"] for r in rs}), rs[0]
        title = (f"attention, H={r0['heads']}, D={r0['headdim']}, {r0['dtype']}, "
                 f"{'causal' if r0['causal'] else 'non-causal'}, B={bs[-1]}..{bs[0]} (B*N constant at large N)")
        why = bk.plot_panels(path, title, panels)
        if why is None:
            written.append(str(path))
        else:
            bk.log(f"plot {path.name} not written: {why}")
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
    bk.add_common_args(p, out="bench_out/attention.json", max_minutes=6.0)
    return p


def parse_args(argv):
    p = build_parser()
    a = bk.parse_common(p, argv, methods=METHODS + EXTRA_METHODS,
                        default_methods=lambda a: SMOKE_METHODS if a.smoke else METHODS,
                        default_seqlens=lambda a: SMOKE_SEQLENS if a.smoke else QUICK_SEQLENS if a.quick else ALL_SEQLENS)
    for name in ("heads", "headdim", "tokens", "max_batch"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.headdim is not None and a.headdim > 256:
        p.error(f"--headdim must be <= 256, got {a.headdim}")
    return p, a


def make_cases(a) -> list[dict]:
    names = ["smoke"] if a.smoke else (["h100_d128", "d64"] if a.preset == "all" else [a.preset])
    cases = []
    for causal in {"both": [True, False], "causal": [True], "noncausal": [False]}[a.causal]:  # causal first
        for name in names:
            pre = {**PRESETS[name], **{k: getattr(a, k) for k in ("heads", "headdim", "tokens", "max_batch")
                                       if getattr(a, k) is not None}}
            for n in a.seqlen_list:
                b = max(1, pre["tokens"] // n)
                for m in a.method_list:
                    cases.append({"id": len(cases), "group": f"{name}/{'causal' if causal else 'noncausal'}",
                                  "preset": name, "n": n, "batch": min(b, pre["max_batch"] or b),
                                  "heads": pre["heads"], "headdim": pre["headdim"], "causal": causal,
                                  "dtype": a.dtype, "method": m})
    return cases


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p, a = parse_args(argv)

    def report(rows, plot):
        groups = build_tables(rows, a.method_list)
        return {"json": {"tables": groups}, "text": render(groups, False), "markdown": render(groups, True),
                "plots": plots(rows, a.method_list, Path(a.out)) if plot else []}

    meta = {"flops": "fwd = 4*B*H*N^2*D (/2 causal); bwd = 2.5x fwd; fwd+bwd = 3.5x fwd",
            "memory": "max_memory_allocated during one fwd+bwd minus memory allocated before (q, k, v, dO)",
            "timing": "median over timed calls after warm-up; CUDA events on GPU, perf_counter on CPU; "
                      "bwd timed on one retained forward graph"}
    return bk.run_bench(p, a, argv, script=str(Path(__file__).resolve()), title="Attention benchmark",
                        cases=make_cases(a), run_case=run_case, meta=meta, report=report)


if __name__ == "__main__":
    sys.exit(main())
