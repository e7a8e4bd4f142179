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

Measured (median after warm-up, bench_attention.py's measurement): fwd and fwd+bwd
(torch.autograd.grad on q, k, v) in ms; peak extra memory of one fwd+bwd; speedup of ours vs
dense (target >= 0.8 / density) and vs flex (target >= 1); "TFLOP/s kept" = dense causal FLOPs x
achieved density / time (the kernel's speed on the blocks it computes; 4*B*H*N^2*D/2 forward,
3.5x for fwd+bwd). For N <= --check-max-n the output and gradients (batch 0, heads 0-1) are
compared with reference_attention given the same block mask (float64); flagged above --check-tol.

  python scripts/bench_block_sparse.py --max-minutes 2.2 --out $OUT/block_sparse.json --markdown
  python scripts/bench_block_sparse.py --smoke --out /tmp/bs.json                # CPU toy run
"""
from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as ba  # noqa: E402
import benchkit as bk  # noqa: E402

METHODS = ["dense", "ours", "flex"]
EXTRA_METHODS = ["flex_dense"]
SEQLENS = [4096, 8192, 16384, 32768, 65536]
DENSITIES = ["1/2", "1/4", "1/8", "1/16"]
DEFAULTS = {"heads": 16, "headdim": 64, "tokens": 131072, "block": 128}
SMOKE = {"seqlens": [256, 512], "densities": ["1/2", "1/4"], "heads": 2, "headdim": 32, "tokens": 512, "block": 64}
_LAYOUTS: dict = {}


def build_layout(kind: str, n: int, target: float, block: int, seed: int = 0):
    """(BlockMask, window) whose causal_density is closest to `target` (cached per process)."""
    key = (kind, n, target, block, seed)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    from longctx.kernels import block_mask as kbm
    if kind not in ("local", "bigbird"):
        raise ValueError(f"unknown layout {kind!r}")

    def make(w):
        if kind == "local":
            return kbm.local_mask(n, n, window_blocks=w, block_m=block, block_n=block, causal=True)
        return kbm.bigbird_mask(n, n, window_blocks=w, global_blocks=1, random_blocks=w, seed=seed,
                                block_m=block, block_n=block, causal=True)

    # causal_density grows with w: bisect for the last w at or below the target, then take whichever
    # of it and its successor lies closer
    nb, lo, hi = -(-n // block), 0, -(-n // block)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if make(mid).causal_density <= target else (lo, mid - 1)
    best = min(((w, make(w)) for w in range(lo, min(lo + 1, nb) + 1)), key=lambda t: abs(t[1].causal_density - target))
    _LAYOUTS[key] = (best[1], best[0])
    return best[1], best[0]


def run_case(case: dict, a) -> dict:
    from longctx.kernels import block_mask as kbm
    b, n, h, d = case["batch"], case["n"], case["heads"], case["headdim"]
    res = {**case, "status": "ok", "reason": "", "flops_fwd_dense_causal": 4.0 * b * h * n * n * d / 2.0}
    mask = None
    if case["method"] == "flex_dense":
        mask = kbm.dense_block_mask(n, n, block_m=case["block"], block_n=case["block"], causal=True)
    elif case["method"] != "dense":
        mask, res["window_blocks"] = build_layout(case["layout"], n, float(Fraction(case["target"])), case["block"],
                                                  a.seed)
    res.update(density=mask.causal_density if mask else 1.0, **({"kept_blocks": mask.nnz} if mask else {}))
    ba.measure(res, "flex" if case["method"].startswith("flex") else "ours", a, ba.device(), causal=True,
               block_mask=mask)
    for mode, mult in (("fwd", 1.0), ("fwdbwd", 3.5)):
        if isinstance(res.get(mode), dict):
            res[mode]["tflops_kept"] = bk.tflops(res["flops_fwd_dense_causal"] * mult * res["density"], res[mode]["ms"])
    lead = f"density {res['density']:.3f}" + (f" (w={res['window_blocks']})" if "window_blocks" in res else "")
    bk.log(ba.case_line(res, "tflops_kept", lead))
    return res


# ---------------------------------------------------------------------------------- reporting
def _ms(r, mode="fwdbwd"):
    return r[mode]["ms"] if r and r.get("status") == "ok" and isinstance(r.get(mode), dict) else None


def _cell(r, mode="fwdbwd"):
    if r is None:
        return "-"
    if _ms(r, mode) is None:
        return ba.STATUS_CELL.get(r["status"], r["status"])
    return f"{_ms(r, mode):.3g}" + ("" if r.get("check_ok", True) else " (!)")


def _ratio(a, b):
    return _ms(a) / _ms(b) if _ms(a) and _ms(b) else None


def build_table(results: list[dict]) -> dict:
    by = {(r["n"], r["method"], r.get("target")): r for r in results}
    targets = list(dict.fromkeys(r["target"] for r in results if r.get("target")))
    has_flex_dense = any(r["method"] == "flex_dense" for r in results)
    headers = ["N", "B", "target", "density", "dense f+b ms", "ours f+b ms", "flex f+b ms", "ours vs dense (goal)",
               "ours vs flex", "ours TF/s kept", "ours fwd ms", "flex fwd ms", "dense fwd ms", "ours mem"]
    headers += ["flex dense f+b ms"] if has_flex_dense else []
    rows, summary = [], {"speedup_ok": 0, "speedup_miss": 0, "flex_ok": 0, "flex_miss": 0}
    for n in sorted({r["n"] for r in results}):
        dense = by.get((n, "dense", None))
        for t in targets:
            o, f = by.get((n, "ours", t)), by.get((n, "flex", t))
            if o is None and f is None:
                continue
            dens = (o or f).get("density")
            goal = 0.8 / dens if dens else None
            sp, vf = _ratio(dense, o), _ratio(f, o)
            if sp is not None and goal is not None:
                summary["speedup_ok" if sp >= goal else "speedup_miss"] += 1
            if vf is not None:
                summary["flex_ok" if vf >= 1 else "flex_miss"] += 1
            row = [str(n), str((o or f)["batch"]), t, bk.fmt(dens, ".3f"), _cell(dense), _cell(o), _cell(f),
                   "-" if sp is None else f"{sp:.2f}x ({goal:.1f}x {'ok' if sp >= goal else 'MISS'})",
                   "-" if vf is None else f"{vf:.2f}x {'ok' if vf >= 1 else 'MISS'}",
                   bk.fmt_tf(o["fwdbwd"].get("tflops_kept") if _ms(o) else None),
                   _cell(o, "fwd"), _cell(f, "fwd"), _cell(dense, "fwd"), bk.fmt_gb(o.get("mem_bytes")) if o else "-"]
            rows.append(row + ([_cell(by.get((n, "flex_dense", None)))] if has_flex_dense else []))
    notes = bk.failure_notes(results, lambda r: f"{r['n']}" + (f"@{r['target']}" if r.get("target") else ""))
    return {"headers": headers, "rows": rows, "notes": notes, "summary": summary}


def render(table: dict, title: str, markdown: bool) -> str:
    s = table["summary"]
    out = [f"#### {title}\n" if markdown else f"== {title}", bk.table(table["headers"], table["rows"], markdown),
           f"\nspeedup vs dense >= 0.8/density: {s['speedup_ok']} ok, {s['speedup_miss']} miss; "
           f"ours >= flex: {s['flex_ok']} ok, {s['flex_miss']} miss"]
    if table["notes"]:
        out += ["\nnotes:\n" if markdown else "notes:", "\n".join(("- " if markdown else "  ") + n for n in table["notes"])]
    return "\n".join(out) + "\n"


def plot(results: list[dict], out: Path, title: str) -> list[str]:
    by = {(r["n"], r["method"], r.get("target")): r for r in results}
    ns = sorted({r["n"] for r in results})
    times = {"ours dense": [(n, _ms(by.get((n, "dense", None)))) for n in ns]}
    speed = {}
    for t in dict.fromkeys(r["target"] for r in results if r.get("target")):
        for m in ("ours", "flex"):
            times[f"{m} {t}"] = [(n, _ms(by.get((n, m, t)))) for n in ns]
        speed[f"ours {t} vs dense"] = [(n, _ratio(by.get((n, "dense", None)), by.get((n, "ours", t)))) for n in ns]
        speed[f"ours {t} vs flex"] = [(n, _ratio(by.get((n, "flex", t)), by.get((n, "ours", t)))) for n in ns]
    why = bk.plot_panels(out.with_suffix(".png"), title, [
        {"title": "forward + backward time", "ylabel": "ms", "series": times},
        {"title": "speedup of ours (block-sparse)", "ylabel": "x", "series": speed}])
    if why is None:
        return [str(out.with_suffix(".png"))]
    bk.log(f"plot not written: {why}")
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
    bk.add_common_args(p, out="bench_out/block_sparse.json", max_minutes=2.5)
    return p


def parse_args(argv):
    p = build_parser()
    a = bk.parse_common(p, argv, methods=METHODS + EXTRA_METHODS, default_methods=lambda a: METHODS,
                        default_seqlens=lambda a: SMOKE["seqlens"] if a.smoke else SEQLENS)
    s = {**DEFAULTS, "densities": DENSITIES, **(SMOKE if a.smoke else {})}
    dens = bk.parse_list(p, "densities", a.densities, Fraction) if a.densities else map(Fraction, s["densities"])
    a.density_list = [str(x) for x in dens]
    if not a.density_list or any(not 0 < Fraction(x) <= 1 for x in a.density_list):
        p.error(f"--densities must be fractions in (0, 1] like 1/4 or 0.25, got {a.densities!r}")
    for name in ("heads", "headdim", "tokens", "block"):
        setattr(a, name, getattr(a, name) or s[name])
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.block & (a.block - 1) or a.block < 16:
        p.error(f"--block must be a power of two >= 16, got {a.block}")
    return p, a


def make_cases(a) -> list[dict]:
    cases = []
    for n in a.seqlen_list:
        jobs = [(m, None) for m in ("dense", "flex_dense") if m in a.method_list]
        jobs += [(m, t) for t in a.density_list for m in ("ours", "flex") if m in a.method_list]
        for method, target in jobs:
            cases.append({"id": len(cases), "group": f"density {target}" if target else method, "n": n,
                          "batch": max(1, a.tokens // n), "method": method, "target": target, "heads": a.heads,
                          "headdim": a.headdim, "dtype": a.dtype, "layout": a.layout, "block": a.block})
    return cases


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p, a = parse_args(argv)
    title = (f"block-sparse attention, causal, {a.layout} layout, H={a.heads}, D={a.headdim}, {a.dtype}, "
             f"block {a.block}x{a.block}, B*N={a.tokens}")

    def report(rows, plots):
        table = build_table(rows)
        return {"json": {"title": title, "table": table}, "text": render(table, title, False),
                "markdown": render(table, title, True), "plots": plot(rows, Path(a.out), title) if plots else []}

    meta = {"title": title, "density": "kept blocks / blocks on or below the diagonal (BlockMask.causal_density)",
            "speedup_goal": "ours vs dense >= 0.8 / density; ours vs flex >= 1",
            "memory": "max_memory_allocated during one fwd+bwd minus memory allocated before (q, k, v, dO)",
            "timing": "median over timed calls after warm-up; CUDA events on GPU, perf_counter on CPU"}
    return bk.run_bench(p, a, argv, script=str(Path(__file__).resolve()), title="Block-sparse attention benchmark",
                        cases=make_cases(a), run_case=run_case, meta=meta, report=report)


if __name__ == "__main__":
    sys.exit(main())
