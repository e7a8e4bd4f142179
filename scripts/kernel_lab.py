"""One GPU call's worth of kernel work: check our attention, then time its variants beside peers.

    python scripts/kernel_lab.py --out $OUT/lab.json [--budget-s 240] [--sections check,dense,sparse]
    python scripts/kernel_lab.py --smoke --out /tmp/lab.json          # CPU interpreter, toy sizes

1. check: on the GPU, out / dq / dk / dv against a float32 reference_attention (bf16, fp16, fp32;
   causal and not; odd lengths; Nq != Nk; a strided fused-qkv view; block-sparse), for the fused
   (atomic dQ) and the deterministic backward and with TMA descriptors on and off; outputs poisoned
   with NaN first; the deterministic backward bitwise reproducible; the fused one's run-to-run
   spread reported. Exit code 1 if a check fails.
2. dense: per (D, causal, N) with B*N = 131072 tokens and H = 16, bf16: forward variants
   (launch config, TMA) and backward variants (deterministic vs fused, launch configs, TMA),
   timed alone; then forward and forward+backward through the public API for the old default
   (deterministic backward, no TMA) and the best new variant, beside cuDNN (sdpa
   CUDNN_ATTENTION), FlashAttention-2 (sdpa FLASH_ATTENTION) and FlexAttention (compiled).
3. sparse: causal local-window and BigBird layouts (128x128 blocks) at target causal densities,
   N = 16384: our block-sparse kernel (old / new backward, launch configs) vs our dense kernel
   and FlexAttention with the same block mask.
Timing: CUDA events around each call, warm-up first, median of repeated calls (inputs are several
times the L2 size, 268 MB per tensor). FLOPs: 4*B*H*N^2*D forward (halved when causal),
backward 2.5x, forward+backward 3.5x. Kernels are compiled up front in a pool of processes (the
Triton and Inductor caches are on disk, so the timed process finds them compiled).
The short tables are printed last; everything goes to the JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

T0 = time.time()
TOKENS = 131072
PROFILE = False  # --profile


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- variants
# A variant: deterministic backward or not, TMA on/off, and launch-config overrides per kernel kind.
def V(name, det=False, tma=False, opts=None, **cfg):
    return {"name": name, "det": det, "tma": tma, "cfg": cfg, "opts": dict(opts or {})}



FWD_VARIANTS = {  # per head dim: the table's config first
    64: [V("fwd_tab"), V("fwd_64x64w4s3", fwd=(64, 64, 4, 3)), V("fwd_128x64w8s3", fwd=(128, 64, 8, 3))],
    128: [V("fwd_tab"), V("fwd_64x64w4s3", fwd=(64, 64, 4, 3)), V("fwd_128x64w8s3", fwd=(128, 64, 8, 3))],
}
BWD_VARIANTS = {
    64: [V("bwd_det", det=True), V("bwd_fused", det=False)],
    128: [V("bwd_det", det=True), V("bwd_fused", det=False),
          V("bwd_det_dkdv32x128w8s3", det=True, dkdv=(32, 128, 8, 3)),
          V("bwd_det_dkdv64x128w8s2", det=True, dkdv=(64, 128, 8, 2))],
}
PROFILE_VARIANTS = [  # --profile: the fused backward without its dQ product, and with plain (racy) stores
    {**V("prof_no_dq"), "dq_mode": 0}, {**V("prof_dq_store"), "dq_mode": 2}]
SPARSE_VARIANTS = [V("sp_det", det=True), V("sp_default", det=None, tma=None)]
DENSE_CASES = [(64, True, 1024), (64, True, 2048), (64, True, 4096), (64, True, 16384), (64, True, 65536),
               (128, True, 2048), (128, True, 4096), (128, True, 16384), (128, False, 4096), (128, False, 16384)]
SPARSE_CASES = [(layout, t) for layout in ("local", "bigbird") for t in ("1/8", "1/16", "1/32")]
SPARSE_N = 16384


def apply_variant(v):
    from kernels import flash as F
    F._PROFILE_DQ_MODE = v.get("dq_mode", 1)
    F._OPTIONS["bwd_fused"] = None
    F._OPTIONS.update(v.get("opts", {}))
    F.clear_launch_config()
    for kind, cfg in v["cfg"].items():
        F.set_launch_config(kind, *cfg)
    F.set_kernel_options(fwd_tma=v.get("fwd_tma", v["tma"]), bwd_tma=v.get("bwd_tma", v["tma"]))


def flops_fwd(b, h, n, d, causal):
    return 4.0 * b * h * n * n * d / (2.0 if causal else 1.0)


# ------------------------------------------------------------------------------- inputs
def make_inputs(b, n, h, d, dtype, device, seed=0):
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn((b, n, h, d), device=device, dtype=dtype, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    return q, k, v, do


def sparse_mask(layout, target, n, block=128):
    from bench_block_sparse import build_layout
    return build_layout(layout, n, float(Fraction(target)), block)[0]


# ------------------------------------------------------------------------------- timing
def timeit(fn, device, rep_ms=250.0):
    if device == "cpu":  # the interpreter: a couple of calls show that the code runs, nothing more
        return bl.time_fn(fn, device, warmup_ms=0.0, rep_ms=0.0, min_reps=2, max_reps=2)["ms"]
    r = bl.time_fn(fn, device, warmup_ms=30.0, rep_ms=rep_ms, min_reps=3, max_reps=100)
    return r["ms"]


def ours_fwd(v, q, k, vv, causal, mask=None):
    from kernels import flash_attention
    return lambda: flash_attention(q, k, vv, causal=causal, block_mask=mask, deterministic=v["det"])


def ours_bwd_only(v, q, k, vv, do, causal, mask=None):
    """The backward kernels alone on one saved forward (the public path minus autograd's overhead)."""
    from kernels import flash as F
    sm = q.shape[-1] ** -0.5
    o, lse = F._flash_fwd(q.detach(), k.detach(), vv.detach(), causal, sm, mask, "ieee")
    return lambda: F._flash_bwd(do, q.detach(), k.detach(), vv.detach(), o, lse, causal, sm, mask, "ieee",
                                deterministic=v["det"])


def fwd_bwd(fwd, q, k, vv, do):
    import torch
    return lambda: torch.autograd.grad(fwd(), (q, k, vv), do)


def peer_fwd(method, q, k, vv, causal, mask=None):
    if mask is not None:  # flex with our block mask
        import bench_block_sparse as bbs
        fbm = bbs.to_flex_block_mask(mask, q.device)
        fn = bbs._flex_fn()
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, vv))
        return lambda: fn(qt, kt, vt, block_mask=fbm).transpose(1, 2)
    import bench_attention as ba
    return ba.make_forward(method, q, k, vv, causal)


# ------------------------------------------------------------------------- warm-up pool
def warm_job(job):
    """Run one configuration once (compiles it into the on-disk caches); returns (job, seconds, error)."""
    import torch
    t = time.time()
    try:
        dev = "cuda"
        if job["kind"] == "check":
            q, k, vv, do, mask = check_inputs(job["case"], dev, False)
            run_check(job["case"], job["variant"], q, k, vv, do, mask)
        elif job["kind"] == "strided":
            qkv, do = strided_qkv(dev, False)
            run_strided(job["variant"], qkv, do)
        elif job["kind"] == "peer":
            b, n, h, d, causal = job["shape"]
            q, k, vv, do = make_inputs(b, n, h, d, torch.bfloat16, dev)
            mask = sparse_mask(*job["sparse"], n) if job.get("sparse") else None
            f = peer_fwd(job["method"], q, k, vv, causal, mask)
            torch.autograd.grad(f(), (q, k, vv), do)
        else:
            b, n, h, d, causal = job["shape"]
            q, k, vv, do = make_inputs(1, n, h, d, torch.bfloat16, dev)
            mask = sparse_mask(*job["sparse"], n) if job.get("sparse") else None
            apply_variant(job["variant"])
            ours_fwd(job["variant"], q, k, vv, causal, mask)()
            if job["kind"] == "bwd":
                ours_bwd_only(job["variant"], q, k, vv, do, causal, mask)()
        torch.cuda.synchronize()
        return job, time.time() - t, None
    except Exception as exc:  # reported, the timed run will meet it again
        return job, time.time() - t, bl.short(f"{type(exc).__name__}: {exc}", 200)


def warm_up(jobs, workers, timeout_s):
    import concurrent.futures as cf
    import multiprocessing as mp
    if not jobs:
        return []
    log(f"warm-up: {len(jobs)} compile jobs on {workers} processes (timeout {timeout_s:.0f} s)")
    errors = []
    ex = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    futs = [ex.submit(warm_job, j) for j in jobs]
    done, pending = cf.wait(futs, timeout=timeout_s)
    for f in done:
        job, _, err = f.result()
        if err:
            errors.append({"job": job["label"], "error": err})
            log(f"  warm-up {job['label']}: {err}")
    log(f"warm-up: {len(done)} done, {len(pending)} still compiling (left to the timed process)")
    ex.shutdown(wait=False, cancel_futures=True)
    return errors


# ------------------------------------------------------------------------------ checks
CHECK_VARIANTS = [V("default", det=None, tma=None), V("det", det=True), V("fused", det=False),
                  V("fused_tma", det=False, tma=True)]


def check_cases(smoke):
    import torch
    if smoke:
        return [(1, 33, 70, 1, 16, True, torch.float32, False), (1, 70, 70, 1, 16, True, torch.float32, True)]
    return [(2, 1000, 1000, 4, 64, True, torch.bfloat16, False), (1, 333, 777, 2, 128, True, torch.float16, False),
            (1, 777, 333, 2, 80, True, torch.float16, False), (2, 300, 300, 2, 40, False, torch.float32, False),
            (2, 512, 512, 2, 256, False, torch.bfloat16, False), (1, 2048, 2048, 4, 64, True, torch.bfloat16, True)]


def check_inputs(case, device, smoke):
    import torch

    import kernels
    B, Nq, Nk, H, D, causal, dtype, sparse = case
    mask = None
    if sparse:
        blk = 32 if smoke else 128
        mask = kernels.bigbird_mask(Nq, window_blocks=1, global_blocks=1, random_blocks=1, seed=5,
                                    block_m=blk, block_n=blk, causal=causal)
    g = torch.Generator(device=device).manual_seed(Nq * 7 + D)
    q = torch.randn(B, Nq, H, D, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(B, Nk, H, D, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, Nk, H, D, device=device, dtype=dtype, generator=g).requires_grad_()
    do = torch.randn(B, Nq, H, D, device=device, dtype=dtype, generator=g)
    return q, k, v, do, mask


def run_check(case, var, q, k, v, do, mask):
    import torch

    from kernels import flash_attention
    apply_variant(var)
    out = flash_attention(q, k, v, causal=case[5], block_mask=mask, deterministic=var["det"])
    return (out,) + torch.autograd.grad(out, (q, k, v), do)


def strided_qkv(device, smoke):
    import torch
    n, heads, d = (40, 1, 16) if smoke else (2048, 4, 64)
    g = torch.Generator(device=device).manual_seed(1)
    qkv = torch.randn(2, n, 3, heads, d, device=device, dtype=torch.float32 if smoke else torch.bfloat16,
                      generator=g).requires_grad_()
    do = torch.randn(2, n, heads, d, device=device, dtype=qkv.dtype, generator=g)
    return qkv, do


def run_strided(var, qkv, do):
    import torch

    from kernels import flash_attention
    apply_variant(var)
    q, k, v = qkv.unbind(2)
    return torch.autograd.grad(flash_attention(q, k, v, causal=True, deterministic=var["det"]), qkv, do)[0]


def check_section(device, smoke):
    import torch

    from kernels import flash as F
    from kernels import reference_attention
    rows, bad = [], 0
    real_like, real_empty = F._empty_like, F._empty
    F._empty_like = lambda t: torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device)
    F._empty = lambda shape, dev: torch.full(shape, float("nan"), dtype=torch.float32, device=dev)
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 5e-3}
    try:
        for case in check_cases(smoke):
            B, Nq, Nk, H, D, causal, dtype, sp = case
            q, k, v, do, mask = check_inputs(case, device, smoke)
            ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
            ref = reference_attention(*ref_in, causal=causal, block_mask=mask)
            ref_g = torch.autograd.grad(ref, ref_in, do.float())
            for var in CHECK_VARIANTS:
                got = run_check(case, var, q, k, v, do, mask)
                errs = [bl.rel_err(a, r) for a, r in zip(got, (ref,) + ref_g)]
                finite = all(bool(torch.isfinite(t).all()) for t in got)
                ok = finite and max(errs) < tol[dtype]
                bad += not ok
                rows.append({"case": [B, Nq, Nk, H, D, causal, str(dtype), sp], "variant": var["name"],
                             "errs": errs, "finite": finite, "ok": ok})
                log(f"check {var['name']:<10} B={B} Nq={Nq} Nk={Nk} H={H} D={D} causal={causal} {str(dtype)[6:]}"
                    f"{' sparse' if sp else ''}: out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} "
                    f"dv {errs[3]:.1e} {'ok' if ok else 'FAIL'}")
        # strided fused-qkv view (no copies): deterministic backward bitwise; the fused one's spread
        qkv, do = strided_qkv(device, smoke)
        res = {var["name"]: [run_strided(var, qkv, do) for _ in range(2)] for var in CHECK_VARIANTS}
        det_bitwise = torch.equal(*res["det"])
        spread = bl.rel_err(res["fused"][0], res["fused"][1])
        vs_det = max(bl.rel_err(res[n_][0], res["det"][0]) for n_ in ("default", "fused", "fused_tma"))
        ok = det_bitwise and vs_det < 1e-2
        bad += not ok
        rows.append({"case": "strided qkv", "det_bitwise": det_bitwise, "fused_run_to_run": spread,
                     "fused_vs_det": vs_det, "ok": ok})
        log(f"check strided fused qkv: deterministic bitwise {det_bitwise}; fused run-to-run {spread:.1e}; "
            f"fused vs deterministic {vs_det:.1e} {'ok' if ok else 'FAIL'}")
    finally:
        F._empty_like, F._empty = real_like, real_empty
        apply_variant(V("default", tma=None))
    return rows, bad


# ------------------------------------------------------------------------------ inspect
def inspect_kernels():
    """Registers, spills, shared memory and key PTX instructions of the last launched kernels."""
    from kernels import flash as F
    out = {}
    for kind, h in (F._RECORD or {}).items():
        info = {}
        for attr in ("n_regs", "n_spills"):
            info[attr] = getattr(h, attr, None)
        md = getattr(h, "metadata", None)
        info["shared"] = getattr(md, "shared", None) if md is not None else None
        ptx = (getattr(h, "asm", None) or {}).get("ptx", "")
        if ptx:
            import re
            for key, pat in (("red_atom", r"\b(?:red|atom)\.[\w.]*"), ("tma", r"cp\.async\.bulk\.tensor[\w.]*"),
                             ("wgmma", r"wgmma\.mma_async[\w.]*"), ("cp_async", r"cp\.async\.(?:ca|cg)[\w.]*")):
                found = re.findall(pat, ptx)
                info[key] = {k: found.count(k) for k in sorted(set(found))}
        out[kind] = info
    return out


# ------------------------------------------------------------------------------- dense
def dense_section(device, smoke, deadline, results):
    import torch

    from kernels import flash as F
    cases = [(16, True, 64)] if smoke else DENSE_CASES
    H = 1 if smoke else 16
    tokens = 64 if smoke else TOKENS
    peers = [] if smoke else ["sdpa_cudnn", "sdpa_flash", "flex"]
    for D, causal, N in cases:
        if time.time() > deadline:
            log(f"dense D={D} causal={causal} N={N}: skipped (time budget)")
            continue
        B = max(1, tokens // N)
        ff = flops_fwd(B, H, N, D, causal)
        row = {"D": D, "causal": causal, "N": N, "B": B, "H": H, "fwd": {}, "bwd": {}, "fb": {}, "inspect": {}}
        results.append(row)
        q, k, vv, do = make_inputs(B, N, H, D, torch.bfloat16 if not smoke else torch.float32, device)
        F._RECORD = {}
        fv = FWD_VARIANTS.get(D, FWD_VARIANTS[64])[: 2 if smoke else None]
        ref_out, ref_grads = None, None
        for var in fv:
            if time.time() > deadline:
                break
            apply_variant(var)
            F._RECORD = {}
            try:
                f = ours_fwd(var, q, k, vv, causal)
                ms = timeit(f, device)
                row["fwd"][var["name"]] = {"ms": ms, "tflops": ff / ms * 1e-9}
                row["inspect"][var["name"]] = inspect_kernels()
                with torch.no_grad():  # same function as the first (table) variant?
                    out = f()
                    ref_out = out if ref_out is None else ref_out
                    row["fwd"][var["name"]]["err_vs_first"] = bl.rel_err(out, ref_out)
            except Exception as exc:
                row["fwd"][var["name"]] = {"error": bl.short(str(exc))}
            log(f"D={D} c={int(causal)} N={N} {var['name']:<18} {row['fwd'][var['name']]}")
        bv = BWD_VARIANTS.get(D, BWD_VARIANTS[64]) + (PROFILE_VARIANTS if PROFILE else [])
        for var in bv:
            if time.time() > deadline:
                break
            apply_variant(var)
            F._RECORD = {}
            try:
                f = ours_bwd_only(var, q, k, vv, do, causal)
                ms = timeit(f, device)
                row["bwd"][var["name"]] = {"ms": ms, "tflops": 2.5 * ff / ms * 1e-9}
                row["inspect"][var["name"]] = inspect_kernels()
                grads = f()
                ref_grads = grads if ref_grads is None else ref_grads
                row["bwd"][var["name"]]["err_vs_first"] = max(bl.rel_err(a, b_) for a, b_ in zip(grads, ref_grads))
            except Exception as exc:
                row["bwd"][var["name"]] = {"error": bl.short(str(exc))}
            log(f"D={D} c={int(causal)} N={N} {var['name']:<18} {row['bwd'][var['name']]}")
        # the best new forward and backward, through the public API, and the old default
        def good(r):
            return "ms" in r and (r.get("err_vs_first") or 0) <= 2e-2
        best_f = min((n_ for n_, r in row["fwd"].items() if good(r)), key=lambda n_: row["fwd"][n_]["ms"],
                     default="fwd_tab")
        best_b = min((n_ for n_, r in row["bwd"].items() if good(r) and n_.startswith("bwd_")),
                     key=lambda n_: row["bwd"][n_]["ms"], default="bwd_tab")
        fvar = next(x for x in fv if x["name"] == best_f)
        bvar = next(x for x in bv if x["name"] == best_b)
        new = V(f"new({best_f}+{best_b})", det=bvar["det"], opts={**fvar["opts"], **bvar["opts"]},
                **{**fvar["cfg"], **bvar["cfg"]})
        new["fwd_tma"], new["bwd_tma"] = fvar["tma"], bvar["tma"]
        row["new_variant"] = new
        methods = [("ours_old", V("old", det=True)), ("ours_default", V("default", det=None, tma=None)),
                   ("ours_new", new)] + [(p, None) for p in peers]
        for name, var in methods:
            if time.time() > deadline:
                break
            try:
                if var is not None:
                    apply_variant(var)
                    f = ours_fwd(var, q, k, vv, causal)
                else:
                    f = peer_fwd(name, q, k, vv, causal)
                fms = timeit(f, device)
                fbms = timeit(fwd_bwd(f, q, k, vv, do), device)
                mem = bl.peak_extra_bytes(fwd_bwd(f, q, k, vv, do), device) if N == 16384 and D == 64 else None
                row["fb"][name] = {"fwd_ms": fms, "fb_ms": fbms, "fwd_tflops": ff / fms * 1e-9,
                                   "fb_tflops": 3.5 * ff / fbms * 1e-9, "mem": mem}
            except Exception as exc:
                row["fb"][name] = {"error": bl.short(f"{type(exc).__name__}: {exc}")}
            log(f"D={D} c={int(causal)} N={N} {name:<10} {row['fb'][name]}")
        apply_variant(V("default"))
        del q, k, vv, do
        bl.free_memory()


# ----------------------------------------------------------------------------- latency
LAT_SHAPE = (1, 256, 4, 64, True)


def latency_section(device, smoke, res, res_shape):
    """Per-call time of a tiny problem: what the host-side work of a call costs (launches, checks)."""
    import torch
    b, n, h, d, causal = (1, 32, 1, 16, True) if smoke else LAT_SHAPE
    res_shape[:] = [b, n, h, d, causal]
    q, k, vv, do = make_inputs(b, n, h, d, torch.float32 if smoke else torch.bfloat16, device)
    apply_variant(V("default", det=None, tma=None))
    methods = [("ours_default", None)] + ([] if smoke else [("sdpa_cudnn", None), ("sdpa_flash", None)])
    for name, _ in methods:
        try:
            f = ours_fwd(V("default", det=None), q, k, vv, causal) if name == "ours_default" else \
                peer_fwd(name, q, k, vv, causal)
            res[name] = {"fwd_ms": timeit(f, device, rep_ms=100), "fb_ms": timeit(fwd_bwd(f, q, k, vv, do), device,
                                                                                   rep_ms=100)}
        except Exception as exc:
            res[name] = {"error": bl.short(f"{type(exc).__name__}: {exc}")}
    log(f"latency B={b} N={n} H={h} D={d}: {res}")


# ------------------------------------------------------------------------------ sparse
def sparse_section(device, smoke, deadline, results, dense_rows):
    import torch
    n = 128 if smoke else SPARSE_N
    H, D = (1, 16) if smoke else (16, 64)
    B = max(1, (128 if smoke else TOKENS) // n)
    ff = flops_fwd(B, H, n, D, True)
    q, k, vv, do = make_inputs(B, n, H, D, torch.float32 if smoke else torch.bfloat16, device)
    dense = next((r["fb"].get("ours_new", {}).get("fb_ms") for r in dense_rows
                  if r["D"] == D and r["causal"] and r["N"] == n), None)
    if dense is None:
        apply_variant(V("default"))
        dense = timeit(fwd_bwd(ours_fwd(V("d"), q, k, vv, True), q, k, vv, do), device)
    for layout, target in (SPARSE_CASES if not smoke else [("local", "1/2")]):
        if time.time() > deadline:
            log(f"sparse {layout} {target}: skipped (time budget)")
            continue
        mask = sparse_mask(layout, target, n, 32 if smoke else 128)
        row = {"layout": layout, "target": target, "density": mask.causal_density, "N": n, "B": B,
               "dense_fb_ms": dense, "ms": {}}
        results.append(row)
        for var in SPARSE_VARIANTS:
            apply_variant(var)
            try:
                f = ours_fwd(var, q, k, vv, True, mask)
                row["ms"][var["name"]] = {"fwd": timeit(f, device), "fb": timeit(fwd_bwd(f, q, k, vv, do), device)}
            except Exception as exc:
                row["ms"][var["name"]] = {"error": bl.short(f"{type(exc).__name__}: {exc}")}
        apply_variant(V("default"))
        if not smoke:
            try:
                f = peer_fwd("flex", q, k, vv, True, mask)
                row["ms"]["flex"] = {"fwd": timeit(f, device), "fb": timeit(fwd_bwd(f, q, k, vv, do), device)}
            except Exception as exc:
                row["ms"]["flex"] = {"error": bl.short(f"{type(exc).__name__}: {exc}")}
        log(f"sparse {layout} {target} density {row['density']:.4f}: {row['ms']}")
    del ff


# ------------------------------------------------------------------------------ tables
def tables(res):
    out = []
    d = res.get("dense", [])
    if d:
        meths = ["ours_old", "ours_default", "ours_new", "sdpa_cudnn", "sdpa_flash", "flex"]
        short = {"ours_old": "det", "ours_default": "dflt", "ours_new": "new", "sdpa_cudnn": "cudnn",
                 "sdpa_flash": "fa2", "flex": "flex"}
        hdr = (["case"] + [f"F {short[m]}" for m in meths] + [f"FB {short[m]}" for m in meths] +
               ["new/cud FB", "new/cud F", "new/flex FB", "dflt/cud FB", "new"])
        rows = []
        for r in d:
            fb = r["fb"]

            def g(m, key, fb=fb):
                return fb.get(m, {}).get(key)

            def ratio(a_, b_, key):
                x, y = g(a_, key), g(b_, key)
                return bl.fmt(x / y if x and y else None, ".2f")
            rows.append([f"D{r['D']} {'c' if r['causal'] else 'nc'} {r['N']}"] +
                        [bl.fmt(g(m, "fwd_tflops")) for m in meths] + [bl.fmt(g(m, "fb_tflops")) for m in meths] +
                        [ratio("ours_new", "sdpa_cudnn", "fb_tflops"), ratio("ours_new", "sdpa_cudnn", "fwd_tflops"),
                         ratio("ours_new", "flex", "fb_tflops"), ratio("ours_default", "sdpa_cudnn", "fb_tflops"),
                         r.get("new_variant", {}).get("name", "-")[4:-1]])
        out.append(f"dense, TFLOP/s, F = forward, FB = forward+backward (B*N = {d[0]['B'] * d[0]['N']}, "
                   f"H = {d[0]['H']})\n" +
                   bl.text_table(hdr, rows))
        hdr2 = ["case"] + sorted({n_ for r in d for n_ in list(r["fwd"]) + list(r["bwd"])})
        rows2 = []
        for r in d:
            allv = {**r["fwd"], **r["bwd"]}
            def cell(x):
                bad_ = (x.get("err_vs_first") or 0) > 2e-2
                return bl.fmt(x.get("tflops")) + ("(!)" if bad_ else "")
            rows2.append([f"D{r['D']} {'c' if r['causal'] else 'nc'} {r['N']}"] +
                         [cell(allv.get(n_, {})) for n_ in hdr2[1:]])
        out.append("variants alone, TFLOP/s (fwd_*: forward; bwd_*: backward only)\n" + bl.text_table(hdr2, rows2))
    lat = res.get("latency", {})
    if lat:
        b_, n_, h_, d_, _ = res.get("latency_shape", LAT_SHAPE)
        out.append(f"latency (B={b_}, N={n_}, H={h_}, D={d_}, causal), ms per call: " + "; ".join(
            f"{k_} fwd {bl.fmt(v_.get('fwd_ms'), '.3f')} fwd+bwd {bl.fmt(v_.get('fb_ms'), '.3f')}"
            for k_, v_ in lat.items()))
    s = res.get("sparse", [])
    if s:
        names = [v["name"] for v in SPARSE_VARIANTS] + ["flex"]
        hdr = ["layout", "target", "density", "dense f+b ms"] + [f"{n_} f+b ms" for n_ in names] + \
              ["best vs dense (0.7/dens)", "best vs flex (1.3)"]
        rows = []
        for r in s:
            ms = {n_: r["ms"].get(n_, {}).get("fb") for n_ in names}
            ours = {n_: m for n_, m in ms.items() if m and n_ != "flex"}
            best = min(ours.values()) if ours else None
            sp = r["dense_fb_ms"] / best if best and r["dense_fb_ms"] else None
            vf = ms["flex"] / best if best and ms["flex"] else None
            rows.append([r["layout"], r["target"], f"{r['density']:.4f}", bl.fmt(r["dense_fb_ms"], ".3g")] +
                        [bl.fmt(ms[n_], ".3g") for n_ in names] +
                        [bl.fmt(sp, ".1f") + f"x ({0.7 / r['density']:.1f}x)" if sp else "-",
                         bl.fmt(vf, ".2f") + "x" if vf else "-"])
        out.append(f"block-sparse, causal, N={s[0]['N']}, B={s[0]['B']}, fwd+bwd ms\n" + bl.text_table(hdr, rows))
    return "\n\n".join(out)


# -------------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/lab.json")
    p.add_argument("--budget-s", type=float, default=240.0, help="stop starting new timings after this")
    p.add_argument("--sections", default="check,dense,sparse")
    p.add_argument("--workers", type=int, default=14, help="compile processes (0: compile in-process)")
    p.add_argument("--warm-timeout", type=float, default=110.0)
    p.add_argument("--dense-until-s", type=float, default=1e9, help="no new dense case after this")
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, toy sizes, no peers")
    p.add_argument("--inspect", action="store_true", help="print registers/spills/PTX counts per variant")
    p.add_argument("--profile", action="store_true", help="also time the fused backward without dQ / with plain stores")
    a = p.parse_args(argv)
    global PROFILE
    PROFILE = a.profile
    sections = [s for s in a.sections.split(",") if s]
    bad_sec = [s for s in sections if s not in ("check", "dense", "sparse")]
    if bad_sec:
        p.error(f"--sections: unknown {bad_sec}; choose from check, dense, sparse")
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not a.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --smoke for the CPU interpreter)")
    device = "cpu" if a.smoke else "cuda"
    global T0
    T0 = time.time()  # budgets count from this call, not from the import (a test imports it early)
    deadline = T0 + a.budget_s
    res = {"env": bl.env_info(), "command": bl.command_line(), "sections": sections}
    log(f"kernel_lab: {res['env'].get('gpu')} torch {res['env'].get('torch')} triton {res['env'].get('triton')}")
    out = Path(a.out)
    if not a.smoke and a.workers > 0:
        jobs = []
        if "check" in sections:
            for case in check_cases(False):
                for var in CHECK_VARIANTS:
                    jobs.append({"kind": "check", "case": case, "variant": var, "label": f"check {case[:6]}"})
            for var in CHECK_VARIANTS:
                jobs.append({"kind": "strided", "variant": var, "label": f"strided {var['name']}"})
        if "dense" in sections:
            for D, causal, N in DENSE_CASES:
                B = TOKENS // N
                for m in ("flex",):
                    jobs.append({"kind": "peer", "method": m, "shape": (B, N, 16, D, causal),
                                 "label": f"{m} D{D} c{int(causal)} {N}"})
        if "sparse" in sections:
            jobs.append({"kind": "peer", "method": "flex", "shape": (TOKENS // SPARSE_N, SPARSE_N, 16, 64, True),
                         "sparse": SPARSE_CASES[0], "label": "flex sparse"})
        if "dense" in sections:
            seen = set()
            for D, causal, N in DENSE_CASES:  # one N per (D, causal): the same specialisation
                if (D, causal) in seen:
                    continue
                seen.add((D, causal))
                for var in FWD_VARIANTS[D]:
                    jobs.append({"kind": "fwd", "variant": var, "shape": (1, N, 16, D, causal),
                                 "label": f"{var['name']} D{D} c{int(causal)}"})
                for var in BWD_VARIANTS[D] + (PROFILE_VARIANTS if a.profile else []):
                    jobs.append({"kind": "bwd", "variant": var, "shape": (1, N, 16, D, causal),
                                 "label": f"{var['name']} D{D} c{int(causal)}"})
        if "dense" in sections:
            jobs.append({"kind": "bwd", "variant": V("default", det=None, tma=None), "shape": LAT_SHAPE,
                         "label": "latency"})
        if "sparse" in sections:
            for var in SPARSE_VARIANTS:
                jobs.append({"kind": "bwd", "variant": var, "shape": (1, SPARSE_N, 16, 64, True),
                             "sparse": SPARSE_CASES[0], "label": f"{var['name']} sparse"})
        res["warm_errors"] = warm_up(jobs, a.workers, a.warm_timeout)
    bad = 0

    def save():
        bl.write_json(out, bl.clean_floats(res))

    if "check" in sections:
        res["check"], bad = check_section(device, a.smoke)
        save()
    res["dense"] = []
    if "dense" in sections:
        dense_section(device, a.smoke, min(deadline, T0 + a.dense_until_s), res["dense"])
        save()
    res["latency"] = {}
    if "dense" in sections:
        res["latency_shape"] = []
        latency_section(device, a.smoke, res["latency"], res["latency_shape"])
    res["sparse"] = []
    if "sparse" in sections:
        sparse_section(device, a.smoke, deadline, res["sparse"], res["dense"])
    res["elapsed_s"] = time.time() - T0
    save()
    print()
    shown = set() if a.inspect else {(r["D"], r["causal"]) for r in res["dense"]}
    for r in res["dense"]:
        if (r["D"], r["causal"]) in shown:
            continue
        shown.add((r["D"], r["causal"]))
        for name, ins in r.get("inspect", {}).items():
            parts = []
            for kind, i in ins.items():
                if i.get("n_regs") is None or (name.startswith("bwd") and kind == "fwd"):
                    continue
                extra = " ".join(f"{k_}={sum(v_.values())}" for k_, v_ in i.items() if isinstance(v_, dict) and v_)
                red = ",".join(i.get("red_atom", {}))
                parts.append(f"{kind} regs {i['n_regs']} spills {i['n_spills']} smem {i['shared']} {extra} {red}")
            if parts:
                print(f"inspect D{r['D']} c{int(r['causal'])} {name}: " + "; ".join(parts))
    print()
    print(tables(res))
    print(f"\nchecks failed: {bad}; elapsed {res['elapsed_s']:.0f} s; wrote {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
