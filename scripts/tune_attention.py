"""Check our Triton attention on a GPU, then sweep its launch configurations.

    python scripts/tune_attention.py --out bench_out/tune.json [--seqlen 8192] [--quick]

1. Correctness on the GPU (bf16 and fp16 against a float32-math reference; fp32 via TF32 and
   IEEE): causal and not, odd lengths, Nq != Nk, strided fused-qkv views, determinism of the
   backward. Fails loudly (exit 1) when an error is out of bounds.
2. For each kernel (fwd; bwd = the fused backward; dkdv and dq = the two deterministic backward
   kernels), head dim and causal flag, times a list of (BLOCK_M, BLOCK_N, num_warps, num_stages)
   candidates at one sequence length and prints the best; the table in kernels/flash.py is
   updated by hand from this output (scripts/kernel_lab.py times whole variants beside peers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from longctx.kernels import flash_attention, reference_attention  # noqa: E402
from longctx.kernels import flash as F  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(dev):
    rows, bad = [], 0
    cases = [  # B, Nq, Nk, H, D, causal, dtype, tol
        (2, 1, 1, 3, 64, False, torch.bfloat16, 2e-2), (2, 257, 257, 3, 64, True, torch.bfloat16, 2e-2),
        (2, 1000, 1000, 4, 128, True, torch.bfloat16, 2e-2), (1, 333, 777, 2, 80, True, torch.float16, 5e-3),
        (1, 777, 333, 2, 96, True, torch.float16, 5e-3), (2, 512, 512, 2, 256, False, torch.bfloat16, 2e-2),
        (1, 300, 300, 2, 40, True, torch.float32, 5e-3), (2, 4096, 4096, 4, 64, True, torch.bfloat16, 2e-2),
    ]
    for B, Nq, Nk, H, D, causal, dtype, tol in cases:
        q = torch.randn(B, Nq, H, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(B, Nk, H, D, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(B, Nk, H, D, device=dev, dtype=dtype, requires_grad=True)
        o = flash_attention(q, k, v, causal=causal)
        do = torch.randn_like(o)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
        q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
        r = reference_attention(q2, k2, v2, causal=causal)
        rq, rk, rv = torch.autograd.grad(r, (q2, k2, v2), do.float())
        errs = [rel(o, r), rel(dq, rq), rel(dk, rk), rel(dv, rv)]
        ok = all(e < tol for e in errs) and all(torch.isfinite(t).all() for t in (o, dq, dk, dv))
        bad += not ok
        rows.append(dict(case=[B, Nq, Nk, H, D, causal, str(dtype)], errs=errs, ok=ok))
        print(f"check B={B} Nq={Nq} Nk={Nk} H={H} D={D} causal={causal} {dtype}: "
              f"out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e} {'ok' if ok else 'FAIL'}")
    # strided views of a fused projection + determinism
    qkv = torch.randn(2, 2048, 3, 8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.unbind(2)
    o = flash_attention(q, k, v, causal=True, deterministic=True)
    do = torch.randn_like(o)
    g1 = torch.autograd.grad(o, qkv, do)[0]
    g2 = torch.autograd.grad(flash_attention(q, k, v, causal=True, deterministic=True), qkv, do)[0]
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    r = reference_attention(q2, k2, v2, causal=True)
    e = rel(o, r)
    det = torch.equal(g1, g2)
    print(f"check strided fused qkv: out {e:.1e}; backward deterministic: {det}")
    bad += (e > 2e-2) or not det
    return rows, bad


def bench(fn, rep=60):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=15, rep=rep, return_mode="median")


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out/tune.json")
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_attention.py needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t0 = time.time()
    rows, bad = check(dev)
    print(f"checks done in {time.time() - t0:.0f}s, failures: {bad}", flush=True)
    res = [] if args.no_sweep else sweep(dev, args.seqlen, [int(d) for d in args.dims.split(",")], args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                              checks=rows, sweep=res), indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
