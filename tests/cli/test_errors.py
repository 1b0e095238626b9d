"""Every command-line error path ends with one line naming the file or key and the documented exit status
(simnpo_fast/errors.py), without a traceback unless --debug (issue 13, items 3, 7, 8 and the Deliver list).

Most cases call ``simnpo_fast.cli.main`` in this process (its exit status is the return value, its report the
captured stderr); the cases that could hang or must show the real process exit run as short subprocesses."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 4-author synthetic TOFU-layout folder, its tokenizer and a 1-layer Llama HF folder (with tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from simnpo_fast.data import synthetic, train_tokenizer

    d = tmp_path_factory.mktemp("cli")
    data = str(d / "data")
    synthetic.generate(data, n_authors=4, facts_per_author=2, seed=0)
    tok = train_tokenizer(data, str(d / "tok"), vocab_size=300)
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model = str(d / "model")
    m.save_pretrained(model)
    tok.save_pretrained(model)
    return {"root": d, "data": data, "tok": str(d / "tok"), "model": model}


def _run(argv, capsys):
    from simnpo_fast.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.startswith("simnpo-fast:")]
    return code, lines, err


def _one_line(err, lines):
    assert len(lines) == 1, err
    # pytest artefact: a library log handler bound to an earlier test's closed capture reports "--- Logging
    # error ---" with a traceback of its own; that block is not ours
    err = re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", err, flags=re.S)
    assert "Traceback" not in err, err
    return lines[0]


# ============================================================================ config errors: exit 2, no work

CONFIG_CASES = [
    (["optim.betas=abc"], "optim.betas: expected a list, got 'abc'"),
    (["optim.betas=[0.9]"], "optim.betas must be two numbers in [0, 1)"),
    (["data.synthetic.n_authors=abc"], "data.synthetic.n_authors: expected an integer, got 'abc'"),
    (["data.max_length=0"], "data.max_length must be >= 2, got 0"),
    (["parallel.device=tpu"], "parallel.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["loss.beta=.inf"], "loss.beta must be a finite number, got inf"),
    (["optim.lr=.inf"], "optim.lr must be a finite number, got inf"),
    (["optim.lr=.nan"], "optim.lr must be a finite number, got nan"),
    (["max_steps=2.5"], "max_steps: expected an integer, got 2.5"),
    (["progress=2"], "progress: expected a boolean, got 2"),
    (["optim.lr.x=1"], "override 'optim.lr.x=1': optim.lr is not a section"),
    (["optim.lr=[1"], "optim.lr: invalid YAML value '[1'"),
    (["optim.lrr=1e-5"], "unknown config key(s) ['lrr'] in optim"),
    (["data.template=llama3"], "data.template: unknown template 'llama3'"),
    (["data.synthetic.facts_per_author=99"], "data.synthetic.facts_per_author must be in 1..20, got 99"),
    (["checkpoint.resume=sometimes"], "checkpoint.resume must be false, true or auto, got 'sometimes'"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_CASES, ids=[c[0][0] for c in CONFIG_CASES])
def test_config_errors_exit_2_before_any_work(overrides, message, tmp_path, capsys):
    out = tmp_path / "never"
    code, lines, err = _run(["unlearn", "--config", "default", f"output_dir={out}", *overrides], capsys)
    line = _one_line(err, lines)
    assert code == 2 and line.startswith("simnpo-fast: config error: ") and message in line, line
    assert not out.exists()  # nothing generated, trained or written


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: [1e-3,\n", "invalid YAML"),
    ("- optim\n- loss\n", "the top level of a config must be a mapping of keys, got a list"),
    ("optim: 3\n", "optim: expected a mapping, got 3"),
    ("", "the config file is empty"),
    ("# a comment only\n", "the config file is empty"),
])
def test_bad_config_files_name_the_file(text, message, tmp_path, capsys):
    cfg = tmp_path / "my.yaml"
    cfg.write_text(text)
    code, lines, err = _run(["unlearn", "--config", str(cfg), f"output_dir={tmp_path / 'never'}"], capsys)
    line = _one_line(err, lines)
    assert code == 2 and message in line, line
    assert "my.yaml" in line or "optim" in line


def test_config_error_in_a_real_process_has_no_traceback_and_debug_adds_it(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("a: [1,\n")
    cmd = [sys.executable, "-m", "simnpo_fast.cli", "unlearn", "--config", str(cfg)]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "bad.yaml: invalid YAML" in p.stderr
    p = subprocess.run(cmd + ["--debug"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" in p.stderr and "ConfigError" in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("simnpo-fast: config error: ")


# ============================================================================ data / model / tokenizer

def _tiny_unlearn(world, out, *extra):
    return ["unlearn", "--config", "default", f"output_dir={out}", "progress=false", "plot=false",
            "evaluate=false", "finetune.enabled=false", "max_steps=1", "batch_size=2", "micro_batch_size=2",
            f"data.tokenizer={world['tok']}", "model.config={hidden_size: 32, intermediate_size: 64, "
            "num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2}", "checkpoint.export_hf=false",
            *extra]


def test_unlearn_on_a_missing_split_and_an_empty_split_is_a_data_error(world, tmp_path, capsys):
    data = tmp_path / "tofu"
    shutil.copytree(world["data"], data)
    os.remove(data / "retain90.json")
    code, lines, err = _run(_tiny_unlearn(world, tmp_path / "r1", "data.kind=tofu", f"data.path={data}"), capsys)
    line = _one_line(err, lines)
    assert code == 4 and "data error" in line and "retain90.json" in line and "split 'retain90' not found" in line
    (data / "retain90.json").write_text("")
    code, lines, err = _run(_tiny_unlearn(world, tmp_path / "r2", "data.kind=tofu", f"data.path={data}"), capsys)
    line = _one_line(err, lines)
    assert code == 4 and "retain90.json: empty split (0 rows)" in line, line


def test_eval_missing_relative_data_path_is_not_a_hub_id(world, capsys, monkeypatch):
    """Issue item 8: a missing relative path was retried over the network as a hub id for ~23 s."""
    import datasets

    def no_network(*a, **k):
        raise AssertionError("datasets.load_dataset called: the path was taken for a hub id")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    for path in ("tofu_data/forget10", "no_such_dir"):
        code, lines, err = _run(["eval", "--model", world["model"], "--data", path], capsys)
        line = _one_line(err, lines)
        assert code == 4 and f"{path}: data folder not found" in line, line



def test_load_tofu_takes_missing_local_looking_paths_for_folders(tmp_path, monkeypatch):
    import datasets

    from simnpo_fast.data import DataFileNotFoundError, load_tofu

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub lookup for a local path"))
    monkeypatch.chdir(tmp_path)
    os.makedirs("data")  # `data/tofu` has the form owner/name, but ./data is a local folder
    for path in ("data/tofu", "./tofu", "../x/tofu", "a/b/c"):
        with pytest.raises(DataFileNotFoundError, match=r"data folder not found \(relative to "):
            load_tofu(path, "forget10")


def test_truncated_tokenizer_json_names_the_file(world, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    raw = (model / "tokenizer.json").read_bytes()
    (model / "tokenizer.json").write_bytes(raw[:len(raw) // 2])
    code, lines, err = _run(["eval", "--model", str(model), "--data", world["data"]], capsys)
    line = _one_line(err, lines)
    assert code == 6 and line.startswith("simnpo-fast: tokenizer error: ") and f"{model}/tokenizer.json" in line
    code, lines, err = _run(["relearn", "--model", world["model"], "--tokenizer", str(tmp_path / "none"),
                             "--data", world["data"]], capsys)
    assert code == 6 and "none: tokenizer folder not found" in _one_line(err, lines)


def test_unloadable_model_folder_is_a_model_error(world, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    (model / "config.json").write_text("{not json")
    code, lines, err = _run(["eval", "--model", str(model), "--data", world["data"]], capsys)
    line = _one_line(err, lines)
    assert code == 5 and line.startswith("simnpo-fast: model error: ") and str(model) in line
    code, lines, err = _run(_tiny_unlearn(world, tmp_path / "r", f"model.path={model}"), capsys)
    assert code == 5 and f"model.path '{model}': cannot load the model" in _one_line(err, lines)
    # issue 24 item 8: a config.json that parses as JSON but not as a model config is a model error too (the
    # tokenizer is read from the model folder first), in unlearn as in eval
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": "big"}')
    for argv in (_tiny_unlearn(world, tmp_path / "r2", f"model.path={model}", "data.tokenizer="),
                 ["eval", "--model", str(model), "--data", world["data"]]):
        code, lines, err = _run(argv, capsys)
        line = _one_line(err, lines)
        assert code == 5 and line.startswith("simnpo-fast: model error: ") and str(model) in line, line


@pytest.mark.parametrize("what", ["data", "model", "tokenizer"])
def test_a_missing_input_folder_has_the_same_exit_status_in_every_command(world, tmp_path, capsys, what):
    """Issue 24 item 8: data 4, model 5, tokenizer 6, in unlearn as in eval."""
    missing = str(tmp_path / "nowhere")
    code_of = {"data": 4, "model": 5, "tokenizer": 6}
    unlearn = {"data": ["data.kind=tofu", f"data.path={missing}"], "model": [f"model.path={missing}"],
               "tokenizer": [f"data.tokenizer={missing}"]}[what]
    ev = {"data": ["--data", missing, "--model", world["model"]],
          "model": ["--data", world["data"], "--model", missing],
          "tokenizer": ["--data", world["data"], "--model", world["model"], "--tokenizer", missing]}[what]
    for argv in (_tiny_unlearn(world, tmp_path / "r", *unlearn), ["eval", *ev]):
        code, lines, err = _run(argv, capsys)
        line = _one_line(err, lines)
        assert code == code_of[what] and "nowhere" in line, (argv[0], line)


EVAL_FAST = ["--max-examples", "2", "--max-new-tokens", "2", "--batch-size", "2", "--no-progress"]


def test_eval_on_an_empty_set_is_an_error_and_writes_nothing(world, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    (data / "forget10_perturbed.json").write_text("")
    out = tmp_path / "report"
    code, lines, err = _run(["eval", "--model", world["model"], "--data", str(data), "--sets", "forget",
                             "--out", str(out), *EVAL_FAST], capsys)
    line = _one_line(err, lines)
    assert code == 4 and "forget10_perturbed.json: empty split (0 rows)" in line, line
    assert not out.exists()


def test_non_finite_metrics_are_an_error_not_exit_0(world, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = tmp_path / "nan-model"
    m = AutoModelForCausalLM.from_pretrained(world["model"])
    with torch.no_grad():
        m.lm_head.weight.fill_(float("nan"))
    m.save_pretrained(str(model))
    shutil.copy(os.path.join(world["model"], "tokenizer.json"), model)
    shutil.copy(os.path.join(world["model"], "tokenizer_config.json"), model)
    out = tmp_path / "report"
    code, lines, err = _run(["eval", "--model", str(model), "--data", world["data"], "--sets", "forget",
                             "--out", str(out), *EVAL_FAST], capsys)
    line = _one_line(err, lines)
    assert code == 9 and line.startswith("simnpo-fast: bad result: ") and "non-finite metric(s) forget/" in line
    assert not out.exists()


def test_relearn_diverging_lr_exits_3(world, tmp_path, capsys):
    """Issue item 8: `relearn --lr 1e12` reported NaN metrics with exit 0."""
    code, lines, err = _run(["relearn", "--model", world["model"], "--data", world["data"], "--lr", "1e12",
                             "--steps", "3", "--n-examples", "2", "--relearn-batch-size", "2",
                             "--out", str(tmp_path / "r"), *EVAL_FAST], capsys)
    line = _one_line(err, lines)
    assert code == 3 and line.startswith("simnpo-fast: diverged: relearning step ") and "non-finite loss" in line
    assert not (tmp_path / "r").exists()


def test_relearn_with_zero_examples_exits_2_instead_of_hanging(world, tmp_path):
    """Issue item 7: `relearn --n-examples 0` looped forever. A real process, with a timeout."""
    base = [sys.executable, "-m", "simnpo_fast.cli", "relearn", "--model", world["model"], "--data", world["data"]]
    p = subprocess.run(base + ["--n-examples", "0"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "simnpo-fast: config error: --n-examples must be >= 1, got 0"


def test_library_relearn_on_no_examples_raises(world):
    from simnpo_fast.eval.relearn import RelearnConfig, finetune_nll, relearn_subset
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="at least one example"):
        finetune_nll(AutoModelForCausalLM.from_pretrained(world["model"]), [], RelearnConfig(steps=2), pad_id=0)
    with pytest.raises(ValueError, match="asked for 5 relearning examples but the forget split has 3"):
        relearn_subset(3, 5, 0)
    assert json.dumps(relearn_subset(3, 0, 0)) == "[]"


def test_plan_with_an_unknown_model_is_an_option_error(capsys):
    code, lines, err = _run(["plan", "--model", "no-such-model", "--gpus", "8"], capsys)
    line = _one_line(err, lines)
    assert code == 2 and line.startswith("simnpo-fast: config error: unknown model 'no-such-model'"), line


def test_options_and_overrides_mix_in_any_order():
    from simnpo_fast.cli.unlearn import normalize_argv

    assert normalize_argv(["unlearn", "a=1", "--resume", "b=2", "--config", "x=y.yaml", "--overwrite"]) == \
        ["unlearn", "--resume", "--config", "x=y.yaml", "--overwrite", "a=1", "b=2"]
    assert normalize_argv(["unlearn", "--resume=auto", "a=1"]) == ["unlearn", "--resume-mode", "auto", "a=1"]
    assert normalize_argv(["eval", "--model", "m=1"]) == ["eval", "--model", "m=1"]  # other commands untouched


def test_resume_flag_before_an_override_does_not_swallow_it(tmp_path, capsys):
    code, lines, err = _run(["unlearn", f"output_dir={tmp_path / 'o'}", "--resume", "optim.lr=.inf"], capsys)
    assert code == 2 and "optim.lr must be a finite number, got inf" in _one_line(err, lines)


@pytest.mark.parametrize("exc, code", [
    (OSError(28, "No space left on device", "/runs/x/log.jsonl"), 11),
    (OSError(30, "Read-only file system", "/runs/x/eval.json"), 11),
    (PermissionError(13, "Permission denied", "/runs/x"), 11),
    (OSError(2, "No such file or directory", "/nowhere"), 1),  # not the storage's doing: a bug here
])
def test_storage_failures_are_not_called_bugs(exc, code, capsys):
    """A full or read-only disk is reported as a storage error (exit 11) with its file, not as a bug."""
    from simnpo_fast.errors import run_command

    def fail():
        raise exc

    assert run_command(fail) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and exc.filename in err[0]
    assert ("storage error" in err[0]) == (code == 11) and ("--debug" in err[0]) == (code == 1)


def test_torch_checkpoint_exception_is_one_line(capsys):
    """torch's CheckpointException derives from BaseException: it still ends as one line, never a traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    from simnpo_fast.errors import run_command

    def fail():
        raise CheckpointException("save failed", {0: (ValueError("boom"), None)})

    assert run_command(fail) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rank(s) 0: ValueError: boom" in err[0] and "Traceback" not in err[0], err
