"""`simnpo-fast eval` on the real TOFU files (``SIMNPO_FAST_TOFU_DIR``; skipped without it): ``--protocol tofu``
evaluates the first 300 questions of each set (all of real authors' 100 and world facts' 117), the JSON holds
the protocol and the per-candidate numbers, and the reported aggregates follow from those numbers by the
reference's own aggregation (locuslab/tofu ``aggregate_eval_stat.get_model_utility``, written here)."""
import json
import os

import numpy as np
import pytest

from simnpo_fast.cli import main as cli

from .conftest import tiny_llama

SETS = {"forget": ("forget10_perturbed", 300), "retain": ("retain_perturbed", 300),
        "real_authors": ("real_authors_perturbed", 100), "world_facts": ("world_facts_perturbed", 117)}


def _rows(tofu_dir, stem):
    with open(os.path.join(tofu_dir, stem + ".json"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_cli_tofu_protocol_on_real_tofu(tofu_dir, tmp_path):
    from simnpo_fast.data import train_tokenizer

    tok = train_tokenizer(tofu_dir, str(tmp_path / "model"), vocab_size=600,
                          files=[s for s, _ in SETS.values()])
    model = tiny_llama(len(tok), seed=3, layers=1, d=16)  # the smallest model: this test is about the data path
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.config.pad_token_id, model.config.max_position_embeddings = tok.pad_token_id, 512
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "ev"
    assert cli(["eval", "--model", str(tmp_path / "model"), "--data", tofu_dir, "--out", str(out),
                "--protocol", "tofu", "--batch-size", "64", "--no-generation", "--no-progress"]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["protocol"] == "tofu" and res["config"]["resolved"]["max_examples"] == 300
    for name, (stem, n) in SETS.items():
        s = res["sets"][name]
        pe = s["per_example"]
        rows = _rows(tofu_dir, stem)
        assert s["n"] == n == len(pe["row"]) and pe["row"] == list(range(n))  # the first 300 (or all) questions
        assert len(pe["perturbed_mean_logp"]) == n
        assert [len(p) for p in pe["perturbed_n_tokens"]] == [len(r["perturbed_answer"]) for r in rows[:n]]
        assert all(k > 0 for k in pe["answer_n_tokens"])
        # the reference aggregation on the stored per-candidate numbers (avg loss = -mean log p)
        gt = -np.array(pe["answer_mean_logp"])
        para = np.array([-p if p is not None else g for p, g in zip(pe["paraphrased_mean_logp"], gt)])
        pert = np.array([np.mean(-np.array(x)) for x in pe["perturbed_mean_logp"]])
        curr = np.exp(pert - para)
        if name in ("real_authors", "world_facts"):
            true_p = np.exp(-gt)
            prob = np.mean(true_p / (true_p + np.array([np.exp(x).sum() for x in pe["perturbed_mean_logp"]])))
            assert all(p is None for p in pe["paraphrased_mean_logp"])
        else:
            prob = np.mean(np.exp(-gt))
        stat = np.mean(np.minimum(curr, 1 / curr)) if name == "forget" else np.mean(np.maximum(0, 1 - 1 / curr))
        assert s["probability"] == pytest.approx(prob, rel=1e-9)
        assert s["truth_ratio_stat"] == pytest.approx(stat, rel=1e-9)
        assert "rouge_l_recall" not in s  # --no-generation
    # generation: greedy, 200 tokens in total with the prompt counted left-padded in its batch of 30 questions
    out1 = tmp_path / "gen"
    assert cli(["eval", "--model", str(tmp_path / "model"), "--data", tofu_dir, "--out", str(out1), "--sets",
                "forget", "--max-examples", "45", "--batch-size", "64", "--no-progress"]) == 0
    g = json.loads((out1 / "eval.json").read_text())["sets"]["forget"]
    pe = g["per_example"]
    widths = [max(pe["prompt_tokens"][:30]), max(pe["prompt_tokens"][30:])]
    assert pe["max_new_tokens"] == [200 - widths[0]] * 30 + [200 - widths[1]] * 15
    assert g["rouge_l_recall"] == pytest.approx(np.mean(pe["rouge_l_recall"])) and len(pe["generation"]) == 45
    first = res["sets"]["forget"]["per_example"]["answer_mean_logp"][:45]
    assert pe["answer_mean_logp"] == pytest.approx(first, rel=1e-5)  # other batches, float rounding only
