"""Loaders: TOFU row counts, generic QA / parquet / JSON arrays, MUSE text, and loud errors on bad input."""
import json
import os
import warnings

import pytest

from simnpo_fast.data import (DataError, DataFileNotFoundError, DataWarning, encode_text_windows, find_overlap,
                              load_muse, load_qa, load_text, load_tofu, read_records)


def _count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


@pytest.mark.parametrize("split,rows", [("forget10", 400), ("retain90", 3600), ("full", 4000), ("forget01", 40),
                                        ("forget05", 200), ("retain99", 3960), ("retain95", 3800),
                                        ("forget10_perturbed", 400), ("retain_perturbed", 400)])
def test_tofu_row_counts(tofu_dir, split, rows):
    ds = load_tofu(tofu_dir, split)
    assert len(ds) == rows == _count_lines(os.path.join(tofu_dir, split + ".json"))
    assert ds.column_names[:2] == ["question", "answer"]


def test_tofu_perturbed_has_five_answers(tofu_dir):
    ds = load_tofu(tofu_dir, "forget10_perturbed")
    assert {"paraphrased_answer", "perturbed_answer", "paraphrased_question"} <= set(ds.column_names)
    assert all(len(p) == 5 for p in ds["perturbed_answer"])
    with open(os.path.join(tofu_dir, "forget10_perturbed.json")) as f:
        first = json.loads(f.readline())
    assert ds[0]["perturbed_answer"] == first["perturbed_answer"]


def test_tofu_forget_retain_partition_full(tofu_dir):
    full, f, r = (load_tofu(tofu_dir, s) for s in ("full", "forget10", "retain90"))
    key = lambda d: [(x["question"], x["answer"]) for x in d]  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_overlap(f, r) == []
    assert sorted(key(f) + key(r)) == sorted(key(full))


def test_missing_split_names_file_and_lists_splits(tmp_path, tofu_dir):
    with pytest.raises(DataFileNotFoundError, match=r"forget42\.json.*forget10"):
        load_tofu(tofu_dir, "forget42")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tofu(str(tmp_path / "nowhere"), "forget10")


def test_missing_field_names_file_row_and_field(tmp_path):
    p = tmp_path / "qa.json"
    p.write_text('{"question": "a", "answer": "b"}\n{"question": "c"}\n')
    with pytest.raises(DataError, match=r"qa\.json, row 1, field 'answer'"):
        load_qa(str(p))
    p.write_text('{"question": "a", "answer": 3}\n')
    with pytest.raises(DataError, match=r"row 0, field 'answer': expected a string"):
        load_qa(str(p))


def test_configurable_fields_parquet_and_json_array(tmp_path):
    import datasets
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "id": i} for i in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "d.json"):
        ds = load_qa(str(tmp_path / name), question_field="prompt", answer_field="response")
        assert ds["question"][:] == [f"q{i}" for i in range(5)] and ds["answer"][:] == [f"a{i}" for i in range(5)]
        assert ds["id"][:] == list(range(5))
    with pytest.raises(DataError, match="field 'question'"):
        load_qa(str(tmp_path / "d.json"))


def test_non_utf8_and_bad_json_lines_counted(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"question": "a", "answer": "b"}\n{"question": "\xff\xfe", "answer": "c"}\n'
                  b'not json\n\n{"question": "d", "answer": "e"}\n')
    with pytest.warns(DataWarning, match=r"1 non-UTF-8 line\(s\) \(lines 2\).*1 unparsable JSON line\(s\) \(lines 3\)"):
        rows, rep = read_records(str(p))
    assert [r["question"] for r in rows] == ["a", "d"]
    assert rep.bad_utf8_lines == [2] and rep.bad_json_lines == [3] and rep.blank_lines == 1 and rep.rows == 2
    with pytest.raises(DataError, match="non-UTF-8"):
        read_records(str(p), on_bad="raise")


def test_empty_split_reported(tmp_path):
    p = tmp_path / "forget10.json"
    p.write_text("")
    with pytest.warns(DataWarning, match=r"empty split \(0 rows\)"):
        ds = load_tofu(str(tmp_path), "forget10")
    assert len(ds) == 0
    with pytest.raises(DataError, match="empty split"):
        load_tofu(str(tmp_path), "forget10", on_bad="raise")


def test_overlap_warns_with_count():
    f = [{"question": "q1", "answer": "a"}, {"question": "q2", "answer": "a"}, {"question": "q3", "answer": "a"}]
    r = [{"question": "q3", "answer": "a"}, {"question": "q1", "answer": "a"}, {"question": "q9", "answer": "a"}]
    with pytest.warns(DataWarning, match=r"share 2 example"):
        assert find_overlap(f, r) == [0, 2]


def test_muse_text_windows(tmp_path, bpe_tok):
    doc = "The silent river ran past the old lighthouse. " * 30
    (tmp_path / "forget.txt").write_text(doc)
    (tmp_path / "retain.json").write_text(json.dumps(["A short retain text.", "Another one."]))
    (tmp_path / "holdout.jsonl").write_text('{"text": "Holdout line."}\n')
    splits = load_muse(str(tmp_path))
    assert splits["forget"] == [doc] and len(splits["retain"]) == 2 and splits["holdout"] == ["Holdout line."]
    enc = encode_text_windows(splits["forget"], bpe_tok, window=32)
    toks = bpe_tok(doc, add_special_tokens=False)["input_ids"]
    n_full, rest = divmod(len(toks), 31)
    assert len(enc) == n_full + (1 if rest else 0) and enc.report.short_windows == (1 if rest else 0)
    flat = []
    for e in enc:
        assert e["input_ids"][0] == bpe_tok.bos_token_id and e["labels"][0] == -100
        assert e["labels"][1:] == e["input_ids"][1:] and len(e["input_ids"]) <= 32
        flat += e["input_ids"][1:]
    assert flat == toks
    with pytest.raises(DataFileNotFoundError, match=r"nope\.txt"):
        load_muse(str(tmp_path), splits=("nope",))


def test_text_non_utf8_lines_dropped_and_counted(tmp_path):
    p = tmp_path / "forget.txt"
    p.write_bytes(b"good line\n\xc3\x28 bad\nmore good\n")
    with pytest.warns(DataWarning, match=r"1 non-UTF-8 line\(s\) \(lines 2\)"):
        docs = load_text(str(p))
    assert docs == ["good line\nmore good\n"]
    q = tmp_path / "t.jsonl"
    q.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl, row 0, field 'text'"):
        load_text(str(q))
