"""Formatting and masking: labels = -100 on prompt and padding, answer + EOS are targets, exact token by token."""
import warnings

import pytest
import torch

from simnpo_fast.data import (IGNORE_INDEX, DataCollator, DataError, DataWarning, PromptTemplate, encode_qa,
                              encode_qa_batch, get_template, load_tofu)

M = IGNORE_INDEX
# WORDS ids (see conftest): <pad>0 <s>1 </s>2 Question:3 Who4 wrote5 it?6 Answer:7 Bob8 did.9 [INST]10 [/INST]11


def test_plain_template_mask_by_hand(word_tok):
    ex, rows, rep = encode_qa_batch(word_tok, ["Who wrote it?"], ["Bob did."], template="plain")
    assert ex[0]["input_ids"] == [1, 3, 4, 5, 6, 7, 8, 9, 2]
    assert ex[0]["labels"] == [M, M, M, M, M, M, 8, 9, 2]
    assert rows == [0] and rep.kept == 1


def test_llama2_template_mask_by_hand(word_tok):
    ex, _, _ = encode_qa_batch(word_tok, ["Who wrote it?", "What?"], ["Bob did.", "Yes."], template="llama2")
    assert ex[0]["input_ids"] == [1, 10, 4, 5, 6, 11, 8, 9, 2]
    assert ex[0]["labels"] == [M, M, M, M, M, M, 8, 9, 2]
    assert ex[1]["input_ids"] == [1, 10, 13, 11, 12, 2]
    assert ex[1]["labels"] == [M, M, M, M, 12, 2]


def test_eos_kept_when_pad_is_eos_by_hand(word_tok_eos_pad):
    tok = word_tok_eos_pad
    assert tok.pad_token_id == tok.eos_token_id == 2
    ex, _, _ = encode_qa_batch(tok, ["Who wrote it?", "What?"], ["Bob did.", "Yes."], template="llama2")
    b = DataCollator.from_tokenizer(tok)(ex)
    assert b["input_ids"].tolist() == [[1, 10, 4, 5, 6, 11, 8, 9, 2], [1, 10, 13, 11, 12, 2, 2, 2, 2]]
    # the short example's real EOS (position 5) is a target and attended; its padding (also id 2) is not
    assert b["labels"].tolist() == [[M, M, M, M, M, M, 8, 9, 2], [M, M, M, M, 12, 2, M, M, M]]
    assert b["attention_mask"].tolist() == [[1] * 9, [1] * 6 + [0] * 3]


def test_left_padding_and_multiple_of_by_hand(word_tok):
    ex, _, _ = encode_qa_batch(word_tok, ["Who wrote it?", "What?"], ["Bob did.", "Yes."], template="llama2")
    b = DataCollator(0, padding_side="left", pad_to_multiple_of=4)(ex)
    assert b["input_ids"].tolist() == [[0, 0, 0, 1, 10, 4, 5, 6, 11, 8, 9, 2], [0] * 6 + [1, 10, 13, 11, 12, 2]]
    assert b["labels"].tolist() == [[M] * 9 + [8, 9, 2], [M] * 10 + [12, 2]]
    assert b["attention_mask"].tolist() == [[0] * 3 + [1] * 9, [0] * 6 + [1] * 6]


def _offset_oracle(tok, prompt_text, answer_text, add_bos=True):
    """Independent oracle: tokenise the *whole* text once with offsets; a token is a target iff it starts at or
    after the end of the prompt text. BOS is prepended, EOS appended as a target."""
    enc = tok(prompt_text + answer_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = ([tok.bos_token_id] if add_bos else []), ([M] if add_bos else [])
    for t, (s, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        ids.append(t)
        labels.append(t if s >= len(prompt_text) else M)
    return ids + [tok.eos_token_id], labels + [tok.eos_token_id]


@pytest.mark.parametrize("name,prompt_fmt", [("plain", "Question: {q}\nAnswer:"), ("llama2", "[INST] {q} [/INST]")])
def test_tofu_masks_token_by_token(tofu_dir, bpe_tok, eos_pad_tok, name, prompt_fmt):
    ds = load_tofu(tofu_dir, "forget10").select(range(6))
    for tok in (bpe_tok, eos_pad_tok):
        enc = encode_qa(ds, tok, template=name)
        assert len(enc) == 6
        batch = DataCollator.from_tokenizer(tok)([enc[i] for i in range(6)])
        for i in range(6):
            q, a = ds[i]["question"], ds[i]["answer"]
            ids, labels = _offset_oracle(tok, prompt_fmt.format(q=q), " " + a)
            assert enc[i]["input_ids"] == ids
            assert enc[i]["labels"] == labels
            n = len(ids)
            assert batch["input_ids"][i, :n].tolist() == ids
            assert batch["labels"][i, :n].tolist() == labels
            assert batch["labels"][i, n:].eq(M).all() and batch["attention_mask"][i, :n].eq(1).all()
            assert batch["attention_mask"][i, n:].eq(0).all()
            # the last real position is EOS and is a target, with pad == eos too
            assert batch["labels"][i, n - 1].item() == tok.eos_token_id
            assert tok.decode([t for t in labels if t != M], skip_special_tokens=True) == " " + a


def test_chat_template_mask(bpe_tok, syn_dir):
    import copy
    tok = copy.deepcopy(bpe_tok)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert get_template(None, tok).use_chat_template
    ds = load_tofu(syn_dir, "forget10").select(range(3))
    enc = encode_qa(ds, tok)  # template chosen from the tokenizer
    for i in range(3):
        q, a = ds[i]["question"], ds[i]["answer"]
        prompt = f"<|user|> {q}\n<|assistant|>"
        ids, labels = _offset_oracle(tok, prompt, a)  # BOS comes from the chat template (a special token)
        assert enc[i]["input_ids"] == ids and enc[i]["labels"] == labels


def test_custom_template_and_eos_counted(syn_dir, bpe_tok):
    tpl = PromptTemplate(name="qa", question_start="Q: ", question_end=" ", answer_start="A:")
    ds = load_tofu(syn_dir, "forget01")
    enc = encode_qa(ds, bpe_tok, template=tpl)
    for i in range(len(ds)):
        a = ds[i]["answer"]
        n_answer = len(bpe_tok(" " + a, add_special_tokens=False)["input_ids"])
        targets = [t for t in enc[i]["labels"] if t != M]
        assert len(targets) == n_answer + 1 and targets[-1] == bpe_tok.eos_token_id
        assert enc[i]["input_ids"][0] == bpe_tok.bos_token_id


def test_overlong_prompt_dropped_and_counted(word_tok):
    qs = ["Who wrote it?", "Who wrote it? Who wrote it? Who wrote it?", "What?"]
    with pytest.warns(DataWarning, match=r"dropped 1 example\(s\) whose prompt does not fit \(rows 1\)"):
        ex, rows, rep = encode_qa_batch(word_tok, qs, ["Bob did."] * 3, template="llama2", max_length=9)
    assert rows == [0, 2] and rep.dropped_prompt_too_long == [1] and rep.kept == 2
    assert ex[0]["labels"] == [M] * 6 + [8, 9, 2]


def test_overlong_answer_truncate_drop_error(word_tok):
    # llama2 prompt of "Who wrote it?" is 6 tokens; answer "Bob did." + EOS is 3 -> 9 tokens
    with pytest.warns(DataWarning, match=r"truncated the answer of 1 example"):
        ex, rows, rep = encode_qa_batch(word_tok, ["Who wrote it?"], ["Bob did."], template="llama2", max_length=7)
    assert ex[0]["input_ids"] == [1, 10, 4, 5, 6, 11, 8] and ex[0]["labels"] == [M] * 6 + [8]
    assert rep.truncated_answer == [0]
    with pytest.warns(DataWarning, match=r"dropped 1 overlong"):
        ex, rows, rep = encode_qa_batch(word_tok, ["Who wrote it?"], ["Bob did."], template="llama2",
                                        max_length=8, overlong="drop")
    assert ex == [] and rep.dropped_answer_too_long == [0]
    with pytest.raises(DataError, match="row 0, field 'answer'"):
        encode_qa_batch(word_tok, ["Who wrote it?"], ["Bob did."], template="llama2", max_length=8, overlong="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fits exactly: no warning
        ex, _, _ = encode_qa_batch(word_tok, ["Who wrote it?"], ["Bob did."], template="llama2", max_length=9)
    assert len(ex[0]["input_ids"]) == 9


def test_empty_answer_warns_and_targets_only_eos(tmp_path, word_tok):
    from simnpo_fast.data import load_qa
    p = tmp_path / "qa.jsonl"
    p.write_text('{"question": "What?", "answer": ""}\n{"question": "What?", "answer": "Yes."}\n')
    with pytest.warns(DataWarning, match="1 row"):
        ds = load_qa(str(p))
    enc = encode_qa(ds, word_tok, template="llama2")
    assert enc[0]["labels"] == [M, M, M, M, 2]


def test_unknown_template_and_no_eos(word_tok):
    with pytest.raises(ValueError, match="unknown template"):
        get_template("nope")
    import copy
    tok = copy.deepcopy(word_tok)
    tok.eos_token = None
    with pytest.raises(ValueError, match="eos"):
        encode_qa_batch(tok, ["What?"], ["Yes."])


def test_collator_nested_and_label_default(word_tok):
    col = DataCollator.from_tokenizer(word_tok)
    out = col([{"forget": {"input_ids": [1, 4]}, "retain": {"input_ids": [1, 5, 6], "labels": [M, 5, 6]}}])
    assert out["forget"]["labels"].tolist() == [[1, 4]]
    assert out["retain"]["labels"].tolist() == [[M, 5, 6]]
    assert out["forget"]["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="labels"):
        col([{"input_ids": [1, 2], "labels": [1]}])
