"""TOFU metrics end to end on a bigram LM whose probabilities are known exactly (oracle: products of table
entries computed here, independently of the fused kernels, the encoders and the batching), the reference's
aggregation re-applied to the per-candidate numbers of the result, and the protocols."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import hmean, ks_2samp

from simnpo_fast.eval import metrics as M
from simnpo_fast.eval.tofu import (PROTOCOLS, TofuEvalConfig, evaluate_tofu, generation_budgets,
                                   reference_truth_ratios)

from .conftest import TINY_TOFU, BigramLM, random_table

SET_FILES = (("forget", "forget10_perturbed"), ("retain", "retain_perturbed"),
             ("real_authors", "real_authors_perturbed"), ("world_facts", "world_facts_perturbed"))


def _ids(tok, words):
    return tok.convert_tokens_to_ids(words)


def _oracle_mean_logp(lm, tok, question, answer):
    """(mean log p, token count) of answer + EOS after "[BOS] Question: q Answer:" from the table."""
    prompt = ["[BOS]", "Question:"] + question.split() + ["Answer:"]
    ans = answer.split() + ["[EOS]"]
    ids = _ids(tok, prompt + ans)
    return math.log(lm.seq_prob(ids[len(prompt) - 1:])) / len(ans), len(ans)


def _oracle_greedy(lm, tok, max_new):
    prev, out = _ids(tok, ["Answer:"])[0], []
    for _ in range(max_new):
        nxt = int(torch.argmax(lm.table[prev]))
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
        prev = nxt
    return tok.decode(out, skip_special_tokens=True).strip()


def _expected(lm, tok, rows, name, max_new):
    """TOFU's per-question numbers from the table: probability, R = exp(mean_k lp_k - lp_para) (the
    answer as denominator without a paraphrase), ROUGE-L recall of the greedy answer."""
    prob, tr, rouge = [], [], []
    for r in rows:
        a, _ = _oracle_mean_logp(lm, tok, r["question"], r["answer"])
        pert = [_oracle_mean_logp(lm, tok, r["question"], x)[0] for x in r["perturbed_answer"]]
        para = _oracle_mean_logp(lm, tok, r["question"], r["paraphrased_answer"])[0] if "paraphrased_answer" in r \
            else a
        prob.append(math.exp(a) / (math.exp(a) + sum(map(math.exp, pert)))
                    if name in ("real_authors", "world_facts") else math.exp(a))
        tr.append(math.exp(np.mean(pert) - para))
        rouge.append(M.rouge_l_recall(r["answer"], _oracle_greedy(lm, tok, max_new)))
    return prob, tr, rouge


def test_uniform_model_hand_values(tiny_tofu, wtok):
    V = len(wtok)
    lm = BigramLM(torch.full((V, V), 1.0 / V, dtype=torch.float64))
    res = evaluate_tofu(lm, wtok, tiny_tofu, TofuEvalConfig(generation=False, batch_size=2))
    s = res["sets"]
    # every token has p = 1/V: probability 1/V, truth ratio exactly 1 -> retain stat 0, forget stat 1
    assert s["forget"]["probability"] == pytest.approx(1 / V, rel=1e-9)
    assert s["retain"]["truth_ratio"] == pytest.approx(1.0, rel=1e-9)
    assert s["retain"]["truth_ratio_stat"] == pytest.approx(0.0, abs=1e-9)
    assert s["forget"]["truth_ratio_stat"] == pytest.approx(1.0, rel=1e-9)
    assert s["forget"]["truth_ratio_stat_def"] == "mean(min(R, 1/R))"
    assert s["real_authors"]["per_example"]["probability"] == pytest.approx([1 / 4, 1 / 3], rel=1e-9)
    assert s["world_facts"]["probability"] == pytest.approx(1 / 3, rel=1e-9)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_bigram_model_matches_table_oracle(tiny_tofu, wtok, batch_size):
    V = len(wtok)
    lm = BigramLM(random_table(V, seed=3, temp=0.5))
    cfg = TofuEvalConfig(batch_size=batch_size, gen_batch_size=batch_size, max_new_tokens=6)
    res = evaluate_tofu(lm, wtok, tiny_tofu, cfg)
    nine = []
    for name, file in SET_FILES:
        prob, tr, rouge = _expected(lm, wtok, TINY_TOFU[file], name, 6)
        got = res["sets"][name]
        assert got["per_example"]["probability"] == pytest.approx(prob, rel=1e-9)
        assert got["per_example"]["truth_ratio"] == pytest.approx(tr, rel=1e-9)
        assert got["per_example"]["rouge_l_recall"] == pytest.approx(rouge, abs=1e-12)
        assert got["truth_ratio"] == pytest.approx(np.mean(tr), rel=1e-9)
        r = np.array(tr)
        stat = np.mean(np.minimum(r, 1 / r)) if name == "forget" else np.mean(np.maximum(0, 1 - r))
        assert got["truth_ratio_stat"] == pytest.approx(stat, rel=1e-9, abs=1e-12)
        if name != "forget":
            nine += [np.mean(prob), np.mean(rouge), stat]
    assert res["model_utility"] == pytest.approx(hmean(nine), rel=1e-9)


def test_per_candidate_numbers_recompute_every_aggregate(tiny_tofu, wtok):
    """The JSON's per-candidate numbers, fed to the reference aggregation (aggregate_eval_stat.get_model_utility
    written here), give the reported aggregates; and they are the table's own likelihoods."""
    V = len(wtok)
    lm = BigramLM(random_table(V, seed=4, temp=0.7))
    res = json.loads(json.dumps(evaluate_tofu(lm, wtok, tiny_tofu, TofuEvalConfig(max_new_tokens=5))))
    for name, file in SET_FILES:
        pe, rows = res["sets"][name]["per_example"], TINY_TOFU[file]
        for q, r in enumerate(rows):
            lp, n = _oracle_mean_logp(lm, wtok, r["question"], r["answer"])
            assert pe["answer_mean_logp"][q] == pytest.approx(lp, rel=1e-9) and pe["answer_n_tokens"][q] == n
            pert = [_oracle_mean_logp(lm, wtok, r["question"], x) for x in r["perturbed_answer"]]
            assert pe["perturbed_mean_logp"][q] == pytest.approx([p[0] for p in pert], rel=1e-9)
            assert pe["perturbed_n_tokens"][q] == [p[1] for p in pert]
            if "paraphrased_answer" in r:
                assert pe["paraphrased_mean_logp"][q] == pytest.approx(
                    _oracle_mean_logp(lm, wtok, r["question"], r["paraphrased_answer"])[0], rel=1e-9)
            else:
                assert pe["paraphrased_mean_logp"][q] is None
        # reference aggregation on avg losses = -mean log p
        gt = -np.array(pe["answer_mean_logp"])
        para = -np.array([p if p is not None else a for p, a in zip(pe["paraphrased_mean_logp"],
                                                                      pe["answer_mean_logp"])])
        pert = np.array([np.mean(-np.array(x)) for x in pe["perturbed_mean_logp"]])
        curr = np.exp(pert - para)  # aggregate_eval_stat's curr_stat_1 = 1/R
        if name == "forget":
            assert res["sets"][name]["truth_ratio_stat"] == pytest.approx(np.mean(np.minimum(curr, 1 / curr)))
        else:
            assert res["sets"][name]["truth_ratio_stat"] == pytest.approx(np.mean(np.maximum(0, 1 - 1 / curr)))
        if name in ("real_authors", "world_facts"):
            true_p = np.exp(-gt)
            all_p = true_p + np.array([np.exp(np.array(x)).sum() for x in pe["perturbed_mean_logp"]])
            assert res["sets"][name]["probability"] == pytest.approx(np.mean(true_p / all_p))
        else:
            assert res["sets"][name]["probability"] == pytest.approx(np.mean(np.exp(-gt)))
        assert res["sets"][name]["rouge_l_recall"] == pytest.approx(np.mean(pe["rouge_l_recall"]))


def test_forget_quality_against_reference_result_and_json(tiny_tofu, wtok, tmp_path):
    V = len(wtok)
    a, b = BigramLM(random_table(V, seed=1)), BigramLM(random_table(V, seed=2))
    cfg = TofuEvalConfig(generation=False, sets=("forget",))
    ref = evaluate_tofu(b, wtok, tiny_tofu, cfg)
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(ref))
    res = evaluate_tofu(a, wtok, tiny_tofu, cfg, reference=str(path))
    tra = res["sets"]["forget"]["per_example"]["truth_ratio"]
    trb = reference_truth_ratios(ref)
    assert trb == pytest.approx(ref["sets"]["forget"]["per_example"]["truth_ratio"], rel=1e-12)
    # the reference's KS test runs on curr_stat_1 = 1/R: the same p-value
    assert res["forget_quality"] == ks_2samp(1 / np.array(tra), 1 / np.array(trb)).pvalue
    same = evaluate_tofu(b, wtok, tiny_tofu, cfg, reference=ref)
    assert same["forget_quality"] == pytest.approx(1.0)
    assert "model_utility" not in res
    # an old JSON without per-candidate numbers (arithmetic truth ratios) is refused, not silently mixed in
    old = json.loads(path.read_text())
    del old["sets"]["forget"]["per_example"]["answer_mean_logp"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="evaluate the retain model again"):
        evaluate_tofu(a, wtok, tiny_tofu, cfg, reference=str(tmp_path / "old.json"))


def test_protocols_resolve_and_are_recorded(tiny_tofu, wtok):
    t = TofuEvalConfig().resolved()
    assert (t["max_examples"], t["max_length"], t["gen_max_length"], t["max_new_tokens"]) == (300, 200, 200, None)
    o = TofuEvalConfig(protocol="open-unlearning").resolved()
    assert (o["max_examples"], o["max_length"], o["max_new_tokens"]) == (None, 512, 200)
    over = TofuEvalConfig(max_new_tokens=7, max_examples=2).resolved()  # explicit values win (HF precedence)
    assert over["max_new_tokens"] == 7 and over["gen_max_length"] is None and over["max_examples"] == 2
    with pytest.raises(ValueError, match="unknown TOFU protocol"):
        TofuEvalConfig(protocol="nope").resolved()
    lm = BigramLM(random_table(len(wtok), seed=5))
    res = evaluate_tofu(lm, wtok, tiny_tofu, TofuEvalConfig(sets=("forget",), max_examples=2, generation=False))
    assert res["protocol"] == "tofu" and res["config"]["resolved"]["max_length"] == PROTOCOLS["tofu"]["max_length"]
    assert res["sets"]["forget"]["n"] == 2
    res = evaluate_tofu(lm, wtok, tiny_tofu, TofuEvalConfig(sets=("forget",), protocol="open-unlearning"))
    assert res["sets"]["forget"]["per_example"]["max_new_tokens"] == [200, 200, 200]


def test_tofu_generation_budget_counts_the_padded_batch_of_30():
    """evaluate_util.run_generation: generate(max_length=200) on left-padded batches of 30 questions in file
    order: budget = 200 - the longest prompt of the batch (written here independently)."""
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(20, 90, 75))
    want = []
    for i in range(75):
        b = i // 30
        want.append(200 - max(lengths[30 * b: 30 * b + 30]))
    assert generation_budgets(lengths, TofuEvalConfig().resolved()) == want
    assert generation_budgets(lengths, TofuEvalConfig(max_new_tokens=64).resolved()) == [64] * 75
    assert generation_budgets(lengths, TofuEvalConfig(protocol="open-unlearning").resolved()) == [200] * 75


def test_arithmetic_truth_ratio_is_a_named_option(tiny_tofu, wtok):
    lm = BigramLM(random_table(len(wtok), seed=6, temp=0.5))
    geo = evaluate_tofu(lm, wtok, tiny_tofu, TofuEvalConfig(sets=("forget",), generation=False))
    ari = evaluate_tofu(lm, wtok, tiny_tofu, TofuEvalConfig(sets=("forget",), generation=False,
                                                            truth_ratio_mean="arithmetic"))
    pe = geo["sets"]["forget"]["per_example"]
    want = [np.mean(np.exp(np.array(p) - q)) for p, q in zip(pe["perturbed_mean_logp"], pe["paraphrased_mean_logp"])]
    assert ari["sets"]["forget"]["per_example"]["truth_ratio"] == pytest.approx(want, rel=1e-12)
    # AM >= GM: the arithmetic ratio is never smaller
    assert all(x >= y - 1e-12 for x, y in zip(want, pe["truth_ratio"]))
    assert ari["config"]["truth_ratio_mean"] == "arithmetic"
    # forget quality under the option compares arithmetic ratios on both sides (the reference's recomputed too)
    ref_lm = BigramLM(random_table(len(wtok), seed=7, temp=0.5))
    ref = evaluate_tofu(ref_lm, wtok, tiny_tofu, TofuEvalConfig(sets=("forget",), generation=False))
    fq = evaluate_tofu(lm, wtok, tiny_tofu, TofuEvalConfig(sets=("forget",), generation=False,
                                                           truth_ratio_mean="arithmetic"), reference=ref)
    rpe = ref["sets"]["forget"]["per_example"]
    ref_ari = [np.mean(np.exp(np.array(p) - q))
               for p, q in zip(rpe["perturbed_mean_logp"], rpe["paraphrased_mean_logp"])]
    assert fq["forget_quality"] == ks_2samp(want, ref_ari).pvalue
