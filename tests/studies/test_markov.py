"""``simnpo-fast study markov --quick`` end to end: files, data / metric checks, trajectories and weights that
the protocol fixes exactly (NPO's weights start at 1, GA's are constant), model checkpoints reused."""
import json
import os

import pytest

from simnpo_fast.cli import main

METHODS = ["GA", "GradDiff", "NPO", "NPO+RT", "SimNPO", "SimNPO+RT"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("markov")
    out, res = str(root / "out"), str(root / "res")
    assert main(["study", "markov", "--quick", "--out", out, "--results", res]) == 0
    with open(os.path.join(res, "markov-quick.json")) as f:
        return {"out": out, "res": res, "study": json.load(f)}


def test_files_and_checks(quick):
    s = quick["study"]
    for f in ("markov-quick.md", "markov-quick.png", "markov-quick-weights.png", "markov-quick.json"):
        assert os.path.getsize(os.path.join(quick["res"], f)) > 0
    assert s["seeds"] == [0] and s["methods"] == METHODS
    assert sorted(r["setting"] for r in s["runs"]) == ["length", "unseen"]
    for r in s["runs"]:
        for chain, c in r["checks"].items():
            assert c["rows"] >= 3 and c["p_value"] > 1e-4, (r["setting"], chain, c)  # data vs its own matrix
            assert abs(c["true_chain_kl"]) < 1e-6  # the true chain through the evaluation path
    md = open(os.path.join(quick["res"], "markov-quick.md")).read()
    assert "simnpo-fast study markov --quick" in md or "studies.markov.run(...)" in md
    assert "load average" in md and "CPU-min" in md and "Reading (computed" in md
    for a, b in s["config"]["report"]["compare"]:  # the config's comparisons, one sentence per setting
        assert md.count(f"**{a} vs {b}**") == 2


def test_trajectories(quick):
    for r in quick["study"]["runs"]:
        starts = [r["methods"][m][0] for m in METHODS]
        for m in METHODS:
            traj = r["methods"][m]
            assert [p["iteration"] for p in traj] == [0, 1, 2, 4, 6]
            assert traj[0] == {**starts[0], **{k: v for k, v in traj[0].items() if k.startswith(("weight", "push"))}}
            assert all(v == v and abs(v) < 1e3 for p in traj for v in p.values())  # finite
        ga = r["methods"]["GA"]
        assert ga[-1]["kl_true/forget1"] > ga[0]["kl_true/forget1"]  # GA moves the model away from forget1
        if r["setting"] == "unseen":  # forget2 never seen: the pretrained model is already near the retrained one
            assert starts[0]["kl_retrain/forget2"] < starts[0]["kl_retrain/forget1"]


def test_weights_fixed_by_the_protocol(quick):
    for r in quick["study"]["runs"]:
        npo, ga = r["methods"]["NPO"], r["methods"]["GA"]
        assert npo[0]["weight/forget1"] == pytest.approx(1.0) and npo[0]["weight/forget2"] == pytest.approx(1.0)
        n1, n2 = 19, (4 if r["setting"] == "length" else 19)
        # NPO starts with w = 1 on every sequence: each chain's push is proportional to its length
        assert npo[0]["push_share/forget1"] == pytest.approx(n1 / (n1 + n2))
        w = ga[0]["weight/forget1"]
        assert w == pytest.approx(1 / ((n1 + n2) / 2))  # token mean: 1 / mean forget length (equal counts)
        assert all(p["weight/forget1"] == w and p["weight/forget2"] == w for p in ga)
        sim = r["methods"]["SimNPO"][0]
        assert sim["weight/forget1"] < 2 / n1 and sim["weight/forget2"] < 2 / n2


def test_models_are_reused_and_runs_repeat(quick):
    from simnpo_fast.studies import load_study_config
    from simnpo_fast.studies.markov import resolve, run as run_markov

    models = os.path.join(quick["out"], "models")
    stamp = {f: os.path.getmtime(os.path.join(models, f)) for f in os.listdir(models)}
    cfg = resolve(load_study_config("markov"), quick=True)
    again = run_markov(cfg, quick["out"], methods=["SimNPO"])
    assert all(m["reused"] for m in again["models"]) and len(again["models"]) == 3
    before = {r["setting"]: r["methods"]["SimNPO"] for r in quick["study"]["runs"]}
    for r in again["runs"]:
        for a, b in zip(r["methods"]["SimNPO"], before[r["setting"]]):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    # another pretraining config trains new checkpoints next to the old ones, never over them
    changed = resolve(load_study_config("markov"), quick=True, overrides=["pretrain.epochs=1", "unlearn.iterations=1"])
    other = run_markov(changed, quick["out"], methods=["GA"])
    assert not any(m["reused"] for m in other["models"])
    assert {f: os.path.getmtime(os.path.join(models, f)) for f in stamp} == stamp
    assert len(os.listdir(models)) == 6


@pytest.mark.parametrize("argv, match", [
    (["study", "markov", "--quick", "--methods", "DPO"], "unknown methods"),
    (["study", "markov", "methods.GA.objective=dpo", "--quick"], "methods.GA.objective"),
    (["study", "markov", "settings.unseen.pretrain_on=[retain,forget3]", "--quick"], "settings.unseen.pretrain_on"),
    (["study", "markov", "data.leakage=1.5", "--quick"], "leakage"),
    (["study", "markov", "--quick", "--data", "x"], "--data"),
    (["study", "tofu-mini", "--quick"], "--quick"),
])
def test_bad_input_is_a_config_error(argv, match, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path / "o"), "--results", str(tmp_path / "r")]) == 2  # EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
