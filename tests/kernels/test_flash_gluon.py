"""The Gluon (Hopper, warp-specialised) forward and backward in kernels/flash_gluon.py.

On the CPU machine the kernel cannot run (Triton's interpreter does not run Gluon), so it is built
for sm_90 with the installed Triton and its PTX is checked for the structure it exists for. On a
Hopper GPU (LONGCTX_TEST_GPU=1) flash_attention runs it and is compared with float64 attention,
gradients included (the backward runs on the Gluon forward's LSE).
"""
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import longctx.kernels.flash as flash_mod
import pytest
import torch
from longctx import kernels
from longctx.kernels import flash_gluon

from .test_flash import DEVICE, run_case

HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9
needs_gluon = pytest.mark.skipif(not flash_gluon.HAVE_GLUON,
                                 reason="the installed Triton has no Gluon Hopper module")
needs_hopper = pytest.mark.skipif(not HOPPER or not flash_gluon.HAVE_GLUON,
                                  reason="needs a Hopper GPU (LONGCTX_TEST_GPU=1)")


if flash_gluon.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
    _load_kv, _load_q_do = flash_gluon._bwd_load_kv, flash_gluon._bwd_load_q_do

    @gluon.jit
    def _pause_20us():
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        x = gl.full([32], 0, gl.int32, lay)
        for _ in gl.static_range(20):
            x = gl.inline_asm_elementwise("nanosleep.u32 1000; mov.b32 $0, $1;", "=r,r", [x],
                                          dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _late_block0_loader(q_desc, do_desc, k_desc, v_desc, kc_desc, q_smem, do_smem, k_smem, v_smem,
                            kc_smem, kv_bar, ready, empty, b, h, n0, lo, n_tiles, idx_ptr, n_idx,
                            BLOCK_M: gl.constexpr, STAGES: gl.constexpr, SPARSE: gl.constexpr, MASK_BM: gl.constexpr,
                            DQ_SPLIT: gl.constexpr):
        """The backward's loader with query block 0 landing last: block 1 first, then a pause long
        enough for a consumer to finish a block, then block 0 (the worst case of TMA reordering)."""
        _load_kv(k_desc, v_desc, kc_desc, k_smem, v_smem, kc_smem, kv_bar, b, h, n0, DQ_SPLIT)
        for t in range(n_tiles):
            buf = t % STAGES
            mbarrier.wait(empty.index(buf), ((t // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(buf), 2 * q_desc.block_type.nbytes)
            if t > 0:
                _load_q_do(q_desc, do_desc, q_smem, do_smem, ready.index(buf), b, h, lo + t * BLOCK_M, buf)
            if t == gl.minimum(n_tiles - 1, 1):
                _pause_20us()
                _load_q_do(q_desc, do_desc, q_smem, do_smem, ready.index(0), b, h, lo, 0)


_BUILD = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from longctx.kernels import flash_gluon
head_dim, causal, kernel = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
backward, sparse = not kernel.startswith("fwd"), kernel in ("sparse", "fwd_sparse", "grouped")
# host TMA descriptors of the (B, N, H, D) tensors: 64 rows per load, 128 for the forward's K / V
layout = flash_gluon.gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
desc = f"tensordesc<bf16[1,64,1,{head_dim}],{layout!r}>"
if backward:  # the inputs, then the outputs
    sig = {name: desc for name in ("q_desc", "k_desc", "v_desc", "do_desc")}
    sig["kc_desc"] = f"tensordesc<bf16[1,64,1,64],{layout!r}>"
    dq_swizzle = flash_gluon.DQ_SWIZZLE_BYTES[(head_dim, causal)]  # as gluon_bwd chooses it
    dq_layout = flash_gluon.gl.NVMMASharedLayout(swizzle_byte_width=dq_swizzle, element_bitwidth=32, rank=3)
    sig["dq_desc"] = f"tensordesc<fp32[1,64,64],{dq_layout!r}>"  # the fp32 dQ accumulator's reductions
    sig.update({name: "*bf16" for name in ("DK", "DV")})
    sig.update({name: "*fp32" for name in ("LSE", "DELTA")})
    sig.update({name: "*i32" for name in ("COL_COUNT", "COL_IDX", "COL_MASKED", "ORDER")})  # the mask's lists
    sig.update({f"stride_{t}{s}": "i32" for t in ("dk", "dv") for s in "bnh"})
    sig.update({"stride_mh": "i32", "stride_mcol": "i32"})
    sig.update({"H": "i32", "Nq": "i32", "Nk": "i32", "qk_scale": "fp32", "sm_scale": "fp32"})
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": 64, "CAUSAL": causal, "SPARSE": sparse, "MASK_BM": 128,
              "MASK_BN": 128, "STAGES": 2, "CONSUMER_REGS": 240, "DQ_SWIZZLE": dq_swizzle,
              "ORDERED": sparse, "GROUP": 4, "num_warps": 4}  # block masks: the launch order (heavy first)
else:
    kv_desc = desc.replace("[1,64,1,", "[1,128,1,")
    sig = {"q_desc": desc, "k_desc": kv_desc, "v_desc": kv_desc, "o_desc": desc, "LSE": "*fp32"}
    sig.update({name: "*i32" for name in ("ROW_COUNT", "ROW_IDX", "ROW_FULL")})  # the block mask's lists
    sig.update({"stride_mh": "i32", "stride_mrow": "i32"})
    sig.update({"H": "i32", "Nq": "i32", "Nk": "i32", "n_units": "i32", "qk_scale": "fp32"})
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": 128, "BLOCK_N": 128, "CAUSAL": causal, "SPARSE": sparse,
              "MASK_BM": 256, "MASK_BN": 256, "STAGES": 2, "CONSUMER_REGS": 240, "num_warps": 4}
kernel = {"fwd": flash_gluon._gl_fwd_kernel, "fwd_sparse": flash_gluon._gl_fwd_kernel,
          "grouped": flash_gluon._gl_bwd_grouped_kernel}.get(kernel, flash_gluon._gl_bwd_kernel)
consts = {name: value for name, value in consts.items() if name in kernel.arg_names}
sig.update({name: "constexpr" for name in consts})
sig = {name: sig[name] for name in kernel.arg_names}
src = GluonASTSource(fn=kernel, signature=sig, constexprs=consts)
sys.stdout.write(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"])
"""


def build_ptx(head_dim: int, causal: bool, kernel: str = "fwd") -> str:
    """PTX of a kernel ("fwd", "fwd_sparse", "bwd", "sparse": the block-sparse backward, or "grouped":
    the block-sparse backward whose programs run several key blocks) for sm_90,
    built in a subprocess: the test session runs Triton's interpreter (TRITON_INTERPRET=1), under which
    gluon.jit functions cannot be compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-c", _BUILD, str(head_dim), "1" if causal else "0", kernel]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def ptxas_report(ptx: str) -> str:
    """What `ptxas -v` says about the PTX for sm_90a (registers, spills, and its "Potential Performance
    Loss" warnings), from a ptxas that the installed Triton ships and that reads this PTX's version."""
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for name in ("ptxas", "ptxas-blackwell"):  # Triton 3.9's own ptxas is older than its PTX
            exe = os.path.join(bin_dir, name)
            if os.path.exists(exe):
                out = subprocess.run([exe, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                                     capture_output=True, text=True, timeout=600)
                if out.returncode == 0:
                    return out.stdout + out.stderr
                errors.append(f"{name}: {out.stderr[-300:]}")
    raise AssertionError(f"no ptxas in {bin_dir} assembled the kernel: {errors}")


def assert_wgmma_stay_asynchronous(ptx: str) -> None:
    """ptxas turns every wgmma of a kernel synchronous (a wait after each) when it cannot keep one
    asynchronous: registers short (C7512) or accumulator registers read while in flight (C7514). The
    head-dim-128 backward was built that way for many versions before this was checked
    (docs/kernel_notes.md Version 18)."""
    report = ptxas_report(ptx)
    assert "wgmma.mma_async instructions are serialized" not in report, report[-2000:]


def qkv_views(B: int, N: int, H: int, D: int):
    """run_case's `make`: q, k, v as strided views of one (B, N, 3, H, D) bf16 projection."""
    def make(gen):
        qkv = torch.randn(B, N, 3, H, D, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
        return qkv.unbind(2), (qkv,)
    return make


def sparse_case(case: str):
    """(causal, nq, nk, heads, mask) of the block-sparse kernel tests: a causal local window, per-head
    BigBird, 64 x 128 and 256 x 256 mask blocks, Nq != Nk, a causal random layout, and a non-causal
    random layout in which query block 2 keeps nothing and key block 3 is kept by no query block."""
    causal, nq, nk, heads = True, 1000, 1000, 2
    if case == "local":
        mask = kernels.local_mask(nq, window_blocks=1, block_m=128, block_n=128, causal=True)
    elif case == "bigbird_heads":
        mask = kernels.bigbird_mask(nq, window_blocks=1, global_blocks=1, random_blocks=1, seed=5,
                                    n_heads=heads, block_m=128, block_n=128, causal=True)
    elif case == "rect_64x128":
        mask = kernels.local_mask(nq, window_blocks=2, block_m=64, block_n=128, causal=True)
    elif case == "big_256":
        nq = nk = 1300
        mask = kernels.bigbird_mask(nq, window_blocks=1, global_blocks=1, random_blocks=1, seed=2,
                                    block_m=256, block_n=256, causal=True)
    elif case == "cross":
        nq, nk = 700, 1500
        mask = kernels.local_mask(nq, nk, window_blocks=2, block_m=128, block_n=128, causal=True)
    elif case == "causal_random":  # some key blocks' lists start below their diagonal block (unmasked)
        layout = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.4
        layout[:, :, 0] = True
        mask = kernels.BlockMask(layout, block_m=128, block_n=128, seq_q=nq, seq_k=nk, causal=True)
    else:
        causal, nk = False, 1100
        layout = torch.rand(1, 8, 9, generator=torch.Generator().manual_seed(0)) < 0.4
        layout[:, :, 3] = False  # key block 3 kept by no query block
        layout[:, 2, :] = False  # query block 2 keeps nothing
        layout[:, 0, 0] = True
        mask = kernels.BlockMask(layout, block_m=128, block_n=128, seq_q=nq, seq_k=nk)
    return causal, nq, nk, heads, mask


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap module.name so that each call appends to the returned list (did that kernel run?)."""
    ran, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: ran.append(1) or real(*a, **k))
    return ran


@needs_gluon
@pytest.mark.parametrize("head_dim,causal,kernel",
                         [(128, True, "fwd"), (64, False, "fwd"), (64, True, "fwd_sparse")])
def test_builds_for_hopper_with_async_wgmma_and_no_cta_wide_barrier_in_the_loop(head_dim, causal, kernel):
    ptx = build_ptx(head_dim, causal, kernel)
    assert "wgmma.mma_async" in ptx and "wgmma.wait_group.sync.aligned 1" in ptx  # S waited for alone
    assert "setmaxnreg" in ptx  # warp specialisation: registers move from the loader to the consumers
    assert "cp.async.bulk.tensor" in ptx  # TMA loads
    assert "cp.async.bulk.tensor.4d.global.shared" in ptx  # O leaves through a TMA store
    # the consumers synchronise only within their own warpgroup (named barriers of 128 threads) or
    # through mbarriers; a CTA-wide `bar.sync 0;` would put the two warpgroups back in lockstep
    assert not re.search(r"\bbar\.sync\s+\d+;", ptx)
    assert_wgmma_stay_asynchronous(ptx)


@needs_gluon
@pytest.mark.parametrize("head_dim,causal,kernel", [(64, True, "bwd"), (64, False, "bwd"),
                                                    (64, True, "sparse"), (64, True, "grouped"),
                                                    (128, True, "bwd"), (128, False, "bwd")])
def test_backward_builds_with_warp_specialisation_and_tma_reductions(head_dim, causal, kernel):
    ptx = build_ptx(head_dim, causal, kernel)
    assert "wgmma.mma_async" in ptx
    # every wait is wait_group 0: a wait_group N > 0 behind the loop's back edge makes ptxas
    # serialise all wgmma of the kernel (docs/kernel_notes.md Version 5)
    assert set(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)) == {"0"}
    assert "setmaxnreg" in ptx and "cp.async.bulk.tensor" in ptx
    # dQ leaves through shared memory and TMA reduce-adds, no per-thread reductions or atomics
    assert "cp.reduce.async.bulk.tensor.3d.global.shared::cta.add" in ptx
    assert not re.search(r"\b(red|atom)\.global", ptx) and "red.relaxed" not in ptx
    assert not re.search(r"\bbar\.sync\s+\d+;", ptx)
    assert_wgmma_stay_asynchronous(ptx)


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(1, 1), (63, 65), (127, 127), (300, 777), (777, 300), (1, 513),
                                   (1500, 1500)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_matches_float64_reference(nq, nk, causal, dtype, head_dim, monkeypatch):
    monkeypatch.setitem(flash_mod._OPTIONS, "bwd_gluon", True)  # below the table's minimum length too
    ran = count_calls(monkeypatch, flash_gluon, "gluon_bwd")
    run_case(2, nq, nk, 3, head_dim, causal, dtype, deterministic=False)
    assert ran, "the Gluon backward did not run"


@needs_hopper
@pytest.mark.parametrize("nq,nk,head_dim", [(1024, 1024, 64), (700, 1500, 64), (1500, 700, 64),
                                            (1024, 1024, 128), (700, 1500, 128)])
def test_backward_waits_for_the_query_block_a_consumer_skips(nq, nk, head_dim, monkeypatch):
    """Causal programs whose second key half starts one query block later skip block 0 but release
    its buffer; they must still wait for it to land, or their parity wait for block 2 passes while
    block 0 is in flight and they read buffer 0 as block 2 (wrong dK/dV in about 1 of 25 large
    launches). A copy of the kernel module whose loader lands block 0 last makes that order certain.
    At head dim 128 no half skips a block (the one whose keys block 0 does not see runs it fully
    masked): there the late block 0 checks that a fully masked block adds nothing and waits like any."""
    spec = importlib.util.spec_from_file_location("_flash_gluon_late_block0", flash_gluon.__file__)
    late = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(late)
    late._bwd_loader = _late_block0_loader
    monkeypatch.setattr(flash_mod, "_gluon", late)
    monkeypatch.setitem(flash_mod._OPTIONS, "bwd_gluon", True)
    ran = count_calls(monkeypatch, late, "gluon_bwd")
    run_case(1, nq, nk, 2, head_dim, True, torch.bfloat16, deterministic=False)
    assert ran, "the Gluon backward did not run"


@needs_hopper
@pytest.mark.parametrize("case,head_dim", [("local", 64), ("bigbird_heads", 64), ("rect_64x128", 64),
                                           ("big_256", 64), ("cross", 64), ("causal_random", 64),
                                           ("noncausal_empty", 64),
                                           ("bigbird_heads", 128), ("noncausal_empty", 128)])
def test_block_sparse_backward_matches_float64_reference(case, head_dim, monkeypatch):
    """The Gluon backward over a block mask's column lists (mask blocks of a multiple of 64 query
    rows by a multiple of 128 keys): causal masks on the blocks that cross the diagonal only, per-head layouts, partial last
    blocks, Nq != Nk, and key blocks that no query block keeps (their dK, dV must be 0). One key block
    per program (_gl_bwd_kernel; the grouped kernel: the test below)."""
    monkeypatch.setitem(flash_mod._OPTIONS, "bwd_gluon", True)
    monkeypatch.setitem(flash_mod._OPTIONS, "sparse_group", 1)
    ran = count_calls(monkeypatch, flash_gluon, "gluon_bwd")
    causal, nq, nk, heads, mask = sparse_case(case)
    out, (dq, dk, dv) = run_case(1, nq, nk, heads, head_dim, causal, torch.bfloat16, block_mask=mask,
                                 deterministic=False)
    assert ran, "the Gluon backward did not run"
    if case == "noncausal_empty":
        assert torch.equal(dk[:, 384:512], torch.zeros_like(dk[:, 384:512]))
        assert torch.equal(dv[:, 384:512], torch.zeros_like(dv[:, 384:512]))


@needs_hopper
@pytest.mark.parametrize("case", ["local", "bigbird_heads", "rect_64x128", "big_256", "cross",
                                  "causal_random", "noncausal_empty"])
def test_block_sparse_backward_grouped_key_blocks(case, monkeypatch):
    """Programs that run 3 key blocks of 128 in turn (flash_gluon._gl_bwd_grouped_kernel, head dim 64;
    1000 keys = key blocks 3 + 3 + 2), the cases above against float64: the ring and the dS slots
    counted on across key blocks, K / V double buffered, a key block no query block keeps (dK = dV =
    0) in the middle of a group, the heavy-first launch order over groups (bigbird_heads, cross), and
    key blocks whose lists start without a masked block (causal_random, noncausal_empty: these read
    shared memory out of range before the fix of docs/kernel_notes.md Version 20). Masks of 64-row
    blocks (rect_64x128) keep one key block per program."""
    monkeypatch.setitem(flash_mod._OPTIONS, "bwd_gluon", True)
    monkeypatch.setitem(flash_mod._OPTIONS, "sparse_group", 3)
    groups, real = [], flash_gluon.gluon_bwd
    monkeypatch.setattr(flash_gluon, "gluon_bwd", lambda *a: groups.append(a[-1]) or real(*a))
    causal, nq, nk, heads, mask = sparse_case(case)
    out, (dq, dk, dv) = run_case(1, nq, nk, heads, 64, causal, torch.bfloat16, block_mask=mask,
                                 deterministic=False)
    assert groups == [1 if case == "rect_64x128" else 3], groups
    if case == "noncausal_empty":
        assert torch.equal(dk[:, 384:512], torch.zeros_like(dk[:, 384:512]))
        assert torch.equal(dv[:, 384:512], torch.zeros_like(dv[:, 384:512]))


@needs_hopper
@pytest.mark.parametrize("kind,block_m,block_n", [("bwd", 64, 64), ("fwd", 64, 128)])
def test_block_sparse_falls_back_for_small_mask_blocks(kind, block_m, block_n, monkeypatch):
    """Forced on, the Gluon kernels still leave masks whose blocks do not cover their tiles to Triton:
    a backward program owns 128 keys, a forward tile 128 query rows."""
    monkeypatch.setitem(flash_mod._OPTIONS, f"{kind}_gluon", True)
    ran = count_calls(monkeypatch, flash_gluon, f"gluon_{kind}")
    mask = kernels.local_mask(600, window_blocks=2, block_m=block_m, block_n=block_n, causal=True)
    run_case(1, 600, 600, 2, 64, True, torch.bfloat16, block_mask=mask, deterministic=False)
    assert not ran


@needs_hopper
def test_backward_table_and_fallbacks(monkeypatch):
    ran = count_calls(monkeypatch, flash_gluon, "gluon_bwd")

    run_case(1, 4096, 4096, 2, 64, True, torch.bfloat16, make=qkv_views(1, 4096, 2, 64))
    assert ran  # the table's default (>= 512 keys), on strided views
    ran.clear()
    run_case(1, 500, 500, 2, 64, True, torch.bfloat16)
    run_case(1, 4096, 4096, 2, 64, True, torch.bfloat16, deterministic=True)
    run_case(1, 500, 500, 2, 128, True, torch.bfloat16)
    run_case(1, 500, 500, 2, 128, False, torch.bfloat16)
    narrow = kernels.local_mask(4096, window_blocks=1, block_m=128, block_n=128, causal=True)
    run_case(1, 4096, 4096, 2, 128, True, torch.bfloat16, block_mask=narrow)
    assert not ran  # short rows, deterministic=True, and block masks of few query blocks per program
    wide = kernels.local_mask(4096, window_blocks=8, block_m=128, block_n=128, causal=True)
    run_case(1, 4096, 4096, 2, 128, True, torch.bfloat16, block_mask=wide)
    assert ran  # block masks whose programs see >= 6 query blocks, head dim 128 too
    ran.clear()
    run_case(1, 512, 512, 2, 128, True, torch.bfloat16)
    assert ran  # head dim 128 from 512 keys causal
    ran.clear()
    run_case(1, 512, 512, 2, 128, False, torch.bfloat16)
    assert ran  # and from 512 non-causal, where the table's Triton choice is the deterministic backward
    ran.clear()
    monkeypatch.setitem(flash_mod._OPTIONS, "bwd_gluon", False)
    run_case(1, 4096, 4096, 2, 64, True, torch.bfloat16)
    assert not ran


@needs_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(1, 1), (127, 127), (300, 777), (777, 300), (1500, 1500)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_float64_reference(nq, nk, causal, head_dim, dtype, monkeypatch):
    monkeypatch.setitem(flash_mod._OPTIONS, "fwd_gluon", True)  # D=64 short rows too (Triton's in the table)
    ran = count_calls(monkeypatch, flash_gluon, "gluon_fwd")
    run_case(2, nq, nk, 3, head_dim, causal, dtype)
    assert ran, "the Gluon forward did not run"


@needs_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk,programs", [(300, 777, 2), (777, 300, 3), (1500, 1500, 5), (1000, 1300, 7),
                                            (1500, 1500, None), (777, 777, None)])
def test_persistent_programs_run_many_tiles(nq, nk, programs, causal, head_dim, monkeypatch):
    """Few persistent programs, so each runs many tiles of different lengths in turn: the Q double
    buffer and the K / V ring's phases carry over from tile to tile (odd block counts included).
    programs=None: the grid for long rows, one program per work unit (a causal unit is two tiles, one
    alone when the query blocks are odd in number)."""
    monkeypatch.setitem(flash_mod._OPTIONS, "fwd_gluon", True)
    if programs is None:
        monkeypatch.setattr(flash_gluon, "PERSISTENT_MAX_KEYS", 0)
    else:
        monkeypatch.setattr(flash_gluon, "_num_sms", lambda device: programs)
    ran = count_calls(monkeypatch, flash_gluon, "gluon_fwd")
    run_case(2, nq, nk, 3, head_dim, causal, torch.bfloat16)
    assert ran, "the Gluon forward did not run"


@needs_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("programs", [None, 3])
@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("case", ["local", "bigbird_heads", "big_256", "cross", "noncausal_empty"])
def test_block_sparse_forward_matches_float64_reference(case, block_n, programs, head_dim, monkeypatch):
    """The Gluon forward over a block mask's row lists (mask blocks of a multiple of 128 query rows by a
    multiple of 128 keys): the element mask on the blocks past the row's `full` prefix only, per-head
    layouts, 256-key mask blocks (two or four key blocks per entry), partial last blocks, Nq != Nk, and a
    query block that keeps nothing (output 0); programs=3: each persistent program runs many rows in turn.
    Key blocks of 64 (the table's short-row entry, taken for every mask here) and of 128 (entry off)."""
    monkeypatch.setitem(flash_mod._OPTIONS, "fwd_gluon", True)
    if programs is not None:
        monkeypatch.setattr(flash_gluon, "_num_sms", lambda device: programs)
    if block_n == 64:
        monkeypatch.setattr(flash_mod, "_sparse_key_blocks_per_row", lambda mask: 0.0)
    else:
        rows = flash_mod._gluon_rows
        monkeypatch.setattr(flash_mod, "_gluon_rows",
                            lambda i, kind, c: {} if kind == "fwd_gluon_sparse_short" else rows(i, kind, c))
    configs, real = [], flash_gluon.gluon_fwd
    monkeypatch.setattr(flash_gluon, "gluon_fwd", lambda *a, **k: configs.append(a[7][0]) or real(*a, **k))
    causal, nq, nk, heads, mask = sparse_case(case)
    out, _ = run_case(1, nq, nk, heads, head_dim, causal, torch.bfloat16, block_mask=mask)
    assert configs == [block_n], "the Gluon forward did not run with the expected key blocks"
    if case == "noncausal_empty":
        assert torch.equal(out[:, 256:384], torch.zeros_like(out[:, 256:384]))


@needs_hopper
@pytest.mark.parametrize("kernel", ["gluon_fwd", "gluon_bwd"])
def test_block_sparse_choice(kernel, monkeypatch):
    """Automatic choice on block masks (local window of 8 blocks of 128 against 1). Forward: the Gluon
    one at head dims 64 and 128, with 64-key blocks where rows keep fewer than 6 key blocks of 128
    on average (the narrow window), 128 otherwise; the Triton one when the Gluon forward is off.
    Backward: at head dim 64 the Gluon one always, its programs running several key blocks where they
    keep few query blocks (_sparse_group: 8 for the narrow window, 2 for the wide one); at head dim 128
    where its 128-key programs see >= 6 query blocks on average; Triton for deterministic=True."""
    calls, real = [], getattr(flash_gluon, kernel)
    wide = kernels.local_mask(2048, window_blocks=8, block_m=128, block_n=128, causal=True)
    narrow = kernels.local_mask(2048, window_blocks=1, block_m=128, block_n=128, causal=True)
    if kernel == "gluon_fwd":  # gluon_fwd's config (argument 7): (BLOCK_N, STAGES, registers)
        monkeypatch.setattr(flash_gluon, kernel, lambda *a, **k: calls.append(a[7][:2]) or real(*a, **k))
        assert flash_mod._sparse_key_blocks_per_row(wide) >= 6 > flash_mod._sparse_key_blocks_per_row(narrow)
        for head_dim in (64, 128):
            run_case(1, 2048, 2048, 2, head_dim, True, torch.bfloat16, block_mask=wide)
            run_case(1, 2048, 2048, 2, head_dim, True, torch.bfloat16, block_mask=narrow)
        assert calls == [(128, 2), (64, 3)] * 2
        monkeypatch.setitem(flash_mod._OPTIONS, "fwd_gluon", False)
        run_case(1, 2048, 2048, 2, 64, True, torch.bfloat16, block_mask=narrow)
        assert len(calls) == 4
        return
    monkeypatch.setattr(flash_gluon, kernel, lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    per, least = flash_mod._sparse_tiles_per_program, flash_mod._GLUON_SPARSE_MIN_TILES
    assert per(wide) >= least > per(narrow)
    run_case(1, 2048, 2048, 2, 64, True, torch.bfloat16, block_mask=wide)
    run_case(1, 2048, 2048, 2, 64, True, torch.bfloat16, block_mask=narrow)
    assert calls == [2, 8]  # gluon_bwd's last argument: key blocks per program
    run_case(1, 2048, 2048, 2, 64, True, torch.bfloat16, block_mask=wide, deterministic=True)
    run_case(1, 2048, 2048, 2, 128, True, torch.bfloat16, block_mask=narrow)
    assert calls == [2, 8]
    run_case(1, 2048, 2048, 2, 128, True, torch.bfloat16, block_mask=wide)
    assert calls == [2, 8, 1]


@needs_hopper
def test_strided_views_and_fallbacks(monkeypatch):
    ran = count_calls(monkeypatch, flash_gluon, "gluon_fwd")

    run_case(2, 700, 700, 2, 128, True, torch.bfloat16, make=qkv_views(2, 700, 2, 128))
    assert ran
    ran.clear()
    monkeypatch.setitem(flash_mod._OPTIONS, "fwd_gluon", False)
    run_case(1, 300, 300, 2, 128, True, torch.bfloat16)
    assert not ran  # switched off: the Triton forward
    monkeypatch.setitem(flash_mod._OPTIONS, "fwd_gluon", None)
    run_case(1, 1024, 1024, 2, 64, True, torch.bfloat16)
    run_case(1, 300, 300, 2, 128, True, torch.float32)
    assert not ran  # the table keeps D=64 causal below 2048 keys on Triton; fp32 has no Gluon path
    run_case(1, 2048, 2048, 2, 64, True, torch.bfloat16)
    assert ran  # D=64 causal from 2048 keys
    ran.clear()
    run_case(1, 1024, 1024, 2, 64, False, torch.bfloat16)
    assert ran  # D=64 non-causal from 1024


@needs_hopper
def test_short_causal_rows_at_head_dim_128_take_64_key_blocks(monkeypatch):
    """The table's short-row entry: dense causal calls at head dim 128 of at most 1024 keys run the Gluon
    forward with BLOCK_N = 64 (against float64, odd lengths included); longer and non-causal calls, and
    block masks whose rows keep 6 or more key blocks of 128, keep 128."""
    configs = []
    real = flash_gluon.gluon_fwd
    monkeypatch.setattr(flash_gluon, "gluon_fwd",
                        lambda *a, **k: configs.append(a[7][0]) or real(*a, **k))
    run_case(2, 1000, 1000, 3, 128, True, torch.bfloat16)
    run_case(1, 777, 1024, 2, 128, True, torch.bfloat16)
    assert configs == [64, 64]
    configs.clear()
    run_case(1, 1100, 1100, 2, 128, True, torch.bfloat16)
    run_case(1, 1000, 1000, 2, 128, False, torch.bfloat16)
    mask = kernels.local_mask(2048, window_blocks=8, block_m=128, block_n=128, causal=True)
    run_case(1, 2048, 2048, 2, 128, True, torch.bfloat16, block_mask=mask)
    assert configs == [128, 128, 128]
