"""`simnpo-fast plan`: one plan against the cards, the table at scale (with measured rates), option errors."""
import json

from simnpo_fast.cli import main

from ..test_plan import _gpu_check_payload


def test_cli_plan_runs(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--gpus", "8", "--card", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "h100-80gb" in out and "fits" in out and "naive logits" in out


def test_cli_plan_table(capsys, tmp_path):
    assert main(["plan", "--table", "--seq", "2048", "--batch", "4"]) == 0
    assert "| llama-3.1-8b | 8 | full |" in capsys.readouterr().out
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(_gpu_check_payload()))
    assert main(["plan", "--table", "--rates", str(path)]) == 0
    assert "tokens/s (AC, fused)" in capsys.readouterr().out
    assert main(["plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["simnpo-fast: config error: plan needs --model (a preset or a config.json) or --table"], err
