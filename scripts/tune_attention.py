"""Check our Triton attention on a GPU, then sweep its launch configurations.

    python scripts/tune_attention.py --out bench_out/tune.json [--seqlen 8192] [--quick]

1. Correctness: the kernel tests (tests/kernels/test_flash.py and test_block_sparse.py: output and
   gradients against a float64 reference, odd lengths, Nq != Nk, strided fused-qkv views, the
   backward variants) with LONGCTX_TEST_GPU=1, i.e. against the compiled kernels on this GPU.
   Exit 1 when a test fails (the sweep still runs: its numbers say nothing about correctness).
2. For each kernel (fwd; bwd = the fused backward; dkdv and dq = the two deterministic backward
   kernels), head dim and causal flag, times a list of (BLOCK_M, BLOCK_N, num_warps, num_stages)
   candidates at one sequence length and prints the best; the table in kernels/flash.py is
   updated by hand from this output (scripts/kernel_lab.py times whole variants beside peers).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk  # noqa: E402

from longctx.kernels import flash as F  # noqa: E402


TESTS = ["tests/kernels/test_flash.py", "tests/kernels/test_block_sparse.py"]


def check() -> dict:
    """Run the kernel tests on this GPU; their pytest summary line and exit status."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    env = {**os.environ, "LONGCTX_TEST_GPU": "1"}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(cmd, cwd=bk.REPO, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    print("\n".join(ln for ln in lines if "FAILED" in ln or "Error" in ln)[-4000:])
    summary = lines[-1] if lines else p.stderr.strip()[-300:]
    print(f"check ({' '.join(cmd[1:])}, LONGCTX_TEST_GPU=1): {summary}", flush=True)
    return {"command": bk.command_line(), "tests": TESTS, "returncode": p.returncode, "summary": summary}


def bench(fn, rep=60):
    return bk.time_fn(fn, "cuda", warmup_ms=15, rep_ms=rep)["ms"]  # median


CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4),
            (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3)],
    "bwd": [(64, 64, 4, 3), (64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3), (32, 128, 8, 3)],
    "dkdv": [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3),
             (128, 128, 8, 2), (64, 128, 4, 2)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3),
           (128, 32, 4, 3), (64, 32, 4, 3)],
}


def sweep(dev, N, dims, quick):
    results = []
    tokens = 16384 * 8
    for D in dims:
        H = 2048 // D
        B = max(1, tokens // N)
        for causal in (True, False):
            flops_fwd = 4 * B * H * N * N * D / (2 if causal else 1)
            q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            do = torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16)
            sm = D ** -0.5
            o, lse = F._flash_fwd(q, k, v, causal, sm, None, "ieee")
            for kind in ("fwd", "bwd", "dkdv", "dq"):
                best = None
                for cfg in CANDIDATES[kind][: 4 if quick else None]:
                    F.clear_launch_config()
                    F.set_launch_config(kind, *cfg)
                    try:
                        if kind == "fwd":
                            ms = bench(lambda: F._flash_fwd(q, k, v, causal, sm, None, "ieee"))
                            tf = flops_fwd / ms * 1e-9
                        else:
                            # time the whole backward; only `kind` varies between candidates
                            det = kind != "bwd"  # dkdv / dq: the deterministic pair; bwd: the fused one
                            ms = bench(lambda: F._flash_bwd(do, q, k, v, o, lse, causal, sm, None, "ieee",
                                                            deterministic=det))
                            tf = 2.5 * flops_fwd / ms * 1e-9
                    except Exception as exc:  # out of resources etc.
                        print(f"  {kind} D={D} causal={causal} {cfg}: failed ({type(exc).__name__}: {str(exc)[:80]})")
                        continue
                    print(f"  {kind} D={D} causal={causal} N={N} {cfg}: {ms:.3f} ms {tf:.0f} TFLOP/s", flush=True)
                    results.append(dict(kind=kind, D=D, causal=causal, N=N, cfg=cfg, ms=ms, tflops=tf))
                    if best is None or ms < best[1]:
                        best = (cfg, ms, tf)
                F.clear_launch_config()
                if best:
                    print(f"BEST {kind} D={D} causal={causal}: {best[0]} {best[1]:.3f} ms {best[2]:.0f} TFLOP/s", flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out/tune.json")
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the kernel tests (step 1)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_attention.py needs a CUDA GPU")
    if not args.no_check and importlib.util.find_spec("pytest") is None:
        sys.exit("error: the check runs the kernel tests with pytest, which is not installed: pip install pytest "
                 "(or pass --no-check)")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t0 = time.time()
    checks = None if args.no_check else check()
    print(f"checks done in {time.time() - t0:.0f}s", flush=True)
    res = [] if args.no_sweep else sweep(dev, args.seqlen, [int(d) for d in args.dims.split(",")], args.quick)
    bk.write_json(args.out, dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, checks=checks, sweep=res))
    sys.exit(1 if checks and checks["returncode"] != 0 else 0)


if __name__ == "__main__":
    main()
