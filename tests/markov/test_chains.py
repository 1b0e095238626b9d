"""The Markov-chain data: matrices against the reference's formula by hand, the sampler against its matrices
(independent per-entry z-scores and the chi-square check, which must also reject a wrong matrix)."""
import numpy as np
import pytest

from simnpo_fast.markov.chains import (CHAINS, batch, initial_distribution, make_chain, make_data, sample,
                                       transition_chi2, transition_matrix)


def test_matrices_by_hand():
    """S=10, leakage 0.2 (run_synthetic.sh): blocks {0,1,2}, {3,4,5}, {6,7,8}; state 9 in none."""
    T = {c: transition_matrix(c, 10, 0.2) for c in CHAINS}
    for c, blk in zip(CHAINS, ([0, 1, 2], [3, 4, 5], [6, 7, 8])):
        others = [s for s in range(10) if s not in blk]
        for s in blk:
            np.testing.assert_allclose(T[c][s, blk], 0.8 / 3)
            np.testing.assert_allclose(T[c][s, others], 0.2 / 7)
        for s in others:  # a row of leak/(S-k) normalised by the reference: uniform
            np.testing.assert_allclose(T[c][s], 0.1)
        pi = initial_distribution(c, 10, 0.2)
        np.testing.assert_allclose(pi[blk], 0.8 / 3)
        np.testing.assert_allclose(pi[others], 0.2 / 7)
        np.testing.assert_allclose(T[c].sum(1), 1.0)
    assert transition_matrix("forget2", 9, 0.1)[8, 6] == pytest.approx(0.9 / 3)


@pytest.mark.parametrize("name", CHAINS)
def test_sampler_matches_its_matrix(name):
    T, pi = transition_matrix(name, 10, 0.2), initial_distribution(name, 10, 0.2)
    seqs = sample(T, pi, 3000, 20, np.random.default_rng(123))
    assert seqs.shape == (3000, 20) and seqs.min() >= 0 and seqs.max() < 10
    # independent check: every empirical transition frequency within 4.5 standard errors of T
    src, dst = seqs[:, :-1].ravel(), seqs[:, 1:].ravel()
    for s in range(10):
        n = int((src == s).sum())
        freq = np.bincount(dst[src == s], minlength=10) / n
        z = np.abs(freq - T[s]) / np.sqrt(T[s] * (1 - T[s]) / n)
        assert z.max() < 4.5, (name, s, z.max())
    first = np.bincount(seqs[:, 0], minlength=10) / len(seqs)
    assert (np.abs(first - pi) / np.sqrt(pi * (1 - pi) / len(seqs))).max() < 4.5
    assert transition_chi2(seqs, T)["p_value"] > 1e-3


def test_chi2_rejects_the_wrong_matrix():
    rng = np.random.default_rng(0)
    f1 = sample(transition_matrix("forget1", 10, 0.2), initial_distribution("forget1", 10, 0.2), 2000, 20, rng)
    assert transition_chi2(f1, transition_matrix("retain", 10, 0.2))["p_value"] < 1e-12
    assert transition_chi2(f1, transition_matrix("forget1", 10, 0.25))["p_value"] < 1e-6  # leakage 0.25, not 0.2
    res = transition_chi2(f1, transition_matrix("forget1", 10, 0.2))
    assert res["rows"] == 10 and res["dof"] == 90


def test_streams_splits_and_shared_retain_data():
    kw = dict(seed=3, n_states=10, leakage=0.2, test_frac=0.2, sizes={"retain": 50, "forget1": 20, "forget2": 20})
    a = make_data(lengths={"retain": 20, "forget1": 20, "forget2": 5}, **kw)
    b = make_data(lengths={"retain": 20, "forget1": 20, "forget2": 20}, **kw)
    np.testing.assert_array_equal(a["retain"].train, b["retain"].train)  # same retain data in both settings
    np.testing.assert_array_equal(a["forget1"].test, b["forget1"].test)
    assert a["retain"].train.shape == (40, 20) and a["retain"].test.shape == (10, 20)
    assert a["forget2"].length == 5 and b["forget2"].length == 20
    other = make_chain("retain", seed=4, n=50, length=20, n_states=10, leakage=0.2)
    assert not np.array_equal(other.train, a["retain"].train)


def test_batch_masks_first_state_and_padding():
    b = batch([np.array([1, 2, 3, 4]), np.array([5, 6])])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3, 4], [-100, 6, -100, -100]]


@pytest.mark.parametrize("kw, match", [({"leakage": 0.0}, "leakage"), ({"leakage": 1.0}, "leakage"),
                                       ({"n_states": 2}, "n_states"), ({"length": 1}, "length"),
                                       ({"n": 2}, "empty"), ({"name": "forget3"}, "unknown chain")])
def test_bad_input_is_a_clear_error(kw, match):
    args = dict(name="retain", seed=0, n=10, length=5, n_states=10, leakage=0.2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        make_chain(args.pop("name"), **args)
