"""`simnpo-fast eval` / `relearn` on a saved model, and the `make demo` main job at toy size (all stages, the
printed table, the report files)."""
import json
import os

import pytest

from simnpo_fast.cli import main as cli

from .conftest import TINY_TOFU, tiny_llama, write_jsonl


@pytest.fixture
def saved(tmp_path, wtok):
    d = tmp_path / "model"
    tiny_llama(len(wtok), seed=9).save_pretrained(d)
    wtok.save_pretrained(d)
    return str(d)


def test_cli_eval_and_relearn(saved, tiny_tofu, tmp_path, capsys):
    from simnpo_fast.eval.tofu import TofuEvalConfig, evaluate_tofu
    from simnpo_fast.data import load_tokenizer
    from transformers import AutoModelForCausalLM

    rows = [{"question": r["question"], "answer": r["answer"]} for r in TINY_TOFU["forget10_perturbed"]]
    write_jsonl(os.path.join(tiny_tofu, "forget10.json"), rows)
    out = tmp_path / "ev"
    assert cli(["eval", "--model", saved, "--data", tiny_tofu, "--out", str(out), "--max-new-tokens", "4",
                "--no-progress"]) == 0
    res = json.loads((out / "eval.json").read_text())
    direct = evaluate_tofu(AutoModelForCausalLM.from_pretrained(saved), load_tokenizer(saved), tiny_tofu,
                           TofuEvalConfig(max_new_tokens=4))
    assert res["summary"] == pytest.approx(direct["summary"])
    assert (out / "summary.md").exists() and (out / "metrics.png").exists()
    assert "model utility" in capsys.readouterr().out
    rl = tmp_path / "rl"
    assert cli(["relearn", "--model", saved, "--data", tiny_tofu, "--out", str(rl), "--n-examples", "2",
                "--steps", "3", "--max-new-tokens", "4", "--reference", str(out / "eval.json"), "--no-progress"]) == 0
    r = json.loads((rl / "relearn.json").read_text())
    assert r["before"]["summary"]["forget/probability"] == pytest.approx(res["summary"]["forget/probability"])
    assert r["before"]["forget_quality"] == pytest.approx(1.0)  # same model as its own reference
    assert len(r["losses"]) == 3 and r["rows"] == sorted(r["rows"])


def test_demo_main_job_toy_size(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli(["demo", "--out", str(out), "data.synthetic.n_authors=10", "data.synthetic.facts_per_author=5",
              "finetune.epochs=2", "unlearn.epochs=1", "eval.every=1", "eval.max_new_tokens=8",
              "model.hidden_size=32", "model.intermediate_size=64"])
    assert rc == 0
    text = capsys.readouterr().out
    for row in ("target (before)", "retain (oracle)", "SimNPO (after)", "forget quality", "model utility",
                "unlearned model:"):
        assert row in text
    assert os.path.isfile(out / "simnpo" / "hf" / "config.json")
    for f in ("summary.md", "metrics.png", "curves.png", "target.json", "retain.json", "simnpo.json",
              "history.json"):
        assert os.path.isfile(out / "report" / f), f
    hist = json.loads((out / "report" / "history.json").read_text())
    assert hist[0]["step"] == 0 and len(hist) >= 2
    retain = json.loads((out / "report" / "retain.json").read_text())
    assert retain["forget_quality"] == pytest.approx(1.0)
