"""Distributed sampler (sharding, padding, bucketing, exact resume), alone and with the paired dataset in a loader."""
import itertools

import numpy as np
import pytest
import torch

from simnpo_fast.data import DataCollator, ForgetRetainDataset, ShardedBatchSampler, encode_qa, load_tofu


def _rank_batches(n, bs, ws, **kw):
    return [list(ShardedBatchSampler(n, bs, rank=r, world_size=ws, **kw)) for r in range(ws)]


@pytest.mark.parametrize("bucket", [False, True])
def test_one_rank_and_two_ranks_see_the_same_global_batches(bucket):
    n = 64
    lengths = list(np.random.default_rng(0).integers(5, 100, n)) if bucket else None
    (one,) = _rank_batches(n, 8, 1, seed=3, lengths=lengths, bucket_steps=3)
    r0, r1 = _rank_batches(n, 4, 2, seed=3, lengths=lengths, bucket_steps=3)
    assert len(one) == len(r0) == len(r1) == 8
    for g, a, b in zip(one, r0, r1):
        assert g == a + b
    flat = [i for a, b in zip(r0, r1) for i in a + b]
    assert sorted(flat) == list(range(n))  # disjoint shards that cover the epoch
    assert not set(itertools.chain(*r0)) & set(itertools.chain(*r1))


def test_deterministic_and_seed_epoch_dependent():
    a = list(ShardedBatchSampler(50, 5, seed=1))
    assert a == list(ShardedBatchSampler(50, 5, seed=1))
    assert a != list(ShardedBatchSampler(50, 5, seed=2))
    s = ShardedBatchSampler(50, 5, seed=1)
    s.set_epoch(1)
    assert list(s) != a
    s.set_epoch(0)
    assert list(s) == a
    assert list(ShardedBatchSampler(10, 5, shuffle=False)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


@pytest.mark.parametrize("n,bs,ws", [(23, 4, 2), (10, 3, 3), (5, 4, 2)])
def test_pad_or_drop_gives_equal_batches_per_rank(n, bs, ws):
    padded = _rank_batches(n, bs, ws, seed=0)
    G = bs * ws
    steps = -(-n // G)
    assert all(len(b) == steps for b in padded)
    assert all(len(x) == bs for b in padded for x in b)
    flat = [i for b in padded for x in b for i in x]
    assert set(flat) == set(range(n))  # every example is seen; the repeats only fill the last global step
    assert len(flat) - len(set(flat)) == ShardedBatchSampler(n, bs, world_size=ws).num_padded == steps * G - n
    if n >= G:
        dropped = _rank_batches(n, bs, ws, seed=0, drop_last=True)
        assert all(len(b) == n // G for b in dropped)
        flat = [i for b in dropped for x in b for i in x]
        assert len(flat) == len(set(flat)) == (n // G) * G
    else:
        with pytest.raises(ValueError, match="drop_last"):
            ShardedBatchSampler(n, bs, world_size=ws, drop_last=True)


def test_bucketing_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 300, 512).tolist()
    def pad_tokens(sampler):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in sampler)
    plain = ShardedBatchSampler(512, 16, seed=0)
    bucket = ShardedBatchSampler(512, 16, seed=0, lengths=lengths, bucket_steps=8)
    assert sorted(i for b in bucket for i in b) == list(range(512))
    assert pad_tokens(bucket) < 0.25 * pad_tokens(plain)


@pytest.mark.parametrize("ws_before,ws_after", [(1, 1), (2, 2), (2, 1)])
def test_resume_mid_epoch_continues_exactly(ws_before, ws_after):
    n, G, k = 37, 4, 3
    kw = dict(seed=5, lengths=list(range(n)), bucket_steps=2)
    # reference: uninterrupted global batches of epoch 1
    ref = ShardedBatchSampler(n, G, **kw)
    ref.set_epoch(1)
    ref_batches = list(ref)
    states = []
    for r in range(ws_before):
        s = ShardedBatchSampler(n, G // ws_before, rank=r, world_size=ws_before, **kw)
        s.set_epoch(1)
        it = iter(s)
        for _ in range(k):
            next(it)
        states.append(s.state_dict())
    assert states[0]["consumed"] == k and states[0]["epoch"] == 1
    resumed = []
    for r in range(ws_after):
        s = ShardedBatchSampler(n, G // ws_after, rank=r, world_size=ws_after, **kw)
        s.load_state_dict(states[0])
        resumed.append(list(s))
    rest = [sum(parts, []) for parts in zip(*resumed)]
    assert rest == ref_batches[k:]


def test_state_mismatch_and_explicit_consumed():
    s = ShardedBatchSampler(20, 2, seed=1)
    st = s.state_dict(consumed=4)
    assert st["consumed"] == 4
    with pytest.raises(ValueError, match="seed"):
        ShardedBatchSampler(20, 2, seed=2).load_state_dict(st)
    with pytest.raises(ValueError, match="global_batch_size"):
        ShardedBatchSampler(20, 4, seed=1).load_state_dict(st)
    t = ShardedBatchSampler(20, 2, seed=1)
    t.load_state_dict(st)
    assert list(t) == list(ShardedBatchSampler(20, 2, seed=1))[4:]
    assert len(list(t)) == 10  # the next iteration is a full epoch again


@pytest.mark.parametrize("ws", [1, 2])
def test_tofu_paired_loader_across_ranks(tofu_dir, bpe_tok, ws):
    f = encode_qa(load_tofu(tofu_dir, "forget10"), bpe_tok)
    r = encode_qa(load_tofu(tofu_dir, "retain90"), bpe_tok)
    col = DataCollator.from_tokenizer(bpe_tok)
    seen, pairs = [], {}
    for rank in range(ws):
        ds = ForgetRetainDataset(f, r, seed=0)
        sampler = ShardedBatchSampler(len(ds), 16 // ws, rank=rank, world_size=ws, seed=0, lengths=f.lengths)
        dl = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=col)
        n_batches = 0
        for idx, batch in zip(sampler, dl):  # the loader re-iterates the sampler: same order
            n_batches += 1
            assert set(batch) == {"forget", "retain"}
            for j, i in enumerate(idx):
                L = len(f[i]["input_ids"])
                assert batch["forget"]["input_ids"][j, :L].tolist() == f[i]["input_ids"]
                pairs[i] = ds.retain_index(i)
            seen += idx
        assert n_batches == len(sampler) == 25  # 400 / (16 global) on every rank
    assert sorted(seen) == list(range(400))  # 400 = 25 global batches of 16: no padding
    ref = ForgetRetainDataset(f, r, seed=0)
    assert pairs == {i: ref.retain_index(i) for i in range(400)}


def test_dataloader_resume_gives_identical_batches(syn_dir, bpe_tok):
    f = encode_qa(load_tofu(syn_dir, "forget10"), bpe_tok)
    r = encode_qa(load_tofu(syn_dir, "retain90"), bpe_tok)
    col = DataCollator.from_tokenizer(bpe_tok)

    def loader(state=None):
        ds = ForgetRetainDataset(f, r, seed=1)
        s = ShardedBatchSampler(len(ds), 3, seed=1, lengths=f.lengths)
        if state:
            s.load_state_dict(state)
            ds.set_epoch(state["epoch"])
        return s, torch.utils.data.DataLoader(ds, batch_sampler=s, collate_fn=col)

    s, dl = loader()
    full = list(dl)
    s, dl = loader()
    it = iter(dl)
    for _ in range(4):
        next(it)
    state = s.state_dict()
    assert state["consumed"] == 4  # num_workers=0: the loader pulls index batches one at a time
    _, dl2 = loader(state)
    rest = list(dl2)
    assert len(rest) == len(full) - 4
    for a, b in zip(rest, full[4:]):
        for k in ("forget", "retain"):
            assert torch.equal(a[k]["input_ids"], b[k]["input_ids"]) and torch.equal(a[k]["labels"], b[k]["labels"])
