"""MUSE end to end: files in the MUSE-News release layout and format (jaechan-repo/muse_bench ``data/bbc/``:
``knowmem/{forget,retain2}_qa{,_icl}.json``, ``verbmem/forget.json``, ``privleak/{forget,holdout,retain2}.json``)
with texts longer than 2048 tokens, ``simnpo-fast eval --task muse`` on a tiny Llama, and every number compared
with MUSE's own metric functions re-implemented here from swj0419/muse_bench ``metrics/verbmem.py``,
``metrics/knowmem.py``, ``metrics/privleak.py``, ``metrics/logger.py`` and ``eval.py`` (HF ``generate`` and full
logits, one unpadded text at a time, as there). Plus the file checks, the options and the PrivLeak sign on a
model that memorised its forget texts."""
import json
import os

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from simnpo_fast.cli import main as cli
from simnpo_fast.data import DataError
from simnpo_fast.eval.muse import (MuseEvalConfig, cut_knowmem_output, evaluate_muse, knowmem_prompt,
                                   load_muse_files, read_retrain_auc)

from .conftest import BigramLM

WORDS = ("river stone cloud market violin lantern harbor meadow copper ticket garden falcon engine mirror "
         "pepper saddle thunder velvet whistle anchor basket candle desert ember fabric glacier hammer island "
         "jacket kettle ladder marble needle orchard pillow quartz ribbon silver timber").split()


def _chain(seed: int, stick: float = 0.9):
    rng = np.random.default_rng(seed)
    succ = rng.permutation(len(WORDS))

    def text(n_words: int, rs) -> str:
        w, out = int(rs.integers(len(WORDS))), []
        for _ in range(n_words):
            out.append(WORDS[w])
            w = int(succ[w]) if rs.random() < stick else int(rs.integers(len(WORDS)))
        return " ".join(out)
    return text


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


@pytest.fixture(scope="module")
def muse_news(tmp_path_factory):
    """A small MUSE-News folder (release layout: retain files named retain2_*), a BPE tokenizer trained on it and
    a tiny Llama trained for a few steps on the forget chain (so that it has memorised something)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from simnpo_fast.data.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("muse")
    d = str(root / "bbc")
    forget, holdout = _chain(0), _chain(1, stick=0.6)
    rs = np.random.default_rng(7)
    long_f = [forget(2300, rs) for _ in range(3)]
    verb = []
    for _ in range(2):
        words = forget(2500, rs).split()
        verb.append({"prompt": " ".join(words[:2300]), "gt": " " + " ".join(words[2300:])})
    qa = lambda n: [{"question": f"Which word follows {WORDS[i]}?", "answer": forget(3, rs)}  # noqa: E731
                    for i in rs.integers(0, len(WORDS), n)]
    files = {"verbmem/forget.json": verb, "knowmem/forget_qa.json": qa(3), "knowmem/forget_qa_icl.json": qa(2),
             "knowmem/retain2_qa.json": qa(2), "knowmem/retain2_qa_icl.json": qa(2),
             "privleak/forget.json": long_f, "privleak/holdout.json": [holdout(2300, rs) for _ in range(3)],
             "privleak/retain2.json": [holdout(300, rs)]}
    for rel, obj in files.items():
        _write(os.path.join(d, rel), obj)
    texts = [forget(400, rs), holdout(400, rs)] + [x["question"] + " " + x["answer"] for x in qa(20)]
    tok = build_tokenizer(texts + ["Question: \nAnswer: \n\n"], vocab_size=700, min_frequency=1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = tok(forget(3000, rs), add_special_tokens=False)["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    n = torch.set_num_threads(1) or torch.get_num_threads()
    for step in range(60):
        starts = rs.integers(0, len(ids) - 65, 8)
        batch = torch.tensor([[tok.bos_token_id] + ids[s:s + 64] for s in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(n)
    model.eval()
    mdir = str(root / "model")
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    return d, mdir


# ----------------------------------------------------------------------------- MUSE's functions, re-implemented

_LOGGER = rouge_scorer.RougeScorer(rouge_types=["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)


def _ref_verbmem(model, tok, items, max_new_tokens=128):
    scores = []
    for it in items:
        input_ids = tok(it["prompt"], return_tensors="pt", add_special_tokens=True).input_ids
        gt_ids = tok(it["gt"], return_tensors="pt", add_special_tokens=True).input_ids[:, :max_new_tokens]
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)[:, len(input_ids[0]):]
        output = tok.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=True)[0]
        gt_short = tok.batch_decode(gt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)[0]
        scores.append(_LOGGER.score(gt_short, output)["rougeL"].fmeasure)
    return scores


def _ref_knowmem(model, tok, qa, icl, max_new_tokens=32):
    general = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in icl)
    scores = []
    for d in qa:
        input_ids = tok(general + f"Question: {d['question']}\nAnswer: ", return_tensors="pt",
                        add_special_tokens=True).input_ids
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)[:, len(input_ids[0]):]
        output = tok.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=True)[0]
        for w in ["\n\n", "\nQuestion", "Question:"]:
            output = output.split(w)[0]
        scores.append(_LOGGER.score(d["answer"], output)["rougeL"].fmeasure)
    return scores


def _ref_min_k(model, tok, text, ratio=0.4):
    input_ids = torch.tensor(tok.encode(text)).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids, labels=input_ids).logits
    probabilities = torch.nn.functional.log_softmax(logits, dim=-1)
    all_prob = [probabilities[0, i, t].item() for i, t in enumerate(input_ids[0][1:])]
    k_length = int(len(all_prob) * ratio)
    return float(-np.mean(np.sort(all_prob)[:k_length]).item()), input_ids.shape[1]


def _sk_auc(y, score):
    """sklearn roc_curve + auc re-derived (distinct thresholds, cumulative counts, trapezoids)."""
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order], score[order]
    idx = np.r_[np.where(np.diff(score))[0], y.size - 1]
    tps = np.cumsum(y)[idx]
    fps = 1 + idx - tps
    tpr, fpr = np.r_[0, tps] / tps[-1], np.r_[0, fps] / fps[-1]
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))


def test_cli_muse_news_layout_equals_muse_functions(muse_news, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, mdir = muse_news
    out = tmp_path / "ev"
    assert cli(["eval", "--task", "muse", "--model", mdir, "--data", d, "--out", str(out), "--batch-size", "4",
                "--no-progress"]) == 0
    res = json.loads((out / "eval.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(mdir).eval()
    tok = AutoTokenizer.from_pretrained(mdir)
    read = lambda rel: json.load(open(os.path.join(d, rel)))  # noqa: E731
    assert res["files"]["knowmem_retain"].endswith("knowmem/retain2_qa.json")
    assert res["config"]["corpus"] == "news"  # from the folder name (bbc)
    # every VerbMem prompt and PrivLeak text is longer than 2048 tokens, and used whole
    assert min(res["verbmem_forget"]["per_example"]["prompt_tokens"]) > 2048
    assert min(res["privleak"]["forget_n_tokens"] + res["privleak"]["holdout_n_tokens"]) > 2048
    vm = _ref_verbmem(model, tok, read("verbmem/forget.json"))
    assert res["verbmem_forget"]["per_example"]["rouge_l_f1"] == pytest.approx(vm, abs=1e-12)
    assert res["summary"]["verbmem_forget"] == pytest.approx(np.mean(vm))
    assert res["summary"]["verbmem_forget"] > 0.05  # the trained model continues the chain: not a 0 == 0 check
    for split, qa, icl in (("forget", "forget_qa", "forget_qa_icl"), ("retain", "retain2_qa", "retain2_qa_icl")):
        km = _ref_knowmem(model, tok, read(f"knowmem/{qa}.json"), read(f"knowmem/{icl}.json"))
        assert res[f"knowmem_{split}"]["per_example"]["rouge_l_f1"] == pytest.approx(km, abs=1e-12)
        assert res["summary"][f"knowmem_{split}"] == pytest.approx(np.mean(km))
    ref_f = [_ref_min_k(model, tok, t) for t in read("privleak/forget.json")]
    ref_h = [_ref_min_k(model, tok, t) for t in read("privleak/holdout.json")]
    assert res["privleak"]["forget_min_k"] == pytest.approx([x[0] for x in ref_f], rel=1e-4)
    assert res["privleak"]["holdout_min_k"] == pytest.approx([x[0] for x in ref_h], rel=1e-4)
    ppl = np.array([x[0] for x in ref_f + ref_h])
    y = np.array([0] * len(ref_f) + [1] * len(ref_h))  # log['forget'] = split0 (0), log['holdout'] = split1 (1)
    auc = _sk_auc(y, -ppl)
    assert res["privleak"]["auc"] == pytest.approx(auc)
    assert res["summary"]["privleak"] == pytest.approx((auc - 0.47719999999999996) / 0.47719999999999996 * 100)
    # trained on the forget chain only: the forget texts look memorised, PrivLeak is strongly negative
    assert res["summary"]["privleak"] < -50
    assert "PrivLeak" in (out / "summary.md").read_text()


def test_memorised_bigram_gets_privleak_near_minus_100(tmp_path, wtok):
    """A bigram LM whose table *is* the forget texts' transitions: forget texts far likelier than holdout ones,
    MUSE AUC 0, PrivLeak about -100 (News), -100 (Books) as well; the old orientation gave +110."""
    words = ["a", "b", "c", "d", "e", "f", "g", "x", "y", "z"]
    rs = np.random.default_rng(0)
    forget = [" ".join(words[(i + j) % 7] for j in range(30)) for i in range(4)]  # a b c d e f g a b ...
    holdout = [" ".join(rs.choice(words, 30)) for _ in range(4)]
    V = len(wtok)
    table = torch.full((V, V), 1e-3, dtype=torch.float64)
    ids = lambda t: wtok.convert_tokens_to_ids(t.split())  # noqa: E731
    for t in forget:
        seq = [wtok.bos_token_id] + ids(t)
        for u, v in zip(seq[:-1], seq[1:]):
            table[u, v] += 1.0
    lm = BigramLM(table / table.sum(-1, keepdim=True))
    _write(str(tmp_path / "privleak" / "forget.json"), forget)
    _write(str(tmp_path / "privleak" / "holdout.json"), holdout)
    for corpus in ("news", "books"):
        res = evaluate_muse(lm, wtok, str(tmp_path), MuseEvalConfig(subsets=("privleak",), corpus=corpus))
        assert res["privleak"]["auc"] == 0.0
        assert res["summary"]["privleak"] == pytest.approx(-100.0)


def test_files_checked_before_any_model_work(muse_news, tmp_path, capsys):
    """The CLI names every missing / malformed file (exit code 4, a data error) before it even looks at the model
    (the model folder given does not exist)."""
    d, _ = muse_news
    bogus_model = str(tmp_path / "no-model-here")
    # the release names the retain files retain2_*, muse_bench's constants retain_*: with neither, one message
    half = tmp_path / "half"
    os.makedirs(half / "knowmem")
    _write(str(half / "knowmem" / "forget_qa.json"), [{"question": "q", "answer": "a"}])
    assert cli(["eval", "--task", "muse", "--model", bogus_model, "--data", str(half), "--sets", "knowmem_forget",
                "knowmem_retain", "--no-progress"]) == 4
    err = capsys.readouterr().err
    assert "knowmem_forget_icl: none of" in err and "forget_qa_icl.json" in err
    assert "knowmem_retain: none of" in err and "retain2_qa.json" in err and "retain_qa.json" in err
    assert "no-model-here" not in err
    bad = tmp_path / "bad"
    _write(str(bad / "verbmem" / "forget.json"), [{"prompt": "p", "gt": "g"}, {"prompt": "p"}])
    assert cli(["eval", "--task", "muse", "--model", bogus_model, "--data", str(bad), "--sets", "verbmem_forget"]) == 4
    assert "verbmem/forget.json, row 1, field 'gt': missing or not a string" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"privleak/forget\.json, row 0: expected a string"):
        _write(str(bad / "privleak" / "forget.json"), [3])
        _write(str(bad / "privleak" / "holdout.json"), ["t"])
        load_muse_files(str(bad), MuseEvalConfig(subsets=("privleak",)))
    # explicit files override the layout search; unknown roles / subsets are named
    cfg = MuseEvalConfig(subsets=("knowmem_retain",),
                         files={"knowmem_retain": os.path.join(d, "knowmem", "forget_qa.json"),
                                "knowmem_retain_icl": os.path.join(d, "knowmem", "forget_qa_icl.json")})
    data = load_muse_files(str(tmp_path / "elsewhere"), cfg)
    assert data["knowmem_retain"]["path"].endswith("forget_qa.json") and len(data["knowmem_retain"]["rows"]) == 3
    with pytest.raises(ValueError, match="unknown MUSE subset"):
        load_muse_files(d, MuseEvalConfig(subsets=("knowmem",)))


def test_options_retrain_auc_max_new_tokens_subsets(muse_news, tmp_path):
    d, mdir = muse_news
    out = tmp_path / "ev"
    assert cli(["eval", "--task", "muse", "--model", mdir, "--data", d, "--out", str(out), "--sets",
                "knowmem_forget", "privleak", "--retrain-auc", "0.4772", "--max-new-tokens", "5",
                "--max-examples", "2", "--no-progress"]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert set(res["summary"]) == {"knowmem_forget", "privleak_auc", "privleak"}
    assert res["knowmem_forget"]["max_new_tokens"] == 5 and res["config"]["verbmem_max_new_tokens"] == 5
    assert res["privleak"]["retrain_auc"] == 0.4772 and res["knowmem_forget"]["n"] == 2
    assert res["summary"]["privleak"] == pytest.approx((res["privleak"]["auc"] - 0.4772) / 0.4772 * 100)
    assert read_retrain_auc("0.5393") == 0.5393 and read_retrain_auc("books") == pytest.approx(0.5393)
    _write(str(tmp_path / "retrain.json"), {"task": "muse", "privleak": {"auc": 0.45}})
    assert read_retrain_auc(str(tmp_path / "retrain.json")) == 0.45
    with pytest.raises(FileNotFoundError, match="neither a number"):
        read_retrain_auc(str(tmp_path / "missing.json"))


def test_knowmem_prompt_and_stop_strings():
    p = knowmem_prompt("q?", [{"question": "a?", "answer": "b"}])
    assert p == "Question: a?\nAnswer: b\n\nQuestion: q?\nAnswer: "  # trailing space, as MUSE
    assert cut_knowmem_output("Paris\n\nQuestion: x") == "Paris"
    assert cut_knowmem_output("Paris\nQuestion: x") == "Paris"
    assert cut_knowmem_output("Paris Question: x") == "Paris "
