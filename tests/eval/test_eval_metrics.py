"""Every metric on hand-computed cases (and scipy / sklearn-free oracles on the same numbers)."""
import math

import numpy as np
import pytest

from simnpo_fast.eval import metrics as M


def test_length_normalised_prob_is_geometric_mean_token_prob():
    # two tokens of p=0.5 and 0.125: mean log p = log(0.25) -> 0.25
    lp = math.log(0.5) + math.log(0.125)
    assert M.length_normalised_prob([lp], [2])[0] == pytest.approx(0.25, rel=1e-12)
    with pytest.raises(ValueError):
        M.length_normalised_prob([0.0], [0])


def test_option_probability_hand():
    assert M.option_probability(0.5, [0.25, 0.25]) == pytest.approx(0.5)
    assert M.option_probability(0.2, [0.2, 0.2, 0.2]) == pytest.approx(0.25)


def test_truth_ratio_hand_and_stat():
    # perturbed 0.1 and 0.3 -> mean 0.2; paraphrased 0.4 -> R = 0.5, stat = 0.5
    r = M.truth_ratio(0.4, [0.1, 0.3])
    assert r == pytest.approx(0.5)
    assert M.truth_ratio_stat([r, 2.0, 1.0]) == pytest.approx([0.5, 0.0, 0.0])
    with pytest.raises(ValueError):
        M.truth_ratio(0.4, [])


def test_harmonic_mean_hand():
    assert M.harmonic_mean([1, 2, 4]) == pytest.approx(3 / (1 + 0.5 + 0.25))  # 12/7
    assert M.harmonic_mean([0.5] * 9) == pytest.approx(0.5)
    assert M.harmonic_mean([0.3, 0.0, 1.0]) == 0.0
    with pytest.raises(ValueError):
        M.harmonic_mean([-1, 2])


def test_ks_pvalue_hand_computed():
    # Disjoint samples of sizes 3 and 3: D = 1, exact two-sided p = 2 / C(6,3) = 0.1
    assert M.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1, rel=1e-9)
    # Identical samples: D = 0, p = 1
    assert M.forget_quality([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    # sizes 2 and 2 disjoint: p = 2 / C(4,2) = 1/3
    assert M.forget_quality([0.1, 0.2], [0.5, 0.9]) == pytest.approx(1 / 3, rel=1e-9)


def test_ks_matches_scipy_on_random_numbers():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(0.5, size=37)
    assert M.forget_quality(a, b) == ks_2samp(a, b).pvalue


def test_min_k_prob_hand():
    lp = [-0.1, -3.0, -0.5, -2.0, -1.0]
    # k = 40% of 5 tokens = 2 lowest: -3, -2 -> -2.5
    assert M.min_k_prob(lp, 0.4) == pytest.approx(-2.5)
    assert M.min_k_prob(lp, 1.0) == pytest.approx(np.mean(lp))
    # at least one token: 10% of 5 -> floor 0 -> 1 token
    assert M.min_k_prob(lp, 0.1) == pytest.approx(-3.0)
    # 40% of 10 tokens = exactly 4 (no float round-down to 3)
    assert M.min_k_prob(list(range(10)), 0.4) == pytest.approx(1.5)


def test_auc_hand_and_ties():
    assert M.auc([3, 4], [1, 2]) == 1.0
    assert M.auc([1, 2], [3, 4]) == 0.0
    # pairs: (2 vs 1)>, (2 vs 3)<, (5 vs 1)>, (5 vs 3)> -> 3/4
    assert M.auc([2, 5], [1, 3]) == pytest.approx(0.75)
    # one tie counts 1/2: pos [1], neg [1] -> 0.5
    assert M.auc([1.0], [1.0]) == pytest.approx(0.5)
    # pos [2, 2], neg [2, 1]: pairs >,=,>,= -> (1+0.5+1+0.5)/4
    assert M.auc([2, 2], [2, 1]) == pytest.approx(0.75)


def test_auc_matches_brute_force():
    rng = np.random.default_rng(1)
    p, n = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 25).astype(float)
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in p for y in n])
    assert M.auc(p, n) == pytest.approx(brute, abs=1e-12)


def test_privleak_hand():
    assert M.privleak(0.75, 0.5) == pytest.approx(0.5)
    assert M.privleak(0.5, 0.5) == 0.0
    assert M.privleak(0.25, 0.5) == pytest.approx(-0.5)


def test_rouge_recall_vs_f1_hand():
    # target 4 words, prediction 2 words all in the LCS: recall 2/4, precision 2/2, F1 = 2/3
    r = M.rouge_l("the cat sat down", "cat down")
    assert r["recall"] == pytest.approx(0.5)
    assert r["precision"] == pytest.approx(1.0)
    assert r["fmeasure"] == pytest.approx(2 / 3)
    assert M.rouge_l_recall("the cat sat down", "cat down") == pytest.approx(0.5)
    assert M.rouge_l_f1("the cat sat down", "cat down") == pytest.approx(2 / 3)
    # LCS is order-sensitive: "down cat" shares an LCS of length 1
    assert M.rouge_l_recall("the cat sat down", "down cat") == pytest.approx(0.25)
    # stemmer on: "running" ~ "run"
    assert M.rouge_l_recall("he runs", "he running") == pytest.approx(1.0)
