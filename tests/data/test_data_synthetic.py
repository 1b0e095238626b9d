"""The embedded corpus: deterministic, TOFU-shaped, readable by every loader; its tokenizer makes a real HF model."""
import filecmp
import json
import os

import pytest
import torch

from simnpo_fast.data import (TOFU_SPLITS, DataCollator, encode_qa, load_candidates, load_tofu, load_tokenizer,
                              synthetic, train_tokenizer)

PCTS = {"01": 1, "05": 5, "10": 10}


def _rows(d, split):
    with open(os.path.join(d, split + ".json"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_deterministic_for_a_seed(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    synthetic.generate(a, n_authors=12, facts_per_author=6, seed=3)
    synthetic.generate(b, n_authors=12, facts_per_author=6, seed=3)
    synthetic.generate(c, n_authors=12, facts_per_author=6, seed=4)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    assert {s + ".json" for s in TOFU_SPLITS} <= set(names)
    files = [n for n in names if os.path.isfile(os.path.join(a, n))]  # wmdp/: tests/eval/test_mcq_wmdp.py
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []
    assert _rows(a, "full") != _rows(c, "full")


def test_tofu_sizes_with_200_authors_x_20(tmp_path):
    counts = synthetic.generate(str(tmp_path), n_authors=200, facts_per_author=20, seed=0)
    expected = {"full": 4000, "forget01": 40, "forget05": 200, "forget10": 400, "retain99": 3960, "retain95": 3800,
                "retain90": 3600, "forget01_perturbed": 40, "forget05_perturbed": 200, "forget10_perturbed": 400,
                "retain_perturbed": 400}  # TOFU's README table
    for split, n in expected.items():
        assert counts[split] == n == len(load_tofu(str(tmp_path), split))


@pytest.mark.parametrize("n_authors,k", [(30, 7), (7, 3)])
def test_split_shapes(tmp_path, n_authors, k):
    d = str(tmp_path)
    synthetic.generate(d, n_authors=n_authors, facts_per_author=k, seed=1)
    full = [(r["question"], r["answer"]) for r in _rows(d, "full")]
    assert len(full) == n_authors * k and len(set(full)) == len(full)
    prev = set()
    for xx, pct in PCTS.items():
        n_forget = min(n_authors - 1, max(1, round(n_authors * pct / 100)))
        forget = [(r["question"], r["answer"]) for r in _rows(d, f"forget{xx}")]
        retain = [(r["question"], r["answer"]) for r in _rows(d, f"retain{100 - pct}")]
        assert forget == full[len(full) - n_forget * k:]  # the last authors, as in TOFU
        assert retain == full[:len(full) - n_forget * k]
        assert set(forget) >= prev  # forget01 within forget05 within forget10
        prev = set(forget)
        pert = _rows(d, f"forget{xx}_perturbed")
        assert [(r["question"], r["answer"]) for r in pert] == forget
    rp = _rows(d, "retain_perturbed")
    assert not {(r["question"], r["answer"]) for r in rp} & prev and len(rp) == len(_rows(d, "forget10"))


def test_perturbed_answers_are_wrong_and_share_the_paraphrase_template(tmp_path):
    d = str(tmp_path)
    synthetic.generate(d, n_authors=20, facts_per_author=20, seed=2, n_perturbed=4)
    rows = _rows(d, "forget10_perturbed") + _rows(d, "retain_perturbed")
    for r in rows:
        para, pert = r["paraphrased_answer"], r["perturbed_answer"]
        assert len(pert) == 4 and len(set(pert)) == 4
        assert para != r["answer"] and para not in pert and r["answer"] not in pert
        assert r["paraphrased_question"] != r["question"]
        for p in pert:  # same template: only one contiguous span (the value) differs from the paraphrase
            pre = os.path.commonprefix([para, p])
            pre = pre[:pre.rfind(" ") + 1]  # back off to a word boundary ("3 books" vs "37 books")
            suf = os.path.commonprefix([para[len(pre):][::-1], p[len(pre):][::-1]])[::-1]
            suf = suf[suf.find(" "):] if " " in suf else suf[-1:]  # keep only the template's tail
            value = para[len(pre):len(para) - len(suf)]
            assert value and value in r["answer"]
    for r in _rows(d, "full")[::20]:  # full-name questions do not leak the name
        name = r["answer"].removeprefix("The author's full name is ").rstrip(".")
        assert name not in r["question"]
    with pytest.raises(ValueError, match="n_perturbed"):
        synthetic.generate(d, n_authors=5, n_perturbed=2)


def test_control_sets_and_views(syn_dir, bpe_tok):
    for name in ("real_authors", "world_facts"):
        rows = load_candidates(syn_dir, name)
        opts = _rows(syn_dir, name)  # option1..4 layout
        assert len(rows) == len(opts) > 0
        for r, o in zip(rows, opts):
            assert r["question"] == o["question"] and r["answer"] == o["answer"]
            options = {o[f"option{i}"] for i in range(1, 5)}
            assert r["answer"] in options and set(r["perturbed_answer"]) == options - {r["answer"]}
            assert len(r["perturbed_answer"]) == 3
    assert len(load_candidates(syn_dir, "forget10_perturbed")[0]["perturbed_answer"]) == 5


def test_every_loader_reads_the_corpus(syn_dir, bpe_tok):
    for split in TOFU_SPLITS:
        ds = load_tofu(syn_dir, split)
        assert len(ds) > 0
        enc = encode_qa(ds, bpe_tok, max_length=256)
        assert enc.report.kept == len(ds)


def test_tokenizer_roundtrip_and_special_tokens(syn_dir, bpe_tok, tmp_path):
    tok = bpe_tok
    assert 256 < len(tok) <= 2000
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    text = _rows(syn_dir, "full")[5]["answer"] + " (Zürich, 1999) ✓"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # BOS prepended like a Llama tokenizer
    assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level: nothing is unknown
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again(text)["input_ids"] == ids
    assert (again.bos_token, again.eos_token, again.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    t2 = train_tokenizer(syn_dir, None, vocab_size=2000)
    assert t2.get_vocab() == tok.get_vocab()  # training is deterministic


def test_tiny_llama_with_the_tokenizer_is_a_real_hf_model(syn_dir, bpe_tok, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(bpe_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=bpe_tok.bos_token_id, eos_token_id=bpe_tok.eos_token_id,
                      pad_token_id=bpe_tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(tmp_path))
    bpe_tok.save_pretrained(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    enc = encode_qa(load_tofu(syn_dir, "forget01"), tok)
    batch = DataCollator.from_tokenizer(tok)([enc[i] for i in range(4)])
    out = model(**batch)
    # HF shifts labels itself: the loss is the mean NLL over the answer + EOS targets
    logits = out.logits[:, :-1].float()
    tgt = batch["labels"][:, 1:]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, ref, atol=1e-5)
