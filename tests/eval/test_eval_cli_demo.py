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
                           TofuEvalConfig(max_new_tokens=4, template="llama2"))
    assert res["summary"] == pytest.approx(direct["summary"])
    assert res["config"]["template_used"] == "llama2"  # --protocol tofu (the default) picks TOFU's format
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


def _no_model(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    import simnpo_fast.cli.eval as C

    monkeypatch.setattr(C, "_setup", lambda args: pytest.fail("the model was loaded before the check"))


@pytest.mark.parametrize("argv, message", [
    (["--reference", "nowhere.json"], "--reference 'nowhere.json': no such file"),
    (["--reference", "{bad}"], "not a usable TOFU evaluation"),
    (["--sets", "forget", "nosuchset"], "--sets: unknown TOFU set(s) ['nosuchset']"),
    (["--task", "mcq", "--protocol", "tofu"], "--protocol: not an option of --task mcq"),
    (["--task", "mcq", "--template", "llama2", "--no-generation"], "--template, --no-generation: not an option"),
    (["--task", "muse", "--forget-split", "forget05"], "--forget-split: not an option of --task muse"),
    (["--mcq-format", "text"], "--mcq-format: not an option of --task tofu"),
])
def test_eval_options_are_checked_before_the_model_loads(saved, tiny_tofu, tmp_path, capsys, monkeypatch, argv,
                                                         message):
    """Issue 24 item 11: a bad --reference / --sets and an option of another task fail at once (exit 2)."""
    _no_model(monkeypatch)
    if "{bad}" in argv:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"task": "mcq"}))
        argv = [str(bad) if a == "{bad}" else a for a in argv]
    assert cli(["eval", "--model", saved, "--data", tiny_tofu, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_default_reports_sit_outside_the_model_one_folder_per_task(saved, tiny_tofu, tmp_path, capsys,
                                                                    monkeypatch):
    """Issue 24 item 11: the default report folder is eval/<model>-<task> under the current folder (never the
    model folder), a second run gets its own; the JSON names the file it read; no loading bars under
    --no-progress."""
    monkeypatch.chdir(tmp_path)
    fast = ["--max-new-tokens", "2", "--max-examples", "2", "--no-progress", "--sets", "forget", "real_authors"]
    assert cli(["eval", "--model", saved, "--data", tiny_tofu, *fast]) == 0
    assert cli(["eval", "--model", saved, "--data", tiny_tofu, *fast]) == 0
    first = tmp_path / "eval" / "model-tofu" / "eval.json"
    second = tmp_path / "eval" / "model-tofu-2" / "eval.json"
    assert first.is_file() and second.is_file() and not os.path.exists(os.path.join(saved, "eval"))
    res = json.loads(first.read_text())
    assert res["sets"]["real_authors"]["file"] == "real_authors_perturbed"
    assert res["sets"]["forget"]["file"] == "forget10_perturbed"
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "%|" not in err, err[-2000:]
