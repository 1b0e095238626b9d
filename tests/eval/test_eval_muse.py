"""MUSE metrics end to end on the bigram LM with known probabilities (oracle: the table, brute-force AUC)."""
import json
import math

import numpy as np
import pytest
import torch

from simnpo_fast.eval import metrics as M
from simnpo_fast.eval.muse import MuseEvalConfig, evaluate_muse, knowmem_prompt

from .conftest import BigramLM, random_table


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def muse_dir(tmp_path):
    d = tmp_path / "muse"
    _write(d / "verbmem" / "forget.json", [{"prompt": "a b", "gt": "c d e"}, {"prompt": "x", "gt": "y z"}])
    _write(d / "knowmem" / "forget_qa.json", [{"question": "who is a", "answer": "b c"},
                                               {"question": "what is x", "answer": "y"}])
    _write(d / "knowmem" / "forget_qa_icl.json", [{"question": "who is g", "answer": "f"}])
    _write(d / "knowmem" / "retain_qa.json", [{"question": "who is d", "answer": "e"}])
    _write(d / "privleak" / "forget.json", ["a b c d e", "x y z", "b b a"])
    _write(d / "privleak" / "holdout.json", [{"text": "e d c b a"}, {"text": "z z"}])
    return str(d)


def _ids(tok, text):
    return tok.convert_tokens_to_ids(text.split())


def _greedy(lm, last, n, eos):
    out = []
    for _ in range(n):
        nxt = int(torch.argmax(lm.table[last]))
        if nxt == eos:
            break
        out.append(nxt)
        last = nxt
    return out


def _min_k(lm, tok, text, k):
    ids = [tok.bos_token_id] + _ids(tok, text)
    lps = [math.log(float(lm.table[u, v])) for u, v in zip(ids[:-1], ids[1:])]
    m = max(1, int(math.floor(k * len(lps) + 1e-9)))
    return float(np.mean(sorted(lps)[:m]))


def test_muse_metrics_match_oracle(muse_dir, wtok):
    V = len(wtok)
    lm = BigramLM(random_table(V, seed=5, temp=0.4))
    cfg = MuseEvalConfig(verbmem_max_new_tokens=4, knowmem_max_new_tokens=3, batch_size=2)
    res = evaluate_muse(lm, wtok, muse_dir, cfg, retrain_auc=0.5)
    eos = wtok.eos_token_id
    # VerbMem: greedy continuation from the prompt's last token, ROUGE-L F1 vs gt
    vm = []
    for p, gt in (("a b", "c d e"), ("x", "y z")):
        gen = wtok.decode(_greedy(lm, _ids(wtok, p)[-1], 4, eos), skip_special_tokens=True)
        vm.append(M.rouge_l_f1(gt, gen))
    assert res["verbmem_forget"]["per_example"]["rouge_l_f1"] == pytest.approx(vm)
    assert res["summary"]["verbmem_forget"] == pytest.approx(np.mean(vm))
    # KnowMem: the prompt ends with "Answer:"; the bigram only sees that token
    km = []
    for q, a in (("who is a", "b c"), ("what is x", "y")):
        gen = wtok.decode(_greedy(lm, _ids(wtok, "Answer:")[0], 3, eos), skip_special_tokens=True)
        gen = gen.split("\n\n")[0].split("Question:")[0].strip()
        km.append(M.rouge_l_f1(a, gen))
    assert res["knowmem_forget"]["per_example"]["rouge_l_f1"] == pytest.approx(km)
    # PrivLeak: Min-K% (k=0.4) per text, AUC forget-vs-holdout by brute force, relative to retrain AUC
    sf = [_min_k(lm, wtok, t, 0.4) for t in ("a b c d e", "x y z", "b b a")]
    sh = [_min_k(lm, wtok, t, 0.4) for t in ("e d c b a", "z z")]
    assert res["privleak"]["forget_min_k"] == pytest.approx(sf, rel=1e-9)
    assert res["privleak"]["holdout_min_k"] == pytest.approx(sh, rel=1e-9)
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in sf for y in sh])
    assert res["privleak"]["auc"] == pytest.approx(brute)
    assert res["summary"]["privleak"] == pytest.approx((brute - 0.5) / 0.5)


def test_knowmem_prompt_layout():
    p = knowmem_prompt("q?", [{"question": "a?", "answer": "b"}])
    assert p == "Question: a?\nAnswer: b\n\nQuestion: q?\nAnswer:"
