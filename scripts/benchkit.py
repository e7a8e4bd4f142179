"""The harness every benchmark script shares: timing, isolation, environment, tables, JSON, plots.

- `log`: progress lines stamped with seconds since the run started (workers share the parent's t0).
- `env_info()`: date, versions, GPU, git commit (never raises).
- `time_fn` (median ms: CUDA events on a GPU, perf_counter on a CPU), `peak_extra_bytes` (peak
  memory of one call minus what was allocated before it), `rel_err`, `classify_error`.
- `Worker` / `serve`: work runs in a child process (the script itself with --_worker) that reads
  cases as JSON lines on stdin and answers with tagged JSON lines on stdout (its other output is
  passed through); a case may say "warmed up" and wait for a go-ahead (bench_training.py warms
  several workers at once, then times them one by one). `run_cases` drives a list of cases through
  one worker: a crash or hang costs that case only (a fresh worker takes the rest); after an OOM /
  crash / timeout of a method its larger N in the same group are skipped; past the deadline the
  remaining cases are "skipped (time budget)".
- `write_json` / `write_text` (atomic: temporary file + rename, so a killed run never leaves a
  half-written file), `save_figure` (the same for a PNG), `table` (aligned text or markdown),
  `plot_panels` (log-log PNG panels).
- `add_common_args` / `parse_common` / `run_bench`: the kernel benchmarks' shared CLI and main
  (bench_attention.py, bench_block_sparse.py); `add_step_args`: the training benchmarks' shared
  arguments (bench_training.py, bench_fsdp.py).

Importable without torch (a parent of isolated workers never imports it).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python scripts/x.py` from anywhere finds kernels/, model/, trainer/
    sys.path.insert(0, str(REPO))

T0 = float(os.environ.get("BENCHKIT_T0", time.time()))
TAG = "@@benchkit "  # marks the worker's messages on its stdout
FAILED = ("OOM", "crash", "timeout")  # after one of these, larger N of that method are skipped
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def start_clock() -> None:
    """t0 of the progress lines and of the time budgets: now (a driver starting its run)."""
    global T0
    T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def short(msg, n: int = 160) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


# ------------------------------------------------------------------------------- environment
def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10).stdout.strip()


def gpu_from_smi() -> dict:
    """The first visible GPU through nvidia-smi, without initialising CUDA here; {} without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    gpus = [[x.strip() for x in line.split(",")] for line in out.splitlines() if line.count(",") >= 2]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    pick = next((g for g in gpus if g[0] == visible), gpus[0] if gpus else None)
    if pick is None:
        return {}
    mem = int(float(pick[2]) * 2**20) if pick[2].replace(".", "").isdigit() else None
    return {"gpu": pick[1], "gpu_count": len(gpus), "gpu_mem_bytes": mem}


def env_info(torch_details: bool = True) -> dict:
    """Date, host, package versions (read from their metadata, nothing imported), git commit; with
    torch_details the CUDA/cuDNN versions and GPU through torch, else the GPU through nvidia-smi."""
    from importlib import metadata

    info: dict = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "python": platform.python_version(), "executable": sys.executable, "host": platform.node()}
    for dist in ("torch", "triton", "transformers", "hydra-core"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    try:
        commit, dirty = _git("rev-parse", "--short", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")
        info["git_commit"], info["git_dirty"] = (commit + ("+dirty" if dirty else "")) or None, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    if not torch_details:
        return {**info, "gpu": None, **gpu_from_smi()}
    try:
        import torch
        info.update(torch=torch.__version__, cuda=torch.version.cuda, gpu=None,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 1e9, 1), gpu_capability=f"{p.major}.{p.minor}")
    except Exception as exc:  # pragma: no cover
        info["torch_error"] = repr(exc)
    return info


# ----------------------------------------------------------------------------- timing, memory
def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def sync(device) -> None:
    if is_cuda(device):
        import torch
        torch.cuda.synchronize()


def free_memory() -> None:
    import gc
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.synchronize()
        sys.modules["torch"].cuda.empty_cache()


def time_fn(fn, device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 3, max_reps: int = 200,
            min_warmup: int = 1) -> dict:
    """Median milliseconds of fn(): at least `min_warmup` calls and ~warmup_ms of warm-up, whose mean
    sizes the timed calls to ~rep_ms (clamped to [min_reps, max_reps]); CUDA events around each call
    on a GPU (one sync at the end), perf_counter on a CPU."""
    sync(device)
    t_start, n_warm, est_ms = time.perf_counter(), 0, rep_ms
    while n_warm < min_warmup or ((time.perf_counter() - t_start) * 1e3 < warmup_ms and n_warm < 1000):
        fn()
        sync(device)
        n_warm += 1
        est_ms = (time.perf_counter() - t_start) * 1e3 / n_warm
    reps = int(max(min_reps, min(max_reps, math.ceil(rep_ms / max(est_ms, 1e-3)))))
    if is_cuda(device):
        import torch
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) for s, e in events)
    else:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
    mid = len(times) // 2
    med = times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])
    return {"ms": med, "min_ms": times[0], "reps": reps, "warmup": n_warm}


def peak_extra_bytes(fn, device) -> int | None:
    """torch.cuda.max_memory_allocated during one fn() minus memory_allocated before it (None on a
    CPU). fn's result is dropped after the peak is read: outputs and gradients count at their peak."""
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
    return None if flops is None or not ms or ms <= 0 else flops / (ms * 1e-3) / 1e12


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| of a against the reference b, in float64."""
    a, b = a.detach().double(), b.detach().double()
    den, num = b.norm().item(), (a - b).norm().item()
    return num / den if den > 0 else num


def classify_error(exc: BaseException) -> tuple[str, str]:
    """An exception -> (table status, short reason): OOM, n/a (backend unavailable here) or error."""
    name, text = type(exc).__name__, str(exc)
    low = text.lower()
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if name == "OutOfMemoryError" or "out of memory" in low:
        return "OOM", short(first or name, 120)
    unavailable = ("no available kernel", "no viable backend", "not supported", "not available", "unsupported",
                   "requires cuda", "no cuda", "not compiled with", "cudnn", "only supports", "backend is not",
                   "could not be imported", "not implemented")
    if isinstance(exc, (ImportError, NotImplementedError)) or any(s in low for s in unavailable):
        return "n/a", short(first or name, 120)
    return "error", short(f"{name}: {first}", 160)


# ------------------------------------------------------------------------------------ outputs
def clean_floats(obj):
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_floats(v) for v in obj]
    return obj


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_text(path, text: str) -> None:
    """Write through a temporary file in the same folder and a rename (mode 0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    write_text(path, json.dumps(clean_floats(obj), indent=1, default=str, allow_nan=False) + "\n")


def read_jsonl(path) -> list[dict]:
    """The rows of a JSON-lines file (train.py's metrics.jsonl); a line cut short by a kill is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def fmt(x, spec: str = ".0f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def fmt_tf(x) -> str:
    """TFLOP/s: integers on a GPU, three significant digits for the tiny CPU numbers."""
    return "-" if x is None else (f"{x:.0f}" if x >= 10 else f"{x:.3g}")


def fmt_gb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e9:.1f} GB"


def table(headers: list, rows: list[list], markdown: bool = False, left: int | set = 1) -> str:
    """Markdown, or text with the columns in `left` (a set of indices, or an int: the first ones)
    left-aligned and the rest right-aligned."""
    rows = [[str(c) for c in r] for r in rows]
    left = set(range(left)) if isinstance(left, int) else left
    if markdown:
        return "\n".join(["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)] +
                         ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max([len(str(h))] + [len(r[i]) for r in rows if i < len(r)]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line([str(h) for h in headers]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def plot_panels(path, title: str, panels: list[dict], xlabel: str = "sequence length N") -> str | None:
    """One PNG of side-by-side log-log panels [{"title", "ylabel", "series": {label: [(x, y)]}}];
    None when written, else why not (matplotlib missing, nothing to plot)."""
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
            pts = sorted((x, y) for x, y in pts if y is not None and y > 0)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=p["ylabel"])
        ax.set_xscale("log", base=2)
        ax.set_title(p["title"], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)
    return None


def save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- worker processes
class Worker:
    """A child process that runs cases (see `serve`): JSON lines on its stdin, tagged JSON lines on
    its stdout (other lines are passed through to ours), its stderr appended to `log_path`."""

    def __init__(self, cmd: list[str], log_path, env: dict | None = None, cwd=None):
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                         env={**(os.environ if env is None else env), "BENCHKIT_T0": str(T0)},
                                         cwd=cwd, start_new_session=True)
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                try:
                    self.messages.put(json.loads(line[len(TAG):]))
                except json.JSONDecodeError:  # cut short by a dying worker
                    pass
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
        self.messages.put(None)

    def send(self, obj) -> None:
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except OSError:  # it died; recv() says so
            pass

    def recv(self, timeout: float):
        """The next message (a dict), None once the process has ended, or "timeout"."""
        try:
            return self.messages.get(timeout=max(timeout, 0.01))
        except queue.Empty:
            return "timeout"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: compile workers go too
            except ProcessLookupError:
                pass
        self.proc.wait()

    def tail(self, n: int = 3) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return " | ".join(lines[-n:])


def serve(run_case, setup=None) -> int:
    """A worker's body: send setup()'s environment, then run each case read from stdin and send its
    result. run_case(case, ready): ready() tells the parent "warmed up" and waits for its go-ahead."""
    def send(obj):
        sys.stdout.write(TAG + json.dumps(clean_floats(obj), default=str) + "\n")
        sys.stdout.flush()

    def ready():
        send({"ready": True})
        sys.stdin.readline()

    send({"env": setup() if setup else {}})
    for line in sys.stdin:
        if line.strip():
            send({"result": run_case(json.loads(line), ready)})
    return 0


def run_cases(cases: list[dict], run_case, *, worker_cmd: list[str] | None, setup, deadline: float,
              case_timeout: float, log_path, on_result) -> tuple[dict, dict]:
    """Every case in order, in a Worker (or in this process when worker_cmd is None); returns
    ({id: result}, env). on_result(results, env) runs after each case."""
    results: dict[str, dict] = {}
    env: dict = {}
    worker = None
    try:
        for i, case in enumerate(cases):
            failed = next((r for r in results.values() if r.get("status") in FAILED and r.get("group") == case["group"]
                           and r.get("method") == case["method"] and r.get("n", 0) < case["n"]), None)
            if failed:
                res = {**case, "status": "skipped", "reason": f"skipped ({failed['status']} at N={failed['n']})"}
            elif time.time() > deadline:
                res = {**case, "status": "skipped", "reason": "skipped (time budget)"}
            elif worker_cmd is None:
                env = env or setup()
                res = run_case(case, None)
            else:
                if worker is None:
                    worker = Worker(worker_cmd, log_path)
                    msg = worker.recv(case_timeout)
                    if not isinstance(msg, dict):  # it cannot even start: nothing would run
                        worker.stop()
                        why = short(f"worker failed to start (exit {worker.proc.returncode}): {worker.tail()}", 300)
                        log(why)
                        for c in cases[i:]:
                            results[str(c["id"])] = {**c, "status": "crash", "reason": why}
                        on_result(results, env)
                        break
                    env = msg["env"]
                worker.send(case)
                msg = worker.recv(min(case_timeout, deadline + 30 - time.time()))  # a bad overrun is a timeout
                if isinstance(msg, dict) and "result" in msg:
                    res = msg["result"]
                else:
                    worker.stop()
                    status, reason = (("timeout", f"timeout (> {case_timeout:.0f} s, worker killed)") if msg == "timeout"
                                      else ("crash", short(f"worker died (exit {worker.proc.returncode}): "
                                                           f"{worker.tail()}", 300)))
                    log(f"case {case['id']} ({case['method']}, N={case['n']}): {status}: {reason}")
                    res, worker = {**case, "status": status, "reason": reason}, None
            results[str(case["id"])] = res
            on_result(results, env)
    finally:
        if worker is not None:
            worker.stop()
    return results, env


# ------------------------------------------------------------------- the kernel benchmarks' CLI
def add_common_args(p: argparse.ArgumentParser, *, out: str, max_minutes: float) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="input dtype (default bf16; fp32 with --smoke)")
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up per measurement, ms (default 25; 0 with --smoke)")
    p.add_argument("--rep-ms", type=float, default=None, help="timed time per measurement, ms (default 100; 0 with --smoke)")
    p.add_argument("--min-reps", type=int, default=None, help="fewest timed calls per measurement (default 3; 1 with --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=max_minutes,
                   help="time budget for the whole run; cases that would start later are reported as skipped")
    p.add_argument("--case-timeout", type=float, default=240.0,
                   help="seconds one case may take before its worker is killed (reported as timeout)")
    p.add_argument("--check-max-n", type=int, default=4096, help="correctness check up to this N")
    p.add_argument("--check-tol", type=float, default=2e-2, help="flag relative errors above this")
    p.add_argument("--out", default=out, help="JSON path; PNGs go next to it")
    p.add_argument("--markdown", nargs="?", const="", default=None, metavar="PATH",
                   help="also write the tables as markdown (default path: the JSON's, .md)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-isolate", action="store_true", help="run cases in this process (a CUDA crash then ends the run)")
    p.add_argument("--smoke", action="store_true", help="toy sizes that run anywhere (CPU: Triton interpreter)")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)


def add_step_args(p: argparse.ArgumentParser, *, steps: int, warmup: int, set_help: str) -> None:
    """The training benchmarks' shared arguments (bench_training.py, bench_fsdp.py)."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"a train.py override, {set_help}")
    p.add_argument("--steps", type=int, default=steps, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps first (compilation, allocator)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")


def parse_list(p, name: str, text, cast=int) -> list:
    try:
        return [cast(x) for x in str(text).replace(",", " ").split() if x]
    except (ValueError, ZeroDivisionError):
        p.error(f"--{name} must be a comma list, got {text!r}")


def parse_common(p, argv, *, methods: list, default_methods, default_seqlens):
    """Parse argv with the shared checks below, and --methods / --seqlens (comma lists, checked)
    into a.method_list (given order, no repeats) and a.seqlen_list (sorted). The defaults are
    functions of the parsed arguments (--smoke, --quick pick others)."""
    a = p.parse_args(argv)
    check_common_args(p, a)
    chosen = parse_list(p, "methods", a.methods, str) if a.methods else default_methods(a)
    if not chosen or any(m not in methods for m in chosen):
        p.error(f"--methods: unknown {[m for m in chosen if m not in methods]}; choose from {methods}")
    a.method_list = list(dict.fromkeys(chosen))
    ns = parse_list(p, "seqlens", a.seqlens) if a.seqlens else default_seqlens(a)
    if not ns or min(ns) < 1:
        p.error(f"--seqlens must be positive integers, got {ns}")
    a.seqlen_list = sorted(set(ns))
    return a


def check_common_args(p, a) -> None:
    """Timing defaults (lighter with --smoke) and one-line errors for the shared arguments."""
    for name, gpu, smoke in (("warmup_ms", 25.0, 0.0), ("rep_ms", 100.0, 0.0), ("min_reps", 3, 1)):
        if getattr(a, name) is None:
            setattr(a, name, smoke if a.smoke else gpu)
    a.dtype = a.dtype or ("fp32" if a.smoke else "bf16")
    if a.warmup_ms < 0 or a.rep_ms < 0:
        p.error(f"--warmup-ms and --rep-ms must be >= 0, got {a.warmup_ms}, {a.rep_ms}")
    for name in ("max_minutes", "case_timeout"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(a, name)}")
    if a.min_reps < 1:
        p.error(f"--min-reps must be >= 1, got {a.min_reps}")
    if Path(a.out).suffix != ".json":
        p.error(f"--out must name a .json file, got {a.out!r}")


def worker_setup() -> dict:
    """A process about to run attention cases: Triton's interpreter on a CPU (before triton is first
    imported, as conftest.py does), room for many compiled shapes, no TF32; returns env_info()."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch._dynamo
    for name, value in (("cache_size_limit", 256), ("recompile_limit", 256), ("accumulated_cache_size_limit", 4096),
                        ("accumulated_recompile_limit", 4096)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)
    torch.backends.cuda.matmul.allow_tf32 = False
    return {**env_info(), "device": device}


def env_header(env: dict, markdown: bool) -> str:
    keys = ["date", "gpu", "torch", "triton", "cudnn", "cuda", "python", "git_commit", "device"]
    line = ", ".join(f"{k} {env.get(k)}" for k in keys if k in env)
    return f"_{line}_\n\n`{command_line()}`\n" if markdown else f"env: {line}\ncommand: {command_line()}"


def run_bench(p, a, argv: list[str], *, script: str, title: str, cases: list[dict], run_case, meta: dict,
              report) -> int:
    """The kernel benchmarks' main after parsing: worker or driver, run_case(case, a) per case. The driver runs the cases
    (isolated unless --no-isolate), rewrites the JSON after each one, then report(rows, plot) ->
    {"json": extra keys, "text": table, "markdown": table, "plots": [png paths]}; prints the table last."""
    one = lambda case, ready: run_case(case, a)  # noqa: E731
    if a._worker:
        return serve(one, worker_setup)
    start_clock()
    if not a.smoke:
        import torch
        if not torch.cuda.is_available():
            p.error("no CUDA GPU found; run with --smoke for the CPU toy run (Triton interpreter)")
    out = Path(a.out)
    meta = {"script": f"scripts/{Path(script).name}", "command": command_line(),
            "settings": {k: v for k, v in vars(a).items() if not k.startswith("_")}, **meta}
    log(f"{Path(script).stem}: {len(cases)} cases, budget {a.max_minutes:g} min -> {out}")

    def save(results, env):
        rows = [results[str(c["id"])] for c in cases if str(c["id"]) in results]
        write_json(out, {**meta, "env": env, "complete": False, "results": rows})

    worker_log = out.with_suffix(".worker.log")
    worker_log.unlink(missing_ok=True)
    results, env = run_cases(
        cases, one, worker_cmd=None if a.no_isolate else [sys.executable, script, *argv, "--_worker"],
        setup=worker_setup, deadline=T0 + a.max_minutes * 60.0 - 10.0,  # ~10 s kept for tables and plots
        case_timeout=a.case_timeout, log_path=worker_log, on_result=save)
    if worker_log.is_file() and not worker_log.read_text(errors="replace").strip():
        worker_log.unlink()
    rows = [results[str(c["id"])] for c in cases]
    rep = report(rows, not a.no_plot)
    write_json(out, {**meta, "env": env, "complete": True, **rep["json"], "plots": rep["plots"], "results": rows})
    if a.markdown is not None:
        write_text(Path(a.markdown) if a.markdown else out.with_suffix(".md"),
                   f"### {title}\n\n{env_header(env, True)}\n{rep['markdown']}")
    n_ok = sum(r["status"] == "ok" for r in rows)
    flags = sum(not r.get("check_ok", True) for r in rows)
    print(f"\n{env_header(env, False)}\n{rep['text']}")
    print(f"{n_ok}/{len(rows)} cases ok; {flags} correctness flags; elapsed {time.time() - T0:.0f} s; wrote {out}"
          + (f", {len(rep['plots'])} PNG" if rep["plots"] else ""))
    return 0


def failure_notes(rows: list[dict], where) -> list[str]:
    """One line per (method, status, reason) of the rows that did not pass: where(row) names each."""
    notes: dict = {}
    for r in rows:
        if r["status"] != "ok" or not r.get("check_ok", True):
            notes.setdefault((r["method"], r["status"], r.get("reason", "")), []).append(where(r))
    return [f"{m} {','.join(w)}: {st}: {why}" for (m, st, why), w in notes.items()]
