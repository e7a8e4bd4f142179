#!/usr/bin/env python
"""Compare the loss curves of two or more train.py runs (their metrics.jsonl), e.g. eager vs compiled:

    python train.py run_dir=outputs/eager compile=false max_steps=200 ...
    python train.py run_dir=outputs/fast compile=auto max_steps=200 ...
    python scripts/compare_runs.py outputs/eager outputs/fast --out loss_curves.png --max-rel 0.02

The first run is the reference. For every other run: the steps both logged, the largest and the
mean |loss - loss_ref| / loss_ref, the final losses and tokens/s (median over the logged rows after
the first). Exit code 1 when --max-rel is given and a run's largest relative difference exceeds it.
A plot of the curves (and of the differences) is written with --out. The summary table is printed last.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk  # noqa: E402


def read_metrics(run_dir: str) -> dict[int, dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; pass train.py run directories (run_dir=...)")
    rows = {int(r["step"]): r for r in bk.read_jsonl(path) if "loss" in r}
    if not rows:
        raise SystemExit(f"error: {path} has no training rows")
    return rows


def compare(ref: dict[int, dict], other: dict[int, dict]) -> dict:
    steps = sorted(set(ref) & set(other))
    if not steps:
        return {"steps": 0}
    rel = [abs(other[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in steps]
    worst = max(range(len(steps)), key=rel.__getitem__)
    return {"steps": len(steps), "max_rel": rel[worst], "at_step": steps[worst], "mean_rel": sum(rel) / len(rel),
            "final_ref": ref[steps[-1]]["loss"], "final": other[steps[-1]]["loss"], "last_step": steps[-1]}


def speed(rows: dict[int, dict]) -> float | None:
    tps = [r["tokens_per_s"] for s, r in sorted(rows.items())[1:] if r.get("tokens_per_s")]
    return statistics.median(tps) if tps else None


def plot(runs: dict[str, dict[int, dict]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    ref = runs[names[0]]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for name, rows in runs.items():
        steps = sorted(rows)
        ax.plot(steps, [rows[s]["loss"] for s in steps], label=name, lw=1.2)
        if name != names[0]:
            common = [s for s in steps if s in ref]
            ax2.plot(common, [(rows[s]["loss"] - ref[s]["loss"]) / ref[s]["loss"] for s in common], label=name, lw=1)
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set_ylabel(f"relative difference\nvs {names[0]}")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    bk.save_figure(fig, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="train.py run directories; the first is the reference")
    ap.add_argument("--names", default=None, help="comma list of labels (default: the folder names)")
    ap.add_argument("--out", default=None, help="write a PNG of the curves here")
    ap.add_argument("--json", default=None, help="write the comparison as JSON here")
    ap.add_argument("--max-rel", type=float, default=None, help="fail (exit 1) above this relative difference")
    a = ap.parse_args(argv)
    if len(a.runs) < 2:
        print("error: give at least two run directories (reference first)", file=sys.stderr)
        return 2
    names = a.names.split(",") if a.names else [Path(r).name for r in a.runs]
    if len(names) != len(a.runs):
        print(f"error: --names has {len(names)} labels for {len(a.runs)} runs", file=sys.stderr)
        return 2
    runs = {n: read_metrics(r) for n, r in zip(names, a.runs)}
    ref = runs[names[0]]
    results = {n: {**compare(ref, runs[n]), "tokens_per_s": speed(runs[n])} for n in names[1:]}
    results[names[0]] = {"tokens_per_s": speed(ref), "reference": True}
    if a.out:
        plot(runs, a.out)
        print(f"wrote {a.out}")
    if a.json:
        bk.write_json(a.json, results)
    failed = False
    t = results[names[0]]["tokens_per_s"]
    lines = [[names[0], len(ref), "(reference)", "", "", f"{ref[max(ref)]['loss']:.4f}", "", bk.fmt(t, ",.0f", "None")]]
    for n in names[1:]:
        r = results[n]
        if not r["steps"]:
            lines.append([n, "0", f"no step in common with {names[0]}"])
            failed = True
            continue
        bad = a.max_rel is not None and r["max_rel"] > a.max_rel
        failed |= bad
        lines.append([n, r["steps"], f"{r['max_rel']:.2e}", r["at_step"], f"{r['mean_rel']:.2e}", f"{r['final']:.4f}",
                      f"{r['final_ref']:.4f}", bk.fmt(r["tokens_per_s"], ",.0f", "None"), "ABOVE --max-rel" if bad else ""])
    print(bk.table(["run", "steps", "max rel diff", "at step", "mean rel", "final loss", "ref final", "tokens/s", ""],
                   lines, left={0, 8}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
