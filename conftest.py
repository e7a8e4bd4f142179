"""Repository-wide pytest setup.

Triton kernels are exercised on the CPU through Triton's interpreter. The interpreter must be
switched on before `triton` is first imported, so it is set here, ahead of every test module.
Set LONGCTX_TEST_GPU=1 to run the same tests on a CUDA GPU with compiled kernels instead.
"""
import os

if os.environ.get("LONGCTX_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
