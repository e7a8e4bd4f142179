"""One GPU call's worth of kernel work: check our attention, time its variants beside peers, sweep
its launch configurations.

    python scripts/kernel_lab.py --out $OUT/lab.json [--budget-s 240] [--sections check,dense,sparse]
    python scripts/kernel_lab.py --sections check,sweep --seqlen 8192 --out $OUT/tune.json   # tune_attention.py
    python scripts/kernel_lab.py --smoke --out /tmp/lab.json          # CPU interpreter, toy sizes

check: on the GPU, out / dq / dk / dv against the float64 reference_attention (bench_attention's
   check_errors, the kernel tests' oracle) in bf16, fp16, fp32; causal and not; N = 1, odd lengths,
   Nq != Nk, block-sparse; for the fused (atomic dQ) and the deterministic backward and with TMA
   descriptors on and off; outputs poisoned with NaN first; on a strided fused-qkv view the
   deterministic backward bitwise reproducible and the fused one's run-to-run spread reported.
   Exit code 1 if a check fails. (The whole test suite on a GPU: LONGCTX_TEST_GPU=1 pytest tests/kernels.)
dense: per (D, causal, N) with B*N = 131072 tokens and H = 16, bf16: forward variants (launch
   config, TMA) and backward variants (deterministic vs fused, launch configs), timed alone; then
   forward and forward+backward through the public API for the old default (deterministic backward,
   no TMA), today's default and the best new variant, beside cuDNN (sdpa CUDNN_ATTENTION),
   FlashAttention-2 (sdpa FLASH_ATTENTION) and FlexAttention (compiled); and a tiny problem's latency.
sparse: causal local-window and BigBird layouts (128x128 blocks) at target causal densities,
   N = 16384: our block-sparse kernel (old / new backward) vs our dense kernel and FlexAttention with
   the same block mask.
sweep: per kernel (fwd; bwd = the fused backward; dkdv and dq = the deterministic pair), head dim
   (--dims, H = 2048 / D) and causal flag, each (BLOCK_M, BLOCK_N, num_warps, num_stages) candidate
   timed alone at --seqlen; the best are printed (kernels/flash.py's tables are edited from them).
Timing: benchkit.time_fn (CUDA events around each call, warm-up first, median; inputs are several
times the L2 size). FLOPs: 4*B*H*N^2*D forward (halved when causal), backward 2.5x, forward+backward
3.5x. Kernels are compiled up front in a pool of processes (the Triton and Inductor caches are on
disk, so the timed process finds them compiled). The short tables are printed last; all goes to the JSON.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention as ba  # noqa: E402
import benchkit as bk  # noqa: E402

TOKENS = 131072
SECTIONS = ("check", "dense", "sparse", "sweep")
PROFILE = False  # --profile


def V(name, det=False, tma=False, opts=None, **cfg):
    """A variant: deterministic backward or not (None: the default), TMA on/off, launch-config
    overrides per kernel kind (fwd, bwd, dkdv, dq)."""
    return {"name": name, "det": det, "tma": tma, "cfg": cfg, "opts": dict(opts or {})}


FWD_VARIANTS = [V("fwd_tab"), V("fwd_64x64w4s3", fwd=(64, 64, 4, 3)), V("fwd_128x64w8s3", fwd=(128, 64, 8, 3))]
BWD_VARIANTS = {64: [V("bwd_det", det=True), V("bwd_fused")],
                128: [V("bwd_det", det=True), V("bwd_fused"), V("bwd_det_dkdv32x128w8s3", det=True, dkdv=(32, 128, 8, 3)),
                      V("bwd_det_dkdv64x128w8s2", det=True, dkdv=(64, 128, 8, 2))]}
PROFILE_VARIANTS = [  # --profile: the fused backward without its dQ product, and with plain (racy) stores
    {**V("prof_no_dq"), "dq_mode": 0}, {**V("prof_dq_store"), "dq_mode": 2}]
SPARSE_VARIANTS = [V("sp_det", det=True), V("sp_default", det=None, tma=None)]
CHECK_VARIANTS = [V("default", det=None, tma=None), V("det", det=True), V("fused", det=False),
                  V("fused_tma", det=False, tma=True)]
DENSE_CASES = [(64, True, 1024), (64, True, 2048), (64, True, 4096), (64, True, 16384), (64, True, 65536),
               (128, True, 2048), (128, True, 4096), (128, True, 16384), (128, False, 4096), (128, False, 16384)]
SPARSE_CASES = [(layout, t) for layout in ("local", "bigbird") for t in ("1/8", "1/16", "1/32")]
SPARSE_N = 16384
LAT_SHAPE = (1, 256, 4, 64, True)
SWEEP = {  # launch-config candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 3),
            (128, 32, 4, 3), (64, 128, 4, 3)],
    "bwd": [(64, 64, 4, 3), (64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3), (32, 128, 8, 3)],
    "dkdv": [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (128, 128, 8, 2),
             (64, 128, 4, 2)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 32, 4, 3),
           (64, 32, 4, 3)],
}


def sweep_variants(kind: str, cands) -> list[dict]:  # dkdv / dq: the deterministic pair; bwd: the fused one
    return [V(f"{kind}_{'x'.join(map(str, c))}", det=kind in ("dkdv", "dq"), **{kind: c}) for c in cands]


def apply_variant(v) -> None:
    from longctx.kernels import flash as F
    F._PROFILE_DQ_MODE = v.get("dq_mode", 1)
    F._OPTIONS["bwd_fused"] = None
    F._OPTIONS.update(v.get("opts", {}))
    F.clear_launch_config()
    for kind, cfg in v["cfg"].items():
        F.set_launch_config(kind, *cfg)
    F.set_kernel_options(fwd_tma=v.get("fwd_tma", v["tma"]), bwd_tma=v.get("bwd_tma", v["tma"]))


def flops_fwd(b, h, n, d, causal):
    return 4.0 * b * h * n * n * d / (2.0 if causal else 1.0)


def sparse_mask(layout, target, n, block=128):
    from bench_block_sparse import build_layout
    return build_layout(layout, n, float(Fraction(target)), block)[0]


def timeit(fn, device, rep_ms=250.0) -> float:
    if str(device) == "cpu":  # the interpreter: a couple of calls show that the code runs, nothing more
        return bk.time_fn(fn, device, warmup_ms=0.0, rep_ms=0.0, min_reps=2, max_reps=2)["ms"]
    return bk.time_fn(fn, device, warmup_ms=30.0, rep_ms=rep_ms, min_reps=3, max_reps=100)["ms"]


def ours_fwd(v, q, k, vv, causal, mask=None):
    from longctx.kernels import flash_attention
    return lambda: flash_attention(q, k, vv, causal=causal, block_mask=mask, deterministic=v["det"])


def ours_bwd_only(v, q, k, vv, do, causal, mask=None):
    """The backward kernels alone on one saved forward (the public path minus autograd's overhead)."""
    from longctx.kernels import flash as F
    sm = q.shape[-1] ** -0.5
    q, k, vv = q.detach(), k.detach(), vv.detach()
    o, lse = F._flash_fwd(q, k, vv, causal, sm, mask, "ieee")
    return lambda: F._flash_bwd(do, q, k, vv, o, lse, causal, sm, mask, "ieee", deterministic=v["det"])


def fwd_bwd(fwd, q, k, vv, do):
    import torch
    return lambda: torch.autograd.grad(fwd(), (q, k, vv), do)


def peer_fwd(method, q, k, vv, causal, mask=None):  # with a block mask: FlexAttention with the same blocks
    return ba.make_forward("flex" if mask is not None else method, q, k, vv, causal, mask)


def failed(exc) -> dict:
    return {"error": bk.short(f"{type(exc).__name__}: {exc}")}


# ------------------------------------------------------------------------------ checks
def check_cases(smoke):
    import torch
    bf, fp, f32 = torch.bfloat16, torch.float16, torch.float32
    if smoke:  # B, Nq, Nk, H, D, causal, dtype, block-sparse
        return [(1, 33, 70, 1, 16, True, f32, False), (1, 70, 70, 1, 16, True, f32, True)]
    return [(2, 1, 1, 3, 64, False, bf, False), (2, 1000, 1000, 4, 64, True, bf, False),
            (1, 333, 777, 2, 128, True, fp, False), (1, 777, 333, 2, 80, True, fp, False),
            (2, 300, 300, 2, 40, False, f32, False), (2, 512, 512, 2, 256, False, bf, False),
            (1, 2048, 2048, 4, 64, True, bf, True), (2, 4096, 4096, 4, 64, True, bf, False)]


def check_inputs(case, device, smoke):
    import torch

    from longctx import kernels
    B, Nq, Nk, H, D, causal, dtype, sparse = case
    blk = 32 if smoke else 128
    mask = kernels.bigbird_mask(Nq, window_blocks=1, global_blocks=1, random_blocks=1, seed=5, block_m=blk,
                                block_n=blk, causal=causal) if sparse else None
    g = torch.Generator(device=device).manual_seed(Nq * 7 + D)
    q, k, v, do = (torch.randn(B, n, H, D, device=device, dtype=dtype, generator=g) for n in (Nq, Nk, Nk, Nq))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do, mask


def run_check(case, var, q, k, v, do, mask) -> dict:
    apply_variant(var)
    return ba.check_errors(ours_fwd(var, q, k, v, case[5], mask), q, k, v, do, case[5], mask, heads=None, batch=None)


def strided_qkv(device, smoke):
    import torch
    n, heads, d = (40, 1, 16) if smoke else (2048, 4, 64)
    g = torch.Generator(device=device).manual_seed(1)
    qkv = torch.randn(2, n, 3, heads, d, device=device, dtype=torch.float32 if smoke else torch.bfloat16, generator=g)
    return qkv.requires_grad_(), torch.randn(2, n, heads, d, device=device, dtype=qkv.dtype, generator=g)


def run_strided(var, qkv, do):
    import torch

    from longctx.kernels import flash_attention
    apply_variant(var)
    q, k, v = qkv.unbind(2)
    return torch.autograd.grad(flash_attention(q, k, v, causal=True, deterministic=var["det"]), qkv, do)[0]


def check_section(device, smoke):
    import torch

    from longctx.kernels import flash as F
    rows, bad = [], 0
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 5e-3}
    real = F._empty_like, F._empty  # outputs poisoned with NaN: an element the kernel forgets to write fails
    F._empty_like = lambda t: torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device)
    F._empty = lambda shape, dev: torch.full(shape, float("nan"), dtype=torch.float32, device=dev)
    try:
        for case in check_cases(smoke):
            B, Nq, Nk, H, D, causal, dtype, sp = case
            q, k, v, do, mask = check_inputs(case, device, smoke)
            for var in CHECK_VARIANTS:
                errs = run_check(case, var, q, k, v, do, mask)
                ok = all(e < tol[dtype] for e in errs.values())  # NaN / inf fail too
                bad += not ok
                rows.append({"case": [B, Nq, Nk, H, D, causal, str(dtype), sp], "variant": var["name"],
                             "errs": list(errs.values()), "ok": ok})
                bk.log(f"check {var['name']:<10} B={B} Nq={Nq} Nk={Nk} H={H} D={D} causal={causal} {str(dtype)[6:]}"
                       f"{' sparse' if sp else ''}: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items())
                       + f" {'ok' if ok else 'FAIL'}")
        # a strided fused-qkv view (no copies): the deterministic backward bitwise; the fused one's spread
        qkv, do = strided_qkv(device, smoke)
        res = {var["name"]: [run_strided(var, qkv, do) for _ in range(2)] for var in CHECK_VARIANTS}
        det_bitwise = torch.equal(*res["det"])
        spread = bk.rel_err(res["fused"][0], res["fused"][1])
        vs_det = max(bk.rel_err(res[n][0], res["det"][0]) for n in ("default", "fused", "fused_tma"))
        ok = det_bitwise and vs_det < 1e-2
        bad += not ok
        rows.append({"case": "strided qkv", "det_bitwise": det_bitwise, "fused_run_to_run": spread,
                     "fused_vs_det": vs_det, "ok": ok})
        bk.log(f"check strided fused qkv: deterministic bitwise {det_bitwise}; fused run-to-run {spread:.1e}; "
               f"fused vs deterministic {vs_det:.1e} {'ok' if ok else 'FAIL'}")
    finally:
        F._empty_like, F._empty = real
        apply_variant(V("default", tma=None))
    return rows, bad


# ------------------------------------------------------------------------------ timings
def inspect_kernels() -> dict:
    """Registers, spills, shared memory and key PTX instructions of the last launched kernels."""
    from longctx.kernels import flash as F
    out = {}
    for kind, h in (F._RECORD or {}).items():
        md = getattr(h, "metadata", None)
        info = {"n_regs": getattr(h, "n_regs", None), "n_spills": getattr(h, "n_spills", None),
                "shared": getattr(md, "shared", None)}
        ptx = (getattr(h, "asm", None) or {}).get("ptx", "")
        for key, pat in (("red_atom", r"\b(?:red|atom)\.[\w.]*"), ("tma", r"cp\.async\.bulk\.tensor[\w.]*"),
                         ("wgmma", r"wgmma\.mma_async[\w.]*"), ("cp_async", r"cp\.async\.(?:ca|cg)[\w.]*")):
            if ptx:
                found = re.findall(pat, ptx)
                info[key] = {k: found.count(k) for k in sorted(set(found))}
        out[kind] = info
    return out


def time_variants(row, kind, variants, q, k, vv, do, causal, ff, deadline, mask=None) -> None:
    """row[kind][name]: each variant's forward ("fwd") or backward kernels alone ("bwd"), timed;
    err_vs_first: its output against the first variant's (the same function under other settings)."""
    import torch

    from longctx.kernels import flash as F
    first, label = None, f"D={q.shape[-1]} c={int(causal)} N={q.shape[1]}"
    for var in variants:
        if time.time() > deadline:
            break
        apply_variant(var)
        F._RECORD = {}
        try:
            f = ours_fwd(var, q, k, vv, causal, mask) if kind == "fwd" else ours_bwd_only(var, q, k, vv, do, causal, mask)
            ms = timeit(f, q.device)
            row["inspect"][var["name"]] = inspect_kernels()
            with torch.no_grad():
                out = f()
            out = out if isinstance(out, tuple) else (out,)
            first = first or out
            row[kind][var["name"]] = {"ms": ms, "tflops": bk.tflops(ff * (1.0 if kind == "fwd" else 2.5), ms),
                                      "err_vs_first": max(bk.rel_err(a, b) for a, b in zip(out, first))}
        except Exception as exc:
            row[kind][var["name"]] = failed(exc)
        bk.log(f"{label} {var['name']:<18} {row[kind][var['name']]}")


def dense_section(device, smoke, deadline, results) -> None:
    import torch
    H, tokens = (1, 64) if smoke else (16, TOKENS)
    for D, causal, N in [(16, True, 64)] if smoke else DENSE_CASES:
        if time.time() > deadline:
            bk.log(f"dense D={D} causal={causal} N={N}: skipped (time budget)")
            continue
        B = max(1, tokens // N)
        ff = flops_fwd(B, H, N, D, causal)
        row = {"D": D, "causal": causal, "N": N, "B": B, "H": H, "fwd": {}, "bwd": {}, "fb": {}, "inspect": {}}
        results.append(row)
        q, k, vv, do = ba.make_inputs(B, N, H, D, torch.float32 if smoke else torch.bfloat16, device)
        fv = FWD_VARIANTS[: 2 if smoke else None]
        bv = BWD_VARIANTS.get(D, BWD_VARIANTS[64]) + (PROFILE_VARIANTS if PROFILE else [])
        time_variants(row, "fwd", fv, q, k, vv, do, causal, ff, deadline)
        time_variants(row, "bwd", bv, q, k, vv, do, causal, ff, deadline)

        def best(variants, kind):  # the fastest variant whose result matches the first one's
            good = [v for v in variants if "ms" in row[kind].get(v["name"], {})
                    and (row[kind][v["name"]]["err_vs_first"] or 0) <= 2e-2 and not v["name"].startswith("prof")]
            return min(good, key=lambda v: row[kind][v["name"]]["ms"], default=variants[0])
        fvar, bvar = best(fv, "fwd"), best(bv, "bwd")
        new = {**V(f"new({fvar['name']}+{bvar['name']})", det=bvar["det"], opts={**fvar["opts"], **bvar["opts"]},
                   **{**fvar["cfg"], **bvar["cfg"]}), "fwd_tma": fvar["tma"], "bwd_tma": bvar["tma"]}
        row["new_variant"] = new
        methods = [("ours_old", V("old", det=True)), ("ours_default", V("default", det=None, tma=None)),
                   ("ours_new", new)] + [(p, None) for p in ([] if smoke else ["sdpa_cudnn", "sdpa_flash", "flex"])]
        for name, var in methods:  # through the public API, beside the peers
            if time.time() > deadline:
                break
            try:
                if var is not None:
                    apply_variant(var)
                f = ours_fwd(var, q, k, vv, causal) if var else peer_fwd(name, q, k, vv, causal)
                fms, fbms = timeit(f, device), timeit(fwd_bwd(f, q, k, vv, do), device)
                mem = bk.peak_extra_bytes(fwd_bwd(f, q, k, vv, do), device) if (N, D) == (16384, 64) else None
                row["fb"][name] = {"fwd_ms": fms, "fb_ms": fbms, "fwd_tflops": bk.tflops(ff, fms),
                                   "fb_tflops": bk.tflops(3.5 * ff, fbms), "mem": mem}
            except Exception as exc:
                row["fb"][name] = failed(exc)
            bk.log(f"D={D} c={int(causal)} N={N} {name:<10} {row['fb'][name]}")
        apply_variant(V("default"))
        del q, k, vv, do
        bk.free_memory()


def latency_section(device, smoke, res, res_shape) -> None:
    """Per-call time of a tiny problem: what the host-side work of a call costs (launches, checks)."""
    import torch
    b, n, h, d, causal = (1, 32, 1, 16, True) if smoke else LAT_SHAPE
    res_shape[:] = [b, n, h, d, causal]
    q, k, vv, do = ba.make_inputs(b, n, h, d, torch.float32 if smoke else torch.bfloat16, device)
    apply_variant(V("default", det=None, tma=None))
    for name in ["ours_default"] + ([] if smoke else ["sdpa_cudnn", "sdpa_flash"]):
        try:
            f = ours_fwd(V("default", det=None), q, k, vv, causal) if name == "ours_default" else \
                peer_fwd(name, q, k, vv, causal)
            res[name] = {"fwd_ms": timeit(f, device, 100), "fb_ms": timeit(fwd_bwd(f, q, k, vv, do), device, 100)}
        except Exception as exc:
            res[name] = failed(exc)
    bk.log(f"latency B={b} N={n} H={h} D={d}: {res}")


def sparse_section(device, smoke, deadline, results, dense_rows) -> None:
    import torch
    n, H, D = (128, 1, 16) if smoke else (SPARSE_N, 16, 64)
    B = max(1, (128 if smoke else TOKENS) // n)
    q, k, vv, do = ba.make_inputs(B, n, H, D, torch.float32 if smoke else torch.bfloat16, device)
    dense = next((r["fb"].get("ours_new", {}).get("fb_ms") for r in dense_rows
                  if r["D"] == D and r["causal"] and r["N"] == n), None)
    if dense is None:
        apply_variant(V("default"))
        dense = timeit(fwd_bwd(ours_fwd(V("d"), q, k, vv, True), q, k, vv, do), device)
    for layout, target in [("local", "1/2")] if smoke else SPARSE_CASES:
        if time.time() > deadline:
            bk.log(f"sparse {layout} {target}: skipped (time budget)")
            continue
        mask = sparse_mask(layout, target, n, 32 if smoke else 128)
        row = {"layout": layout, "target": target, "density": mask.causal_density, "N": n, "B": B,
               "dense_fb_ms": dense, "ms": {}}
        results.append(row)
        for var in SPARSE_VARIANTS + ([] if smoke else [None]):  # None: FlexAttention, the same blocks
            name = var["name"] if var else "flex"
            try:
                if var is not None:
                    apply_variant(var)
                f = ours_fwd(var, q, k, vv, True, mask) if var else peer_fwd("flex", q, k, vv, True, mask)
                row["ms"][name] = {"fwd": timeit(f, device), "fb": timeit(fwd_bwd(f, q, k, vv, do), device)}
            except Exception as exc:
                row["ms"][name] = failed(exc)
            apply_variant(V("default"))
        bk.log(f"sparse {layout} {target} density {row['density']:.4f}: {row['ms']}")


def sweep_section(device, smoke, deadline, results, seqlen, dims, quick) -> None:
    import torch
    for D in [16] if smoke else dims:
        H, N = (1, 64) if smoke else (max(1, 2048 // D), seqlen)
        B = max(1, (64 if smoke else TOKENS) // N)
        for causal in (True, False):
            q, k, vv, do = ba.make_inputs(B, N, H, D, torch.float32 if smoke else torch.bfloat16, device)
            ff = flops_fwd(B, H, N, D, causal)
            for kind, cands in SWEEP.items():
                row = {"fwd": {}, "bwd": {}, "inspect": {}}
                variants = sweep_variants(kind, cands[: 1 if smoke else 4 if quick else None])
                alone = "fwd" if kind == "fwd" else "bwd"
                time_variants(row, alone, variants, q, k, vv, do, causal, ff, deadline)
                timed = [(v["cfg"][kind], row[alone][v["name"]]) for v in variants if "ms" in row[alone].get(v["name"], {})]
                results += [{"kind": kind, "D": D, "causal": causal, "N": N, "cfg": list(c), "ms": r["ms"],
                             "tflops": r["tflops"]} for c, r in timed]
                if timed:
                    c, r = min(timed, key=lambda t: t[1]["ms"])
                    bk.log(f"BEST {kind} D={D} causal={causal}: {c} {r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s")
            apply_variant(V("default"))
            del q, k, vv, do
            bk.free_memory()


# ------------------------------------------------------------------------- warm-up pool
def warm_job(job):
    """Run one configuration once (compiles it into the on-disk caches); returns (job, error or None)."""
    import torch
    try:
        if job["kind"] == "check":
            run_check(job["case"], job["variant"], *check_inputs(job["case"], "cuda", False))
        elif job["kind"] == "strided":
            run_strided(job["variant"], *strided_qkv("cuda", False))
        else:
            b, n, h, d, causal = job["shape"]
            q, k, vv, do = ba.make_inputs(b if job["kind"] == "peer" else 1, n, h, d, torch.bfloat16, "cuda")
            mask = sparse_mask(*job["sparse"], n) if job.get("sparse") else None
            if job["kind"] == "peer":
                torch.autograd.grad(peer_fwd(job["method"], q, k, vv, causal, mask)(), (q, k, vv), do)
            else:
                apply_variant(job["variant"])
                ours_fwd(job["variant"], q, k, vv, causal, mask)()
                if job["kind"] == "bwd":
                    ours_bwd_only(job["variant"], q, k, vv, do, causal, mask)()
        torch.cuda.synchronize()
        return job, None
    except Exception as exc:  # reported; the timed run will meet it again
        return job, bk.short(f"{type(exc).__name__}: {exc}", 200)


def warm_jobs(a, sections) -> list[dict]:
    jobs = []
    if "check" in sections:
        jobs += [{"kind": "check", "case": c, "variant": v, "label": f"check {c[:6]}"}
                 for c in check_cases(False) for v in CHECK_VARIANTS]
        jobs += [{"kind": "strided", "variant": v, "label": f"strided {v['name']}"} for v in CHECK_VARIANTS]
    if "dense" in sections:
        jobs += [{"kind": "peer", "method": "flex", "shape": (TOKENS // N, N, 16, D, causal),
                  "label": f"flex D{D} c{int(causal)} {N}"} for D, causal, N in DENSE_CASES]
        first = {(D, causal): N for D, causal, N in reversed(DENSE_CASES)}  # one N per (D, causal): one compile
        for (D, causal), N in first.items():
            variants = [("fwd", v) for v in FWD_VARIANTS] + [("bwd", v) for v in BWD_VARIANTS[D] +
                                                             (PROFILE_VARIANTS if a.profile else [])]
            jobs += [{"kind": kind, "variant": v, "shape": (1, N, 16, D, causal), "label": f"{v['name']} D{D} c{int(causal)}"}
                     for kind, v in variants]
        jobs.append({"kind": "bwd", "variant": V("default", det=None, tma=None), "shape": LAT_SHAPE, "label": "latency"})
    if "sparse" in sections:
        shape = (TOKENS // SPARSE_N, SPARSE_N, 16, 64, True)
        jobs.append({"kind": "peer", "method": "flex", "shape": shape, "sparse": SPARSE_CASES[0], "label": "flex sparse"})
        jobs += [{"kind": "bwd", "variant": v, "shape": (1, *shape[1:]), "sparse": SPARSE_CASES[0],
                  "label": f"{v['name']} sparse"} for v in SPARSE_VARIANTS]
    if "sweep" in sections:
        jobs += [{"kind": "fwd" if kind == "fwd" else "bwd", "variant": v, "shape": (1, a.seqlen, max(1, 2048 // D), D, c),
                  "label": f"{v['name']} D{D} c{int(c)}"}
                 for D in a.dim_list for c in (True, False) for kind, cands in SWEEP.items()
                 for v in sweep_variants(kind, cands[: 4 if a.quick else None])]
    return jobs


def warm_up(jobs, workers, timeout_s) -> list[dict]:
    import concurrent.futures as cf
    import multiprocessing as mp
    if not jobs:
        return []
    bk.log(f"warm-up: {len(jobs)} compile jobs on {workers} processes (timeout {timeout_s:.0f} s)")
    ex = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    done, pending = cf.wait([ex.submit(warm_job, j) for j in jobs], timeout=timeout_s)
    errors = [{"job": job["label"], "error": err} for job, err in (f.result() for f in done) if err]
    for e in errors:
        bk.log(f"  warm-up {e['job']}: {e['error']}")
    bk.log(f"warm-up: {len(done)} done, {len(pending)} still compiling (left to the timed process)")
    ex.shutdown(wait=False, cancel_futures=True)
    return errors


# ------------------------------------------------------------------------------ tables
def tables(res) -> str:
    out = []
    d = res.get("dense", [])

    def case(r):
        return f"D{r['D']} {'c' if r['causal'] else 'nc'} {r['N']}"
    if d:
        short = {"ours_old": "det", "ours_default": "dflt", "ours_new": "new", "sdpa_cudnn": "cudnn",
                 "sdpa_flash": "fa2", "flex": "flex"}
        rows = []
        for r in d:
            def g(m, key, fb=r["fb"]):
                return fb.get(m, {}).get(key)

            def ratio(x, y, key="fb_tflops"):
                return bk.fmt(g(x, key) / g(y, key) if g(x, key) and g(y, key) else None, ".2f")
            rows.append([case(r)] + [bk.fmt(g(m, "fwd_tflops")) for m in short] + [bk.fmt(g(m, "fb_tflops")) for m in short]
                        + [ratio("ours_new", "sdpa_cudnn"), ratio("ours_new", "sdpa_cudnn", "fwd_tflops"),
                           ratio("ours_new", "flex"), ratio("ours_default", "sdpa_cudnn"),
                           r.get("new_variant", {}).get("name", "-")[4:-1]])
        hdr = (["case"] + [f"F {s}" for s in short.values()] + [f"FB {s}" for s in short.values()] +
               ["new/cud FB", "new/cud F", "new/flex FB", "dflt/cud FB", "new"])
        out.append(f"dense, TFLOP/s, F = forward, FB = forward+backward (B*N = {d[0]['B'] * d[0]['N']}, "
                   f"H = {d[0]['H']})\n" + bk.table(hdr, rows))
        names = sorted({n for r in d for n in list(r["fwd"]) + list(r["bwd"])})
        rows = [[case(r)] + [bk.fmt(x.get("tflops")) + ("(!)" if (x.get("err_vs_first") or 0) > 2e-2 else "")
                             for x in ({**r["fwd"], **r["bwd"]}.get(n, {}) for n in names)] for r in d]
        out.append("variants alone, TFLOP/s (fwd_*: forward; bwd_*: backward only)\n" + bk.table(["case"] + names, rows))
    if res.get("latency"):
        b, n, h, dd, _ = res.get("latency_shape") or LAT_SHAPE
        out.append(f"latency (B={b}, N={n}, H={h}, D={dd}, causal), ms per call: " + "; ".join(
            f"{k} fwd {bk.fmt(v.get('fwd_ms'), '.3f')} fwd+bwd {bk.fmt(v.get('fb_ms'), '.3f')}"
            for k, v in res["latency"].items()))
    s = res.get("sparse", [])
    if s:
        names = [v["name"] for v in SPARSE_VARIANTS] + ["flex"]
        rows = []
        for r in s:
            ms = {n: r["ms"].get(n, {}).get("fb") for n in names}
            best = min((m for n, m in ms.items() if m and n != "flex"), default=None)
            sp = r["dense_fb_ms"] / best if best and r["dense_fb_ms"] else None
            vf = ms["flex"] / best if best and ms["flex"] else None
            rows.append([r["layout"], r["target"], f"{r['density']:.4f}", bk.fmt(r["dense_fb_ms"], ".3g")] +
                        [bk.fmt(ms[n], ".3g") for n in names] +
                        [bk.fmt(sp, ".1f") + f"x ({0.7 / r['density']:.1f}x)" if sp else "-", bk.fmt(vf, ".2f") + "x"
                         if vf else "-"])
        hdr = (["layout", "target", "density", "dense f+b ms"] + [f"{n} f+b ms" for n in names] +
               ["best vs dense (0.7/dens)", "best vs flex (1.3)"])
        out.append(f"block-sparse, causal, N={s[0]['N']}, B={s[0]['B']}, fwd+bwd ms\n" + bk.table(hdr, rows))
    sw = res.get("sweep", [])
    if sw:
        groups = {}
        for r in sw:
            groups.setdefault((r["kind"], r["D"], r["causal"], r["N"]), []).append(r)
        rows = []
        for (kind, D, causal, N), rs in groups.items():
            b = min(rs, key=lambda x: x["ms"])
            rows.append([kind, D, causal, N, len(rs), tuple(b["cfg"]), f"{b['ms']:.3f}", bk.fmt(b["tflops"])])
        out.append("launch-config sweep, best per kernel (bwd: fused; dkdv, dq: the deterministic pair)\n" +
                   bk.table(["kernel", "D", "causal", "N", "candidates", "best (BM, BN, warps, stages)", "ms",
                             "TFLOP/s"], rows))
    return "\n\n".join(out)


def inspect_lines(dense, everything: bool) -> list[str]:
    """Registers / spills / shared memory / PTX counts per variant of the first case of each (D, causal),
    with --inspect (the JSON has every case's)."""
    lines, shown = [], set()
    for r in dense if everything else []:
        if (r["D"], r["causal"]) in shown:
            continue
        shown.add((r["D"], r["causal"]))
        for name, ins in r.get("inspect", {}).items():
            parts = [f"{kind} regs {i['n_regs']} spills {i['n_spills']} smem {i['shared']} "
                     + " ".join(f"{k}={sum(v.values())}" for k, v in i.items() if isinstance(v, dict) and v)
                     + " " + ",".join(i.get("red_atom", {}))
                     for kind, i in ins.items() if i.get("n_regs") is not None and not (name.startswith("bwd")
                                                                                         and kind == "fwd")]
            if parts:
                lines.append(f"inspect D{r['D']} c{int(r['causal'])} {name}: " + "; ".join(parts))
    return lines


# -------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/lab.json")
    p.add_argument("--budget-s", type=float, default=240.0, help="stop starting new timings after this")
    p.add_argument("--sections", default="check,dense,sparse", help=f"comma list out of {', '.join(SECTIONS)}")
    p.add_argument("--workers", type=int, default=14, help="compile processes (0: compile in-process)")
    p.add_argument("--warm-timeout", type=float, default=110.0)
    p.add_argument("--dense-until-s", type=float, default=1e9, help="no new dense case after this")
    p.add_argument("--seqlen", type=int, default=8192, help="sweep: the sequence length (B*N = 131072)")
    p.add_argument("--dims", default="64,128", help="sweep: head dims")
    p.add_argument("--quick", action="store_true", help="sweep: the first 4 candidates per kernel")
    p.add_argument("--smoke", action="store_true", help="CPU interpreter, toy sizes, no peers")
    p.add_argument("--inspect", action="store_true", help="print registers/spills/PTX counts per variant")
    p.add_argument("--profile", action="store_true", help="also time the fused backward without dQ / with plain stores")
    return p


def main(argv=None) -> int:
    global PROFILE
    p = build_parser()
    a = p.parse_args(argv)
    PROFILE = a.profile
    sections = [s for s in a.sections.split(",") if s]
    if not sections or any(s not in SECTIONS for s in sections):
        p.error(f"--sections: unknown {[s for s in sections if s not in SECTIONS]}; choose from {', '.join(SECTIONS)}")
    a.dim_list = bk.parse_list(p, "dims", a.dims)
    if a.seqlen < 1 or not a.dim_list or any(not 1 <= d <= 256 for d in a.dim_list):
        p.error(f"--seqlen must be >= 1 and --dims head dims in 1..256, got {a.seqlen}, {a.dims!r}")
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not a.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --smoke for the CPU interpreter)")
    bk.start_clock()
    device, deadline, out = "cpu" if a.smoke else "cuda", bk.T0 + a.budget_s, Path(a.out)
    res = {"env": bk.env_info(), "command": bk.command_line(), "sections": sections}
    bk.log(f"kernel_lab: {res['env'].get('gpu')} torch {res['env'].get('torch')} triton {res['env'].get('triton')}")
    if not a.smoke and a.workers > 0:
        res["warm_errors"] = warm_up(warm_jobs(a, sections), a.workers, a.warm_timeout)
    bad = 0
    if "check" in sections:
        res["check"], bad = check_section(device, a.smoke)
        bk.write_json(out, res)
    res.update(dense=[], latency={}, sparse=[], sweep=[])
    if "dense" in sections:
        dense_section(device, a.smoke, min(deadline, bk.T0 + a.dense_until_s), res["dense"])
        bk.write_json(out, res)
        res["latency_shape"] = []
        latency_section(device, a.smoke, res["latency"], res["latency_shape"])
    if "sparse" in sections:
        sparse_section(device, a.smoke, deadline, res["sparse"], res["dense"])
    if "sweep" in sections:
        sweep_section(device, a.smoke, deadline, res["sweep"], a.seqlen, a.dim_list, a.quick)
    res["elapsed_s"] = time.time() - bk.T0
    bk.write_json(out, res)
    print("\n" + "\n".join(inspect_lines(res["dense"], a.inspect)))
    print(tables(res))
    print(f"\nchecks failed: {bad}; elapsed {res['elapsed_s']:.0f} s; wrote {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
