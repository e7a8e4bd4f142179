#!/usr/bin/env python
"""Fine-tuning speed for long-document classification: our GPT classifier against Hugging Face
`GPT2ForSequenceClassification` (attn_implementation="sdpa"), per sequence length.

    python scripts/bench_longdoc.py --seq-lens 512,1024,2048,4096 --out bench_out/longdoc.json
    python scripts/bench_longdoc.py --smoke            # CPU, toy sizes: checks that it runs

Both models run the same optimizer step (scripts/eval_longdoc.py `finetune_step`, what
eval_longdoc.py trains with): bf16 autocast on CUDA, fused AdamW, micro-batches of
--micro-batch-tokens tokens (micro_batch = tokens // seq_len documents of seq_len random tokens,
no padding, so both pool the last token), --steps timed steps after --warmup steps, one GPU.
tokens/s counts every position of every sequence; peak memory is torch.cuda.max_memory_allocated.
Ours uses --attention (flash = our Triton kernel); Hugging Face sizes are the same GPT-2 (model=).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk  # noqa: E402

ROOT = bk.REPO


class HFAdapter(nn.Module):
    """GPT2ForSequenceClassification behind our classifier's call: (ids, lengths, doc, n_docs) -> logits."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, x, lengths, doc=None, n_docs=None):
        return self.hf(input_ids=x).logits


def build(impl: str, sizes: dict, seq_len: int, num_labels: int, attention: str):
    if impl == "ours":
        from longctx.model import GPT, GPTConfig
        from longctx.model.classify import GPTClassifier

        gpt = GPT(GPTConfig(seq_len=seq_len, n_layer=sizes["n_layer"], n_head=sizes["n_head"], n_embd=sizes["n_embd"],
                            attn_impl=attention))
        return GPTClassifier(gpt, num_labels)
    import transformers

    cfg = transformers.GPT2Config(n_positions=seq_len, n_layer=sizes["n_layer"], n_head=sizes["n_head"],
                                  n_embd=sizes["n_embd"], num_labels=num_labels, pad_token_id=50256,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attn_implementation=impl.split("_", 1)[1])  # hf_sdpa -> sdpa, hf_eager -> eager
    return HFAdapter(transformers.GPT2ForSequenceClassification(cfg))


def bench_case(impl: str, sizes: dict, seq_len: int, micro_batch: int, steps: int, warmup: int,
               device: torch.device, attention: str = "flash", num_labels: int = 10) -> dict:
    from eval_longdoc import finetune_step, single_label_loss

    from longctx.trainer.optim import Precision

    row = {"impl": impl, "seq_len": seq_len, "micro_batch": micro_batch}
    torch.manual_seed(0)
    try:
        model = build(impl, sizes, seq_len, num_labels, attention).to(device).train()
        kw = {"fused": True} if device.type == "cuda" else {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kw)
        prec = Precision("bf16", device)
        x = torch.randint(0, 50000, (micro_batch, seq_len), device=device)  # no pad id (50256) inside
        lengths = torch.full((micro_batch,), seq_len, device=device)
        y = torch.nn.functional.one_hot(torch.randint(0, num_labels, (micro_batch,)), num_labels).bool().to(device)
        batch = [(x, lengths, None, micro_batch, y)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(warmup + steps):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
            loss, _, _ = finetune_step(model, batch, opt, prec, single_label_loss, micro_batch, 1.0)
        loss = float(loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        row.update(tokens_per_s=steps * micro_batch * seq_len / dt, step_ms=1e3 * dt / steps, loss=loss,
                   peak_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None)
    except torch.cuda.OutOfMemoryError:
        row.update(tokens_per_s=None, error="OOM")
    finally:
        model = opt = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    lens = sorted({r["seq_len"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    peers = [i for i in impls if i != "ours" and "ours" in impls]
    by = {(r["impl"], r["seq_len"]): r for r in rows}

    def cell(r):
        t, mem = r.get("tokens_per_s"), r.get("peak_mem_gb")
        return f"{t / 1e3:.1f}k" + ("" if mem is None else f" ({mem:.1f} GB)") if t else r.get("error", "-")

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"
    return bk.table(["seq_len", "micro-batch", *(f"{i} tok/s (mem)" for i in impls), *(f"ours / {i}" for i in peers)],
                    [[n, by[(impls[0], n)]["micro_batch"], *(cell(by.get((i, n), {})) for i in impls),
                      *(ratio(by.get(("ours", n), {}).get("tokens_per_s"), by.get((i, n), {}).get("tokens_per_s"))
                        for i in peers)] for n in lens], markdown=True) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="512,1024,2048,4096")
    ap.add_argument("--impls", default="ours,hf_sdpa", help="ours, hf_sdpa, hf_eager")
    ap.add_argument("--model", default="gpt2_small", help="a configs/model/ name (sizes)")
    ap.add_argument("--attention", default="flash", help="our attention: flash | sdpa | naive")
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--smoke", action="store_true", help="CPU-sized: 2 layers, width 64, length 64, 2 steps")
    args = ap.parse_args(argv)

    import yaml

    sizes = yaml.safe_load((ROOT / "configs" / "model" / f"{args.model}.yaml").read_text())
    lens = [int(v) for v in args.seq_lens.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        sizes = {"n_layer": 2, "n_head": 2, "n_embd": 64}
        lens, args.micro_batch_tokens, args.steps, args.warmup = [64], 256, 2, 1
        if device.type == "cpu":
            args.attention = "sdpa"
    rows = []
    for n in lens:
        for impl in args.impls.split(","):
            r = bench_case(impl, sizes, n, max(1, args.micro_batch_tokens // n), args.steps, args.warmup, device,
                           args.attention)
            r.update(model=args.model if not args.smoke else "smoke", device=str(torch.cuda.get_device_name(device))
                     if device.type == "cuda" else "cpu", attention=args.attention if impl == "ours" else impl)
            rows.append(r)
            t = r.get("tokens_per_s")
            print(f"{impl:8s} seq_len {n:6d}: " + (f"{t / 1e3:.1f}k tokens/s" if t else r.get("error", "?")), flush=True)
    if args.out:
        bk.write_json(args.out, rows)
    print(table(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
