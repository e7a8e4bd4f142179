"""Training windows are a pure function of (seed, step, rank); validation covers a fixed span."""

import numpy as np
import pytest
import torch
from longctx.data import TokenData
from longctx.data.tokenfile import TokenWriter
from longctx.data.tokenizer import tokenizer_fingerprint

N_TRAIN, N_VAL = 5000, 600


@pytest.fixture(scope="module")
def td(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    fp = tokenizer_fingerprint()
    for name, n in (("train", N_TRAIN), ("val", N_VAL)):
        with TokenWriter(folder / f"{name}.bin", fp) as w:
            w.write(np.arange(n, dtype=np.uint16))  # token i sits at position i: windows are easy to read
    return TokenData(folder)


def _batch(td, step=3, **kw):
    args = dict(seed=7, seq_len=16, micro_batch=4, micro_step=0, grad_accum=1, rank=0, world_size=1)
    args.update(kw)
    return td.train_batch(step, **args)


def test_shapes_dtype_and_shift(td):
    x, y = _batch(td)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # each row is one contiguous window
    assert int(x.max()) < N_TRAIN and int(y.max()) < N_TRAIN


def test_deterministic(td):
    a, b = _batch(td), _batch(td)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(_batch(td, step=4)[0], a[0])
    assert not torch.equal(_batch(td, seed=8)[0], a[0])


def _global_rows(td, world_size, grad_accum, micro_batch, step=5):
    per_slot = []
    for rank in range(world_size):
        for m in range(grad_accum):
            x, _ = td.train_batch(
                step,
                seed=1,
                seq_len=8,
                micro_batch=micro_batch,
                micro_step=m,
                grad_accum=grad_accum,
                rank=rank,
                world_size=world_size,
            )
            per_slot.append(x)
    return per_slot


def test_rank_disjoint_and_world_size_invariant(td):
    ref = torch.cat(_global_rows(td, 1, 8, 4))  # 32 windows from one process
    starts = td.train_starts(5, seed=1, seq_len=8, global_windows=32)
    assert torch.equal(ref[:, 0], torch.from_numpy(starts))  # slots are disjoint slices, in order
    for ws, ga, mb in ((2, 4, 4), (4, 2, 4), (8, 1, 4), (2, 2, 8)):
        slots = _global_rows(td, ws, ga, mb)
        got = torch.cat(slots)
        # same global windows whatever the split, as a set
        assert sorted(got[:, 0].tolist()) == sorted(ref[:, 0].tolist()), (ws, ga, mb)
    # rank-major layout: with the same micro_batch the order is identical too
    assert torch.equal(torch.cat(_global_rows(td, 2, 4, 4)), ref)


def test_val_span_same_for_every_seq_len(td):
    eval_tokens = 256
    for seq_len in (8, 16, 32):
        xs, ys = zip(*td.val_batches(seq_len, 3, eval_tokens))
        x, y = torch.cat(xs), torch.cat(ys)
        assert x.shape == (eval_tokens // seq_len, seq_len)
        assert torch.equal(x.flatten(), torch.arange(eval_tokens))
        assert torch.equal(y.flatten(), torch.arange(1, eval_tokens + 1))
        assert all(b.shape[0] <= 3 for b in xs)


def test_val_ranks_disjoint_and_equal(td):
    for seq_len in (8, 16, 32):
        shares, counts = [], set()
        for rank in range(2):
            plan = td.val_plan(seq_len, 3, 256, rank, 2)
            batches = list(td.val_batches(seq_len, 3, 256, rank, 2))
            counts.add(len(batches))
            assert len(batches) == plan.batches_per_rank
            y = torch.cat([b[1] for b in batches]).flatten()
            assert y.numel() == plan.tokens_per_rank == 128
            shares.append(set(y.tolist()))
        assert len(counts) == 1  # FSDP ranks run the same number of forwards
        assert shares[0].isdisjoint(shares[1])
        assert shares[0] | shares[1] == set(range(1, 257))


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(seq_len=N_TRAIN), "train split has only"),
        (dict(seq_len=0), "seq_len must be an integer >= 1"),
        (dict(rank=2, world_size=2), r"rank must be in \[0, world_size=2\)"),
        (dict(micro_step=1, grad_accum=1), "micro_step must be in"),
        (dict(micro_batch=0), "micro_batch"),
        (dict(seed=-1), "seed"),
    ],
)
def test_train_batch_bad_args(td, kw, msg):
    with pytest.raises(ValueError, match=msg):
        _batch(td, **kw)


@pytest.mark.parametrize(
    "args, msg",
    [
        ((24, 2, 256), "not a multiple of seq_len=24"),
        ((8, 2, 1024), "needs 1025 validation tokens but val.bin has 600"),
        ((8, 2, N_VAL), "needs 601 validation tokens"),
        ((32, 2, 96, 0, 2), "do not split evenly over world_size=2"),
    ],
)
def test_val_bad_args(td, args, msg):
    with pytest.raises(ValueError, match=msg):
        td.val_batches(*args)  # raised at the call, before iterating
