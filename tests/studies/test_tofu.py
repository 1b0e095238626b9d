"""The TOFU study: its stages are the trainer's configs with the study's YAML values, and ``simnpo-fast study``
runs them at toy size (files, printed rows, the retain model as its own reference, stages reused)."""
import json
import os

import pytest
import yaml

from simnpo_fast.cli import main
from simnpo_fast.errors import ConfigError
from simnpo_fast.studies import config_file, load_study_config, study_kind
from simnpo_fast.studies import tofu as T

TOY = ["data.synthetic.n_authors=10", "data.synthetic.facts_per_author=5", "finetune.epochs=1", "unlearn.epochs=1",
       "eval.max_new_tokens=4", "eval.max_examples=6", "model.hidden_size=32", "model.intermediate_size=64",
       "relearn.methods=[SimNPO-b1]", "relearn.n_examples=2", "relearn.steps=1"]


def test_the_kind_picks_the_module():
    assert study_kind(load_study_config("tofu-mini")) is T
    assert study_kind(load_study_config("markov")).__name__ == "simnpo_fast.studies.markov"
    with pytest.raises(ConfigError, match="study kind 'dpo'"):
        study_kind({"kind": "dpo"})


def test_stages_carry_the_yaml_values(tmp_path):
    with open(config_file("tofu-mini-b1")) as f:
        raw = yaml.safe_load(f)
    cfg = load_study_config("tofu-mini-b1")
    corpus = T.Corpus(str(tmp_path / "data"), "synthetic", str(tmp_path / "tok"), None)
    st = T.seed_stages(cfg, corpus, str(tmp_path / "seed3"), 3, ["NPO", "SimNPO-b1", "SimNPO-e10-lr2e-3"])
    ft, fs = st.target.cfg, raw["finetune"]
    assert (ft.loss.objective, ft.data.forget_split, ft.seed, ft.model.seed) == ("finetune", "pretrain_full", 3, 3)
    assert (ft.epochs, ft.optim.lr, ft.batch_size, ft.optim.schedule) == (fs["epochs"], fs["lr"], fs["batch_size"],
                                                                          fs["schedule"])
    assert ft.model.config == raw["model"] and ft.output_dir == str(tmp_path / "seed3" / "target")
    assert st.retain.cfg.data.forget_split == "pretrain_retain90"
    u = raw["unlearn"]
    for label, objective, beta, epochs, lr in (("NPO", "npo", 0.1, u["epochs"], u["lr"]),
                                               ("SimNPO-b1", "simnpo", 1.0, u["epochs"], u["lr"]),
                                               ("SimNPO-e10-lr2e-3", "simnpo", 2.5, 10, 2e-3)):
        c = st.unlearn[label].cfg
        assert (c.loss.objective, c.loss.beta, c.epochs, c.optim.lr) == (objective, beta, epochs, lr), label
        assert c.model.path == os.path.join(ft.output_dir, "hf") and c.model.preset is None
        assert (c.data.forget_split, c.batch_size, c.optim.weight_decay) == ("forget10", u["batch_size"], 0.0)
    with pytest.raises(ConfigError, match="unknown method 'DPO'"):
        T.seed_stages(cfg, corpus, str(tmp_path), 0, ["DPO"])
    bad = load_study_config("tofu-mini-b1", ["unlearn.methods.NPO.betta=1"])
    with pytest.raises(ConfigError, match=r"unlearn.methods.NPO: unknown key\(s\) \['betta'\]"):
        T.seed_stages(bad, corpus, str(tmp_path), 0, ["NPO"])


def test_study_end_to_end_at_toy_size(tmp_path, capsys):
    out, res = tmp_path / "out", tmp_path / "res"
    argv = ["study", "tofu-mini-b1", *TOY, "--seeds", "0", "--methods", "SimNPO-b1", "--out", str(out),
            "--results", str(res)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for row in ("retain (oracle)", "target (finetuned)", "SimNPO-b1", "SimNPO-b1 + relearn", "results: "):
        assert row in text
    for f in ("tofu-mini-b1.md", "tofu-mini-b1.png", "tofu-mini-b1.json"):
        assert os.path.getsize(res / f) > 0
    study = json.loads((out / "study.json").read_text())
    assert study["rows"]["retain (oracle)"]["forget_quality"] == pytest.approx(1.0)  # its own reference
    run = json.loads((out / "seed0" / "SimNPO-b1" / "run.json").read_text())["config"]
    assert (run["loss"]["objective"], run["loss"]["beta"]) == ("simnpo", 1.0)
    hf = out / "seed0" / "target" / "hf" / "config.json"
    stamp = os.path.getmtime(hf)
    assert main(argv) == 0  # every stage reused: nothing trained again
    assert os.path.getmtime(hf) == stamp
    capsys.readouterr()
    assert main(argv[:2] + ["finetune.lr=0.01"] + argv[2:]) == 7  # EXIT_RUN_FOLDER: another config in that folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr: 0.003 -> 0.01" in err[0], err
