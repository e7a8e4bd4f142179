"""Shared helpers for the attention benchmarks (bench_attention.py, bench_block_sparse.py).

What lives here, one job each:
- `Clock` / `log`: progress lines stamped with seconds since the script started.
- `env_info()`: GPU, torch, Triton, cuDNN, CUDA versions, date, git commit.
- `classify_error(exc)`: an exception -> ("OOM" | "n/a" | "error", short reason).
- `time_fn(fn, ...)`: median milliseconds per call (CUDA events on a GPU, perf_counter on CPU).
- `peak_extra_bytes(fn, ...)`: torch.cuda.max_memory_allocated during one call minus the memory
  allocated before it (so q, k, v, dO and anything else already alive are not counted).
- `rel_err(a, b)`: ||a - b|| / ||b|| in fp32.
- `run_cases(...)`: the driver. Every benchmark configuration is a "case" (a JSON-able dict);
  cases run in a worker *process* (the same script re-invoked with --_worker) that appends one
  JSON line per finished case. If the worker dies (CUDA illegal memory access, segfault) or a
  case hangs past --case-timeout, the parent records that case as "crash"/"timeout", starts a
  fresh worker and goes on with the rest. A --max-minutes budget turns the cases that would start
  after it into "skipped (time budget)". After an OOM/crash/timeout of a method, its larger-N
  cases in the same group are skipped (they would fail the same way, only slower).
- `write_json(path, obj)`: atomic (temporary file + rename), so a killed run never leaves a
  half-written file; the driver rewrites the JSON after every case, so partial results survive.
- `markdown_table` / `text_table`, `plot_lines`.

The module is importable without torch (the parent process of an isolated run never imports it).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python scripts/bench_x.py` from anywhere finds kernels/
    sys.path.insert(0, str(REPO))

FAIL_STATUSES = ("OOM", "crash", "timeout")  # after one of these, larger N of that method is skipped


# ----------------------------------------------------------------------------------- progress
class Clock:
    """Seconds since t0 (the parent's start time, handed to workers so all lines share it)."""

    def __init__(self, t0: float | None = None):
        self.t0 = time.time() if t0 is None else t0

    def elapsed(self) -> float:
        return time.time() - self.t0


_CLOCK = Clock()


def set_clock(t0: float) -> None:
    global _CLOCK
    _CLOCK = Clock(t0)


def log(msg: str) -> None:
    print(f"[{_CLOCK.elapsed():7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------- env info
def env_info() -> dict:
    """Versions and hardware; never raises."""
    info: dict = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        import torch
        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_mem_gb"] = round(p.total_memory / 1e9, 1)
            info["gpu_capability"] = f"{p.major}.{p.minor}"
        else:
            info["gpu"] = None
    except Exception as exc:  # pragma: no cover
        info["torch_error"] = repr(exc)
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"n/a ({type(exc).__name__})"
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    try:
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_dirty"] = bool(dirty)
    except Exception:
        info["git_commit"] = None
    return info


# ------------------------------------------------------------------------------ errors, memory
def short(msg: str, n: int = 160) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def classify_error(exc: BaseException) -> tuple[str, str]:
    """Map an exception to a table status: OOM, n/a (backend unavailable) or error."""
    name = type(exc).__name__
    text = str(exc)
    low = text.lower()
    if name == "OutOfMemoryError" or "out of memory" in low or "cuda_error_out_of_memory" in low:
        return "OOM", short(text.splitlines()[0] if text else name, 120)
    unavailable = ("no available kernel", "no viable backend", "not supported", "not available", "unsupported",
                   "requires cuda", "no cuda", "not compiled with", "cudnn", "only supports",
                   "backend is not", "could not be imported", "not implemented")
    if isinstance(exc, (ImportError, NotImplementedError)) or any(s in low for s in unavailable):
        first = next((ln for ln in text.splitlines() if ln.strip()), name)
        return "n/a", short(first, 120)
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    return "error", short(f"{name}: {first}", 160)


def free_memory() -> None:
    import gc
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:
        pass


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def rel_err(a, b) -> float:
    """Relative Frobenius error of a against the reference b (fp32)."""
    a = a.detach().float()
    b = b.detach().float()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


# --------------------------------------------------------------------------------- timing
def _sync(device) -> None:
    if is_cuda(device):
        import torch
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_reps: int = 3, max_reps: int = 200, min_warmup: int = 1) -> dict:
    """Median time of fn() in milliseconds.

    Warm-up: at least `min_warmup` calls and about `warmup_ms`; the warm-up's mean gives the
    number of timed calls, about rep_ms / estimate, clamped to [min_reps, max_reps]. On a GPU
    each call is bracketed by CUDA events (one sync at the end); on CPU by perf_counter.
    """
    cuda = is_cuda(device)
    _sync(device)
    t_start = time.perf_counter()
    n_warm = 0
    est_ms = None
    while n_warm < min_warmup or (time.perf_counter() - t_start) * 1e3 < warmup_ms:
        fn()
        n_warm += 1
        _sync(device)
        est_ms = (time.perf_counter() - t_start) * 1e3 / n_warm
        if n_warm >= 1000:
            break
    if est_ms is None:  # min_warmup == 0: one untimed estimate-less start
        est_ms = rep_ms
    reps = int(max(min_reps, min(max_reps, math.ceil(rep_ms / max(est_ms, 1e-3)))))
    times = []
    if cuda:
        import torch
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    mid = len(times) // 2
    med = times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])
    return {"ms": med, "min_ms": times[0], "reps": reps, "warmup": n_warm}


def peak_extra_bytes(fn: Callable[[], object], device) -> int | None:
    """max_memory_allocated during one fn() minus memory_allocated before it (None on CPU).

    fn's return value is dropped inside the measured window's end, so outputs and gradients
    count at their peak but do not stay allocated afterwards.
    """
    if not is_cuda(device):
        return None
    import torch
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del res
    return int(peak - base)


def tflops(flops: float | None, ms: float | None) -> float | None:
    if flops is None or ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------- output
def write_json(path: Path, obj) -> None:
    """Write JSON atomically: temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def finite_or_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def clean_floats(obj):
    """Replace NaN/inf floats by None (JSON has no NaN) recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_floats(v) for v in obj]
    return obj


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(x, spec: str = ".0f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def fmt_tf(x) -> str:
    """TFLOP/s: integers on a GPU, three significant digits for the tiny CPU numbers."""
    return "-" if x is None else (f"{x:.0f}" if x >= 10 else f"{x:.3g}")


def fmt_gb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e9:.1f} GB"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def plot_lines(path: Path, title: str, panels: list[dict]) -> str | None:
    """One PNG with side-by-side log-log panels.

    panels: [{"title", "ylabel", "series": {label: [(x, y), ...]}}]. Returns None when written,
    else the reason it was not (matplotlib missing, nothing to plot).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"matplotlib unavailable ({type(exc).__name__})"
    panels = [p for p in panels if any(y for pts in p["series"].values() for _, y in pts)]
    if not panels:
        return "no data to plot"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for label, pts in p["series"].items():
            pts = [(x, y) for x, y in pts if y is not None and y > 0]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(p.get("xlabel", "sequence length N"))
        ax.set_ylabel(p["ylabel"])
        ax.set_title(p["title"], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return None


# ------------------------------------------------------------------------------------ driver
def skip_reason(case: dict, results: dict) -> str | None:
    """Why `case` should not run given earlier results (an OOM/crash/timeout at a smaller N)."""
    for r in results.values():
        if (r.get("group") == case.get("group") and r.get("method") == case.get("method")
                and r.get("status") in FAIL_STATUSES and r.get("n", 0) < case.get("n", 0)):
            return f"skipped ({r['status']} at N={r['n']})"
    return None


def skipped_result(case: dict, reason: str) -> dict:
    return {**case, "status": "skipped", "reason": reason}


def _worker_args(argv: list[str]) -> list[str]:
    """Strip the driver-only flags from argv before handing it to a worker."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        if a in ("--_worker", "--_t0", "--_deadline"):
            skip = 1
            continue
        if a.startswith(("--_worker=", "--_t0=", "--_deadline=")):
            continue
        out.append(a)
    return out


def worker_main(job_path: str, run_case: Callable[[dict], dict], setup: Callable[[], dict] | None = None) -> int:
    """Body of a worker process: run the job file's cases in order, one JSON line per event."""
    job = json.loads(Path(job_path).read_text())
    set_clock(job["t0"])
    deadline = job["deadline"]
    results = {str(r["id"]): r for r in job.get("prior", [])}
    out = open(job["results"], "a", buffering=1)

    def emit(obj):
        out.write(json.dumps(clean_floats(obj), default=_json_default) + "\n")
        out.flush()
        os.fsync(out.fileno())

    if setup is not None:
        emit({"event": "env", "env": setup()})
    for case in job["cases"]:
        reason = skip_reason(case, results)
        if reason is None and time.time() > deadline:
            reason = "skipped (time budget)"
        if reason is not None:
            res = skipped_result(case, reason)
        else:
            emit({"event": "start", "id": case["id"], "time": time.time()})
            if os.environ.get("BENCHLIB_TEST_CRASH") == case.get("method"):
                os._exit(3)  # test hook: a worker dying mid-case (tests/scripts/test_bench_smoke.py)
            res = run_case(case)
        results[str(case["id"])] = res
        emit({"event": "done", "id": case["id"], "result": res})
    out.close()
    return 0


def run_cases(cases: list[dict], *, script: str, argv: list[str], run_case: Callable[[dict], dict],
              setup: Callable[[], dict], isolate: bool, t0: float, deadline: float,
              case_timeout: float, on_result: Callable[[dict, dict], None], tmpdir: Path,
              max_restarts: int = 8) -> tuple[dict, dict]:
    """Run every case; return ({id: result}, env). on_result(results, env) after each case."""
    results: dict[str, dict] = {}
    env: dict = {}
    if not isolate:
        env = setup()
        for case in cases:
            reason = skip_reason(case, results)
            if reason is None and time.time() > deadline:
                reason = "skipped (time budget)"
            res = skipped_result(case, reason) if reason else run_case(case)
            results[str(case["id"])] = res
            on_result(results, env)
        return results, env

    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    restarts = 0
    while True:
        remaining = [c for c in cases if str(c["id"]) not in results]
        if not remaining:
            break
        if restarts > max_restarts or time.time() > deadline:
            why = "time budget" if time.time() > deadline else "too many worker restarts"
            for c in remaining:
                results[str(c["id"])] = skipped_result(c, f"skipped ({why})")
            on_result(results, env)
            break
        job = tmpdir / f"job{restarts}.json"
        res_path = tmpdir / f"results{restarts}.jsonl"
        err_path = tmpdir / f"worker{restarts}.stderr"
        res_path.write_text("")
        write_json(job, {"cases": remaining, "prior": list(results.values()), "results": str(res_path),
                         "t0": t0, "deadline": deadline})
        cmd = [sys.executable, script, *_worker_args(argv), "--_worker", str(job)]
        with open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=None, stderr=err, start_new_session=True)
        in_flight, started = None, None
        pos = 0
        killed_for = None
        while True:
            rc = proc.poll()
            with open(res_path) as f:
                f.seek(pos)
                chunk = f.read()
            # only consume complete lines
            cut = chunk.rfind("\n") + 1
            pos += len(chunk[:cut].encode())
            for line in chunk[:cut].splitlines():
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if ev["event"] == "env":
                    env = ev["env"]
                elif ev["event"] == "start":
                    in_flight, started = ev["id"], time.time()
                elif ev["event"] == "done":
                    results[str(ev["id"])] = ev["result"]
                    in_flight = None
                    on_result(results, env)
            if rc is not None:
                break
            now = time.time()
            if in_flight is not None and now - started > case_timeout:
                killed_for = "timeout"
            elif now > deadline + 30:  # a case that started in budget but overruns it badly
                killed_for = "timeout"
            if killed_for:
                log(f"case {in_flight} exceeded its time limit; killing worker pid {proc.pid}")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                break
            time.sleep(0.2)
        if all(str(c["id"]) in results for c in remaining):
            break
        # the worker ended early: blame the case in flight (or the first unfinished one)
        tail = ""
        try:
            lines = [ln for ln in err_path.read_text(errors="replace").splitlines() if ln.strip()]
            tail = " | ".join(lines[-3:])
        except OSError:
            pass
        blame = in_flight if in_flight is not None else next(
            c["id"] for c in remaining if str(c["id"]) not in results)
        case = next(c for c in cases if c["id"] == blame)
        if killed_for == "timeout":
            status, reason = "timeout", f"timeout (> {case_timeout:.0f} s, worker killed)"
        elif in_flight is None and not env:
            status, reason = "crash", short(f"worker failed to start (exit {proc.returncode}): {tail}", 300)
        else:
            status, reason = "crash", short(f"worker died (exit {proc.returncode}): {tail}", 300)
        log(f"case {blame} ({case.get('method')}, N={case.get('n')}): {status}: {reason}")
        results[str(blame)] = {**case, "status": status, "reason": reason}
        on_result(results, env)
        if status == "crash" and in_flight is None and not env:
            # the worker cannot even start: nothing will run; report every case the same way
            for c in cases:
                results.setdefault(str(c["id"]), {**c, "status": "crash", "reason": reason})
            on_result(results, env)
            break
        restarts += 1
    return results, env


# ------------------------------------------------------------------------------ common CLI
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_common_args(p, *, out_default: str, max_minutes: float) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="input dtype (default bf16; fp32 with --smoke)")
    p.add_argument("--warmup-ms", type=float, default=None,
                   help="warm-up per measurement, ms (default 25; 0 with --smoke)")
    p.add_argument("--rep-ms", type=float, default=None,
                   help="timed time per measurement, ms (default 100; 0 with --smoke)")
    p.add_argument("--min-reps", type=int, default=None,
                   help="fewest timed calls per measurement (default 3; 1 with --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=max_minutes,
                   help="time budget for the whole run (from start); cases that would start later are "
                        "reported as skipped")
    p.add_argument("--case-timeout", type=float, default=240.0,
                   help="seconds one case may take before its worker is killed (reported as timeout)")
    p.add_argument("--out", default=out_default, help="JSON path; PNGs go next to it")
    p.add_argument("--markdown", nargs="?", const="", default=None, metavar="PATH",
                   help="also write the tables as markdown (default path: the JSON's, .md)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-isolate", action="store_true",
                   help="run cases in this process (a CUDA crash then ends the run)")
    p.add_argument("--smoke", action="store_true",
                   help="toy sizes that run anywhere (CPU: Triton interpreter, perf_counter timing)")
    p.add_argument("--_worker", default=None, help=argparse_suppress())


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


def parse_list(text: str, cast=int) -> list:
    return [cast(x) for x in str(text).replace(",", " ").split() if x]


def check_budget_args(p, args) -> None:
    """Fill the timing defaults (lighter with --smoke) and check the common arguments."""
    for name, gpu, smoke in (("warmup_ms", 25.0, 0.0), ("rep_ms", 100.0, 0.0), ("min_reps", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else gpu)
    if args.warmup_ms < 0 or args.rep_ms < 0:
        p.error(f"--warmup-ms and --rep-ms must be >= 0, got {args.warmup_ms}, {args.rep_ms}")
    if args.max_minutes <= 0:
        p.error(f"--max-minutes must be > 0, got {args.max_minutes}")
    if args.case_timeout <= 0:
        p.error(f"--case-timeout must be > 0, got {args.case_timeout}")
    if args.min_reps < 1:
        p.error(f"--min-reps must be >= 1, got {args.min_reps}")
    if Path(args.out).suffix != ".json":
        p.error(f"--out must name a .json file, got {args.out!r}")


def cuda_available_or_exit(p, args) -> None:
    """Without --smoke a CUDA GPU is needed; say so in one line before any work starts."""
    if args.smoke:
        return
    import torch
    if not torch.cuda.is_available():
        p.error("no CUDA GPU found; run with --smoke for the CPU toy run (Triton interpreter)")


def worker_setup(smoke: bool) -> dict:
    """Prepare a worker process: interpreter on CPU, larger dynamo recompile limits; env info."""
    import torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        # Must precede the first import of triton (kernels.flash); conftest does the same.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import torch._dynamo
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 4096)
    except Exception:
        pass
    torch.backends.cuda.matmul.allow_tf32 = False
    info = env_info()
    info["device"] = dev
    return info


def collect_worker_logs(tmpdir: Path, dest: Path) -> None:
    """Keep the workers' stderr (warnings, tracebacks) next to the results, when there is any."""
    parts = []
    for f in sorted(Path(tmpdir).glob("worker*.stderr")):
        text = f.read_text(errors="replace").strip()
        if text:
            parts.append(f"===== {f.name}\n{text}\n")
    if parts:
        write_text(dest, "\n".join(parts))
