"""Check our Triton attention on a GPU, then sweep its launch configurations.

    python scripts/tune_attention.py --out bench_out/tune.json [--seqlen 8192] [--quick]

1. Correctness: the kernel tests themselves (tests/kernels/test_flash.py and test_block_sparse.py:
   output and gradients against a float64 reference, odd lengths, Nq != Nk, strided fused-qkv
   views, the backward variants) with LONGCTX_TEST_GPU=1, i.e. on this GPU's compiled kernels.
   Exit 1 when a test fails (the sweep still runs; its numbers say nothing about correctness).
2. kernel_lab.py's sweep section: for each kernel (fwd; bwd = the fused backward; dkdv and dq = the
   deterministic pair), head dim and causal flag, each (BLOCK_M, BLOCK_N, num_warps, num_stages)
   candidate timed at one sequence length; the best are printed (kernels/flash.py's launch tables
   are edited by hand from them).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk  # noqa: E402

TESTS = ["tests/kernels/test_flash.py", "tests/kernels/test_block_sparse.py"]


def check() -> dict:
    """Run the kernel tests on this GPU; their pytest summary line and exit status."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    env = {**os.environ, "LONGCTX_TEST_GPU": "1"}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(cmd, cwd=bk.REPO, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    summary = lines[-1] if lines else bk.short(p.stderr, 300)
    bk.log(f"check: {' '.join(['pytest', *TESTS])} with LONGCTX_TEST_GPU=1: {summary}" +
           "".join(f"\n  {ln}" for ln in failed))
    return {"tests": TESTS, "returncode": p.returncode, "summary": summary, "failed": failed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out/tune.json")
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--quick", action="store_true", help="the first 4 candidates per kernel")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the kernel tests (step 1)")
    a = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        sys.exit("tune_attention.py needs a CUDA GPU")
    if not a.no_check and importlib.util.find_spec("pytest") is None:
        sys.exit("error: the check runs the kernel tests with pytest, which is not installed: pip install pytest "
                 "(or pass --no-check)")
    checks = None if a.no_check else check()
    sweep = []
    if not a.no_sweep:
        import kernel_lab
        with tempfile.TemporaryDirectory() as tmp:
            lab = Path(tmp) / "lab.json"
            kernel_lab.main(["--sections", "sweep", "--seqlen", str(a.seqlen), "--dims", a.dims, "--budget-s", "1e9",
                             "--out", str(lab), *(["--quick"] if a.quick else [])])
            sweep = json.loads(lab.read_text())["sweep"]
    bk.write_json(a.out, dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, checks=checks, sweep=sweep))
    return 1 if checks and checks["returncode"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
