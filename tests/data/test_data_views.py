"""Evaluation views: paraphrased / perturbed candidates tokenised exactly like training examples."""
import json
import os

import pytest

from simnpo_fast.data import (CandidateCollator, DataCollator, DataError, DataWarning, encode_candidates,
                              load_candidates, load_eval_view)

M = -100


def _file_rows(d, name):
    with open(os.path.join(d, name + ".json"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_candidate(tok, ex, prompt_ids, text):
    """Oracle: prompt ids masked, then the separately tokenised ' ' + text and EOS as targets (for this byte-level
    BPE the same tokens as the joint tokenisation: its pre-tokenizer splits before ' ' + word)."""
    ans = tok(" " + text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == prompt_ids + ans
    assert ex["labels"] == [M] * len(prompt_ids) + ans


def test_tofu_forget10_perturbed_view(tofu_dir, bpe_tok):
    view = load_eval_view(tofu_dir, "forget10_perturbed", bpe_tok)
    rows = _file_rows(tofu_dir, "forget10_perturbed")
    assert len(view) == len(rows) == 400
    for it in view.items[:5] + view.items[-2:]:
        r = rows[it["row"]]
        prompt = [bpe_tok.bos_token_id] + bpe_tok(f"Question: {r['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        _check_candidate(bpe_tok, it["answer"], prompt, r["answer"])
        _check_candidate(bpe_tok, it["paraphrased"], prompt, r["paraphrased_answer"])
        assert len(it["perturbed"]) == 5
        for ex, text in zip(it["perturbed"], r["perturbed_answer"]):
            _check_candidate(bpe_tok, ex, prompt, text)


def test_paraphrased_question_view(tofu_dir, bpe_tok):
    """llama2 on the paraphrased question, against TOFU's TextDatasetQA encoding: '[INST] q [/INST]' + answer
    (no space) tokenised once, the question's tokens masked, EOS appended."""
    view = load_eval_view(tofu_dir, "forget01_perturbed", bpe_tok, question="paraphrased_question", template="llama2")
    r = _file_rows(tofu_dir, "forget01_perturbed")[0]
    prompt = f"[INST] {r['paraphrased_question']} [/INST]"
    for ex, text in [(view[0]["answer"], r["answer"])] + list(zip(view[0]["perturbed"], r["perturbed_answer"])):
        full = bpe_tok(prompt + text)["input_ids"]
        n_q = len(bpe_tok.tokenize(prompt, add_special_tokens=True))
        assert ex["input_ids"] == full + [bpe_tok.eos_token_id]
        assert ex["labels"] == [M] * n_q + full[n_q:] + [bpe_tok.eos_token_id]


@pytest.mark.parametrize("name,n", [("real_authors", 100), ("world_facts", 117)])
def test_tofu_control_sets(tofu_dir, bpe_tok, name, n):
    rows = load_candidates(tofu_dir, name)
    file_rows = _file_rows(tofu_dir, name + "_perturbed")
    assert len(rows) == len(file_rows) == n
    assert [r["perturbed_answer"] for r in rows] == [r["perturbed_answer"] for r in file_rows]
    assert all(r["paraphrased_answer"] is None for r in rows)
    view = encode_candidates(rows, bpe_tok)
    batch = CandidateCollator(DataCollator.from_tokenizer(bpe_tok))([view[i] for i in range(4)])
    C = [len(rows[i]["perturbed_answer"]) for i in range(4)]
    assert batch["answer"]["input_ids"].shape[0] == 4 and "paraphrased" not in batch
    assert batch["perturbed"]["input_ids"].shape[0] == sum(C)
    assert batch["num_perturbed"].tolist() == C
    assert batch["perturbed_owner"].tolist() == [i for i in range(4) for _ in range(C[i])]


def test_options_layout_is_read_too(tmp_path, bpe_tok):
    (tmp_path / "real_authors.json").write_text(
        '{"question": "Who wrote X?", "option1": "A", "option2": "B", "option3": "C", "answer": "B"}\n')
    rows = load_candidates(str(tmp_path), "real_authors")
    assert rows[0]["perturbed_answer"] == ["A", "C"] and rows[0]["answer"] == "B"
    (tmp_path / "bad_perturbed.json").write_text('{"question": "q", "answer": "a", "perturbed_answer": "x"}\n'
                                                 '{"question": "q", "answer": "a", "perturbed_answer": [1]}\n')
    with pytest.raises(DataError, match=r"bad_perturbed\.json, row 1, field 'perturbed_answer'"):
        load_candidates(str(tmp_path), "bad_perturbed")


def test_candidate_rows_dropped_when_prompt_does_not_fit(bpe_tok):
    rows = [{"question": "Who?", "answer": "Me.", "paraphrased_answer": "It is me.", "perturbed_answer": ["You.", "Them."]},
            {"question": "Who " * 100, "answer": "Me.", "paraphrased_answer": None, "perturbed_answer": ["You."]}]
    with pytest.warns(DataWarning, match=r"dropped 1 question"):
        view = encode_candidates(rows, bpe_tok, max_length=64)
    assert len(view) == 1 and view.dropped_rows == [1] and view[0]["row"] == 0
    assert len(view[0]["perturbed"]) == 2 and view[0]["paraphrased"] is not None
