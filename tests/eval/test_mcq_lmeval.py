"""External check: on the same local question file and the same tiny Llama, ``simnpo_fast.eval.mcq`` gives
lm-evaluation-harness's per-question log-likelihoods, predictions and accuracy (``lm_eval`` from PyPI, the
``test-lmeval`` extra). The task YAML written here *includes* lm-eval's own installed
``lm_eval/tasks/wmdp/_default_template_yaml`` (prompt, choices, target) and only points it at the local JSONL
through datasets' ``json`` builder (no hub access); the description is ``wmdp_bio.yaml``'s. Skips when lm_eval
is not importable."""
import json
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install -e '.[test-lmeval]')")

from simnpo_fast.eval.mcq import McqEvalConfig, evaluate_mcq  # noqa: E402

from .test_mcq import QUESTIONS, tiny_model_and_tokenizer  # noqa: E402


def _task_yaml(folder, data_file, fmt):
    base = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "wmdp", "_default_template_yaml")
    if fmt == "text":
        base = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "mmlu", "continuation",
                            "_continuation_template_yaml")
    assert os.path.isfile(base), base
    name = f"local_mcq_{fmt}"
    desc = "The following are multiple choice questions (with answers) about biology.\n\n"
    lines = [f"include: {base}", f"task: {name}", "dataset_path: json", "dataset_name: null",
             "dataset_kwargs:", "  data_files:", f"    test: {data_file}", "test_split: test",
             "fewshot_split: null", "num_fewshot: 0", f"description: {json.dumps(desc)}",
             "metric_list:", "  - metric: acc", "  - metric: acc_norm"]
    with open(os.path.join(folder, name + ".yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return name


def test_per_question_equals_lm_eval(tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = tiny_model_and_tokenizer()
    data = tmp_path / "bio-questions.jsonl"
    with open(data, "w") as f:
        for r in QUESTIONS:
            f.write(json.dumps(r) + "\n")
    (tmp_path / "tasks").mkdir()
    tasks = {fmt: _task_yaml(str(tmp_path / "tasks"), str(data), fmt) for fmt in ("letters", "text")}
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=list(tasks.values()), task_manager=tm, log_samples=True, num_fewshot=0,
                          bootstrap_iters=0)
    n_differ = 0
    for fmt, task in tasks.items():
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        ours = evaluate_mcq(model, tok, str(data), McqEvalConfig(format=fmt, subject="biology", batch_size=3))
        pq = ours["sets"]["bio-questions"]["per_question"]
        assert len(samples) == len(pq) == len(QUESTIONS)
        for s, r in zip(samples, pq):
            theirs = [float(x[0]) for x in s["filtered_resps"]]
            torch.testing.assert_close(torch.tensor(r["loglik"]), torch.tensor(theirs), rtol=1e-5, atol=1e-5)
            assert r["acc"] == s["acc"] and r["acc_norm"] == s["acc_norm"]
            n_differ += r["pred"] != r["pred_norm"]
        res = out["results"][task]
        assert ours["summary"]["bio-questions/acc"] == pytest.approx(res["acc,none"], abs=1e-12)
        assert ours["summary"]["bio-questions/acc_norm"] == pytest.approx(res["acc_norm,none"], abs=1e-12)
    assert n_differ > 0  # the length normalisation changes some prediction: acc_norm is really checked
