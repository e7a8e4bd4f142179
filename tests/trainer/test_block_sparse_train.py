"""attention=block_sparse through train.py: on the Triton kernel (here through the interpreter, as on a
GPU) and on the CPU fallback (kernels.reference_attention with the same block mask) the run is the
same, including a sequence length that is not a multiple of the block size (a partial last block)."""
from __future__ import annotations

import pytest

from .conftest import read_rows, run_inprocess

KW = {"attention": "block_sparse", "attention.layout": "bigbird", "attention.block_size": 16,
      "attention.window_blocks": 0, "attention.random_blocks": 1, "attention.global_blocks": 1,
      "seq_len": 56, "max_steps": 1, "train.global_batch_tokens": 56, "train.micro_batch": 1,
      "eval_tokens": 56, "eval_every": 0, "ckpt_every": 0, "model.n_layer": 1}  # (the interpreter is slow)


def test_kernel_path_equals_cpu_fallback(corpus, tmp_path, monkeypatch, caplog):
    import longctx.model.attention as attn
    from longctx.kernels import build_block_mask_from_config

    from .conftest import base_overrides, compose_cfg

    cfg = compose_cfg(base_overrides(corpus, tmp_path, **KW))
    mask = build_block_mask_from_config(cfg.attention, cfg.seq_len, cfg.model.n_head)
    assert mask.n_blocks_m == 4 and mask.causal_density < 1  # 16 + 16 + 16 + 8: sparse, last block partial

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run_inprocess(corpus, tmp_path / "kernel", **KW)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(attn, "_fallback_logged", set())
    with caplog.at_level("WARNING"):
        run_inprocess(corpus, tmp_path / "fallback", **KW)
    assert "using the reference attention with the same block mask" in caplog.text  # the CPU path says so
    k, f = read_rows(tmp_path / "kernel"), read_rows(tmp_path / "fallback")
    assert [r["step"] for r in k] == [r["step"] for r in f] == [1]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in k] == pytest.approx([r[key] for r in f], rel=1e-4), key
    assert k[-1]["val_loss"] == pytest.approx(f[-1]["val_loss"], rel=1e-4)
