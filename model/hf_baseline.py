"""Hugging Face GPT-2 as a training baseline behind the same trainer: `model.backend=hf_eager|hf_sdpa`.

    python train.py model=gpt2_small model.backend=hf_sdpa seq_len=1024 ...

`HFGPT` wraps a randomly initialised `transformers.GPT2LMHeadModel` and exposes exactly what
train.py, trainer/parallelize.py and trainer/optim.py use from our GPT, so both models run the same
loop, data, optimizer, precision, checkpoints and metrics:

  forward(idx, targets) -> (logits, loss)   loss: mean cross-entropy over targets != -1, computed
                                            from fp32-upcast logits as model/gpt.py does (targets are
                                            already shifted, so Hugging Face's own `labels=` shift is
                                            not used)
  blocks                                    the GPT2Block ModuleList (activation checkpointing,
                                            torch.compile and FSDP2 wrap its entries in place)
  num_params(non_embedding), optim_groups(weight_decay)   same rules as our GPT
  flops_per_token(seq_len)                  OUR formula for the same sizes (model/gpt.py), so MFU
                                            compares speed at equal work

Same work as ours: the same sizes, GPT-2's init (N(0, 0.02), residual projections scaled by
1/sqrt(2 n_layer)), tied embeddings, biases, GELU-tanh, and the vocabulary padded to
`pad_vocab_multiple` (50257 -> 50304) exactly like ours, so both models have the same parameter
count and matmul shapes. Attention is Hugging Face's: `eager` (materialised scores, the
"Hugging Face" column of the paper's Table 2) or `sdpa` (torch's fused kernels); `attention=`
is not used (block-sparse layouts need model.backend=ours). transformers is an optional extra:
`pip install transformers` (or `pip install -e ".[dev]"`).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
BACKENDS = {"hf_eager": "eager", "hf_sdpa": "sdpa"}  # model.backend -> transformers attn_implementation


class HFGPT(nn.Module):
    def __init__(self, hf_model: nn.Module, flops_ref: nn.Module, backend: str):
        super().__init__()
        self.hf = hf_model
        self.backend = backend
        self._flops_ref = [flops_ref]  # a list: a meta-device GPT kept out of the module tree

    @property
    def blocks(self) -> nn.ModuleList:
        return self.hf.transformer.h  # the same object: entries replaced by parallelize act in the model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.hf(input_ids=idx, use_cache=False).logits
        loss = None
        if targets is not None:
            upcast = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(upcast.view(-1, upcast.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _embeddings(self) -> list[nn.Parameter]:
        t = self.hf.transformer
        return [t.wte.weight, t.wpe.weight]

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied wte/lm_head matrix counted once (as our GPT.num_params)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self._embeddings())
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        return self._flops_ref[0].flops_per_token(seq_len)

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """Decay on 2-D weights (Conv1D / Linear); none on biases, norms and embeddings (as ours)."""
        from .gpt import decay_groups

        return decay_groups(self, self._embeddings(), weight_decay)


def build_hf_model(cfg) -> HFGPT:
    """HFGPT from the composed config: cfg.model (sizes, backend), cfg.seq_len. ValueError on bad input."""
    from longctx.trainer.config import as_config

    from .gpt import GPT, gpt_config

    cfg = as_config(cfg)
    backend = cfg.model.backend  # ours | hf_eager | hf_sdpa: checked by the schema (trainer/config.py)
    if not cfg.model.bias:
        raise ValueError(f"model.backend={backend} needs model.bias=true (Hugging Face GPT-2 always has biases)")
    if cfg.attention.impl == "block_sparse":
        raise ValueError(f"attention=block_sparse needs model.backend=ours (model.backend={backend} runs "
                         f"Hugging Face's {BACKENDS[backend]} attention)")
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise ValueError(f"model.backend={backend} needs transformers: pip install transformers ({e})") from None

    gcfg = gpt_config(cfg, attn_impl="sdpa")  # validates the sizes; also the FLOPs reference
    with torch.device("meta"):
        flops_ref = GPT(gcfg)
    hcfg = GPT2Config(vocab_size=gcfg.padded_vocab_size, n_positions=gcfg.seq_len, n_embd=gcfg.n_embd,
                      n_layer=gcfg.n_layer, n_head=gcfg.n_head, activation_function="gelu_new",
                      resid_pdrop=gcfg.dropout, embd_pdrop=gcfg.dropout, attn_pdrop=0.0,
                      tie_word_embeddings=True, use_cache=False)
    hf = GPT2LMHeadModel._from_config(hcfg, attn_implementation=BACKENDS[backend])
    if hf.transformer.wte.weight.device.type != "meta":  # train.py first builds on meta to check sizes
        log.info(f"model.backend={backend}: Hugging Face GPT2LMHeadModel with {BACKENDS[backend]} attention "
                 f"(attention={cfg.attention.impl} is not used)")
    return HFGPT(hf, flops_ref, backend)
