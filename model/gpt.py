"""GPT-2, as trained in the FlashAttention paper's experiments; single-device and readable.

Learned token + position embeddings -> n_layer pre-LayerNorm blocks -> final LayerNorm -> lm_head
tied to the token embedding. No parallelism here: FSDP, activation checkpointing and
torch.compile are applied per `Block` from outside (trainer/parallelize.py).

Vocabulary: GPT-2's 50257 tokens are padded to a multiple of `pad_vocab_multiple` (64 -> 50304)
so the embedding / lm_head matmuls have friendly shapes. Targets are always < vocab_size, so the
padded rows are never a target: they are trained only as outputs (their logits are pushed down),
as in nanoGPT. Logits have all padded_vocab columns; `generate` never samples a padded id.

Dropout: `dropout` is applied to the embeddings and to each residual branch (after the attention
output projection and after the MLP). Dropout on the attention probabilities is not supported
(our FlashAttention kernel has none), so it is always 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import ATTENTION, FALLBACKS, IMPLS, resolve
from .loss import CHUNK_TOKENS, lm_head_cross_entropy


@dataclass
class GPTConfig:
    seq_len: int = 1024            # context length; wpe has exactly seq_len rows
    vocab_size: int = 50257        # GPT-2 BPE
    pad_vocab_multiple: int = 64   # embedding rows rounded up to a multiple of this
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0           # embedding + residual dropout (no attention-prob dropout)
    bias: bool = True              # biases in Linear and LayerNorm, as GPT-2
    attn_impl: str = "flash"       # flash | block_sparse | sdpa | naive (model/attention.py)
    cpu_fallback: str = "sdpa"     # where our kernel cannot run: sdpa (run a fallback, logged) | error

    def __post_init__(self):
        if self.seq_len <= 0:
            raise ValueError(f"seq_len must be a positive integer, got {self.seq_len}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.attn_impl not in IMPLS:
            raise ValueError(f"unknown attention impl {self.attn_impl!r}; expected one of {', '.join(IMPLS)}")
        if self.cpu_fallback not in FALLBACKS:
            raise ValueError(f"attention.cpu_fallback={self.cpu_fallback!r}: use sdpa or error")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_multiple)
        return (self.vocab_size + m - 1) // m * m


def decay_groups(model: nn.Module, embeddings, weight_decay: float) -> list[dict]:
    """Two AdamW groups of model's trainable parameters: weight decay on 2-D weights except the
    `embeddings`; none on those, biases and norms."""
    skip = {id(p) for p in embeddings}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, impl: str):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attn_impl = impl  # the implementation that runs (resolved once by GPT, model/attention.py)
        self.attend = ATTENTION[impl]

    def forward(self, x: torch.Tensor, block_mask=None) -> torch.Tensor:
        B, N, C = x.shape
        # (B, N, 3C) viewed as (B, N, 3, H, D): q, k, v are strided (B, N, H, D) views, no copies
        q, k, v = self.c_attn(x).view(B, N, 3, self.n_head, self.head_dim).unbind(dim=2)
        y = self.attend(q, k, v, True, block_mask)
        return self.resid_dropout(self.c_proj(y.reshape(B, N, C)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)). One tensor in, one out
    (block_mask: the model's BlockMask for block-sparse attention, else None)."""

    def __init__(self, cfg: GPTConfig, impl: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, impl)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, block_mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), block_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """block_mask: a kernels BlockMask, required with attn_impl="block_sparse" (passed to every
    block's forward; not a parameter or buffer). device: where it will run (None: cuda if
    available), which decides once whether our kernel can run there (model/attention.py)."""

    def __init__(self, cfg: GPTConfig, block_mask=None, device: str | torch.device | None = None):
        super().__init__()
        if cfg.attn_impl == "block_sparse" and block_mask is None:
            raise ValueError("attention=block_sparse needs a block_mask (build_model makes one from "
                             "cfg.attention); got None")
        impl = resolve(cfg.attn_impl, cfg.cpu_fallback, device)
        self.config = cfg
        V = cfg.padded_vocab_size
        self.wte = nn.Embedding(V, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, impl) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, V, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embedding
        self.block_mask = block_mask  # plain attribute: not a parameter, not in the state dict
        # tokens per logits chunk of the loss (model/loss.py); 0 = the plain loss over full logits
        self.loss_chunk_tokens = CHUNK_TOKENS
        self.compile_loss = False  # torch.compile the loss's per-chunk math (set by trainer/parallelize.py)

        # GPT-2 init: N(0, 0.02) weights, zero biases, LayerNorm (1, 0); the residual projections
        # (attn.c_proj, mlp.c_proj) get std 0.02/sqrt(2*n_layer): 2 residual adds per layer.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, return_logits: bool = False):
        """idx, targets: int64 (B, N), N <= seq_len; targets may use -1 to ignore a position.

        Returns (logits, loss). Without targets: logits (B, N, padded_vocab) in the autocast dtype
        and loss None. With targets: loss is the mean cross-entropy over all non-ignored positions,
        computed in fp32 (fp64 for fp64 models) chunk by chunk from the final hidden states
        (model/loss.py: the (B, N, vocab) logits never exist), and logits is None, unless
        return_logits=True (then the logits are built and the loss computed from them).
        """
        B, N = idx.shape
        if N > self.config.seq_len:
            raise ValueError(f"input has {N} tokens but the model was built for seq_len="
                             f"{self.config.seq_len} (position embeddings); pass at most that many")
        pos = torch.arange(N, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x, self.block_mask)
        x = self.ln_f(x)
        if targets is not None and not return_logits and self.loss_chunk_tokens > 0:
            return None, lm_head_cross_entropy(x, self.lm_head.weight, targets, ignore_index=-1,
                                               chunk_tokens=self.loss_chunk_tokens, compiled=self.compile_loss)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            upcast = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (or fp64)
            loss = F.cross_entropy(upcast.view(-1, upcast.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied wte/lm_head matrix counted once.

        non_embedding=True leaves out wte (= lm_head, padded_vocab x n_embd) and wpe
        (seq_len x n_embd): what is left is the blocks and ln_f.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add).

            6 * (N_nonemb + padded_vocab * n_embd)  +  6 * n_layer * n_embd * seq_len

        N_nonemb = num_params(non_embedding=True) (blocks + ln_f; biases and norms counted as if
        they were matmul weights, as the usual 6N rule does). padded_vocab * n_embd is the lm_head
        matmul, counted at the padded width it actually runs at; the embedding lookups (wte, wpe)
        cost no FLOPs. Attention: per layer and token, q k^T and p v are 2 * 2 * seq_len * n_embd
        forward, x3 for training = 12 * n_layer * n_embd * seq_len non-causal, halved for causal.
        Softmax, LayerNorm, GELU, dropout and the loss are ignored. For block-sparse attention
        this is still the dense causal count.
        """
        T = self.config.seq_len if seq_len is None else seq_len
        c = self.config
        matmul_params = self.num_params(non_embedding=True) + c.padded_vocab_size * c.n_embd
        return 6 * matmul_params + 6 * c.n_layer * c.n_embd * T

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """Two AdamW groups: decay on 2-D Linear weights; none on biases, norms and embeddings.

        Every parameter appears exactly once (lm_head.weight is wte.weight: one embedding).
        """
        return decay_groups(self, [self.wte.weight, self.wpe.weight], weight_decay)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, N); the context is cropped to the last
        seq_len tokens. temperature <= 0 means greedy. Padded vocabulary ids are never sampled."""
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.config.seq_len:]
            logits, _ = self(ctx)
            logits = logits[:, -1, :self.config.vocab_size].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    # Hugging Face GPT-2 interop lives in model/hf.py (weight mapping, padding rows, position extension).
    @classmethod
    def from_pretrained(cls, name_or_dir, seq_len: int | None = None, extend: str = "tile",
                        attn_impl: str = "flash", dropout: float = 0.0) -> GPT:
        """Load a Hugging Face GPT-2 checkpoint: a hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a
        local folder with config.json + model.safetensors / pytorch_model.bin. Sizes come from its
        config; seq_len beyond its n_positions extends the position table (extend: tile | interpolate)."""
        from .hf import from_pretrained

        return from_pretrained(cls, name_or_dir, seq_len=seq_len, extend=extend, attn_impl=attn_impl, dropout=dropout)

    def save_pretrained(self, out_dir) -> None:
        """Write a folder that transformers.GPT2LMHeadModel.from_pretrained loads (n_positions = seq_len)."""
        from .hf import save_pretrained

        save_pretrained(self, out_dir)


def build_model(cfg) -> GPT:
    """GPT from train.py's config (a typed Config; a composed DictConfig or a dict is typed first by
    trainer/config.py): cfg.model (sizes), cfg.attention, cfg.seq_len.

    For attention.impl == "block_sparse" the block mask is built once from cfg.attention by
    kernels.build_block_mask_from_config and kept on the model (not a parameter or buffer).
    """
    from longctx.trainer.config import as_config

    cfg = as_config(cfg)
    if cfg.model.backend != "ours":  # Hugging Face GPT-2 baseline: model/hf_baseline.py
        from .hf_baseline import build_hf_model
        return build_hf_model(cfg)
    gcfg = gpt_config(cfg)
    mask = None
    if gcfg.attn_impl == "block_sparse":
        from longctx.kernels import build_block_mask_from_config
        mask = build_block_mask_from_config(cfg.attention, gcfg.seq_len, gcfg.n_head)
    device = None if cfg.device == "auto" else cfg.device
    return GPT(gcfg, block_mask=mask, device=device)


def gpt_config(cfg, attn_impl: str | None = None) -> GPTConfig:
    """The GPTConfig of a typed Config: cfg.model's sizes at cfg.seq_len (ValueError on bad sizes)."""
    m = cfg.model
    return GPTConfig(seq_len=cfg.seq_len, vocab_size=m.vocab_size, pad_vocab_multiple=m.pad_vocab_multiple or 1,
                     n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout or 0.0, bias=m.bias,
                     attn_impl=attn_impl or cfg.attention.impl, cpu_fallback=cfg.attention.cpu_fallback)
