"""Fused evaluation and weights of the Markov study against independent fp64 oracles (explicit logits, numpy
KL of the true rows, closed-form gradient weights), and the unlearning loss on a real mixed-length batch."""
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simnpo_fast.batch import ForgetRetainBatch
from simnpo_fast.markov.chains import batch, initial_distribution, sample, transition_matrix
from simnpo_fast.markov.core import (TrueChain, build_model, evaluate, make_criterion, make_evalset, make_schedule,
                                     sequence_weights)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=32)


def _seqs(name, n, length, seed=0):
    T = transition_matrix(name, 10, 0.2)
    return T, sample(T, initial_distribution(name, 10, 0.2), n, length, np.random.default_rng(seed))


def _kl_rows(P, Q):
    return (P * (np.log(P) - np.log(Q))).sum(-1)


def test_true_chain_has_zero_kl_and_the_kl_of_another_chain_is_the_numpy_one():
    Tr, _ = _seqs("retain", 1, 2)
    Tf, f1 = _seqs("forget1", 40, 20)
    s = make_evalset("forget1", f1, TrueChain(Tf), Tf)
    ev = evaluate(TrueChain(Tf), [s])["forget1"]
    assert abs(ev["kl_true"]) < 1e-6 and abs(ev["kl_retrain"]) < 1e-6
    other = evaluate(TrueChain(Tr), [s])["forget1"]  # the retain chain scored on forget1 data
    want = _kl_rows(Tf[f1[:, :-1]], Tr[f1[:, :-1]]).mean()  # every transition s_t -> s_t+1 is a target
    assert other["kl_true"] == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(other["logp"].numpy(), np.log(Tr[f1[:, :-1], f1[:, 1:]]).sum(1), rtol=1e-5)
    assert other["n"].tolist() == [19] * 40


def test_model_kl_matches_explicit_logits_on_mixed_lengths():
    torch.manual_seed(0)
    model, retrained = build_model(TINY, 10, seed=1), build_model(TINY, 10, seed=2)
    Tf, long = _seqs("forget2", 6, 20)
    _, short = _seqs("forget2", 6, 5, seed=1)
    seqs = list(long) + list(short)
    s = make_evalset("forget2", seqs, retrained, Tf)
    ev = evaluate(model, [s])["forget2"]
    b = batch(seqs)
    with torch.no_grad():
        lp = F.log_softmax(model.lm(b["input_ids"], attention_mask=b["attention_mask"]).logits.double(), -1)
        lq = F.log_softmax(retrained.lm(b["input_ids"], attention_mask=b["attention_mask"]).logits.double(), -1)
    kl_re, kl_true, logp = [], [], []
    for i, x in enumerate(seqs):
        n = len(x) - 1
        kl_re.append((lq[i, :n].exp() * (lq[i, :n] - lp[i, :n])).sum(-1))
        true = torch.as_tensor(Tf[x[:-1]])
        kl_true.append((true * (true.log() - lp[i, :n])).sum(-1))
        logp.append(lp[i, torch.arange(n), torch.as_tensor(x[1:])].sum())
    assert ev["kl_retrain"] == pytest.approx(float(torch.cat(kl_re).mean()), rel=1e-4)
    assert ev["kl_true"] == pytest.approx(float(torch.cat(kl_true).mean()), rel=1e-4)
    torch.testing.assert_close(ev["logp"], torch.stack(logp), rtol=1e-5, atol=1e-5)
    assert ev["tokens"] == 6 * 19 + 6 * 4


def test_sequence_weights_closed_forms():
    logp = torch.tensor([-40.0, -3.0, -0.5, -8.0], dtype=torch.float64)
    n = torch.tensor([19, 4, 4, 19])
    ref = torch.tensor([-38.0, -3.5, -0.5, -2.0], dtype=torch.float64)
    sim = make_criterion({"objective": "simnpo", "beta": 2.0, "gamma": 0.5})
    want = (2.0 / n) * torch.sigmoid(2.0 / n * logp + 0.5)
    torch.testing.assert_close(sequence_weights(sim, logp, n, ref_logp=None, mean_len=11.5), want)
    npo = make_criterion({"objective": "npo", "beta": 1.0, "retain_weight": 1.0})
    torch.testing.assert_close(sequence_weights(npo, logp, n, ref_logp=ref, mean_len=11.5),
                               2.0 * torch.sigmoid(logp - ref))
    assert sequence_weights(npo, ref, n, ref_logp=ref, mean_len=1.0).tolist() == [1.0] * 4  # at the start: all 1
    for obj in ("ga", "graddiff"):
        w = sequence_weights(make_criterion({"objective": obj}), logp, n, ref_logp=None, mean_len=11.5)
        torch.testing.assert_close(w, torch.full((4,), 1 / 11.5, dtype=torch.float64))


@pytest.mark.parametrize("spec", [{"objective": "simnpo", "beta": 1.0, "retain_weight": 1.0},
                                  {"objective": "npo", "beta": 1.0}, {"objective": "graddiff", "retain_weight": 1.0}])
def test_unlearning_loss_on_a_mixed_batch_is_the_reference_formula(spec):
    """One forget batch of lengths 20 and 5 + a retain batch, as the study builds it, against explicit logits
    (unlearn_utils.py: SimNPO_RT, NPO_loss, grad_diff_loss; |y| = the sequence's transitions)."""
    model = build_model(TINY, 10, seed=0)
    _, f_long = _seqs("forget1", 2, 20)
    _, f_short = _seqs("forget2", 2, 5)
    _, r = _seqs("retain", 4, 20)
    forget = [f_long[0], f_short[0], f_long[1], f_short[1]]
    b = batch(forget + list(r))
    ref = torch.tensor([-35.0, -6.0, -40.0, -5.0])
    crit = make_criterion(spec)
    fr = ForgetRetainBatch(b["input_ids"], b["attention_mask"], b["labels"], 4,
                           ref_logp_sum=ref if spec["objective"] == "npo" else None)
    with torch.no_grad():
        got = model(b["input_ids"], b["attention_mask"], functools.partial(crit.batch_loss, batch=fr))
        lp = F.log_softmax(model.lm(b["input_ids"], attention_mask=b["attention_mask"]).logits.double(), -1)
    tok = [lp[i, torch.arange(len(x) - 1), torch.as_tensor(x[1:])] for i, x in enumerate(forget + list(r))]
    f_logp = torch.stack([t.sum() for t in tok[:4]])
    n = torch.tensor([len(x) - 1 for x in forget], dtype=torch.float64)
    ce_r = -torch.cat(tok[4:]).mean()
    if spec["objective"] == "simnpo":
        want = (-2.0 * F.logsigmoid(-f_logp / n)).mean() + ce_r
    elif spec["objective"] == "npo":
        want = (-2.0 * F.logsigmoid(-(f_logp - ref.double()))).mean()
    else:
        want = torch.cat(tok[:4]).mean() + ce_r
    assert float(got.loss) == pytest.approx(float(want), rel=1e-5, abs=2e-6)  # GradDiff: a difference of ~2.3s


def test_schedule_is_deterministic_and_covers_each_pass():
    a = make_schedule(10, 7, iterations=6, batch_size=3, seed=0)
    assert a == make_schedule(10, 7, iterations=6, batch_size=3, seed=0)
    f = [i for fi, _ in a for i in fi]
    assert sorted(f[:10]) == list(range(10))  # a full pass before any repeat
    r = [i for _, ri in a for i in ri]
    assert sorted(r[:7]) == list(range(7)) and len(r) == 18
