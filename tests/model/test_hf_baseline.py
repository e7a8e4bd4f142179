"""model.backend=hf_eager|hf_sdpa: the Hugging Face GPT-2 adapter behind the trainer (CPU, tiny sizes).

References: transformers' own `labels=` loss path (it shifts the labels itself), our GPT of the same
sizes (parameter count, FLOPs), and the unwrapped model (activation checkpointing through .blocks)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("transformers")

from longctx.model import build_model
from longctx.model.hf_baseline import HFGPT
from longctx.trainer.distributed import DistInfo
from longctx.trainer.parallelize import parallelize

ROOT = Path(__file__).resolve().parents[2]


def cfg(backend: str, impl: str = "sdpa", seq_len: int = 32, **model):
    m = OmegaConf.load(ROOT / "configs/model/gpt2_tiny.yaml")
    m.update({"n_layer": 2, "n_head": 2, "n_embd": 32, "backend": backend, **model})
    return OmegaConf.create({"model": m, "attention": {"impl": impl}, "seq_len": seq_len,
                             "parallel": {"name": "single", "activation_checkpointing": "none"}})


def batch(seed=0, b=2, n=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50257, (b, n + 1), generator=g)
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("backend", ["hf_eager", "hf_sdpa"])
def test_loss_matches_transformers_labels_path_and_sizes_match_ours(backend):
    torch.manual_seed(0)
    m = build_model(cfg(backend))
    assert isinstance(m, HFGPT)
    x, y = batch()
    logits, loss = m(x, y)
    assert logits.shape == (2, 32, 50304)  # vocabulary padded like ours
    # transformers shifts `labels` itself: labels=x scores x[:, 1:], i.e. y without its last column
    y_cut = y.clone()
    y_cut[:, -1] = -1  # ignored
    ref = m.hf(input_ids=x, labels=x).loss
    assert m(x, y_cut)[1].item() == pytest.approx(ref.item(), rel=1e-5)
    assert loss.item() != pytest.approx(ref.item(), rel=1e-5)  # the last column does count
    ours = build_model(cfg("ours"))
    assert m.num_params() == ours.num_params()
    assert m.num_params(non_embedding=True) == ours.num_params(non_embedding=True)
    assert m.flops_per_token(32) == ours.flops_per_token(32)
    # optimizer groups: every parameter once; the decayed tensors are the same sizes as ours
    groups, ref_groups = m.optim_groups(0.1), ours.optim_groups(0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in ref_groups[0]["params"])


def test_eager_and_sdpa_agree_and_checkpointing_acts_through_blocks():
    torch.manual_seed(0)
    eager = build_model(cfg("hf_eager"))
    sdpa = build_model(cfg("hf_sdpa"))
    sdpa.load_state_dict(eager.state_dict())
    x, y = batch(1)
    l1, l2 = eager(x, y)[1], sdpa(x, y)[1]
    assert l1.item() == pytest.approx(l2.item(), rel=1e-5)
    l1.backward()
    ref_grads = [p.grad.clone() for p in eager.parameters()]
    c = cfg("hf_eager")
    c.parallel.activation_checkpointing = "full"
    wrapped = parallelize(sdpa, c, DistInfo())
    assert all(type(b).__name__ == "CheckpointWrapper" for b in wrapped.hf.transformer.h)
    l3 = wrapped(x, y)[1]
    assert l3.item() == pytest.approx(l1.item(), rel=1e-5)
    l3.backward()
    for g, p in zip(ref_grads, wrapped.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw, msg", [
    ({"backend": "hf_flash"}, "model.backend='hf_flash': use ours, hf_eager or hf_sdpa"),
    ({"backend": "hf_sdpa", "bias": False}, "needs model.bias=true"),
    ({"backend": "hf_sdpa", "impl": "block_sparse"}, "attention=block_sparse needs model.backend=ours"),
])
def test_bad_backend_settings_are_one_line(kw, msg):
    impl = kw.pop("impl", "sdpa")
    with pytest.raises(ValueError) as e:
        build_model(cfg(impl=impl, **kw))
    assert msg in str(e.value) and "\n" not in str(e.value)
