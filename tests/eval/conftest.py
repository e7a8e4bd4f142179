"""Helpers for the Hugging Face interop and long-document evaluation tests: tiny random
`transformers` GPT-2 folders and a tiny train.py run (CPU, seconds)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import make_corpus, run_inprocess


def hf_tiny(vocab_size: int = 50257, n_positions: int = 64, seed: int = 0, n_layer: int = 2, n_embd: int = 32):
    """A random transformers.GPT2LMHeadModel (eval mode, no dropout), weights perturbed away from
    their init (LayerNorm weights 1 and biases 0 would hide transposition or mapping mistakes)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "wte" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 with GPT-2's vocabulary, saved by transformers (model.safetensors)."""
    d = tmp_path_factory.mktemp("hf_tiny")
    hf_tiny().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def corpus_eval(tmp_path_factory) -> dict:
    return make_corpus(tmp_path_factory.mktemp("corpus_eval"))


@pytest.fixture(scope="session")
def tiny_run(corpus_eval, tmp_path_factory) -> Path:
    """A 4-step train.py run (2 layers, width 64, seq_len 32) with one checkpoint."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    run_inprocess(corpus_eval, run_dir, max_steps=4, eval_every=0, eval_tokens=0, ckpt_every=0, log_every=4)
    return run_dir
