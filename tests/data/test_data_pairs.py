"""The forget/retain paired dataset: seeded pairing rules, overlap warnings, forget-only items, loading two splits."""
import pytest
import torch

from simnpo_fast.data import DataError, DataWarning, EncodedDataset, ForgetRetainDataset, load_forget_retain


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

    from simnpo_fast.data.pairs import PAIRINGS
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


def test_load_forget_retain_defaults_to_the_complement(tofu_dir, bpe_tok):
    ds = load_forget_retain(tofu_dir, bpe_tok, "forget05", seed=2)
    assert len(ds) == 200 and len(ds.retain) == 3800 and ds.shared == []
    with pytest.raises(ValueError, match="retain_split"):
        load_forget_retain(tofu_dir, bpe_tok, "full")
