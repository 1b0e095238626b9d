"""ForgetRetainBatch and StepCounts (against counts made by hand), and UnlearningLoss.batch_loss: equal to the
forward on the split rows, to the fp64 oracle of test_ops, and exact under gradient accumulation."""
import pytest
import torch

import simnpo_fast as sf
from simnpo_fast.data import DataCollator
from tests.test_kl import oracle as kl_oracle
from tests.test_ops import make, oracle_loss, relerr


def _labels(rows):
    """``[len(rows), 8]`` labels: row r has ``rows[r]`` answer tokens at the end (the rest -100)."""
    y = torch.full((len(rows), 8), -100)
    for i, n in enumerate(rows):
        if n:
            y[i, 8 - n:] = torch.arange(n) + 3
    return y


def _batch(forget_tokens, retain_tokens, pad=0):
    y = _labels(list(forget_tokens) + list(retain_tokens))
    mask = torch.ones_like(y)
    if pad:
        mask[:, :pad] = 0
    return sf.ForgetRetainBatch(torch.zeros_like(y), mask, y, len(forget_tokens))


def test_step_counts_equal_a_hand_count():
    # answer tokens after the shift: labels[:, 1:], so a row with n answer tokens at positions >= 1 counts n
    b1 = _batch([3, 0, 5], [2, 4, 1])
    b2 = _batch([1, 2], [6, 0], pad=2)
    c = sf.StepCounts.of([b1, b2], sf.get_method("simnpo"))
    assert c == sf.StepCounts(forget=4.0, retain_tokens=13.0, forget_tokens=11, tokens=6 * 8 + 4 * 6,
                              retain_sequences=4.0)
    c = sf.StepCounts.of([b1, b2], sf.get_method("graddiff"))
    assert (c.forget, c.retain_tokens) == (11.0, 13.0)
    assert c.normalizers() == (11.0, 13.0)
    assert sf.StepCounts.of([_batch([0], [])], sf.get_method("npo")).normalizers() == (None, None)
    # reduce: what a rank all-reduce returns (here: two identical ranks)
    c2 = sf.StepCounts.of([b1, b2], sf.get_method("simnpo"), reduce=lambda t: t * 2)
    assert c2 == sf.StepCounts(forget=8.0, retain_tokens=26.0, forget_tokens=22, tokens=2 * (48 + 24),
                               retain_sequences=8.0)
    # normalize="sequence": GradDiff's GA term counts forget sequences, the retain term retain sequences
    c3 = sf.StepCounts.of([b1, b2], sf.get_method("graddiff"), normalize="sequence")
    assert c3.normalizers() == (4.0, 4.0) and c3.retain_tokens == 13.0


def test_collate_from_padded_and_views():
    col = DataCollator(pad_token_id=9)
    forget = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5, 6], "labels": [-100, 6]}]
    retain = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}]
    b = sf.ForgetRetainBatch.collate(forget, retain, col, index=[7, 2])
    assert b.n_forget == 2 and b.n_retain == 1 and b.index.tolist() == [7, 2]
    assert b.input_ids.tolist() == [[5, 6, 7, 9], [5, 6, 9, 9], [1, 2, 3, 4]]
    assert b.retain_labels.tolist() == [[-100, -100, 3, 4]] and b.forget_labels.shape == (2, 4)
    ids, mask = b.retain_inputs()
    assert ids.tolist() == [[1, 2, 3, 4]] and mask.tolist() == [[1, 1, 1, 1]]
    j = sf.ForgetRetainBatch.from_padded(col.pad(forget), col.pad(retain), 9)
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(j, k), getattr(b, k))
    only = sf.ForgetRetainBatch.collate(forget, None, col)
    assert only.n_retain == 0 and only.retain_labels is None and only.retain_inputs() is None
    ref = b.with_ref_logp(torch.arange(10, dtype=torch.float32))
    assert ref.ref_logp_sum.tolist() == [7.0, 2.0] and b.ref_logp_sum is None
    assert b.to("cpu").input_ids.data_ptr() == b.input_ids.data_ptr()


def test_batch_errors():
    y = _labels([1, 2])
    with pytest.raises(ValueError, match="n_forget=3"):
        sf.ForgetRetainBatch(y, y, y, 3)
    with pytest.raises(ValueError, match="labels"):
        sf.ForgetRetainBatch(y, y, y[:, :5], 1)
    with pytest.raises(ValueError, match=r"index must be \[n_forget\]"):
        sf.ForgetRetainBatch(y, y, y, 1, index=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="no index"):
        sf.ForgetRetainBatch(y, y, y, 1).with_ref_logp(torch.zeros(4))


def _rows(F, R, seed):
    hf, W, b, yf, ref = make(F, 16, 24, 300, seed=seed)
    hr, _, _, yr, _ = make(R, 16, 24, 300, seed=seed + 1)
    return hf, hr, W, b, yf, yr, ref


@pytest.mark.parametrize("objective", ["simnpo", "npo", "graddiff", "finetune"])
def test_batch_loss_equals_forward_and_oracle(objective):
    hf, hr, W, b, yf, yr, ref = _rows(3, 2, 11)
    crit = sf.UnlearningLoss(objective, forget_weight=0.25, retain_weight=0.7, beta=0.5 if objective == "npo" else 3.0)
    with_retain = crit.uses_retain
    hidden = torch.cat([hf, hr]) if with_retain else hf
    labels = torch.cat([yf, yr]) if with_retain else yf
    batch = sf.ForgetRetainBatch(torch.zeros_like(labels), torch.ones_like(labels), labels, 3,
                                 ref_logp_sum=ref if objective == "npo" else None)
    got = crit.batch_loss(W, b, hidden, batch)
    want = crit(W, hf, yf, hr if with_retain else None, yr if with_retain else None, bias=b,
                ref_logp_sum=batch.ref_logp_sum)
    assert torch.equal(got.loss, want.loss) and set(got.terms) == set(want.terms)
    kind = {"simnpo": "simnpo", "npo": "npo", "graddiff": "ga", "finetune": "nll"}[objective]
    oracle = 0.25 * oracle_loss(kind, hf, W, yf, b, beta=crit.forget_objective.__dict__.get("beta"), ref=ref)
    if with_retain:
        oracle = oracle + 0.7 * oracle_loss("nll", hr, W, yr, b)
    assert relerr(got.loss, oracle) < 1e-5


@pytest.mark.parametrize("objective", ["simnpo", "graddiff"])
def test_batch_loss_accumulates_to_the_full_batch(objective):
    """Two micro-batches normalised by their StepCounts give the gradient of one batch of all rows."""
    hf, hr, W, b, yf, yr, _ = _rows(4, 4, 21)
    yf[1, :] = -100  # a forget row without answer tokens leaves the sequence count
    crit = sf.UnlearningLoss(objective, forget_weight=0.5, retain_weight=1.0)
    full = crit(W, hf, yf, hr, yr, bias=b).loss
    g_full = torch.autograd.grad(full, [W, b, hf, hr])
    halves = []
    for s in (slice(0, 2), slice(2, 4)):
        y = torch.cat([yf[s], yr[s]])
        halves.append((torch.cat([hf[s], hr[s]]), sf.ForgetRetainBatch(torch.zeros_like(y), torch.ones_like(y), y, 2)))
    counts = sf.StepCounts.of([bt for _, bt in halves], crit.method)
    acc = sum(crit.batch_loss(W, b, h, bt, counts).loss for h, bt in halves)
    assert relerr(acc, full) < 1e-6
    for a, w in zip(torch.autograd.grad(acc, [W, b, hf, hr]), g_full):
        assert relerr(a, w) < 1e-5


def test_batch_loss_retain_kl_through_the_reference_head():
    from tests.test_kl import make as make_kl

    h, W, b, hr, Wr, br, y = make_kl(B=3, T=20, d=24, dr=16, V=200, seed=3)
    hf, _, _, yf, _ = make(2, 20, 24, 200, seed=8)
    crit = sf.UnlearningLoss("simnpo", retain_weight=0.6, retain_loss="kl", beta=2.0)
    assert crit.retain_loss == "kl"
    labels = torch.cat([yf, y])
    batch = sf.ForgetRetainBatch(torch.zeros_like(labels), torch.ones_like(labels), labels, 2)
    ref = sf.ReferenceHead(hr, Wr, br)
    out = crit.batch_loss(W, b, torch.cat([hf, h]), batch, reference=ref)
    kl_sum, n_kl = kl_oracle(h, W, b, hr, Wr, br, y)
    want = oracle_loss("simnpo", hf, W, yf, b, beta=2.0) + 0.6 * kl_sum / n_kl
    assert relerr(out.loss, want) < 1e-5
    assert torch.equal(out.terms["retain_n_tokens"], (y[:, 1:] != -100).sum(1))
    naive = sf.UnlearningLoss("simnpo", retain_weight=0.6, retain_loss="kl", beta=2.0, backend="reference")
    assert relerr(naive.batch_loss(W, b, torch.cat([hf, h]), batch, reference=ref).loss, want) < 1e-5
    with pytest.raises(ValueError, match="needs reference="):
        crit.batch_loss(W, b, torch.cat([hf, h]), batch)
    with pytest.raises(ValueError, match="retain batch"):
        crit.batch_loss(W, b, hf, sf.ForgetRetainBatch(torch.zeros_like(yf), torch.ones_like(yf), yf, 2))
    with pytest.raises(ValueError, match="retain_loss must be"):
        sf.UnlearningLoss("simnpo", retain_loss="kll")
    # a method without a retain term ignores retain_loss / retain_weight (e.g. the trainer's config default)
    ga = sf.UnlearningLoss("ga", retain_loss="kl", retain_weight=1.0)
    assert (ga.retain_loss, ga.retain_weight, ga.uses_retain) == ("none", 0.0, False)
