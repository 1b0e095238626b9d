"""Every metric against an independent re-implementation written here from the reference code, on hand-built
per-candidate numbers: locuslab/tofu ``aggregate_eval_stat.py`` (``get_model_utility``, ``get_forget_quality``)
and swj0419/muse_bench ``metrics/privleak.py`` (``inference``, ``sweep``) + ``eval.py`` (PrivLeak), with
sklearn's ``roc_curve`` / ``auc`` re-derived here (sklearn is not a dependency)."""
import math

import numpy as np
import pytest
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp

from simnpo_fast.eval import metrics as M

# ----------------------------------------------------------------------------- TOFU: the reference aggregation


def _ref_model_utility(logs: dict) -> dict:
    """aggregate_eval_stat.get_model_utility, transcribed: ``logs`` = {eval_task: {'avg_gt_loss': {i: l},
    'average_perturb_loss': {i: [l, ...]}, 'avg_paraphrased_loss': {i: l}, 'rougeL_recall': {i: r}}}."""
    names = {"eval_real_author_wo_options.json": "Real Authors", "eval_real_world_wo_options.json": "Real World",
             "eval_log.json": "Retain", "eval_log_forget.json": "Forget"}
    out = {}
    for k, v in logs.items():
        if "eval_log" in k:
            out[f"Prob. {names[k]}"] = np.mean(np.exp(-1 * np.array(list(v["avg_gt_loss"].values()))))
        else:
            true_p = np.exp(-1 * np.array(list(v["avg_gt_loss"].values())))
            false_p = np.exp(-1 * np.array(list(v["average_perturb_loss"].values())))
            all_p = np.concatenate([np.expand_dims(true_p, axis=-1), false_p], axis=1).sum(-1)
            out[f"Prob. {names[k]}"] = np.mean(true_p / all_p)
        out[f"ROUGE {names[k]}"] = np.array(list(v["rougeL_recall"].values())).mean()
        para = np.array(list(v["avg_paraphrased_loss"].values()))
        pert = np.array(list(v["average_perturb_loss"].values())).mean(axis=-1)
        curr = np.exp(pert - para)
        if "forget" in k:
            out[f"Truth Ratio {names[k]}"] = np.mean(np.minimum(curr, 1 / curr))
        else:
            out[f"Truth Ratio {names[k]}"] = np.mean(np.maximum(0, 1 - 1 / curr))
    out["Model Utility"] = hmean([v for k, v in out.items() if "Forget" not in k])
    return out


def _ref_forget_quality(unlearn_forget: dict, retain_forget: dict) -> float:
    """aggregate_eval_stat.get_forget_quality, transcribed."""
    def tr(log):
        para = np.array(list(log["avg_paraphrased_loss"].values()))
        pert = np.array(list(log["average_perturb_loss"].values())).mean(axis=-1)
        return np.exp(pert - para)
    return ks_2samp(tr(unlearn_forget), tr(retain_forget)).pvalue


def _hand_logs(seed: int, n: int = 300, k: int = 5, shift: float = 0.0) -> dict:
    """Hand-built per-candidate average losses (= -mean log-likelihood) in the reference's eval-log layout.
    Real authors / world facts have no paraphrase: their 'avg_paraphrased_loss' is the answer's own loss
    (``base_answer_key: answer`` in eval_everything.yaml)."""
    rng = np.random.default_rng(seed)
    logs = {}
    for task, m in (("eval_log.json", n), ("eval_real_author_wo_options.json", 100),
                    ("eval_real_world_wo_options.json", 117), ("eval_log_forget.json", n)):
        gt = rng.gamma(2.0, 0.4, m) + (shift if "forget" in task else 0.0)
        para = rng.gamma(2.0, 0.5, m) + (shift if "forget" in task else 0.0) if "eval_log" in task else gt
        pert = rng.gamma(3.0, 0.6, (m, k))
        logs[task] = {"avg_gt_loss": dict(enumerate(gt)), "avg_paraphrased_loss": dict(enumerate(para)),
                      "average_perturb_loss": {i: list(p) for i, p in enumerate(pert)},
                      "rougeL_recall": dict(enumerate(rng.uniform(0, 1, m)))}
    return logs


def _ours(log: dict, multiple_choice: bool, forget: bool) -> dict:
    """The project's functions on the same per-candidate numbers (mean log-likelihood = -avg loss)."""
    q = sorted(log["avg_gt_loss"])
    prob, tr = [], []
    for i in q:
        p_ans = math.exp(-log["avg_gt_loss"][i])
        pert_lp = [-x for x in log["average_perturb_loss"][i]]
        prob.append(M.option_probability(p_ans, [math.exp(x) for x in pert_lp]) if multiple_choice else p_ans)
        tr.append(M.truth_ratio_logp(-log["avg_paraphrased_loss"][i], pert_lp))
    stat = M.forget_truth_ratio_stat(tr) if forget else M.truth_ratio_stat(tr)
    return {"prob": np.mean(prob), "rouge": np.mean([log["rougeL_recall"][i] for i in q]),
            "stat": np.mean(stat), "tr": tr}


def test_tofu_aggregates_equal_the_reference_aggregation():
    logs = _hand_logs(0)
    ref = _ref_model_utility(logs)
    nine = []
    for task, name in (("eval_log.json", "Retain"), ("eval_real_author_wo_options.json", "Real Authors"),
                       ("eval_real_world_wo_options.json", "Real World"), ("eval_log_forget.json", "Forget")):
        got = _ours(logs[task], "eval_log" not in task, "forget" in task)
        assert got["prob"] == pytest.approx(ref[f"Prob. {name}"], rel=1e-12)
        assert got["stat"] == pytest.approx(ref[f"Truth Ratio {name}"], rel=1e-12)
        if name != "Forget":
            nine += [got["prob"], got["rouge"], got["stat"]]
    assert M.harmonic_mean(nine) == pytest.approx(ref["Model Utility"], rel=1e-12)


def test_forget_quality_equals_reference_ks_on_reciprocal():
    unl, ret = _hand_logs(1, shift=0.3), _hand_logs(2)
    ours = M.forget_quality(_ours(unl["eval_log_forget.json"], False, True)["tr"],
                            _ours(ret["eval_log_forget.json"], False, True)["tr"])
    assert ours == _ref_forget_quality(unl["eval_log_forget.json"], ret["eval_log_forget.json"])
    assert 0.0 < ours < 1e-3  # the shifted forget losses are told apart
    same = M.forget_quality(_ours(ret["eval_log_forget.json"], False, True)["tr"],
                            _ours(ret["eval_log_forget.json"], False, True)["tr"])
    assert same == pytest.approx(1.0)


def test_truth_ratio_geometric_by_hand_and_arithmetic_option():
    # p_para = 0.5, perturbed 0.1 and 0.4: geometric sqrt(0.04) / 0.5 = 0.4; the paper's arithmetic 0.25 / 0.5
    assert M.truth_ratio(0.5, [0.1, 0.4]) == pytest.approx(0.4, rel=1e-12)
    assert M.truth_ratio(0.5, [0.1, 0.4], mean="arithmetic") == pytest.approx(0.5, rel=1e-12)
    # the same from mean log-likelihoods, as evaluate_util: exp(gt_loss - mean(perturb_loss))
    para_loss, pert_loss = -math.log(0.5), [-math.log(0.1), -math.log(0.4)]
    assert M.truth_ratio_logp(-para_loss, [-x for x in pert_loss]) == pytest.approx(
        math.exp(para_loss - np.mean(pert_loss)), rel=1e-12)
    # far-apart log-likelihoods do not underflow: exp(-900 - (-1000)) = e^100
    assert M.truth_ratio_logp(-1000.0, [-900.0]) == pytest.approx(math.exp(100.0), rel=1e-12)
    assert M.truth_ratio(0.0, [0.1]) == math.inf
    with pytest.raises(ValueError):
        M.truth_ratio(0.4, [])
    with pytest.raises(ValueError):
        M.truth_ratio(0.4, [0.1], mean="harmonic")


def test_truth_ratio_stats_by_hand():
    r = [0.5, 2.0, 1.0, 0.25]
    assert M.truth_ratio_stat(r) == pytest.approx([0.5, 0.0, 0.0, 0.75])
    assert M.forget_truth_ratio_stat(r) == pytest.approx([0.5, 0.5, 1.0, 0.25])
    assert np.all(M.forget_truth_ratio_stat(np.linspace(0.01, 50, 101)) <= 1.0)


def test_option_probability_and_length_normalisation_hand():
    assert M.option_probability(0.5, [0.25, 0.25]) == pytest.approx(0.5)
    lp = math.log(0.5) + math.log(0.125)  # two tokens: geometric mean 0.25
    assert M.length_normalised_prob([lp], [2])[0] == pytest.approx(0.25, rel=1e-12)
    with pytest.raises(ValueError):
        M.length_normalised_prob([0.0], [0])


def test_harmonic_mean_is_scipy_hmean():
    v = [0.3, 0.9, 0.5, 0.71]
    assert M.harmonic_mean(v) == pytest.approx(hmean(v), rel=1e-12)
    assert M.harmonic_mean([0.3, 0.0, 1.0]) == 0.0
    with pytest.raises(ValueError):
        M.harmonic_mean([-1, 2])


def test_ks_pvalue_hand_computed():
    assert M.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1, rel=1e-9)  # 2 / C(6, 3)
    assert M.forget_quality([0.1, 0.2], [0.5, 0.9]) == pytest.approx(1 / 3, rel=1e-9)  # 2 / C(4, 2)


def test_rouge_tofu_recall_stemmed_muse_f1_unstemmed():
    stem = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # evaluate_util.eval_rouge_recall
    plain = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)  # MUSE logger
    for gt, gen in (("the cat sat down", "cat down"), ("he runs fast", "he running fast"), ("a b c", "x y")):
        assert M.rouge_l_recall(gt, gen) == stem.score(gt, gen)["rougeL"].recall
        assert M.rouge_l_f1(gt, gen) == plain.score(gt, gen)["rougeL"].fmeasure
    # stemming is what tells them apart: "runs" / "running" match only stemmed
    assert M.rouge_l_recall("he runs", "he running") == pytest.approx(1.0)
    assert M.rouge_l_f1("he runs", "he running") == pytest.approx(0.5)


# ----------------------------------------------------------------------------- MUSE: Min-K%, AUC, PrivLeak


def _ref_min_k(all_prob, ratio=0.4):
    """metrics/privleak.inference, transcribed."""
    k_length = int(len(all_prob) * ratio)
    topk_prob = np.sort(all_prob)[:k_length]
    return float(-np.mean(topk_prob).item())


def _sk_roc_auc(y, score):
    """sklearn.metrics.roc_curve(y, score) + auc(fpr, tpr), re-derived: thresholds at the distinct scores in
    decreasing order, cumulative true / false positives, trapezoidal area."""
    y, score = np.asarray(y), np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order], score[order]
    idx = np.r_[np.where(np.diff(score))[0], y.size - 1]
    tps = np.cumsum(y)[idx]
    fps = 1 + idx - tps
    tpr, fpr = np.r_[0, tps] / tps[-1], np.r_[0, fps] / fps[-1]
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))


def _ref_privleak(forget_lps, holdout_lps, corpus="news"):
    """metrics/privleak.eval (split0 = forget -> y 0, split1 = holdout -> y 1; sweep: roc_curve(y, -ppl)) and
    eval.eval_model's PrivLeak with constants.AUC_RETRAIN[corpus]['forget_holdout_Min-40%']."""
    ppl = np.array([_ref_min_k(p) for p in forget_lps] + [_ref_min_k(p) for p in holdout_lps])
    y = np.array([0] * len(forget_lps) + [1] * len(holdout_lps))
    auc = _sk_roc_auc(y, -ppl)
    retrain = {"news": 0.47719999999999996, "books": 0.5392999999999999}[corpus]
    return auc, (auc - retrain) / retrain * 100


def test_min_k_score_is_muse_inference():
    rng = np.random.default_rng(0)
    for n in (3, 5, 10, 11, 37, 2049):
        lp = list(-rng.exponential(2.0, n))
        assert M.min_k_score(lp, 0.4) == pytest.approx(_ref_min_k(lp), rel=1e-12)
    assert M.min_k_score([-0.1, -3.0, -0.5, -2.0, -1.0], 0.4) == pytest.approx(2.5)  # int(5 * .4) = 2 lowest
    with pytest.raises(ValueError, match="selects no token"):  # int(2 * 0.4) = 0: MUSE would give NaN
        M.min_k_score([-1.0, -2.0], 0.4)


def test_roc_auc_equals_sklearn_curve_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        s = rng.integers(0, 6, 60).astype(float)  # many ties
        assert M.roc_auc(y, s) == pytest.approx(_sk_roc_auc(y, s), abs=1e-12)
    with pytest.raises(ValueError):
        M.roc_auc([1, 1], [0.1, 0.2])


def _texts(rng, n, lo, hi, length=40):
    return [list(rng.uniform(lo, hi, length)) for _ in range(n)]


def test_privleak_sign_memorised_model_is_strongly_negative():
    """A model that memorised its forget texts (token log-probs near 0) and not the holdout texts (around -3):
    every forget text scores a lower Min-40% than every holdout text, AUC = 0, PrivLeak = -100 (News)."""
    rng = np.random.default_rng(2)
    forget, holdout = _texts(rng, 20, -0.05, 0.0), _texts(rng, 20, -6.0, -1.0)
    sf = [M.min_k_score(t) for t in forget]
    sh = [M.min_k_score(t) for t in holdout]
    auc = M.privleak_auc(sf, sh)
    ref_auc, ref_pl = _ref_privleak(forget, holdout)
    assert auc == pytest.approx(ref_auc, abs=1e-12) and auc == 0.0
    assert M.privleak(auc, M.AUC_RETRAIN["news"]) == pytest.approx(ref_pl) == pytest.approx(-100.0)
    # over-unlearned (forget texts now *less* likely than holdout ones): strongly positive
    auc_over = M.privleak_auc([M.min_k_score(t) for t in _texts(rng, 20, -9.0, -7.0)], sh)
    assert auc_over == 1.0 and M.privleak(auc_over, M.AUC_RETRAIN["news"]) == pytest.approx(
        (1 - 0.4772) / 0.4772 * 100, rel=1e-3)


def test_privleak_mixed_case_equals_reference_both_corpora():
    rng = np.random.default_rng(3)  # every text its own log-prob range: the two sets overlap
    forget = [list(rng.uniform(rng.uniform(-4.0, -2.0), -0.1, 40)) for _ in range(30)]
    holdout = [list(rng.uniform(rng.uniform(-4.5, -2.2), -0.1, 40)) for _ in range(25)]
    sf = [M.min_k_score(t) for t in forget]
    sh = [M.min_k_score(t) for t in holdout]
    for corpus in ("news", "books"):
        ref_auc, ref_pl = _ref_privleak(forget, holdout, corpus)
        assert M.privleak_auc(sf, sh) == pytest.approx(ref_auc, abs=1e-12)
        assert 0.0 < ref_auc < 1.0
        assert M.privleak(M.privleak_auc(sf, sh), M.AUC_RETRAIN[corpus]) == pytest.approx(ref_pl, rel=1e-12)
    assert M.AUC_RETRAIN == {"news": pytest.approx(0.4772), "books": pytest.approx(0.5393)}
    with pytest.raises(ValueError):
        M.privleak(0.5, 0.0)
