"""`init_from=`: start a model from pretrained weights instead of a random initialisation.

    python train.py init_from=gpt2 seq_len=4096                 # Hugging Face hub id (network once)
    python train.py init_from=/models/gpt2-medium ...           # local HF folder (config.json + weights)
    python train.py init_from=outputs/run1 ...                  # one of our run dirs / checkpoint folders

`resolve_init(init_from)` finds the weights and their model sizes (one-line ConfigError when it
cannot: missing folder, offline hub, unreadable checkpoint). `apply_init_from(cfg)` then writes
those sizes into cfg.model, so everything downstream (the meta-device check, checkpoint metadata,
FLOP counts, logs) sees the real model; sizes given explicitly on the command line (`model=...` or
`model.n_layer=...`) that differ from the checkpoint's are a ConfigError. Outside a Hydra CLI run
(a config composed in code) every size in cfg.model counts as explicit, so it must match.
`InitSource.load_into(model, positions)` copies the weights into a freshly built GPT, extending or
cutting the position table to the model's seq_len (model/hf.py: tile | interpolate).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from longctx.trainer import ConfigError

log = logging.getLogger(__name__)

SIZE_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias")  # what a checkpoint fixes


@dataclass
class InitSource:
    kind: str            # "hf" (Hugging Face GPT-2 folder) or "run" (our DCP checkpoint)
    path: Path           # the HF folder, or the checkpoint folder step_XXXXXXX
    name: str            # what the user passed (for messages)
    model: dict          # sizes: n_layer, n_head, n_embd, vocab_size, pad_vocab_multiple, bias
    seq_len: int         # positions the checkpoint was trained with

    def load_into(self, model, positions: str = "tile") -> None:
        """Copy the weights into `model` (a plain GPT of these sizes, any seq_len) in place."""
        from longctx.model.hf import PretrainedError, extend_positions, load_hf_into, read_hf_weights

        try:
            if self.kind == "hf":
                load_hf_into(model, read_hf_weights(self.path), extend=positions, source=self.name)
                return
            from longctx.model import GPT, GPTConfig
            from longctx.trainer.checkpoint import load_model_only

            c = model.config
            src = GPT(GPTConfig(seq_len=self.seq_len, vocab_size=c.vocab_size, pad_vocab_multiple=c.pad_vocab_multiple,
                                n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, bias=c.bias, attn_impl="sdpa"))
            load_model_only(self.path, src)
            sd = src.state_dict()
            sd["wpe.weight"] = extend_positions(sd["wpe.weight"], c.seq_len, positions)
            model.load_state_dict(sd, strict=True)
        except PretrainedError as e:
            raise ConfigError(str(e)) from None


def resolve_init(init_from) -> InitSource | None:
    """init_from (None | hub id | HF folder | run dir | checkpoint folder) -> InitSource."""
    if init_from is None or str(init_from).strip().lower() in ("", "none", "null"):
        return None
    from longctx.model.hf import PretrainedError, read_hf_config, resolve_checkpoint_dir

    name = str(init_from)
    p = Path(name).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():  # not an HF folder: one of our run dirs?
        from longctx.trainer.checkpoint import read_meta, resolve_resume

        ckpt = resolve_resume(str(p), p)  # ConfigError (one line) when it holds no complete checkpoint
        meta = read_meta(ckpt)
        m = dict(meta.get("model") or {})
        missing = [k for k in ("n_layer", "n_head", "n_embd") if k not in m]
        if missing or "seq_len" not in meta:
            raise ConfigError(f"init_from={name}: {ckpt}/meta.json has no model sizes / seq_len; is it a train.py checkpoint?")
        m.setdefault("vocab_size", 50257)
        m.setdefault("pad_vocab_multiple", 64)
        m.setdefault("bias", True)
        m.setdefault("name", p.name)
        return InitSource("run", ckpt, name, m, int(meta["seq_len"]))
    try:
        d = resolve_checkpoint_dir(name)
        hf = read_hf_config(d)
    except PretrainedError as e:
        raise ConfigError(f"init_from={name}: {e}") from None
    sizes = {"name": f"hf:{Path(name).name}", "n_layer": int(hf["n_layer"]), "n_head": int(hf["n_head"]), "n_embd": int(hf["n_embd"]),
             "vocab_size": int(hf.get("vocab_size", 50257)), "pad_vocab_multiple": 64, "bias": True}
    return InitSource("hf", d, name, sizes, int(hf.get("n_positions", 1024)))


def explicit_model_keys() -> set[str] | None:
    """Model keys given on the command line of the running Hydra app (None outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError, AttributeError):
        return None
    keys: set[str] = set()
    for o in overrides:
        k = o.split("=", 1)[0].lstrip("+~")
        if k == "model":
            keys.update(SIZE_KEYS)
        elif k.startswith("model."):
            keys.add(k[len("model."):])
    return keys


def apply_init_from(cfg, explicit: set[str] | None = None) -> InitSource | None:
    """Resolve cfg.init_from and put its sizes into cfg.model (in place; a typed Config or a
    DictConfig); None without init_from."""
    import contextlib

    from omegaconf import OmegaConf, open_dict

    source = resolve_init(getattr(cfg, "init_from", None))
    if source is None:
        return None
    positions_mode(cfg)
    model = cfg.model
    if str(getattr(model, "backend", "ours")) != "ours":
        raise ConfigError(f"init_from loads weights into our GPT; model.backend={model.backend} is the "
                          f"Hugging Face baseline: use model.backend=ours (or leave init_from out)")
    explicit = explicit_model_keys() if explicit is None else explicit
    keys = SIZE_KEYS if explicit is None else [k for k in SIZE_KEYS if k in explicit]
    diff = [(k, getattr(model, k), source.model.get(k)) for k in keys if getattr(model, k, None) is not None
            and getattr(model, k) != source.model.get(k)]
    if diff:
        what = ", ".join(f"{k}={a} vs {b}" for k, a, b in diff)
        raise ConfigError(f"init_from={source.name} is a model with "
                          f"{', '.join(f'{k}={source.model[k]}' for k in ('n_layer', 'n_head', 'n_embd'))} but "
                          f"model={getattr(model, 'name', '?')} asks for other sizes ({what} in the checkpoint); "
                          f"leave model= out (sizes come from init_from) or pick a matching checkpoint")
    with open_dict(cfg) if OmegaConf.is_config(cfg) else contextlib.nullcontext():
        for k, v in source.model.items():
            if k in SIZE_KEYS or k in ("pad_vocab_multiple", "name"):
                setattr(model, k, v)
    return source


def positions_mode(cfg) -> str:
    mode = str(getattr(cfg, "init_positions", None) or "tile")
    from longctx.model.hf import EXTEND_MODES

    if mode not in EXTEND_MODES:
        raise ConfigError(f"init_positions={mode!r}: use one of {', '.join(EXTEND_MODES)}")
    return mode


@torch.no_grad()
def load_init(model, source: InitSource | None, cfg) -> None:
    """Copy init_from's weights into the freshly built `model` (no-op without init_from)."""
    if source is None:
        return
    mode = positions_mode(cfg)
    source.load_into(model, mode)
    n = model.config.seq_len
    how = "" if n <= source.seq_len else f", positions {source.seq_len} -> {n} ({mode})"
    log.info(f"init_from {source.name}: weights of {source.path}{how}")
