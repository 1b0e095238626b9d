"""Pure metric functions (numbers in, numbers out): the TOFU and MUSE definitions *as their reference code
computes them*, nothing model-specific. Every function names the reference file and function it follows.

TOFU (Maini et al., 2024). References: locuslab/tofu ``evaluate_util.py`` (``get_all_evals``,
``eval_perturbation_ratio``, ``eval_rouge_recall``), ``aggregate_eval_stat.py`` (``get_model_utility``,
``get_forget_quality``), ``config/eval_everything.yaml``; open-unlearning ``src/evals/metrics/memorization.py``
(``probability``, ``probability_w_options``, ``truth_ratio``) and ``src/evals/metrics/utils.py``
(``evaluate_probability``, ``eval_text_similarity``, ``get_forget_quality``).

* Per candidate answer the reference stores the *average loss* ``avg_loss = -logp_sum / n_tokens`` (answer
  tokens plus EOS; ``get_batch_loss(...) / num_token``). Its probability is ``exp(-avg_loss)`` =
  ``P(a|q)^(1/|a|)`` (:func:`length_normalised_prob`).
* **Probability** on forget / retain: the mean over questions of ``exp(-avg_loss(answer))``. On real authors /
  world facts: ``p(answer) / (p(answer) + sum_k p(perturbed_k))`` (:func:`option_probability`).
* **ROUGE-L recall** of the greedy generation against the ground truth, ``rouge_score`` with the Porter
  stemmer (:func:`rouge_l_recall`).
* **Truth ratio** of one question, the *code's* definition (a geometric mean over the perturbed answers)::

      R = exp(avg_loss(paraphrased) - mean_k avg_loss(perturbed_k))
        = (prod_k p(perturbed_k))^(1/K) / p(paraphrased)     (:func:`truth_ratio_logp`, :func:`truth_ratio`)

  (``evaluate_util.eval_perturbation_ratio``: ``truth_ratio = exp(gt_loss_per_token -
  perturb_loss_per_token.mean(-1))``; ``aggregate_eval_stat.py`` works with its reciprocal
  ``curr_stat_1 = exp(mean_k avg_loss(perturbed_k) - avg_loss(paraphrased)) = 1/R``). The TOFU paper's prose writes
  an *arithmetic* mean of the perturbed probabilities; every published number (TOFU, SimNPO, open-unlearning)
  comes from the code, so the geometric mean is the default and the arithmetic one is only an option
  (``mean="arithmetic"``). Real authors / world facts have no paraphrase: the answer is the denominator
  (``base_answer_key: answer`` in ``eval_everything.yaml``).
* Truth-ratio **statistics** ("Truth Ratio <set>" of ``get_model_utility``): on the forget set
  ``mean(min(R, 1/R))`` (<= 1; 1 = the true answer is no more likely than the wrong ones;
  :func:`forget_truth_ratio_stat`), on the other sets ``mean(max(0, 1 - R))`` (higher = the true answer is more
  likely than the wrong ones; :func:`truth_ratio_stat`).
* **Forget quality**: ``ks_2samp`` p-value between the forget-set ``R`` of the evaluated model and of the
  retain-only model (:func:`forget_quality`; the KS test is invariant to the strictly decreasing map ``R -> 1/R``
  applied to both samples, so this equals the reference's test on ``curr_stat_1``).
* **Model utility**: harmonic mean (``scipy.stats.hmean``) of the nine numbers {probability, ROUGE-L recall,
  truth-ratio statistic} x {retain, real authors, world facts} (:func:`harmonic_mean`).

MUSE (Shi et al., 2024). References: swj0419/muse_bench ``eval.py`` (``eval_model``), ``constants.py``
(``AUC_RETRAIN``), ``metrics/verbmem.py``, ``metrics/knowmem.py``, ``metrics/privleak.py`` (``compute_ppl``,
``inference``, ``sweep``, ``eval``), ``metrics/logger.py`` (``RougeEvalLogger``); the same files in
OPTML-Group/Unlearn-Simple ``MUSE/``.

* **VerbMem** / **KnowMem**: mean ROUGE-L **F1** (``fmeasure``), ``rouge_score`` *without* stemming
  (:func:`rouge_l_f1`). MUSE's tables show the mean x 100.
* **Min-K% Prob** score of a text (:func:`min_k_score`): with ``lp`` the log-probabilities of every token after
  the first, ``Min-K% = -mean(sort(lp)[:int(len(lp) * k)])`` (a positive number; low = the text looks like
  training data). k = 40%.
* **AUC** (:func:`privleak_auc`): ``sklearn roc_curve(y, -score)`` + ``auc`` with forget texts labelled 0 and
  holdout texts labelled 1 (key ``forget_holdout_Min-40%``), i.e. ``P(-s_holdout > -s_forget) + P(tie)/2``:
  the probability that a holdout text looks *more* likely than a forget text. A model that memorised the
  forget texts gives them high likelihood (low Min-K% scores), so AUC -> 0.
* **PrivLeak** (:func:`privleak`): ``(AUC - AUC_retrain) / AUC_retrain * 100`` with ``AUC_retrain`` of
  ``constants.py`` (News 0.4772, Books 0.5393; :data:`AUC_RETRAIN`). Close to 0 is good (the unlearned model
  looks like the retrained one); strongly negative = under-unlearned (memorised: about -100); strongly
  positive = over-unlearned.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

# MUSE constants.py: AUC_RETRAIN[corpus]["forget_holdout_Min-40%"] (the retrained model's AUC).
AUC_RETRAIN = {"news": 0.47719999999999996, "books": 0.5392999999999999}
MUSE_K = 0.4


# ----------------------------------------------------------------------------- probabilities

def length_normalised_prob(logp_sum, n_tokens) -> np.ndarray:
    """``exp(logp_sum / n_tokens)`` elementwise: ``P(a|q)^(1/|a|) = exp(-avg_loss)`` (TOFU ``avg_gt_loss``)."""
    lp = np.asarray(logp_sum, dtype=np.float64)
    n = np.asarray(n_tokens, dtype=np.float64)
    if np.any(n <= 0):
        raise ValueError("every answer needs at least one target token (n_tokens > 0)")
    return np.exp(lp / n)


def option_probability(correct: float, wrong: Sequence[float]) -> float:
    """Multiple-choice probability ``correct / (correct + sum(wrong))`` of length-normalised probabilities
    (``aggregate_eval_stat.get_model_utility``, real authors / world facts)."""
    wrong = [float(w) for w in wrong]
    total = float(correct) + sum(wrong)
    if total <= 0.0:
        raise ValueError("all option probabilities are zero")
    return float(correct) / total


def truth_ratio_logp(paraphrased_mean_logp: float, perturbed_mean_logp: Sequence[float], *,
                     mean: str = "geometric") -> float:
    """TOFU's ``R`` of one question from mean log-likelihoods ``mean_logp = -avg_loss`` (no underflow).

    ``mean="geometric"`` (the reference code, default): ``exp(mean_k lp_k - lp_para)``, i.e.
    ``exp(avg_loss_para - mean_k avg_loss_k)`` (``evaluate_util.eval_perturbation_ratio``; the reciprocal of
    ``aggregate_eval_stat``'s ``curr_stat_1``); ``mean="arithmetic"`` (the paper's prose):
    ``mean_k exp(lp_k - lp_para)``."""
    pert = np.asarray([float(p) for p in perturbed_mean_logp], dtype=np.float64)
    if pert.size == 0:
        raise ValueError("truth ratio needs at least one perturbed answer")
    para = float(paraphrased_mean_logp)
    if mean == "geometric":
        return float(np.exp(pert.mean() - para))
    if mean == "arithmetic":
        return float(np.mean(np.exp(pert - para)))
    raise ValueError(f"mean must be 'geometric' or 'arithmetic', got {mean!r}")


def truth_ratio(paraphrased: float, perturbed: Sequence[float], *, mean: str = "geometric") -> float:
    """:func:`truth_ratio_logp` from length-normalised probabilities ``p = exp(mean_logp)``:
    ``(prod_k p_k)^(1/K) / p_para`` (geometric, default) or ``mean_k p_k / p_para`` (arithmetic).
    ``p_para == 0`` gives ``inf``."""
    if not [p for p in perturbed]:
        raise ValueError("truth ratio needs at least one perturbed answer")
    if paraphrased <= 0.0:
        return math.inf
    with np.errstate(divide="ignore"):
        return truth_ratio_logp(math.log(float(paraphrased)), np.log(np.asarray(perturbed, dtype=np.float64)),
                                mean=mean)


def truth_ratio_stat(r_truth) -> np.ndarray:
    """Retain-side truth-ratio statistic ``max(0, 1 - R)`` elementwise (``get_model_utility``: ``max(0, 1 -
    1/curr_stat_1)``; open-unlearning ``truth_ratio`` aggregator ``true_better``). Mean it over questions."""
    return np.maximum(0.0, 1.0 - np.asarray(r_truth, dtype=np.float64))


def forget_truth_ratio_stat(r_truth) -> np.ndarray:
    """Forget-set truth-ratio statistic ``min(R, 1/R)`` elementwise, in (0, 1] (``get_model_utility``:
    ``np.minimum(curr_stat_1, 1/curr_stat_1)``; open-unlearning aggregator ``closer_to_1_better``)."""
    r = np.asarray(r_truth, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.minimum(r, 1.0 / r)


def forget_quality(unlearned_truth_ratios: Sequence[float], retain_truth_ratios: Sequence[float]) -> float:
    """TOFU forget quality: two-sample KS-test p-value (``scipy.stats.ks_2samp``, two-sided, method ``auto``)
    between the forget-set truth ratios of the evaluated model and of the retain-only model
    (``aggregate_eval_stat.get_forget_quality``)."""
    from scipy.stats import ks_2samp

    a = np.asarray(unlearned_truth_ratios, dtype=np.float64)
    b = np.asarray(retain_truth_ratios, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget quality needs two non-empty samples of truth ratios")
    return float(ks_2samp(a, b).pvalue)


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean (``scipy.stats.hmean`` of ``get_model_utility``); 0 when any value is 0; negative or
    non-finite values are an error."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("harmonic mean of nothing")
    if np.any(v < 0) or np.any(~np.isfinite(v)):
        raise ValueError(f"harmonic mean needs finite non-negative values, got {v.tolist()}")
    if np.any(v == 0):
        return 0.0
    return float(v.size / np.sum(1.0 / v))


# ----------------------------------------------------------------------------- ROUGE

_SCORERS: dict = {}


def _scorer(use_stemmer: bool):
    if use_stemmer not in _SCORERS:
        from rouge_score import rouge_scorer

        _SCORERS[use_stemmer] = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return _SCORERS[use_stemmer]


def rouge_l(target: str, prediction: str, *, use_stemmer: bool) -> dict:
    """``{"precision", "recall", "fmeasure"}`` of ROUGE-L (LCS of ``rouge_score``'s lower-cased alphanumeric
    tokens), with or without the Porter stemmer."""
    s = _scorer(bool(use_stemmer)).score(target, prediction)["rougeL"]
    return {"precision": float(s.precision), "recall": float(s.recall), "fmeasure": float(s.fmeasure)}


def rouge_l_recall(target: str, prediction: str) -> float:
    """TOFU's ROUGE-L **recall**, stemmer on (``evaluate_util.eval_rouge_recall``)."""
    return rouge_l(target, prediction, use_stemmer=True)["recall"]


def rouge_l_f1(target: str, prediction: str) -> float:
    """MUSE's ROUGE-L **F1**, stemmer off (``metrics/logger.RougeEvalLogger``: ``use_stemmer=False``,
    ``score['rougeL'].fmeasure``)."""
    return rouge_l(target, prediction, use_stemmer=False)["fmeasure"]


# ----------------------------------------------------------------------------- MUSE

def min_k_score(token_logprobs: Sequence[float], k: float = MUSE_K) -> float:
    """MUSE's ``Min-K%`` score of one text (``metrics/privleak.inference``): ``-mean`` of the
    ``int(len(lp) * k)`` lowest token log-probabilities ``lp`` (tokens after the first). Positive; lower = more
    likely = more "member"-like. A text with ``int(len(lp) * k) == 0`` has no score (MUSE gets NaN): error."""
    lp = np.sort(np.asarray(token_logprobs, dtype=np.float64))
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    m = int(lp.size * k)
    if m == 0:
        raise ValueError(f"Min-{k:.0%} of a text with {lp.size} scored token(s) selects no token "
                         f"(MUSE would give NaN); the text needs at least {math.ceil(1 / k)} tokens after the first")
    return float(-lp[:m].mean())


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve of ``scores`` for the positive class ``labels == 1`` (what ``sklearn``'s
    ``roc_curve`` + ``auc`` give): ``P(s_pos > s_neg) + P(s_pos == s_neg) / 2`` over all pairs, computed exactly
    with average ranks (Mann-Whitney U / (n_pos n_neg))."""
    from scipy.stats import rankdata

    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    pos, neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if pos + neg != y.size:
        raise ValueError("labels must be 0 or 1")
    if pos == 0 or neg == 0:
        raise ValueError("AUC needs both classes")
    ranks = rankdata(s)
    u = ranks[y == 1].sum() - pos * (pos + 1) / 2.0
    return float(u / (pos * neg))


def privleak_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """MUSE's ``forget_holdout_Min-40%`` AUC (``metrics/privleak.eval`` + ``sweep``): forget texts labelled 0
    ("non-member" slot ``split0``), holdout texts labelled 1, ranked by ``-score``. Memorised forget texts
    (low Min-K% scores) push it to 0; a retrained model gives ~0.48 (News)."""
    f = np.asarray(forget_scores, dtype=np.float64)
    h = np.asarray(holdout_scores, dtype=np.float64)
    if f.size == 0 or h.size == 0:
        raise ValueError("PrivLeak AUC needs forget and holdout scores")
    y = np.concatenate([np.zeros(f.size, dtype=int), np.ones(h.size, dtype=int)])
    return roc_auc(y, -np.concatenate([f, h]))


def privleak(auc_unlearned: float, auc_retrain: float) -> float:
    """MUSE PrivLeak in percent (``eval.eval_model``): ``(AUC - AUC_retrain) / AUC_retrain * 100``. Near 0 is
    good; strongly negative (about -100) = the forget texts still look memorised (under-unlearned); strongly
    positive = over-unlearned."""
    if not auc_retrain > 0:
        raise ValueError(f"retrain AUC must be positive, got {auc_retrain}")
    return (float(auc_unlearned) - float(auc_retrain)) / float(auc_retrain) * 100.0
