"""A small training loop over parallelize(), run by the tests under torchrun (or as one process).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/parallel/dist_worker.py \
        --parallel fsdp --steps 5 --out losses.json

Global batch: `--global-batch` sequences per step drawn from (seed, step) alone, each rank taking
a disjoint slice and accumulating `global_batch / (world_size * micro_batch)` micro-steps, so
the losses must not depend on the world size. fp32 throughout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from longctx.model import GPT, GPTConfig  # noqa: E402
from longctx.trainer.distributed import all_reduce, barrier, destroy, init_distributed  # noqa: E402
from longctx.trainer.metrics import batch_arithmetic  # noqa: E402
from longctx.trainer.optim import Precision  # noqa: E402
from longctx.trainer.parallelize import parallelize, unwrap  # noqa: E402
from longctx.trainer.step import DeviceBatches, train_step  # noqa: E402

VOCAB, SEQ = 96, 16


def tiny_model(seed: int = 0, dropout: float = 0.0, attn: str = "sdpa", n_layer: int = 3) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(seq_len=SEQ, vocab_size=VOCAB, pad_vocab_multiple=32, n_layer=n_layer, n_head=2,
                         n_embd=32, dropout=dropout, attn_impl=attn))


def batch(step: int, global_batch: int, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100003 + step)
    return torch.randint(0, VOCAB, (global_batch, SEQ + 1), generator=g)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--parallel", default="single")
    ap.add_argument("--ac", default="none")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--first-step", type=int, default=0, help="first step (after --load)")
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--save", default=None, help="DCP folder written after the last step")
    ap.add_argument("--load", default=None, help="DCP folder to resume from")
    ap.add_argument("--out", default=None)
    ap.add_argument("--hang-rank", type=int, default=None,
                    help="this rank stalls past the collective timeout (3 s); the others report the failure")
    ap.add_argument("--fsdp", action="append", default=[], help="extra parallel.KEY=VALUE (e.g. cpu_offload=true)")
    ap.add_argument("--count-gathers", action="store_true",
                    help="count FSDP2's parameter all-gathers (a private torch function) into the output")
    a = ap.parse_args(argv)
    gathers = [0]
    if a.count_gathers:
        import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_pg
        real_gather = fsdp_pg.foreach_all_gather

        def counted(*args, **kw):
            gathers[0] += 1
            return real_gather(*args, **kw)
        fsdp_pg.foreach_all_gather = counted

    if a.hang_rank is not None:  # both ranks up (torch imported) before the 3 s timeout can bite: on a
        import time                 # loaded machine one process may start seconds after the other

        ranks = range(int(os.environ["WORLD_SIZE"]))
        Path(f"{a.out}.ready{os.environ['RANK']}").touch()
        t_wait = time.time()
        while not all(Path(f"{a.out}.ready{r}").exists() for r in ranks) and time.time() - t_wait < 100:
            time.sleep(0.05)
    d = init_distributed("cpu", timeout_s=3 if a.hang_rank is not None else 120)
    if a.hang_rank is not None:  # a rank hangs: the others' next collective times out, naming them
        import time

        from longctx.trainer.distributed import DistributedError
        if d.rank == a.hang_rank:
            time.sleep(10)
            os._exit(0)
        try:
            all_reduce(torch.ones(1), "sum")
            barrier()
            msg = "no error"
        except DistributedError as e:
            msg = str(e)
        with open(f"{a.out}.rank{d.rank}", "w") as f:
            f.write(msg)
        os._exit(0)
    cfg = {"compile": a.compile, "seq_len": SEQ,
           "train": {"global_batch_tokens": a.global_batch * SEQ, "micro_batch": a.micro_batch},
           "parallel": {"name": a.parallel, "activation_checkpointing": a.ac,
                        **({"param_dtype": "fp32", "reduce_dtype": "fp32"} if a.parallel == "fsdp" else {})}}
    for kv in a.fsdp:
        k, v = kv.split("=", 1)
        cfg["parallel"][k] = {"true": True, "false": False}.get(v.lower(), v)
    model = parallelize(tiny_model(), cfg, d)
    opt = torch.optim.AdamW(unwrap(model).optim_groups(0.1), lr=3e-3, betas=(0.9, 0.95), foreach=False)
    micro_batch, accum = batch_arithmetic(cfg, d.world_size)
    assert micro_batch == a.micro_batch

    if a.load:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=a.load)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    per_rank = accum * a.micro_batch

    def fetch(step, micro):  # this rank's slice of the step's global batch, micro-batch by micro-batch
        xb = batch(step, a.global_batch)[d.rank * per_rank + micro * a.micro_batch:][:a.micro_batch]
        return xb[:, :-1], xb[:, 1:]

    # the training step of train.py (trainer/step.py), fp32
    prec = Precision("fp32", d.device)
    batches = DeviceBatches(fetch, d.device, range(a.first_step, a.first_step + a.steps), accum)
    losses, norms = [], []
    for step in range(a.first_step, a.first_step + a.steps):
        loss, norm = train_step(model, batches, opt, prec, accum=accum, grad_clip=1.0, step=step)
        losses.append(loss)
        norms.append(norm)

    if a.save:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=a.save)
    barrier()
    if d.is_main and a.out:
        with open(a.out, "w") as f:
            json.dump({"losses": losses, "norms": norms, "world_size": d.world_size, "accum": accum,
                       "all_gathers": gathers[0]}, f)
    destroy()


if __name__ == "__main__":
    main()
