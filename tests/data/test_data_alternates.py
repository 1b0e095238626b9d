"""Alternate answers (simnpo_fast/data/alternates.py): the refusal file read as the references read it
(``open().readlines()`` + ``.strip()``), the (question x refusal) table encoded like the forget set, per-epoch
draws, the dataset wrapper, and the synthetic corpus's own refusal file (left out of the tokenizer)."""
import os
import pickle
import warnings

import pytest

from simnpo_fast import data as D
from simnpo_fast.data.tokenizer import corpus_texts


def test_load_idk_strips_lines_and_reports_blank_ones(tmp_path):
    p = tmp_path / "idk.jsonl"
    p.write_text("  I don't know.  \n\nNo idea\t\n   \nCan't say.", encoding="utf-8")
    with pytest.warns(D.DataWarning, match=r"idk.jsonl: skipped 2 blank line\(s\) \(lines 2, 4\)"):
        assert D.load_idk(str(p)) == ["I don't know.", "No idea", "Can't say."]
    with pytest.raises(D.DataFileNotFoundError, match="nope.jsonl: refusal answers not found"):
        D.load_idk(str(tmp_path / "nope.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n \n", encoding="utf-8")
    with pytest.raises(D.DataError, match="blank.jsonl: holds no refusal answer"):
        D.load_idk(str(tmp_path / "blank.jsonl"))
    (tmp_path / "bin.jsonl").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(D.DataError, match="bin.jsonl: not UTF-8"):
        D.load_idk(str(tmp_path / "bin.jsonl"))


def test_real_tofu_refusals_as_the_references_read_them():
    tofu = os.environ.get("SIMNPO_FAST_TOFU_DIR")
    if not tofu:
        pytest.skip("SIMNPO_FAST_TOFU_DIR not set")
    path = os.path.join(tofu, D.IDK_FILE)
    with open(path, encoding="utf-8") as f:
        want = [line.strip() for line in f.readlines()]  # locuslab/tofu TextForgetDatasetDPOQA
    assert D.load_idk(path) == want and len(want) == 100


def test_synthetic_corpus_writes_refusals_outside_the_splits(syn_dir):
    assert D.load_idk(os.path.join(syn_dir, D.IDK_FILE)) == D.synthetic.IDK_ANSWERS
    assert len(set(D.synthetic.IDK_ANSWERS)) == 20
    assert "idontknow" not in D.list_splits(syn_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", D.DataWarning)  # the plain-text file is not read as a JSON split
        texts = set(corpus_texts(syn_dir))
    assert not texts & set(D.synthetic.IDK_ANSWERS)


@pytest.fixture(scope="module")
def forget(syn_dir, bpe_tok):
    rows = D.load_tofu(syn_dir, "forget10")
    return rows, D.encode_qa(rows, bpe_tok, max_length=128)


def test_candidate_table_is_every_question_with_every_answer(forget, bpe_tok):
    rows, enc = forget
    answers = ["I don't know.", "No idea, sorry.", "That is beyond what I know."]
    qs = D.forget_questions(rows, enc)
    assert qs == list(rows["question"])
    alts = D.encode_alternates(qs, answers, bpe_tok, max_length=128, seed=0)
    assert len(alts) == len(enc) * 3 and alts.n_choices == 3
    for k in (0, 5, len(enc) - 1):
        for j, a in enumerate(answers):
            (one,), _, _ = D.encode_qa_batch(bpe_tok, [qs[k]], [a], max_length=128)
            assert alts[k * 3 + j] == one
        n_prompt = enc[k]["labels"].count(-100)  # same question and template: the same prompt tokens
        assert alts[k * 3]["input_ids"][:n_prompt] == enc[k]["input_ids"][:n_prompt]
        assert alts[k * 3]["labels"][:n_prompt] == [-100] * n_prompt and alts[k * 3]["labels"][n_prompt] != -100


def test_draws_per_seed_and_epoch_are_uniform(forget, bpe_tok):
    rows, enc = forget
    answers = [f"refusal {i}" for i in range(4)]
    alts = D.encode_alternates(D.forget_questions(rows, enc), answers, bpe_tok, max_length=128, seed=7)
    same = D.encode_alternates(D.forget_questions(rows, enc), answers, bpe_tok, max_length=128, seed=7)
    other = D.encode_alternates(D.forget_questions(rows, enc), answers, bpe_tok, max_length=128, seed=8)
    F = len(enc)

    def picks(a):
        return [a.index(k) - 4 * k for k in range(F)]

    e0 = picks(alts)
    assert all(0 <= j < 4 for j in e0) and e0 == picks(same) and e0 != picks(other)
    counts = [0] * 4
    seen = set()
    for epoch in range(50):
        alts.set_epoch(epoch)
        p = picks(alts)
        seen.add(tuple(p))
        for j in p:
            counts[j] += 1
    assert len(seen) == 50  # re-drawn every epoch
    n = 50 * F  # each count is Binomial(n, 1/4): mean n/4, sd sqrt(3n)/4; 5 sd is a bug, not chance
    assert all(abs(c - n / 4) < 5 * (3 * n) ** 0.5 / 4 for c in counts), counts
    alts.set_epoch(0)
    assert picks(alts) == e0


def test_with_alternates_items_epochs_and_pickling(syn_dir, bpe_tok):
    ds = D.load_forget_retain(syn_dir, bpe_tok, "forget10", idk=True, max_length=128, seed=3)
    assert isinstance(ds, D.WithAlternates) and len(ds) == len(ds.forget) and ds.alternates.n_choices == 20
    item = ds[2]
    assert set(item) == {"forget", "retain", "alternate", "alternate_index"}
    assert item["alternate"] == ds.alternates[item["alternate_index"]] and item["forget"] == ds.forget[2]
    assert ds.alternates.index(2) == item["alternate_index"] == ds[-len(ds) + 2]["alternate_index"]
    pair0 = [ds.retain_index(i) for i in range(len(ds))]  # the wrapped dataset's own attributes
    alt0 = [ds[i]["alternate_index"] for i in range(len(ds))]
    ds.set_epoch(1)
    assert [ds.retain_index(i) for i in range(len(ds))] != pair0  # the retain pairing is re-drawn too
    assert [ds[i]["alternate_index"] for i in range(len(ds))] != alt0
    back = pickle.loads(pickle.dumps(ds))  # DataLoader workers
    assert back[2] == ds[2]
    with pytest.raises(ValueError, match="forget items but alternates for"):
        D.WithAlternates(D.ForgetRetainDataset(ds.forget, ds.retain), D.AlternateAnswers(ds.alternates.examples,
                                                                                         len(ds) * 20, 1))
