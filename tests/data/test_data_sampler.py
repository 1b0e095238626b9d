"""Distributed sampler (sharding, padding, bucketing, exact resume) and the forget/retain paired dataset."""
import itertools

import numpy as np
import pytest
import torch

from simnpo_fast.data import (DataCollator, DataError, DataWarning, EncodedDataset, ForgetRetainDataset,
                              ShardedBatchSampler, encode_qa, load_tofu)


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


def _ds(seqs):
    return EncodedDataset([{"input_ids": list(s), "labels": list(s)} for s in seqs])


def test_pairing_is_seeded_and_distinct():
    forget = _ds([[1, i] for i in range(6)])
    retain = _ds([[2, i] for i in range(10)])
    a = ForgetRetainDataset(forget, retain, seed=7)
    b = ForgetRetainDataset(forget, retain, seed=7)
    pa = [a.retain_index(i) for i in range(6)]
    assert pa == [b.retain_index(i) for i in range(6)]  # same on every rank / process
    assert len(set(pa)) == 6  # distinct partners while forget <= retain
    assert pa != [ForgetRetainDataset(forget, retain, seed=8).retain_index(i) for i in range(6)]
    a.set_epoch(1)
    assert [a.retain_index(i) for i in range(6)] != pa
    item = b[2]
    assert item["forget"]["input_ids"] == [1, 2] and item["retain"]["input_ids"] == [2, pa[2]]
    c = ForgetRetainDataset(forget, retain, seed=7, pairing="cycle")
    off = c.retain_index(0)
    assert [c.retain_index(i) for i in range(6)] == [(off + i) % 10 for i in range(6)]
    assert [ForgetRetainDataset(forget, _ds([[3]] * 4), pairing="fixed").retain_index(i) for i in range(6)] == \
        [0, 1, 2, 3, 0, 1]


def test_seeded_offset_pairing_is_the_authors_rule():
    """Issue 23: OPTML-Group/Unlearn-Simple TOFU/data_module.py TextForgetDatasetQA.__getitem__ pairs forget item
    idx with ``(idx + torch.randint(0, R, (1,)).item()) % R`` right after ``torch.manual_seed(idx)``: the oracle
    is that code's rule on the global RNG; ours draws from a generator of its own and leaves the global RNG be."""
    import torch

    from simnpo_fast.data.collate import PAIRINGS
    from simnpo_fast.train.validation import PAIRINGS as CONFIG_PAIRINGS

    assert CONFIG_PAIRINGS == PAIRINGS
    forget, retain = _ds([[1, i] for i in range(40)]), _ds([[2, i] for i in range(360)])
    ds = ForgetRetainDataset(forget, retain, pairing="seeded_offset")
    want = []
    for idx in range(40):
        torch.manual_seed(idx)
        want.append((idx + torch.randint(0, 360, (1,)).item()) % 360)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert [ds.retain_index(i) for i in range(40)] == want
    assert torch.equal(torch.get_rng_state(), state)
    ds.set_epoch(3)
    assert [ds.retain_index(i) for i in range(40)] == want  # the same partner every epoch


def test_pairing_overlap_warns_and_empty_errors():
    forget = _ds([[1, 0], [1, 1], [1, 2]])
    retain = _ds([[1, 2], [9, 9], [1, 0]])
    with pytest.warns(DataWarning, match="share 2 example"):
        p = ForgetRetainDataset(forget, retain)
    assert p.shared == [0, 2]
    with pytest.raises(DataError, match="forget set is empty"):
        ForgetRetainDataset(_ds([]), retain)


def test_forget_only_items_without_a_retain_set():
    """``retain=None`` (a method without a retain term): items ``{"forget": forget[i]}``, nothing drawn or
    checked for overlap; the same items every epoch."""
    forget = _ds([[1, 0], [1, 1, 5], [1, 2]])
    ds = ForgetRetainDataset(forget, None, seed=3)
    assert len(ds) == 3 and ds.retain is None and ds.shared == []
    assert [ds[i] for i in range(3)] == [{"forget": forget[i]} for i in range(3)] and ds[-1] == {"forget": forget[2]}
    assert ds.lengths == [2, 3, 2]
    ds.set_epoch(4)
    assert [ds[i] for i in range(3)] == [{"forget": forget[i]} for i in range(3)]
    with pytest.raises(DataError, match="forget set is empty"):
        ForgetRetainDataset(_ds([]))


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


def test_load_forget_retain_defaults_to_the_complement(tofu_dir, bpe_tok):
    from simnpo_fast.data import load_forget_retain
    ds = load_forget_retain(tofu_dir, bpe_tok, "forget05", seed=2)
    assert len(ds) == 200 and len(ds.retain) == 3800 and ds.shared == []
    with pytest.raises(ValueError, match="retain_split"):
        load_forget_retain(tofu_dir, bpe_tok, "full")
