"""TOFU metrics end to end on a bigram LM whose probabilities are known exactly (oracle: products of table
entries computed here, independently of the fused kernels, the encoders and the batching)."""
import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from simnpo_fast.eval import metrics as M
from simnpo_fast.eval.tofu import TofuEvalConfig, evaluate_tofu, reference_truth_ratios

from .conftest import TINY_TOFU, BigramLM, random_table


def _ids(tok, words):
    return tok.convert_tokens_to_ids(words)


def _oracle_p(lm, tok, question, answer):
    """Length-normalised p(answer + EOS | "[BOS] Question: q Answer:") from the table."""
    prompt = ["[BOS]", "Question:"] + question.split() + ["Answer:"]
    ans = answer.split() + ["[EOS]"]
    ids = _ids(tok, prompt + ans)
    p = lm.seq_prob(ids[len(prompt) - 1:])
    return p ** (1.0 / len(ans))


def _oracle_greedy(lm, tok, question, max_new):
    prev = _ids(tok, ["Answer:"])[0]
    out = []
    eos = tok.eos_token_id
    for _ in range(max_new):
        nxt = int(torch.argmax(lm.table[prev]))
        if nxt == eos:
            break
        out.append(nxt)
        prev = nxt
    return tok.decode(out, skip_special_tokens=True).strip()


def _expected(lm, tok, rows, multiple_choice, max_new):
    prob, tr, rouge = [], [], []
    for r in rows:
        pa = _oracle_p(lm, tok, r["question"], r["answer"])
        pert = [_oracle_p(lm, tok, r["question"], a) for a in r["perturbed_answer"]]
        para = _oracle_p(lm, tok, r["question"], r["paraphrased_answer"]) if "paraphrased_answer" in r else pa
        prob.append(pa / (pa + sum(pert)) if multiple_choice else pa)
        tr.append(np.mean(pert) / para)
        gen = _oracle_greedy(lm, tok, r["question"], max_new)
        rouge.append(M.rouge_l_recall(r["answer"], gen))
    return prob, tr, rouge


def test_uniform_model_hand_values(tiny_tofu, wtok):
    V = len(wtok)
    lm = BigramLM(torch.full((V, V), 1.0 / V, dtype=torch.float64))
    res = evaluate_tofu(lm, wtok, tiny_tofu, TofuEvalConfig(generation=False, batch_size=2))
    s = res["sets"]
    # every token has p = 1/V: length-normalised probability 1/V, truth ratio exactly 1, stat 0
    assert s["forget"]["probability"] == pytest.approx(1 / V, rel=1e-9)
    assert s["retain"]["truth_ratio"] == pytest.approx(1.0, rel=1e-9)
    assert s["forget"]["truth_ratio_stat"] == pytest.approx(0.0, abs=1e-9)
    # multiple choice with 1 correct + 3 (real authors row 0) / 2 wrong options, all equally likely
    assert s["real_authors"]["per_example"]["probability"] == pytest.approx([1 / 4, 1 / 3], rel=1e-9)
    assert s["world_facts"]["probability"] == pytest.approx(1 / 3, rel=1e-9)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_bigram_model_matches_table_oracle(tiny_tofu, wtok, batch_size):
    V = len(wtok)
    lm = BigramLM(random_table(V, seed=3, temp=0.5))
    cfg = TofuEvalConfig(batch_size=batch_size, gen_batch_size=batch_size, max_new_tokens=6)
    res = evaluate_tofu(lm, wtok, tiny_tofu, cfg)
    nine = []
    for name, file in (("forget", "forget10_perturbed"), ("retain", "retain_perturbed"),
                       ("real_authors", "real_authors_perturbed"), ("world_facts", "world_facts_perturbed")):
        rows = TINY_TOFU[file]
        prob, tr, rouge = _expected(lm, wtok, rows, name in ("real_authors", "world_facts"), 6)
        got = res["sets"][name]
        assert got["per_example"]["probability"] == pytest.approx(prob, rel=1e-9)
        assert got["per_example"]["truth_ratio"] == pytest.approx(tr, rel=1e-9)
        assert got["per_example"]["rouge_l_recall"] == pytest.approx(rouge, abs=1e-12)
        assert got["probability"] == pytest.approx(np.mean(prob), rel=1e-9)
        stat = np.mean(np.maximum(0, 1 - np.array(tr)))
        assert got["truth_ratio_stat"] == pytest.approx(stat, rel=1e-9, abs=1e-12)
        if name != "forget":
            nine += [np.mean(prob), np.mean(rouge), stat]
    assert len(nine) == 9
    hm = 0.0 if min(nine) == 0 else 9 / sum(1 / x for x in nine)
    assert res["model_utility"] == pytest.approx(hm, rel=1e-9)


def test_forget_quality_against_reference_result_and_json(tiny_tofu, wtok, tmp_path):
    import json

    V = len(wtok)
    a = BigramLM(random_table(V, seed=1))
    b = BigramLM(random_table(V, seed=2))
    cfg = TofuEvalConfig(generation=False, sets=("forget",))
    ref = evaluate_tofu(b, wtok, tiny_tofu, cfg)
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(ref))
    res = evaluate_tofu(a, wtok, tiny_tofu, cfg, reference=str(path))
    tra = res["sets"]["forget"]["per_example"]["truth_ratio"]
    trb = reference_truth_ratios(ref)
    assert res["forget_quality"] == ks_2samp(tra, trb).pvalue
    # the same model as its own reference: identical distributions, p = 1
    same = evaluate_tofu(b, wtok, tiny_tofu, cfg, reference=ref)
    assert same["forget_quality"] == pytest.approx(1.0)
    assert "model_utility" not in res  # only the forget set was evaluated
