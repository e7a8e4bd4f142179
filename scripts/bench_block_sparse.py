"""Block-sparse attention: our kernel with a BlockMask vs our dense kernel vs FlexAttention.

For each N and target density (kept blocks / blocks of the dense causal layout), causal:
  dense        kernels.flash_attention(q, k, v, causal=True)                (once per N)
  ours         kernels.flash_attention(q, k, v, causal=True, block_mask=bm)
  flex         torch.compile'd flex_attention with the *same* block mask, converted from bm.layout
               by BlockMask.from_kv_blocks (kept blocks fully below the diagonal are "full"
               blocks, diagonal blocks are "partial" with a causal mask_mod), BLOCK_SIZE =
               (bm.block_m, bm.block_n). Checked against create_block_mask on a mask_mod that
               indexes the layout (same kept/full blocks) for N <= --check-max-n.
  flex_dense   flex with the dense causal block mask (only with --methods ...,flex_dense)
The layout family has a tunable density: `local` (causal sliding window of w blocks; w chosen
so that bm.causal_density is closest to the target) or `bigbird` (window w, 1 global block,
w random blocks per row; w tuned the same way). The achieved density is reported.

Measured (median after warm-up): fwd and fwd+bwd (torch.autograd.grad on q, k, v) in ms; peak
extra memory of one fwd+bwd; speedup of ours vs dense (target >= 0.8 / density) and vs flex
(target >= 1); "TFLOP/s kept" = dense causal FLOPs x achieved density / time (the kernel's speed
on the blocks it computes; 4*B*H*N^2*D/2 forward, 3.5x for fwd+bwd). For N <= --check-max-n
the output and gradients (batch 0, heads 0-1) are compared with reference_attention given the
same block mask (float64); flagged above --check-tol.

  python scripts/bench_block_sparse.py --max-minutes 2.2 --out $OUT/block_sparse.json --markdown
  python scripts/bench_block_sparse.py --smoke --out /tmp/bs.json                # CPU toy run
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

METHODS = ["dense", "ours", "flex"]
EXTRA_METHODS = ["flex_dense"]
SEQLENS = [4096, 8192, 16384, 32768, 65536]
DENSITIES = ["1/2", "1/4", "1/8", "1/16"]
SMOKE = {"seqlens": [256, 512], "densities": ["1/2", "1/4"], "heads": 2, "headdim": 32,
         "tokens": 512, "block": 64}

ARGS = None
DEVICE = "cpu"


# ------------------------------------------------------------------------------------ layouts
_LAYOUTS: dict = {}


def build_layout(kind: str, n: int, target: float, block: int, seed: int = 0):
    """(BlockMask, window) whose causal_density is closest to `target` (cached per process)."""
    key = (kind, n, target, block, seed)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    from kernels import block_mask as kbm
    nb = -(-n // block)

    def make(w):
        if kind == "local":
            return kbm.local_mask(n, n, window_blocks=w, block_m=block, block_n=block, causal=True)
        if kind == "bigbird":
            return kbm.bigbird_mask(n, n, window_blocks=w, global_blocks=1, random_blocks=w, seed=seed,
                                    block_m=block, block_n=block, causal=True)
        raise ValueError(f"unknown layout {kind!r}")

    # causal_density grows with w: bisect for the last w at or below the target, then take
    # whichever of it and its successor lies closer.
    lo, hi = 0, nb
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if make(mid).causal_density <= target:
            lo = mid
        else:
            hi = mid - 1
    cands = [make(lo)] + ([make(lo + 1)] if lo + 1 <= nb else [])
    best_w, best = min(((lo + i, m) for i, m in enumerate(cands)),
                       key=lambda t: abs(t[1].causal_density - target))
    _LAYOUTS[key] = (best, best_w)
    return best, best_w


def _causal_mod(b, h, q_idx, kv_idx):  # one module-level object: compiled flex code is reused
    return q_idx >= kv_idx


def to_flex_block_mask(bm, device):
    """Our causal BlockMask -> torch FlexAttention BlockMask with the same kept blocks.

    Kept blocks entirely on/below the diagonal (every key <= every query of the block) become
    flex "full" blocks (no mask_mod call); the other kept blocks (the diagonal ones) are
    "partial" blocks with the causal mask_mod. Equal block sizes on both sides.
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    layout = bm.layout  # (Hm, nMb, nNb), CPU; the small index tensors move to `device` at the end
    hm, nmb, nnb = layout.shape
    n_q, n_k = bm.seq_q, bm.seq_k
    off = n_k - n_q  # bottom-right alignment, as our kernel
    mb = torch.arange(nmb)[:, None]
    nb_ = torch.arange(nnb)[None, :]
    q_first = mb * bm.block_m + off
    k_last = torch.clamp((nb_ + 1) * bm.block_n, max=n_k) - 1
    full_pos = k_last <= q_first  # every (q, k) in the block has k <= q + off
    full = layout & full_pos
    partial = layout & ~full_pos

    def compress(sel):
        # indices of True columns first, ascending; counts per row. int32, shape (1, Hm, nMb, nNb)
        cnt = sel.sum(-1, dtype=torch.int32)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return cnt[None].contiguous().to(device), order[None].contiguous().to(device)

    kv_num, kv_idx = compress(partial)
    full_num, full_idx = compress(full)
    return FlexBlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                        BLOCK_SIZE=(bm.block_m, bm.block_n), mask_mod=_causal_mod,
                                        seq_lengths=(n_q, n_k))


def flex_structure_matches(bm, flex_bm, device) -> bool:
    """Does flex_bm keep the same full/partial blocks as create_block_mask on the element mask?"""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    layout = bm.layout.to(device)
    bmm, bnn = bm.block_m, bm.block_n

    def mod(b, h, q_idx, kv_idx):
        return layout[0, q_idx // bmm, kv_idx // bnn] & (q_idx >= kv_idx)

    ref = create_block_mask(mod, None, None, bm.seq_q, bm.seq_k, device=device, BLOCK_SIZE=(bmm, bnn))

    def dense(num, idx, nnb):
        num, idx = num[0, 0].cpu(), idx[0, 0].cpu().long()
        out = torch.zeros(num.shape[0], nnb, dtype=torch.bool)
        for r in range(num.shape[0]):
            out[r, idx[r, : int(num[r])]] = True
        return out

    nnb = layout.shape[-1]
    return bool(torch.equal(dense(ref.kv_num_blocks, ref.kv_indices, nnb),
                            dense(flex_bm.kv_num_blocks, flex_bm.kv_indices, nnb))
                and torch.equal(dense(ref.full_kv_num_blocks, ref.full_kv_indices, nnb),
                                dense(flex_bm.full_kv_num_blocks, flex_bm.full_kv_indices, nnb)))


_FLEX = {}


def _flex_fn():
    if "fn" not in _FLEX:
        import torch
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


# ----------------------------------------------------------------------------------- one case
def make_forward(case: dict, q, k, v, res: dict):
    from kernels import flash_attention
    from kernels import block_mask as kbm
    m, n = case["method"], case["n"]
    if m == "dense":
        return lambda: flash_attention(q, k, v, causal=True), None
    if m == "flex_dense":
        bm = kbm.dense_block_mask(n, n, block_m=case["block"], block_n=case["block"], causal=True)
    else:
        bm, w = build_layout(case["layout"], n, float(Fraction(case["target"])), case["block"], ARGS.seed)
        res["window_blocks"] = w
    res["density"] = bm.causal_density
    res["kept_blocks"] = bm.nnz
    if m == "ours":
        return lambda: flash_attention(q, k, v, causal=True, block_mask=bm), bm
    # flex / flex_dense
    if not bl.is_cuda(q.device):
        if case["n"] <= ARGS.check_max_n:
            res["check"] = {"flex_blocks_match": flex_structure_matches(bm, to_flex_block_mask(bm, q.device),
                                                                        q.device)}
            res["check_ok"] = res["check"]["flex_blocks_match"]
        raise NotImplementedError("FlexAttention needs CUDA here (eager flex ignores the block "
                                  "structure and has no backward on CPU)")
    fbm = to_flex_block_mask(bm, q.device)
    fn = _flex_fn()
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if case["n"] <= ARGS.check_max_n:
        res["check"] = {"flex_blocks_match": flex_structure_matches(bm, fbm, q.device)}
    return (lambda: fn(qt, kt, vt, block_mask=fbm).transpose(1, 2)), bm


def _measure(case: dict, res: dict, stage: dict) -> None:
    import torch
    from kernels import reference_attention
    a = ARGS
    dtype = getattr(torch, bl.DTYPES[case["dtype"]])
    b, n, h, d = case["batch"], case["n"], case["heads"], case["headdim"]
    gen = torch.Generator(device=DEVICE).manual_seed(a.seed * 1_000_003 + n)
    q, k, v, dout = (torch.randn((b, n, h, d), device=DEVICE, dtype=dtype, generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    timing = dict(warmup_ms=a.warmup_ms, rep_ms=a.rep_ms, min_reps=a.min_reps,
                  min_warmup=0 if a.smoke else 1)
    stage["name"] = "setup"
    fwd, bm = make_forward(case, q, k, v, res)
    stage["name"] = "first call"
    t = time.perf_counter()
    fwd()
    bl._sync(DEVICE)
    res["first_call_s"] = round(time.perf_counter() - t, 3)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), (q, k, v), dout)

    if n <= a.check_max_n:
        stage["name"] = "check"
        hc = min(2, h)
        out = fwd()
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref_in = [t_[:1, :, :hc].detach().double().requires_grad_() for t_ in (q, k, v)]
        ref = reference_attention(*ref_in, causal=True, block_mask=bm)
        ref_g = torch.autograd.grad(ref, ref_in, dout[:1, :, :hc].double())
        errs = res.setdefault("check", {})
        errs["out"] = bl.rel_err(out[:1, :, :hc], ref)
        for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_g):
            errs[name] = bl.rel_err(g[:1, :, :hc], rg)
        del out, grads
        worst = max((e for e in errs.values() if isinstance(e, float)), default=0.0)
        res["check_ok"] = bool(worst <= a.check_tol and errs.get("flex_blocks_match", True))
        if not res["check_ok"]:
            res["reason"] = f"check FAILED: {errs}"
    if bl.is_cuda(DEVICE) or "check" not in res:
        stage["name"] = "fwd+bwd warm-up"
        fwd_bwd()
    stage["name"] = "memory"
    res["mem_bytes"] = bl.peak_extra_bytes(fwd_bwd, DEVICE)
    stage["name"] = "fwd"
    res["fwd"] = bl.time_fn(fwd, DEVICE, **timing)
    stage["name"] = "fwd+bwd"
    res["fwdbwd"] = bl.time_fn(fwd_bwd, DEVICE, **timing)


def run_case(case: dict) -> dict:
    res = dict(case)
    res.update(status="ok", reason="")
    b, n, h, d = case["batch"], case["n"], case["heads"], case["headdim"]
    res["flops_fwd_dense_causal"] = 4.0 * b * h * n * n * d / 2.0
    if case["method"] == "dense":
        res["density"] = 1.0
    stage = {"name": "start"}
    t0 = time.perf_counter()
    try:
        _measure(case, res, stage)
    except Exception as exc:
        status, reason = bl.classify_error(exc)
        if case["method"].startswith("flex") and status == "error" and stage["name"] in ("setup", "first call"):
            status, reason = "n/a", bl.short(f"flex failed to compile/run: {reason}", 160)
        if status == "OOM" and not bl.is_cuda(DEVICE):
            status = "error"
        res.update(status=status, reason=reason, failed_in=stage["name"])
    bl.free_memory()
    res["case_s"] = round(time.perf_counter() - t0, 2)
    dens = res.get("density")
    for mode, mult in (("fwd", 1.0), ("fwdbwd", 3.5)):
        if isinstance(res.get(mode), dict) and dens is not None:
            res[mode]["tflops_kept"] = bl.tflops(res["flops_fwd_dense_causal"] * mult * dens, res[mode]["ms"])
    bl.log(case_line(res))
    return res


def case_line(r: dict) -> str:
    tgt = r.get("target") or "1"
    head = f"N={r['n']:<6} B={r['batch']:<3} {r['method']:<10} target {tgt:<5}"
    parts = []
    if r.get("density") is not None:
        parts.append(f"density {r['density']:.3f}" + (f" (w={r['window_blocks']})" if "window_blocks" in r else ""))
    for mode, label in (("fwd", "fwd"), ("fwdbwd", "f+b")):
        m = r.get(mode)
        if isinstance(m, dict):
            parts.append(f"{label} {m['ms']:8.3f} ms ({bl.fmt_tf(m.get('tflops_kept'))} TF/s kept)")
    if r.get("mem_bytes") is not None:
        parts.append(f"mem {r['mem_bytes'] / 1e9:5.2f} GB")
    if "check" in r:
        errs = [e for e in r["check"].values() if isinstance(e, float)]
        if errs:
            parts.append(f"err {max(errs):.1e}")
        if "flex_blocks_match" in r["check"]:
            parts.append(f"flex blocks {'match' if r['check']['flex_blocks_match'] else 'DIFFER'}")
        if not r.get("check_ok", True):
            parts.append("FLAGGED")
    if r["status"] != "ok":
        parts.append(f"{r['status']}: {r.get('reason', '')}" +
                     (f" (in {r['failed_in']})" if r.get("failed_in") else ""))
    parts.append(f"[{r.get('case_s', 0):.1f} s]")
    return head + " | ".join(parts)


# ---------------------------------------------------------------------------------- reporting
def _ms(r, mode="fwdbwd"):
    m = r.get(mode) if r else None
    return m["ms"] if isinstance(m, dict) and r.get("status") == "ok" else None


def _cell(r, mode="fwdbwd"):
    if r is None:
        return "-"
    v = _ms(r, mode)
    if v is None:
        return {"skipped": "skip"}.get(r["status"], r["status"])
    return f"{v:.3g}" + ("" if r.get("check_ok", True) else " (!)")


def build_table(results: list[dict]) -> dict:
    by = {(r["n"], r["method"], r.get("target")): r for r in results}
    ns = sorted({r["n"] for r in results})
    targets = list(dict.fromkeys(r["target"] for r in results if r.get("target")))
    has_flex_dense = any(r["method"] == "flex_dense" for r in results)
    headers = ["N", "B", "target", "density", "dense f+b ms", "ours f+b ms", "flex f+b ms",
               "ours vs dense (goal)", "ours vs flex", "ours TF/s kept", "ours fwd ms", "flex fwd ms",
               "dense fwd ms", "ours mem"]
    if has_flex_dense:
        headers.append("flex dense f+b ms")
    rows, summary = [], {"speedup_ok": 0, "speedup_miss": 0, "flex_ok": 0, "flex_miss": 0}
    for n in ns:
        dense = by.get((n, "dense", None))
        for t in targets:
            o, f = by.get((n, "ours", t)), by.get((n, "flex", t))
            if o is None and f is None:
                continue
            dens = (o or f).get("density")
            goal = 0.8 / dens if dens else None
            sp = (_ms(dense) / _ms(o)) if _ms(dense) and _ms(o) else None
            vf = (_ms(f) / _ms(o)) if _ms(f) and _ms(o) else None
            if sp is not None and goal is not None:
                summary["speedup_ok" if sp >= goal else "speedup_miss"] += 1
            if vf is not None:
                summary["flex_ok" if vf >= 1 else "flex_miss"] += 1
            b = (o or f)["batch"]
            row = [str(n), str(b), t, bl.fmt(dens, ".3f"), _cell(dense), _cell(o), _cell(f),
                   ("-" if sp is None else f"{sp:.2f}x ({goal:.1f}x {'ok' if sp >= goal else 'MISS'})"),
                   ("-" if vf is None else f"{vf:.2f}x {'ok' if vf >= 1 else 'MISS'}"),
                   bl.fmt_tf((o or {}).get("fwdbwd", {}).get("tflops_kept") if _ms(o) else None),
                   _cell(o, "fwd"), _cell(f, "fwd"), _cell(dense, "fwd"),
                   bl.fmt_gb(o.get("mem_bytes")) if o else "-"]
            if has_flex_dense:
                row.append(_cell(by.get((n, "flex_dense", None))))
            rows.append(row)
    notes = {}
    for r in results:
        if r["status"] != "ok" or not r.get("check_ok", True):
            key = (r["method"], r["status"], r.get("reason", ""))
            notes.setdefault(key, []).append(f"{r['n']}" + (f"@{r['target']}" if r.get("target") else ""))
    note_lines = [f"{m} {','.join(w)}: {st}: {why}" for (m, st, why), w in notes.items()]
    return {"headers": headers, "rows": rows, "notes": note_lines, "summary": summary}


def render(table: dict, title: str, markdown: bool) -> str:
    fn = bl.markdown_table if markdown else bl.text_table
    out = [f"#### {title}\n" if markdown else f"== {title}", fn(table["headers"], table["rows"])]
    s = table["summary"]
    out.append(f"\nspeedup vs dense >= 0.8/density: {s['speedup_ok']} ok, {s['speedup_miss']} miss; "
               f"ours >= flex: {s['flex_ok']} ok, {s['flex_miss']} miss")
    if table["notes"]:
        out.append("\nnotes:\n" if markdown else "notes:")
        out.append("\n".join(("- " if markdown else "  ") + ln for ln in table["notes"]))
    return "\n".join(out) + "\n"


def plot(results: list[dict], out: Path, title: str) -> list[str]:
    targets = list(dict.fromkeys(r["target"] for r in results if r.get("target")))
    by = {(r["n"], r["method"], r.get("target")): r for r in results}
    ns = sorted({r["n"] for r in results})
    time_series = {"ours dense": [(n, _ms(by.get((n, "dense", None)))) for n in ns]}
    speed = {}
    for t in targets:
        time_series[f"ours {t}"] = [(n, _ms(by.get((n, "ours", t)))) for n in ns]
        time_series[f"flex {t}"] = [(n, _ms(by.get((n, "flex", t)))) for n in ns]
        pts = []
        for n in ns:
            dm, om = _ms(by.get((n, "dense", None))), _ms(by.get((n, "ours", t)))
            pts.append((n, dm / om if dm and om else None))
        speed[f"ours {t} vs dense"] = pts
        fpts = []
        for n in ns:
            fm, om = _ms(by.get((n, "flex", t))), _ms(by.get((n, "ours", t)))
            fpts.append((n, fm / om if fm and om else None))
        speed[f"ours {t} vs flex"] = fpts
    panels = [{"title": "forward + backward time", "ylabel": "ms", "series": time_series},
              {"title": "speedup of ours (block-sparse)", "ylabel": "x", "series": speed}]
    path = out.with_suffix(".png")
    why = bl.plot_lines(path, title, panels)
    if why is None:
        return [str(path)]
    bl.log(f"plot not written: {why}")
    return []


# --------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default=None, help=f"comma list (default {','.join(map(str, SEQLENS))})")
    p.add_argument("--densities", default=None, help=f"comma list of fractions (default {','.join(DENSITIES)})")
    p.add_argument("--layout", default="local", choices=["local", "bigbird"])
    p.add_argument("--methods", default=None,
                   help=f"comma list out of {METHODS + EXTRA_METHODS} (default {','.join(METHODS)})")
    p.add_argument("--heads", type=int, default=None, help="H (default 16)")
    p.add_argument("--headdim", type=int, default=None, help="D (default 64)")
    p.add_argument("--tokens", type=int, default=None, help="B*N, B = max(1, tokens // N) (default 131072)")
    p.add_argument("--block", type=int, default=None, help="mask block size, both axes (default 128)")
    p.add_argument("--check-max-n", type=int, default=4096)
    p.add_argument("--check-tol", type=float, default=2e-2)
    bl.add_common_args(p, out_default="bench_out/block_sparse.json", max_minutes=2.5)
    return p


def parse_args(argv):
    p = build_parser()
    a = p.parse_args(argv)
    bl.check_budget_args(p, a)
    s = SMOKE if a.smoke else {}
    try:
        a.seqlen_list = sorted(set(bl.parse_list(a.seqlens) if a.seqlens else s.get("seqlens", SEQLENS)))
    except ValueError:
        p.error(f"--seqlens must be a comma list of integers, got {a.seqlens!r}")
    dens = bl.parse_list(a.densities, str) if a.densities else s.get("densities", DENSITIES)
    try:
        a.density_list = [str(Fraction(x)) for x in dens]
    except (ValueError, ZeroDivisionError):
        p.error(f"--densities must be fractions like 1/4 or 0.25, got {a.densities!r}")
    if not a.density_list or any(not 0 < Fraction(x) <= 1 for x in a.density_list):
        p.error(f"--densities must lie in (0, 1], got {a.density_list}")
    methods = bl.parse_list(a.methods, str) if a.methods else METHODS
    bad = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if bad or not methods:
        p.error(f"--methods: unknown {bad}; choose from {METHODS + EXTRA_METHODS}")
    a.method_list = list(dict.fromkeys(methods))
    a.heads = a.heads or s.get("heads", 16)
    a.headdim = a.headdim or s.get("headdim", 64)
    a.tokens = a.tokens or s.get("tokens", 131072)
    a.block = a.block or s.get("block", 128)
    a.dtype = a.dtype or ("fp32" if a.smoke else "bf16")
    if not a.seqlen_list or min(a.seqlen_list) < 1:
        p.error(f"--seqlens must be positive, got {a.seqlen_list}")
    for name in ("heads", "headdim", "tokens", "block"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.block & (a.block - 1) or a.block < 16:
        p.error(f"--block must be a power of two >= 16, got {a.block}")
    return p, a


def make_cases(a) -> list[dict]:
    cases = []
    base = {"heads": a.heads, "headdim": a.headdim, "dtype": a.dtype, "layout": a.layout, "block": a.block}
    for n in a.seqlen_list:
        b = max(1, a.tokens // n)
        def add(method, target):
            cases.append({"id": len(cases), "group": f"density {target}" if target else method,
                          "n": n, "batch": b, "method": method, "target": target, **base})
        if "dense" in a.method_list:
            add("dense", None)
        if "flex_dense" in a.method_list:
            add("flex_dense", None)
        for t in a.density_list:
            for m in ("ours", "flex"):
                if m in a.method_list:
                    add(m, t)
    return cases


def main(argv=None) -> int:
    global ARGS, DEVICE
    argv = list(sys.argv[1:] if argv is None else argv)
    p, a = parse_args(argv)
    ARGS = a

    def setup():
        global DEVICE
        info = bl.worker_setup(a.smoke)
        DEVICE = info["device"]
        return info

    if a._worker:
        return bl.worker_main(a._worker, run_case, setup)
    t0 = time.time()
    bl.set_clock(t0)
    bl.cuda_available_or_exit(p, a)
    out = Path(a.out)
    cases = make_cases(a)
    deadline = t0 + a.max_minutes * 60.0 - 10.0
    title = (f"block-sparse attention, causal, {a.layout} layout, H={a.heads}, D={a.headdim}, {a.dtype}, "
             f"block {a.block}x{a.block}, B*N={a.tokens}")
    bl.log(f"bench_block_sparse: {len(cases)} cases, budget {a.max_minutes:g} min -> {out}")
    meta = {"script": "scripts/bench_block_sparse.py", "command": bl.command_line(), "title": title,
            "settings": {k: v for k, v in vars(a).items() if not k.startswith("_")},
            "density": "kept blocks / blocks on or below the diagonal (BlockMask.causal_density)",
            "speedup_goal": "ours vs dense >= 0.8 / density; ours vs flex >= 1",
            "memory": "max_memory_allocated during one fwd+bwd minus memory allocated before (q, k, v, dO)",
            "timing": "median over timed calls after warm-up; CUDA events on GPU, perf_counter on CPU"}

    def save(results: dict, env: dict):
        rows = [results[str(c["id"])] for c in cases if str(c["id"]) in results]
        bl.write_json(out, bl.clean_floats({**meta, "env": env, "complete": False, "results": rows}))

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_block_sparse.{os.getpid()}"
    results, env = bl.run_cases(
        cases, script=str(Path(__file__).resolve()), argv=argv, run_case=run_case, setup=setup,
        isolate=not a.no_isolate, t0=t0, deadline=deadline, case_timeout=a.case_timeout,
        on_result=save, tmpdir=tmp)
    rows = [results[str(c["id"])] for c in cases]
    table = build_table(rows)
    pngs = [] if a.no_plot else plot(rows, out, title)
    bl.write_json(out, bl.clean_floats({**meta, "env": env, "complete": True, "table": table,
                                        "plots": pngs, "results": rows}))
    from bench_attention import env_header  # same header format for both benches
    if a.markdown is not None:
        md = Path(a.markdown) if a.markdown else out.with_suffix(".md")
        bl.write_text(md, f"### Block-sparse attention benchmark\n\n{env_header(env, True)}\n"
                          f"{render(table, title, True)}")
    bl.collect_worker_logs(tmp, out.with_suffix(".worker.log"))
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(env_header(env, False))
    print(render(table, title, False))
    n_ok = sum(r["status"] == "ok" for r in rows)
    flagged = [r for r in rows if not r.get("check_ok", True)]
    print(f"{n_ok}/{len(rows)} cases ok; {len(flagged)} correctness flags; elapsed {time.time() - t0:.0f} s; "
          f"wrote {out}" + (f", {len(pngs)} PNG" if pngs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
