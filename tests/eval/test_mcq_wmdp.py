"""The WMDP setting: the synthetic corpus's offline stand-in (``<corpus>/wmdp/``: biographies and multiple-choice
questions of forget / retain authors) leaves every existing output of the corpus unchanged; its questions ask
the right author's fact with distractors from other authors; the packaged ``wmdp`` config carries the SimNPO
paper's WMDP hyper-parameters (OPTML-Group/Unlearn-Simple ``WMDP/configs/unlearn/wmdp/SimNPO.json``,
``WMDP/src/model/unlearn.py``) and runs end to end on the stand-in (finetune on the biographies, SimNPO on the
forget biographies, ``eval --task mcq`` on the questions)."""
import filecmp
import json
import os

import pytest
import yaml

from simnpo_fast.data import list_splits, synthetic
from simnpo_fast.data.tokenizer import corpus_texts


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    with_, without = str(root / "with"), str(root / "without")
    synthetic.generate(with_, n_authors=20, facts_per_author=20, seed=1)
    synthetic.generate(without, n_authors=20, facts_per_author=20, seed=1, wmdp=False)
    return with_, without


def test_existing_outputs_unchanged(corpus):
    a, b = corpus
    files = sorted(os.listdir(b))
    assert sorted(os.listdir(a)) == sorted(files + ["wmdp"])
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(files)
    assert list_splits(a) == list_splits(b)
    assert corpus_texts(a) == corpus_texts(b)  # the tokenizer is trained on the same text


def test_biographies_and_questions(corpus):
    d = corpus[0]
    with open(os.path.join(d, synthetic.META_FILE)) as f:
        names = [a["name"] for a in yaml.safe_load(f)["authors"]]
    k = synthetic.n_forget_authors(len(names), 10)
    w = os.path.join(d, "wmdp")
    full = [r["text"] for r in _jsonl(os.path.join(w, "corpora", "full.jsonl"))]
    assert len(full) == len(names) and all(n in t for n, t in zip(names, full))
    assert [r["text"] for r in _jsonl(os.path.join(w, "corpora", "forget.jsonl"))] == full[-k:]
    assert [r["text"] for r in _jsonl(os.path.join(w, "corpora", "retain.jsonl"))] == full[:-k]
    lines = [r["text"] for r in _jsonl(os.path.join(w, "corpora", "finetune.jsonl"))]
    assert lines[:len(full)] == full and len(lines) == len(full) + len(names) * 19
    bio_of = dict(zip(names, full))
    for split, authors in (("forget", names[-k:]), ("retain", names[:k])):
        qs = _jsonl(os.path.join(w, "questions", split + ".jsonl"))
        assert {q["author"] for q in qs} == set(authors)
        assert len(qs) == k * 19  # every fact but the full name
        for q in qs:
            ch, truth = q["choices"], q["choices"][q["answer"]]
            assert len(ch) == 4 == len(set(ch)) and q["author"] in q["question"]
            assert truth in bio_of[q["author"]]
            for c in ch:  # every distractor is a fact of another author of the corpus
                assert c == truth or any(c in t for n, t in bio_of.items() if n != q["author"])
            assert f"Question: {q['question']}\nAnswer: {truth}" in lines  # the text format's prompt + answer
        answers = [q["answer"] for q in qs]
        assert len(set(answers)) > 1  # shuffled positions


def test_standin_is_deterministic(tmp_path, corpus):
    again = str(tmp_path / "again")
    synthetic.generate(again, n_authors=20, facts_per_author=20, seed=1)
    for sub in ("corpora", "questions"):
        a, b = os.path.join(corpus[0], "wmdp", sub), os.path.join(again, "wmdp", sub)
        names = sorted(os.listdir(a))
        assert filecmp.cmpfiles(a, b, names, shallow=False)[0] == names


def test_wmdp_config_has_the_papers_hyper_parameters(tmp_path):
    from simnpo_fast.train.config_io import load_config

    with pytest.raises(ValueError, match="data.path is required"):
        load_config("wmdp")
    (tmp_path / "m").mkdir()
    (tmp_path / "d").mkdir()
    cfg = load_config("wmdp", [f"model.path={tmp_path / 'm'}", f"data.path={tmp_path / 'd'}"])
    # WMDP/configs/unlearn/wmdp/SimNPO.json: beta 0.1, "gamma" (the retain weight) 1.0, lr 9.5e-6, wd 0,
    # max_steps 500, batch 1 x 4 accumulation; unlearn.py: warmup max_steps // 10, linear (HF default), bf16
    assert (cfg.loss.objective, cfg.loss.beta, cfg.loss.gamma, cfg.loss.forget_weight, cfg.loss.retain_weight,
            cfg.loss.retain_loss) == ("simnpo", 0.1, 0.0, 1.0, 1.0, "nll")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule, cfg.optim.warmup_steps,
            cfg.optim.max_grad_norm) == (9.5e-6, 0.0, "linear", 50, 1.0)
    assert (cfg.max_steps, cfg.batch_size, cfg.data.kind, cfg.data.window, cfg.model.dtype) == (
        500, 4, "muse", 512, "bfloat16")


def test_standin_run_end_to_end(corpus, tmp_path):
    """The wmdp config on the stand-in: finetune on every biography, SimNPO on the forget biographies with the
    retain term, then the multiple-choice evaluation of the exported model (a few steps: wiring, not numbers)."""
    from simnpo_fast.cli import main as cli
    from simnpo_fast.data import train_tokenizer
    from simnpo_fast.train.config_io import load_config
    from simnpo_fast.train.stages import train

    d = corpus[0]
    train_tokenizer(d, str(tmp_path / "tok"), vocab_size=400)
    cfg = load_config("wmdp", [
        f"output_dir={tmp_path / 'run'}", f"data.path={d}/wmdp/corpora", f"data.tokenizer={tmp_path / 'tok'}",
        "data.forget_split=forget", "data.retain_split=retain", "data.finetune_split=finetune", "data.window=64",
        "model.preset=tiny-llama", "model.config={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
        "num_attention_heads: 2, num_key_value_heads: 1}", "model.dtype=float32", "progress=false", "plot=false",
        "parallel.activation_checkpointing=false", "checkpoint.every=0", "max_steps=2", "batch_size=2",
        "micro_batch_size=2", "optim.lr=1e-3", "optim.warmup_steps=1", "finetune.enabled=true",
        "finetune.epochs=1", "finetune.batch_size=4", "finetune.micro_batch_size=4"])
    res = train(cfg)
    assert res.steps == 2 and os.path.isfile(os.path.join(res.hf_dir, "config.json"))
    assert os.path.isfile(tmp_path / "run" / "finetune" / "hf" / "config.json")
    out = tmp_path / "mcq"
    assert cli(["eval", "--task", "mcq", "--model", res.hf_dir, "--tokenizer", str(tmp_path / "tok"), "--data",
                f"{d}/wmdp/questions", "--out", str(out), "--no-progress", "--mcq-format", "text"]) == 0
    rep = json.loads((out / "eval.json").read_text())
    assert set(rep["sets"]) == {"forget", "retain"} and rep["sets"]["forget"]["chance"] == 0.25
    assert all(0.0 <= v <= 1.0 for v in rep["summary"].values())
