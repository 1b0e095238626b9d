"""Acceptance: `simnpo-fast unlearn --config default` (the embedded default: synthetic corpus, tokenizer, tiny
Llama finetuned first, then SimNPO) finishes on CPU, lowers the forget-set log-likelihood by >= 0.3 nats/token
while the retain-set log-likelihood drops by <= 0.25 nats/token, and writes the log, the plot, the resolved
config and an HF folder that `from_pretrained` loads. The exported model is re-scored independently with HF's
own loss and must reproduce the trainer's final forget log-likelihood."""
import json
import os
import subprocess
import sys

import torch

from .conftest import ROOT, child_env

FORGET_DROP_MIN = 0.3   # nats per answer token
RETAIN_DROP_MAX = 0.25  # nats per answer token


def test_cli_embedded_default(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "simnpo_fast.cli", "unlearn", "--config", "default", f"output_dir={out}",
           "progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(1), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["forget_loglik"] - after["forget_loglik"] >= FORGET_DROP_MIN, summary
    assert before["retain_loglik"] - after["retain_loglik"] <= RETAIN_DROP_MAX, summary

    recs = [json.loads(x) for x in open(out / "log.jsonl")]
    assert [r["step"] for r in recs] == list(range(1, summary["steps"] + 1))
    for key in ("loss", "forget_loss", "retain_loss", "forget_loglik", "grad_norm", "lr", "tokens_per_s",
                "peak_mem_mb"):
        assert all(r[key] is not None for r in recs), key
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / os.path.basename(summary["checkpoint"]) / "config.yaml").is_file()
    assert (out / "finetune" / "hf" / "model.safetensors").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simnpo_fast import data as D

    model = AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    tok = AutoTokenizer.from_pretrained(str(out / "hf"))
    forget = D.encode_qa(D.load_tofu(str(out / "data"), "forget10"), tok, max_length=128)
    col = D.DataCollator.from_tokenizer(tok)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(forget), 8):
            b = col.pad([forget[j] for j in range(i, min(len(forget), i + 8))])
            k = int((b["labels"][:, 1:] != -100).sum())
            nll += float(model(**b).loss) * k
            n += k
    assert abs(-nll / n - after["forget_loglik"]) < 1e-4, (-nll / n, after["forget_loglik"])
