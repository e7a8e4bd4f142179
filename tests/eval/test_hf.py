"""Hugging Face GPT-2 in and out: logits equal transformers' (fp32, <= 1e-4), position extension,
export of a training checkpoint, train.py init_from, and the one-line errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from longctx.model import GPT
from longctx.model.hf import PretrainedError, extend_positions

from .conftest import hf_tiny

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4


def _logits_ours(model: GPT, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)[0][..., :model.config.vocab_size]


def _logits_hf(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).logits


def test_from_pretrained_round_trip(hf_dir, tmp_path):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    ours = GPT.from_pretrained(hf_dir, attn_impl="sdpa")
    assert (ours.config.n_layer, ours.config.n_embd, ours.config.seq_len) == (2, 32, 64)
    x = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    ref = _logits_hf(hf, x)
    assert (_logits_ours(ours, x) - ref).abs().max() <= TOL
    # padding rows (50257 -> 50304) hold the mean embedding: their logit is the mean real logit
    full = ours(x)[0]
    assert full.shape[-1] == 50304
    assert torch.allclose(full[..., 50257:], ref.mean(dim=-1, keepdim=True).expand(-1, -1, 47), atol=1e-4)

    ours.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    assert back.config.n_positions == 64 and back.config.vocab_size == 50257
    assert (_logits_hf(back, x) - ref).abs().max() <= TOL


def test_pytorch_model_bin_with_legacy_keys(tmp_path):
    """The hub's gpt2 weights are GPT2Model keys (no `transformer.` prefix) with causal-mask buffers."""
    hf = hf_tiny(vocab_size=300, n_positions=40, seed=3)
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(40, 40)).view(1, 1, 40, 40)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")
    ours = GPT.from_pretrained(tmp_path, attn_impl="sdpa")
    x = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(2))
    assert (_logits_ours(ours, x) - _logits_hf(hf, x)).abs().max() <= TOL


def test_extension_tile_keeps_short_inputs(hf_dir):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    ours = GPT.from_pretrained(hf_dir, seq_len=200, attn_impl="sdpa")
    old = hf.transformer.wpe.weight.detach()
    wpe = ours.wpe.weight.detach()
    assert wpe.shape == (200, 32)
    assert torch.equal(wpe[:64], old) and torch.equal(wpe[64:128], old) and torch.equal(wpe[192:200], old[:8])
    x = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(3))
    assert (_logits_ours(ours, x) - _logits_hf(hf, x)).abs().max() <= TOL  # positions < 64 unchanged
    long = torch.randint(0, 50257, (1, 200))
    assert torch.isfinite(_logits_ours(ours, long)).all()


def test_extension_interpolate_is_linear():
    old = torch.randn(5, 3, dtype=torch.float64)
    new = extend_positions(old, 9, "interpolate")  # new row i sits at old position i * 4 / 8 = i / 2
    assert torch.allclose(new[0::2], old)  # even rows land on old rows
    assert torch.allclose(new[1::2], (old[:-1] + old[1:]) / 2)  # odd rows halfway between
    assert torch.equal(extend_positions(old, 3, "tile"), old[:3])  # shorter: the first rows
    with pytest.raises(PretrainedError, match="use one of tile, interpolate"):
        extend_positions(old, 9, "rope")


def test_interpolated_model_saves_and_loads_extended(hf_dir, tmp_path):
    ours = GPT.from_pretrained(hf_dir, seq_len=96, extend="interpolate", attn_impl="sdpa")
    ours.save_pretrained(tmp_path / "ext")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ext")
    assert back.config.n_positions == 96
    x = torch.randint(0, 50257, (1, 96), generator=torch.Generator().manual_seed(4))
    assert (_logits_ours(ours, x) - _logits_hf(back, x)).abs().max() <= TOL


def test_bad_sources_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedError) as e:
        GPT.from_pretrained("gpt2-medium")
    msg = str(e.value)
    assert "could not be downloaded from the Hugging Face Hub" in msg and "hf download gpt2-medium" in msg
    assert "\n" not in msg
    with pytest.raises(PretrainedError, match="no such checkpoint directory"):
        GPT.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match="no config.json"):
        GPT.from_pretrained(tmp_path / "empty")


def _load_export_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_hf", ROOT / "scripts" / "export_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_hf_of_a_training_checkpoint(tiny_run, tmp_path, capsys):
    from longctx.model import build_model
    from longctx.trainer.checkpoint import latest_checkpoint, load_model_only
    from omegaconf import OmegaConf

    export_hf = _load_export_script()
    out = tmp_path / "exported"
    assert export_hf.main([str(tiny_run), str(out)]) == 0  # what `python scripts/export_hf.py RUN OUT` runs
    ckpt = latest_checkpoint(tiny_run / "checkpoints")
    cfg = OmegaConf.load(ckpt / "config.yaml")
    cfg.attention.impl = "sdpa"
    ref = build_model(cfg)
    load_model_only(ckpt, ref)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert hf.config.n_positions == 32 and hf.config.n_layer == 2
    x = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(5))
    assert (_logits_hf(hf, x) - _logits_ours(ref, x)).abs().max() <= TOL
    capsys.readouterr()
    assert export_hf.main([str(tmp_path / "no_run"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "does not exist" in err
    assert not (tmp_path / "o2").exists()


def test_train_init_from_hf_dir_and_run_dir(corpus_eval, hf_dir, tiny_run, tmp_path, monkeypatch):
    """init_from=<HF folder> at seq_len 96 > 64 positions: step 1's loss is the loss of the
    extended pretrained model; init_from=<our run dir> starts at that run's weights."""
    import longctx.trainer.parallelize as par
    from tests.trainer.conftest import read_rows, run_inprocess

    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    seen = {}
    real = par.parallelize

    def capture(model, cfg, dist):
        seen["wpe"] = model.wpe.weight.detach().clone()
        seen["h0"] = model.blocks[0].attn.c_attn.weight.detach().clone()
        return real(model, cfg, dist)

    monkeypatch.setattr(par, "parallelize", capture)  # (train.py imports it when the run is set up)
    sizes = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32}
    run_inprocess(corpus_eval, tmp_path / "a", init_from=str(hf_dir), seq_len=96, max_steps=1, eval_tokens=0,
                  ckpt_every=0, **sizes, **{"train.global_batch_tokens": 384})
    old = hf.transformer.wpe.weight.detach()
    assert torch.equal(seen["wpe"][:64], old) and torch.equal(seen["wpe"][64:], old[:32])
    assert torch.equal(seen["h0"], hf.transformer.h[0].attn.c_attn.weight.detach().t())
    assert "hf:" in (tmp_path / "a" / "config.yaml").read_text()

    from longctx.trainer.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(tiny_run / "checkpoints")
    from longctx.model import build_model
    from longctx.trainer.checkpoint import load_model_only
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ckpt / "config.yaml")
    cfg.attention.impl = "sdpa"
    ref = build_model(cfg)
    load_model_only(ckpt, ref)
    run_inprocess(corpus_eval, tmp_path / "b", init_from=str(tiny_run), max_steps=1, eval_tokens=0, ckpt_every=0)
    assert torch.equal(seen["h0"], ref.blocks[0].attn.c_attn.weight.detach())
    assert len(read_rows(tmp_path / "b")) == 1


def test_train_init_from_conflicting_model_one_line(hf_dir, tmp_path):
    """`python train.py init_from=<2-layer GPT-2> model=gpt2_small`: the model= given on the command line
    conflicts (read from Hydra's overrides, as in a CLI run); nothing is written."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from longctx.trainer import ConfigError
    from omegaconf import open_dict

    from longctx import train as train_mod

    overrides = [f"init_from={hf_dir}", "model=gpt2_small", f"run_dir={tmp_path / 'r'}", "logger=none", "device=cpu"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # what @hydra.main does before calling train.main
    with open_dict(cfg):  # and the job's own config has no `hydra` node
        del cfg["hydra"]
    try:
        with pytest.raises(ConfigError) as e:
            train_mod.train(cfg, run_dir=tmp_path / "r")
    finally:
        HydraConfig.instance().cfg = None
    msg = str(e.value)
    assert "n_layer=12 vs 2" in msg and "leave model= out" in msg and "\n" not in msg
    assert not (tmp_path / "r").exists()


def test_init_from_one_line_errors(hf_dir, tmp_path, monkeypatch):
    from longctx.trainer import ConfigError
    from longctx.trainer.init import apply_init_from

    from tests.trainer.conftest import compose_cfg

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_cfg(["model=gpt2_tiny", f"init_from={hf_dir}"])
    assert apply_init_from(cfg, explicit=set()).seq_len == 64  # no explicit sizes: taken from the checkpoint
    assert (cfg.model.n_layer, cfg.model.n_embd) == (2, 32)
    for overrides, explicit, expect in [
        ([f"init_from={hf_dir}", "model.n_embd=64"], {"n_embd"}, "n_embd=64 vs 32"),
        (["init_from=gpt2"], set(), "could not be downloaded from the Hugging Face Hub"),
        ([f"init_from={tmp_path / 'nowhere'}"], set(), "no such checkpoint directory"),
        ([f"init_from={tmp_path}"], set(), "no complete checkpoint"),
        ([f"init_from={hf_dir}", "init_positions=rope"], set(), "init_positions='rope'"),
    ]:
        with pytest.raises(ConfigError) as e:
            apply_init_from(compose_cfg(["model=gpt2_tiny", *overrides]), explicit=explicit)
        assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
