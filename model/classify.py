"""Document classification with our GPT: a linear head on a pooled hidden state, and the scores.

Pooling (`pool`), over the hidden states after ln_f. Sequences are padded on the right; under causal
attention position t attends only to positions <= t, so no real position ever sees the padding and
both poolings equal those of the unpadded sequence exactly (tests/eval/test_longdoc.py checks it):
  mean  the mean over the real tokens (default): every position contributes, so the document
        vector aggregates evidence from the whole text even when the trunk is weakly pretrained
        or randomly initialised (a learned bag of contextual features);
  last  the state at the LAST REAL TOKEN, the one position that has read the whole document
        (what Hugging Face's GPT2ForSequenceClassification does); it only works once the trunk
        has learned to summarise the document into that single state.

Long documents, `long_docs`:
  truncate  the first seq_len tokens (one sequence per document)
  chunk     up to max_chunks consecutive chunks of seq_len tokens, each pooled at its last real
            token; the document vector is the mean of its chunk vectors

Scores (`scores`): over a boolean prediction matrix P and gold matrix G (documents x labels),
  micro-F1 = 2 TP / (2 TP + FP + FN), with TP, FP, FN summed over all labels;
  macro-F1 = the mean over labels of 2 TP_j / (2 TP_j + FP_j + FN_j), over the labels that occur
             in G or P (for a label with neither, F1 is 0/0: it is left out, not counted as 0 or 1);
  accuracy = the share of documents whose predicted label set equals the gold set (single-label:
             the usual accuracy, equal to micro-F1 when every document has one gold and one
             predicted label).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class GPTClassifier(nn.Module):
    """A GPT trunk (any of our GPTs, e.g. GPT.from_pretrained) + a linear head over num_labels."""

    def __init__(self, gpt: nn.Module, num_labels: int, dropout: float = 0.0, head_lr_scale: float = 1.0,
                 pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "last"):
            raise ValueError(f"pool={pool!r}: use mean or last")
        self.gpt = gpt
        self.pool = pool
        self.head_lr_scale = head_lr_scale
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(gpt.config.n_embd, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def blocks(self) -> nn.ModuleList:  # what trainer/parallelize.py wraps and shards, block by block
        return self.gpt.blocks

    @property
    def config(self):
        return self.gpt.config

    def pooled(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(S, N) right-padded token ids, (S,) real lengths (1..N) -> (S, n_embd) pooled state: the mean
        over the real tokens (pool=mean) or the state at the last real token (pool=last).

        The trunk is GPT.forward without lm_head: embeddings + positions, the blocks, ln_f."""
        g = self.gpt
        S, N = idx.shape
        if N > g.config.seq_len:
            raise ValueError(f"input has {N} tokens but the model has {g.config.seq_len} positions")
        x = g.drop(g.wte(idx) + g.wpe(torch.arange(N, device=idx.device)))
        for block in g.blocks:
            x = block(x)
        x = g.ln_f(x)
        if self.pool == "last":
            return x[torch.arange(S, device=idx.device), lengths - 1]
        real = (torch.arange(N, device=idx.device)[None, :] < lengths[:, None]).to(x.dtype)  # (S, N)
        return torch.einsum("sn,snd->sd", real, x) / lengths.to(x.dtype)[:, None]

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor, doc: torch.Tensor | None = None,
                n_docs: int | None = None) -> torch.Tensor:
        """Logits (n_docs, num_labels). doc[s] says which document sequence s (a chunk) belongs to;
        None: one sequence per document. Chunk vectors of a document are averaged."""
        h = self.pooled(idx, lengths)
        if doc is not None:
            n_docs = int(n_docs if n_docs is not None else int(doc.max()) + 1)
            summed = torch.zeros(n_docs, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, doc, h)
            count = torch.zeros(n_docs, dtype=h.dtype, device=h.device).index_add_(0, doc, torch.ones_like(doc, dtype=h.dtype))
            h = summed / count.clamp(min=1).unsqueeze(1)
        return self.head(self.dropout(h))

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """The GPT's two AdamW groups, plus the head's (weight decayed, bias not); the head's groups
        carry lr_scale = head_lr_scale (trainer/schedule.py multiplies the scheduled lr by it)."""
        groups = self.gpt.optim_groups(weight_decay)
        groups.append({"params": [self.head.weight], "weight_decay": weight_decay, "lr_scale": self.head_lr_scale})
        groups.append({"params": [self.head.bias], "weight_decay": 0.0, "lr_scale": self.head_lr_scale})
        return groups

    def num_params(self) -> int:
        return self.gpt.num_params() + sum(p.numel() for p in self.head.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token of the trunk (GPT.flops_per_token, which counts the lm_head
        matmul that classification does not run: so MFU from it is an upper estimate)."""
        c = self.gpt.config
        return self.gpt.flops_per_token(seq_len) - 6 * c.padded_vocab_size * c.n_embd


def scores(pred: torch.Tensor, gold: torch.Tensor) -> dict:
    """micro_f1, macro_f1, accuracy of boolean (docs, labels) predictions against gold (see module doc)."""
    pred, gold = pred.bool(), gold.bool()
    tp = (pred & gold).sum(0).double()
    fp = (pred & ~gold).sum(0).double()
    fn = (~pred & gold).sum(0).double()
    denom = 2 * tp + fp + fn
    micro = (2 * tp.sum() / denom.sum()).item() if denom.sum() > 0 else 0.0
    present = denom > 0
    macro = (2 * tp[present] / denom[present]).mean().item() if present.any() else 0.0
    acc = (pred == gold).all(dim=1).double().mean().item() if len(gold) else 0.0
    return {"micro_f1": micro, "macro_f1": macro, "accuracy": acc}


def predict(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Boolean predictions: multi-label sigmoid > 0.5 (logit > 0); single-label the argmax."""
    if multi_label:
        return logits > 0
    return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).bool()
