"""Formatting and masking: labels = -100 on prompt and padding, answer + EOS are targets, exact token by token;
every built-in template checked against the reference string it reproduces, token by token, on two BPE tokenizers
(the project's byte-level one and a SentencePiece-style Metaspace one like Llama's, both trained offline here)."""
import copy
import warnings

import pytest
import torch

from simnpo_fast.data import (IGNORE_INDEX, TEMPLATES, DataCollator, DataError, DataWarning, PromptTemplate,
                              encode_qa, encode_qa_batch, get_template, load_tofu)

M = IGNORE_INDEX
# WORDS ids (see conftest): <pad>0 <s>1 </s>2 Question:3 Who4 wrote5 it?6 Answer:7 Bob8 did.9 [INST]10 [/INST]11
# Yes.12 What?13 (a whitespace word tokenizer: the hand-written cases use the plain template, whose prompt and
# answer are separated by whitespace; llama2 joins "[/INST]" and the answer with no space, see the BPE tests).


def test_plain_template_mask_by_hand(word_tok):
    ex, rows, rep = encode_qa_batch(word_tok, ["Who wrote it?"], ["Bob did."], template="plain")
    assert ex[0]["input_ids"] == [1, 3, 4, 5, 6, 7, 8, 9, 2]
    assert ex[0]["labels"] == [M, M, M, M, M, M, 8, 9, 2]
    assert rows == [0] and rep.kept == 1 and rep.boundary_mismatch == []


def test_eos_kept_when_pad_is_eos_by_hand(word_tok_eos_pad):
    tok = word_tok_eos_pad
    assert tok.pad_token_id == tok.eos_token_id == 2
    ex, _, _ = encode_qa_batch(tok, ["Who wrote it?", "What?"], ["Bob did.", "Yes."], template="plain")
    b = DataCollator.from_tokenizer(tok)(ex)
    assert b["input_ids"].tolist() == [[1, 3, 4, 5, 6, 7, 8, 9, 2], [1, 3, 13, 7, 12, 2, 2, 2, 2]]
    # the short example's real EOS (position 5) is a target and attended; its padding (also id 2) is not
    assert b["labels"].tolist() == [[M, M, M, M, M, M, 8, 9, 2], [M, M, M, M, 12, 2, M, M, M]]
    assert b["attention_mask"].tolist() == [[1] * 9, [1] * 6 + [0] * 3]


def test_left_padding_and_multiple_of_by_hand(word_tok):
    ex, _, _ = encode_qa_batch(word_tok, ["Who wrote it?", "What?"], ["Bob did.", "Yes."], template="plain")
    b = DataCollator(0, padding_side="left", pad_to_multiple_of=4)(ex)
    assert b["input_ids"].tolist() == [[0, 0, 0, 1, 3, 4, 5, 6, 7, 8, 9, 2], [0] * 6 + [1, 3, 13, 7, 12, 2]]
    assert b["labels"].tolist() == [[M] * 9 + [8, 9, 2], [M] * 10 + [12, 2]]
    assert b["attention_mask"].tolist() == [[0] * 3 + [1] * 9, [0] * 6 + [1] * 6]


# ----------------------------------------------------------------------------- templates vs reference strings

#: (prompt, answer part) exactly as the reference code writes them; {eos} = the tokenizer's EOS string.
REFERENCE = {
    # locuslab/tofu config/model_config.yaml 'llama2-7b' (question_start_tag "[INST] ", question_end_tag
    # " [/INST]", answer_tag ""), = open-unlearning configs/model/Llama-2-7b-chat-hf.yaml (asst_start_tag ""):
    # no space between "[/INST]" and the answer.
    "llama2": ("[INST] {q} [/INST]", "{a}"),
    # locuslab/tofu config/model_config.yaml 'phi': question "Question: {q}\n", answer_tag "Answer: " belongs to
    # new_answer, i.e. to the target (convert_raw_data_to_model_format masks only the question's tokens).
    "phi": ("Question: {q}\n", "Answer: {a}"),
    # HuggingFaceH4/zephyr-7b-beta chat template with add_generation_prompt (tokenised without special tokens).
    "zephyr": ("<|user|>\n{q}{eos}\n<|assistant|>\n", "{a}"),
    # this project's own format (no benchmark reference).
    "plain": ("Question: {q}\nAnswer:", " {a}"),
}
ADD_SPECIAL_TOKENS = {"llama2": True, "phi": True, "zephyr": False, "plain": True}


def _tofu_reference(tok, prompt, answer_part, add_special_tokens):
    """locuslab/tofu data_module.convert_raw_data_to_model_format, transcribed (without the padding): the full
    text tokenised once, ``num_question_tokens = len(tokenizer.tokenize(question, add_special_tokens=True))``
    masked, EOS appended as a target."""
    encoded = tok(prompt + answer_part, add_special_tokens=add_special_tokens)["input_ids"]
    num_question_tokens = len(tok.tokenize(prompt, add_special_tokens=add_special_tokens))
    label = list(encoded) + [tok.eos_token_id]
    for i in range(num_question_tokens):
        label[i] = M
    return list(encoded) + [tok.eos_token_id], label


@pytest.fixture(scope="module")
def sp_tok(syn_dir):
    """A SentencePiece-style BPE (Metaspace pre-tokenizer, dummy prefix on the first word, BOS added), trained
    offline on the synthetic corpus plus the template tags: Llama-2's tokenisation behaviour at a border."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from simnpo_fast.data.tokenizer import corpus_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    texts = corpus_texts(syn_dir) + ["[INST] Who? [/INST]Yes.", "Question: x\nAnswer: y",
                                     "<|user|>\nq\n<|assistant|>\n"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_template_equals_reference_string_token_by_token(name, syn_dir, bpe_tok, sp_tok):
    ds = load_tofu(syn_dir, "forget10").select(range(12))
    qs, ans = ds["question"], ds["answer"]
    prompt_fmt, answer_fmt = REFERENCE[name]
    for tok in (bpe_tok, sp_tok):
        ex, rows, rep = encode_qa_batch(tok, qs, ans, template=name)
        assert rows == list(range(12)) and rep.boundary_mismatch == []
        for i, (q, a) in enumerate(zip(qs, ans)):
            ids, labels = _tofu_reference(tok, prompt_fmt.format(q=q, eos=tok.eos_token),
                                          answer_fmt.format(a=a), ADD_SPECIAL_TOKENS[name])
            assert ex[i]["input_ids"] == ids, (name, i)
            assert ex[i]["labels"] == labels, (name, i)


def test_llama2_border_no_space_and_joint_tokenisation_matter(syn_dir, sp_tok):
    """Why the reference string and the joint tokenisation both matter on a SentencePiece tokenizer: the answer
    tokenised on its own gets the dummy-prefix space ("▁The" instead of "The"), and the old " " before the answer
    changes the border tokens too (open-unlearning's note on asst_start_tag)."""
    ds = load_tofu(syn_dir, "forget10").select(range(6))
    ex, _, _ = encode_qa_batch(sp_tok, ds["question"], ds["answer"], template="llama2")
    separate = with_space = 0
    for i, (q, a) in enumerate(zip(ds["question"], ds["answer"])):
        prompt = sp_tok(f"[INST] {q} [/INST]")["input_ids"]
        target = [t for t in ex[i]["labels"] if t != M][:-1]
        separate += sp_tok(a, add_special_tokens=False)["input_ids"] != target
        with_space += sp_tok(f"[INST] {q} [/INST] {a}")["input_ids"] != ex[i]["input_ids"][:-1]
        assert ex[i]["input_ids"][: len(prompt)] == prompt
    assert separate == 6 and with_space == 6
    assert TEMPLATES["llama2"].answer_prefix == "" and "tofu" in TEMPLATES["llama2"].reference


def test_phi_target_starts_with_answer_tag(bpe_tok):
    ex, _, _ = encode_qa_batch(bpe_tok, ["Who wrote it?"], ["Bob did."], template="phi")
    target = [t for t in ex[0]["labels"] if t != M]
    assert bpe_tok.decode(target, skip_special_tokens=True) == "Answer: Bob did."
    prompt = [t for t, lab in zip(ex[0]["input_ids"], ex[0]["labels"]) if lab == M]
    assert bpe_tok.decode(prompt, skip_special_tokens=True) == "Question: Who wrote it?\n"


def test_border_merge_is_counted_and_masked_like_the_reference(bpe_tok):
    """A prompt ending in a space merges with the answer's first word (" Bob" is one token): the first
    len(tokenize(prompt)) tokens are masked as TOFU does, and the example is counted and warned about."""
    tpl = PromptTemplate(name="odd", question_start="Q: ", question_end="", answer_start=" A: ", answer_prefix="")
    with pytest.warns(DataWarning, match="tokenise across the prompt/answer border"):
        ex, _, rep = encode_qa_batch(bpe_tok, ["Who?"], ["Bob did."], template=tpl)
    assert rep.boundary_mismatch == [0]
    ids, labels = _tofu_reference(bpe_tok, "Q: Who? A: ", "Bob did.", True)
    assert ex[0]["input_ids"] == ids and ex[0]["labels"] == labels


def _offset_oracle(tok, prompt_text, answer_text, add_bos=True):
    """Independent oracle: tokenise the *whole* text once with offsets; a token is a target iff it starts at or
    after the end of the prompt text. BOS is prepended, EOS appended as a target."""
    enc = tok(prompt_text + answer_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = ([tok.bos_token_id] if add_bos else []), ([M] if add_bos else [])
    for t, (s, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        ids.append(t)
        labels.append(t if s >= len(prompt_text) else M)
    return ids + [tok.eos_token_id], labels + [tok.eos_token_id]


@pytest.mark.parametrize("name,prompt_fmt,answer_fmt", [("plain", "Question: {q}\nAnswer:", " {a}"),
                                                        ("llama2", "[INST] {q} [/INST]", "{a}")])
def test_tofu_masks_token_by_token(tofu_dir, bpe_tok, eos_pad_tok, name, prompt_fmt, answer_fmt):
    ds = load_tofu(tofu_dir, "forget10").select(range(6))
    for tok in (bpe_tok, eos_pad_tok):
        enc = encode_qa(ds, tok, template=name)
        assert len(enc) == 6
        batch = DataCollator.from_tokenizer(tok)([enc[i] for i in range(6)])
        for i in range(6):
            q, a = ds[i]["question"], ds[i]["answer"]
            ids, labels = _offset_oracle(tok, prompt_fmt.format(q=q), answer_fmt.format(a=a))
            assert enc[i]["input_ids"] == ids
            assert enc[i]["labels"] == labels
            n = len(ids)
            assert batch["input_ids"][i, :n].tolist() == ids
            assert batch["labels"][i, :n].tolist() == labels
            assert batch["labels"][i, n:].eq(M).all() and batch["attention_mask"][i, :n].eq(1).all()
            assert batch["attention_mask"][i, n:].eq(0).all()
            # the last real position is EOS and is a target, with pad == eos too
            assert batch["labels"][i, n - 1].item() == tok.eos_token_id
            assert tok.decode([t for t in labels if t != M], skip_special_tokens=True) == answer_fmt.format(a=a)


def test_chat_template_mask(bpe_tok, syn_dir):
    """open-unlearning preprocess_chat_instance (apply_chat_template: True), transcribed as the oracle: the whole
    conversation and the prompt rendered by the chat template, EOS appended when the conversation does not end
    with it, the prompt's tokens masked."""
    tok = copy.deepcopy(bpe_tok)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|> "
                         "{{ m['content'] }}\n{% else %}<|assistant|> {{ m['content'] }}{{ eos_token }}\n{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert get_template(None, tok).use_chat_template
    ds = load_tofu(syn_dir, "forget10").select(range(3))
    enc = encode_qa(ds, tok)  # template chosen from the tokenizer

    def ids_of(out):
        return list(out) if isinstance(out, list) else list(out["input_ids"])

    for i in range(3):
        chat = [{"role": "user", "content": ds[i]["question"]}, {"role": "assistant", "content": ds[i]["answer"]}]
        chat_ids = ids_of(tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=False))
        prompt_ids = ids_of(tok.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True))
        if chat_ids[-1] != tok.eos_token_id:
            chat_ids += [tok.eos_token_id]
        labels = [M] * len(prompt_ids) + chat_ids[len(prompt_ids):]
        assert enc[i]["input_ids"] == chat_ids and enc[i]["labels"] == labels
        assert chat_ids[0] == tok.bos_token_id and chat_ids.count(tok.bos_token_id) == 1


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
        ex, rows, rep = encode_qa_batch(word_tok, qs, ["Bob did."] * 3, template="plain", max_length=9)
    assert rows == [0, 2] and rep.dropped_prompt_too_long == [1] and rep.kept == 2
    assert ex[0]["labels"] == [M] * 6 + [8, 9, 2]


def test_overlong_answer_truncate_drop_error(word_tok):
    # plain prompt of "Who wrote it?" is 6 tokens; answer "Bob did." + EOS is 3 -> 9 tokens
    with pytest.warns(DataWarning, match=r"truncated the answer of 1 example"):
        ex, rows, rep = encode_qa_batch(word_tok, ["Who wrote it?"], ["Bob did."], template="plain", max_length=7)
    assert ex[0]["input_ids"] == [1, 3, 4, 5, 6, 7, 8] and ex[0]["labels"] == [M] * 6 + [8]
    assert rep.truncated_answer == [0]
    with pytest.warns(DataWarning, match=r"dropped 1 overlong"):
        ex, rows, rep = encode_qa_batch(word_tok, ["Who wrote it?"], ["Bob did."], template="plain",
                                        max_length=8, overlong="drop")
    assert ex == [] and rep.dropped_answer_too_long == [0]
    with pytest.raises(DataError, match="row 0, field 'answer'"):
        encode_qa_batch(word_tok, ["Who wrote it?"], ["Bob did."], template="plain", max_length=8, overlong="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fits exactly: no warning
        ex, _, _ = encode_qa_batch(word_tok, ["Who wrote it?"], ["Bob did."], template="plain", max_length=9)
    assert len(ex[0]["input_ids"]) == 9


def test_empty_answer_warns_and_targets_only_eos(tmp_path, word_tok):
    from simnpo_fast.data import load_qa
    p = tmp_path / "qa.jsonl"
    p.write_text('{"question": "What?", "answer": ""}\n{"question": "What?", "answer": "Yes."}\n')
    with pytest.warns(DataWarning, match="1 row"):
        ds = load_qa(str(p))
    enc = encode_qa(ds, word_tok, template="plain")
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
