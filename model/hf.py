"""Hugging Face GPT-2 checkpoints in and out, without `transformers` at run time.

    model = GPT.from_pretrained("gpt2")                        # hub id (needs the network once)
    model = GPT.from_pretrained("path/to/gpt2", seq_len=4096)  # local dir, positions extended
    model.save_pretrained("out/gpt2-4k")                       # transformers.GPT2LMHeadModel loads it

A checkpoint directory holds `config.json` (GPT-2 sizes) and `model.safetensors` (read with the
`safetensors` package), `model.safetensors.index.json` + shards, or `pytorch_model.bin` (read with
`torch.load(weights_only=True)`). A hub id is fetched with `huggingface_hub.snapshot_download`
(config and weights only; a copy already in the Hugging Face cache is used offline).

Weight layout. Hugging Face GPT-2 stores its projections as `Conv1D` with weight (in, out) and
computes x @ W; ours are `nn.Linear` with weight (out, in) and compute x @ W.T, so c_attn, c_proj,
c_fc and mlp.c_proj are transposed on the way in and out. The fused c_attn columns are [q | k | v],
heads contiguous inside each, the same order our attention views them in. Biases, LayerNorms
(eps 1e-5, as nn.LayerNorm's default) and the embeddings are copied as they are; HF's causal-mask
buffers (`attn.bias`, `attn.masked_bias`) are not weights and are skipped. lm_head is tied to wte
on both sides.

Padded vocabulary. Our wte has padded_vocab_size rows (50257 -> 50304). Loading copies the
checkpoint's rows and fills each padding row with the MEAN of the real rows. Since lm_head is tied,
a padding logit is then the mean of the real logits at that position, and by Jensen's inequality
exp(mean) <= mean(exp), so all 47 padding ids together take at most 47/50257 < 0.1% of the
probability mass: the cross-entropy of a loaded model exceeds the checkpoint's by less than
log(1 + 47/50257) = 0.00094 nats before any training (zero rows would give logit 0, far above
GPT-2's typical logits of about -100, and wreck the loss). Logits over the real vocabulary are
exactly the checkpoint's. Padding ids are never inputs. save_pretrained drops the padding rows.

Positions. `seq_len` longer than the checkpoint's n_positions extends the learned table wpe:
  tile (default)  row i = old row (i mod n_old): the pretrained table copied over and over, as
                  RoBERTa/Longformer-style copying does. Rows below n_old are unchanged, so logits
                  on inputs of at most n_old tokens equal the checkpoint's exactly.
  interpolate     the whole table resampled linearly onto the new length (new row i sits at old
                  position i * (n_old - 1) / (n_new - 1)), like position interpolation: every
                  position keeps a smooth neighbourhood, but rows below n_old change too, so
                  short inputs no longer give the checkpoint's logits.
A shorter seq_len keeps the first seq_len rows (positions below it unchanged).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

EXTEND_MODES = ("tile", "interpolate")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all compute GELU's tanh approximation
_HUB_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class PretrainedError(ValueError):
    """A checkpoint that cannot be found, read or mapped onto our GPT; the message is one line."""


# ---- locating and reading a checkpoint ------------------------------------------------------------

def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else with a slash, or starting with . / ~, is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def resolve_checkpoint_dir(name_or_dir: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """A local directory with config.json + weights, downloading a hub id if needed.

    Raises PretrainedError (one line) for a missing directory, a directory without the files, or a
    hub id that cannot be downloaded (offline machines).
    """
    name = str(name_or_dir)
    p = Path(name).expanduser()
    if p.is_dir():
        _check_dir(p)
        return p
    if p.exists() or _looks_like_path(name):
        raise PretrainedError(f"{name}: no such checkpoint directory (expected a folder with config.json and "
                              f"model.safetensors or pytorch_model.bin, or a hub id such as {', '.join(_HUB_SIZES)})")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=name, cache_dir=cache_dir,
                                  allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json",
                                                  "pytorch_model.bin"])
    except Exception as e:  # noqa: BLE001  (offline, unknown repo, no huggingface_hub: all the same answer)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
        raise PretrainedError(
            f"{name} is not a local directory and could not be downloaded from the Hugging Face Hub "
            f"(offline? {reason}): download it elsewhere with "
            f"`hf download {name} config.json model.safetensors --local-dir ./{Path(name).name}` and pass the "
            f"local directory") from None
    local = Path(local)
    _check_dir(local)
    return local


def _check_dir(d: Path) -> None:
    if not (d / "config.json").is_file():
        raise PretrainedError(f"{d}: no config.json (a Hugging Face GPT-2 checkpoint folder has config.json and "
                              f"model.safetensors or pytorch_model.bin)")
    if not any((d / f).is_file() for f in _WEIGHT_FILES):
        raise PretrainedError(f"{d}: no weights ({' / '.join(_WEIGHT_FILES)}) next to config.json")


def read_hf_config(d: Path) -> dict:
    try:
        cfg = json.loads((Path(d) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{d}/config.json: unreadable ({e})") from None
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise PretrainedError(f"{d}: model_type={cfg.get('model_type')!r}; only GPT-2 checkpoints (model_type gpt2) load")
    unsupported = []
    if cfg.get("activation_function", "gelu_new") not in _TANH_GELU:
        unsupported.append(f"activation_function={cfg['activation_function']}")
    if cfg.get("n_inner") not in (None, 4 * cfg.get("n_embd", 768)):
        unsupported.append(f"n_inner={cfg['n_inner']}")
    if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("non-standard attention scaling")
    if cfg.get("add_cross_attention", False):
        unsupported.append("cross-attention")
    if abs(float(cfg.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        unsupported.append(f"layer_norm_epsilon={cfg['layer_norm_epsilon']}")
    if unsupported:
        raise PretrainedError(f"{d}: {', '.join(unsupported)} is not supported by our GPT (GPT-2 uses tanh GELU, "
                              f"a 4x MLP, 1/sqrt(head_dim) scaling, LayerNorm eps 1e-5)")
    return cfg


def read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors on the CPU, keys without the `transformer.` prefix."""
    d = Path(d)
    if (d / "model.safetensors").is_file():
        sd = _load_safetensors([d / "model.safetensors"])
    elif (d / "model.safetensors.index.json").is_file():
        index = json.loads((d / "model.safetensors.index.json").read_text())
        sd = _load_safetensors([d / f for f in sorted(set(index["weight_map"].values()))])
    else:
        sd = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {k.removeprefix("transformer."): v for k, v in sd.items()}


def _load_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise PretrainedError("reading model.safetensors needs the `safetensors` package: pip install safetensors") from None
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f), device="cpu"))
    return sd


# ---- positions --------------------------------------------------------------------------------

def extend_positions(wpe: torch.Tensor, n_new: int, mode: str = "tile") -> torch.Tensor:
    """The position table (n_old, C) resized to (n_new, C); see the module docstring for the modes."""
    if mode not in EXTEND_MODES:
        raise PretrainedError(f"position extension {mode!r}: use one of {', '.join(EXTEND_MODES)}")
    n_old = wpe.shape[0]
    if n_new <= n_old:
        return wpe[:n_new].clone()
    if mode == "tile":
        return wpe[torch.arange(n_new) % n_old].clone()
    # linear interpolation at fractional old positions t_i = i * (n_old - 1) / (n_new - 1), in fp64
    t = torch.arange(n_new, dtype=torch.float64) * (n_old - 1) / (n_new - 1)
    lo = t.floor().long().clamp(max=n_old - 1)
    hi = (lo + 1).clamp(max=n_old - 1)
    w = (t - lo).unsqueeze(1)
    old = wpe.double()
    return (old[lo] * (1 - w) + old[hi] * w).to(wpe.dtype)


# ---- HF <-> ours ------------------------------------------------------------------------------

def gpt_config_from_hf(hf_cfg: dict, seq_len: int | None = None, **overrides):
    """Our GPTConfig for a Hugging Face GPT-2 config (sizes from it; seq_len defaults to n_positions)."""
    from .gpt import GPTConfig

    return GPTConfig(seq_len=int(seq_len or hf_cfg.get("n_positions", 1024)),
                     vocab_size=int(hf_cfg.get("vocab_size", 50257)), n_layer=int(hf_cfg["n_layer"]),
                     n_head=int(hf_cfg["n_head"]), n_embd=int(hf_cfg["n_embd"]), bias=True, **overrides)


def load_hf_into(model, sd: dict[str, torch.Tensor], extend: str = "tile", source: str = "checkpoint") -> None:
    """Copy Hugging Face GPT-2 tensors `sd` (prefix-free keys) into our GPT `model` in place."""
    c = model.config
    V = c.vocab_size
    expected = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    for i in range(c.n_layer):
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.weight",
                     "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_fc.weight",
                     "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"):
            expected.add(f"h.{i}.{name}")
    missing = sorted(expected - set(sd))
    if missing:
        raise PretrainedError(f"{source}: {len(missing)} GPT-2 weights missing (first: {missing[0]}); "
                              f"is it a GPT-2 checkpoint of n_layer={c.n_layer}?")
    if sd["wte.weight"].shape != (V, c.n_embd):
        raise PretrainedError(f"{source}: wte is {tuple(sd['wte.weight'].shape)}, config says ({V}, {c.n_embd})")
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["wte.weight"]):
        raise PretrainedError(f"{source}: lm_head is not tied to wte; our GPT ties them")
    ours = dict(model.named_parameters())
    with torch.no_grad():
        wte = sd["wte.weight"].to(torch.float32)
        ours["wte.weight"][:V].copy_(wte)
        ours["wte.weight"][V:].copy_(wte.mean(dim=0, keepdim=True).expand(ours["wte.weight"].shape[0] - V, -1))
        ours["wpe.weight"].copy_(extend_positions(sd["wpe.weight"].to(torch.float32), c.seq_len, extend))
        for key in expected - {"wte.weight", "wpe.weight"}:
            mine = "blocks." + key[2:] if key.startswith("h.") else key
            t = sd[key].to(torch.float32)
            if key.endswith(_CONV1D):
                t = t.t()
            if ours[mine].shape != t.shape:
                raise PretrainedError(f"{source}: {key} has shape {tuple(sd[key].shape)}, expected "
                                      f"{tuple(ours[mine].shape)} (transposed for Conv1D weights)")
            ours[mine].copy_(t)


def to_hf(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, GPT2LMHeadModel state dict) of our GPT; padding rows dropped, fp32, CPU."""
    c = model.config
    if not c.bias:
        raise PretrainedError("save_pretrained: a model with bias=False has no Hugging Face GPT-2 equivalent")
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": sd["wte.weight"][:c.vocab_size].contiguous(),
           "transformer.wpe.weight": sd["wpe.weight"].contiguous()}
    for k, v in sd.items():
        if k.startswith("blocks."):
            hf_key = "transformer.h." + k[len("blocks."):]
            out[hf_key] = (v.t() if k.endswith(_CONV1D) else v).contiguous()
        elif k.startswith("ln_f."):
            out["transformer." + k] = v.contiguous()
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "vocab_size": c.vocab_size, "n_positions": c.seq_len, "n_ctx": c.seq_len, "n_embd": c.n_embd,
        "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None, "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256, "use_cache": True,
        "dtype": "float32",
    }
    return config, out


# ---- the two public entry points (GPT.from_pretrained / GPT.save_pretrained call these) ---------

def from_pretrained(cls, name_or_dir, seq_len: int | None = None, extend: str = "tile",
                    attn_impl: str = "flash", dropout: float = 0.0, cache_dir: str | None = None):
    """A `cls` (GPT) with the weights of a Hugging Face GPT-2 checkpoint; see the module docstring."""
    if extend not in EXTEND_MODES:
        raise PretrainedError(f"extend={extend!r}: use one of {', '.join(EXTEND_MODES)}")
    d = resolve_checkpoint_dir(name_or_dir, cache_dir)
    hf_cfg = read_hf_config(d)
    model = cls(gpt_config_from_hf(hf_cfg, seq_len, attn_impl=attn_impl, dropout=dropout))
    load_hf_into(model, read_hf_weights(d), extend=extend, source=str(name_or_dir))
    return model


def save_pretrained(model, out_dir) -> Path:
    """Write config.json + model.safetensors for transformers.GPT2LMHeadModel into out_dir (created
    if needed; other files in it are left alone). Each file is written under a temporary name and
    renamed into place, so a crash never leaves a half-written file; the weights go first, so an
    existing folder never pairs a new config with weights it does not describe for longer than one rename."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    config, sd = to_hf(model)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".model.safetensors.tmp-{os.getpid()}"
    try:
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    tmp = out / f".config.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    return out
