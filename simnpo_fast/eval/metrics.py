"""Pure metric functions (numbers in, numbers out): the TOFU and MUSE definitions, nothing model-specific.

TOFU (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning for LLMs", Sec. 2.5):

* **Probability** on forget / retain: ``P(a|q)^(1/|a|) = exp(mean token log p of the answer)``.
  On real authors / world facts (multiple choice): ``P(a|q)^(1/|a|) / sum_{a' in {a} + perturbed} P(a'|q)^(1/|a'|)``.
* **ROUGE-L recall** of the greedy generation against the ground-truth answer (``rouge-score``, stemmer on).
* **Truth ratio** ``R_truth = (1/|A_pert|) sum_{a_pert} P(a_pert|q)^(1/|a_pert|) / P(a_para|q)^(1/|a_para|)``
  (paraphrased answer in the denominator; the real-authors / world-facts files have no paraphrase, so the
  answer itself is used). For model utility the retain-side statistic is ``max(0, 1 - R_truth)`` per question
  ("higher is better"); for **forget quality** the raw ``R_truth`` of the forget set is compared with a
  retain-only model's by a two-sample Kolmogorov-Smirnov test and the p-value is reported (high = the two
  distributions cannot be told apart = forgotten as if never trained on).
* **Model utility**: harmonic mean of the nine numbers {probability, ROUGE, truth-ratio stat} x {retain,
  real authors, world facts}.

MUSE (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"):

* **VerbMem** / **KnowMem**: ROUGE-L F1 of greedy continuations / few-shot answers against the ground truth.
* **PrivLeak**: Min-K% Prob (Shi et al., 2023, "Detecting Pretraining Data from LLMs": mean of the k% lowest
  token log-probs of a text, k = 40%) scores forget (members) and holdout (non-members) texts; the AUC of
  "member" vs "non-member" is compared with a retrained model's: ``PrivLeak = (AUC - AUC_retrain) / AUC_retrain``.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


# ----------------------------------------------------------------------------- probabilities

def length_normalised_prob(logp_sum, n_tokens) -> np.ndarray:
    """``exp(logp_sum / n_tokens)`` elementwise: the per-token geometric-mean probability ``P(a|q)^(1/|a|)``."""
    lp = np.asarray(logp_sum, dtype=np.float64)
    n = np.asarray(n_tokens, dtype=np.float64)
    if np.any(n <= 0):
        raise ValueError("every answer needs at least one target token (n_tokens > 0)")
    return np.exp(lp / n)


def option_probability(correct: float, wrong: Sequence[float]) -> float:
    """Multiple-choice probability: ``correct / (correct + sum(wrong))`` of length-normalised probabilities."""
    wrong = [float(w) for w in wrong]
    total = float(correct) + sum(wrong)
    if total <= 0.0:
        raise ValueError("all option probabilities are zero")
    return float(correct) / total


def truth_ratio(paraphrased: float, perturbed: Sequence[float]) -> float:
    """TOFU's ``R_truth`` of one question from length-normalised probabilities: mean(perturbed) / paraphrased."""
    perturbed = [float(p) for p in perturbed]
    if not perturbed:
        raise ValueError("truth ratio needs at least one perturbed answer")
    if paraphrased <= 0.0:
        return math.inf
    return float(np.mean(perturbed)) / float(paraphrased)


def truth_ratio_stat(r_truth) -> np.ndarray:
    """The model-utility statistic ``max(0, 1 - R_truth)`` (elementwise; TOFU Sec. 2.5, retain-side sets)."""
    return np.maximum(0.0, 1.0 - np.asarray(r_truth, dtype=np.float64))


def forget_quality(unlearned_truth_ratios: Sequence[float], retain_truth_ratios: Sequence[float]) -> float:
    """TOFU forget quality: the two-sample KS-test p-value between the forget-set truth ratios of the unlearned
    model and of the retain-only model (``scipy.stats.ks_2samp``, two-sided, method ``auto``)."""
    from scipy.stats import ks_2samp

    a = np.asarray(unlearned_truth_ratios, dtype=np.float64)
    b = np.asarray(retain_truth_ratios, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget quality needs two non-empty samples of truth ratios")
    return float(ks_2samp(a, b).pvalue)


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (the TOFU model-utility convention); negative values are an error."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("harmonic mean of nothing")
    if np.any(v < 0) or np.any(~np.isfinite(v)):
        raise ValueError(f"harmonic mean needs finite non-negative values, got {v.tolist()}")
    if np.any(v == 0):
        return 0.0
    return float(v.size / np.sum(1.0 / v))


# ----------------------------------------------------------------------------- ROUGE

_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def rouge_l(target: str, prediction: str) -> dict:
    """``{"precision", "recall", "fmeasure"}`` of ROUGE-L (LCS; ``rouge-score`` with the Porter stemmer)."""
    s = _scorer().score(target, prediction)["rougeL"]
    return {"precision": float(s.precision), "recall": float(s.recall), "fmeasure": float(s.fmeasure)}


def rouge_l_recall(target: str, prediction: str) -> float:
    return rouge_l(target, prediction)["recall"]


def rouge_l_f1(target: str, prediction: str) -> float:
    return rouge_l(target, prediction)["fmeasure"]


# ----------------------------------------------------------------------------- MUSE

def min_k_prob(token_logprobs: Sequence[float], k: float = 0.4) -> float:
    """Min-K% Prob: mean of the ``max(1, floor(k * n))`` lowest token log-probabilities of one text."""
    lp = np.sort(np.asarray(token_logprobs, dtype=np.float64))
    if lp.size == 0:
        raise ValueError("Min-K% Prob of an empty text")
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    m = max(1, int(math.floor(k * lp.size + 1e-9)))
    return float(lp[:m].mean())


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """ROC AUC of scores where ``positive`` should score higher: ``P(s_pos > s_neg) + 0.5 P(s_pos == s_neg)``
    over all pairs (the Mann-Whitney U statistic / (n_pos n_neg)), computed exactly with ranks."""
    from scipy.stats import rankdata

    p = np.asarray(positive, dtype=np.float64)
    n = np.asarray(negative, dtype=np.float64)
    if p.size == 0 or n.size == 0:
        raise ValueError("AUC needs non-empty positive and negative samples")
    ranks = rankdata(np.concatenate([p, n]))  # average ranks for ties
    u = ranks[: p.size].sum() - p.size * (p.size + 1) / 2.0
    return float(u / (p.size * n.size))


def privleak(auc_unlearned: float, auc_retrain: float) -> float:
    """MUSE PrivLeak ``(AUC_unlearn - AUC_retrain) / AUC_retrain`` (a fraction; MUSE tables show it x100 in %).
    Near 0 is good; large positive = under-unlearned (forget still looks like training data), negative =
    over-unlearned."""
    if auc_retrain <= 0:
        raise ValueError("retrain AUC must be positive")
    return (float(auc_unlearned) - float(auc_retrain)) / float(auc_retrain)
