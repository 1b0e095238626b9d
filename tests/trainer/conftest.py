"""Shared fixtures of the trainer tests: one tiny synthetic corpus + tokenizer per session, config builders."""
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A 10-author x 5-fact synthetic TOFU-layout corpus and a 512-token BPE tokenizer trained on it."""
    from simnpo_fast.data import synthetic, train_tokenizer

    d = tmp_path_factory.mktemp("corpus")
    data = str(d / "data")
    synthetic.generate(data, n_authors=10, facts_per_author=5, seed=0)
    tok = str(d / "tok")
    train_tokenizer(data, tok, vocab_size=512)
    return {"data": data, "tokenizer": tok}


def base_overrides(corpus, out, **extra):
    """key=value overrides of a tiny, fast run on the session corpus (no finetune stage, nothing written
    unless asked)."""
    ov = {
        "output_dir": out, "seed": 0, "max_steps": 1, "batch_size": 4, "micro_batch_size": 4,
        "progress": False, "plot": False, "evaluate": False,
        "model.preset": "tiny-llama", "model.config": "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                                                     "num_attention_heads: 4, num_key_value_heads: 2}",
        "data.kind": "synthetic", "data.path": corpus["data"], "data.tokenizer": corpus["tokenizer"],
        "data.synthetic": "{n_authors: 10, facts_per_author: 5, seed: 0}",  # what the session corpus was made with
        "data.max_length": 96, "finetune.enabled": False,
        "optim.lr": 1e-3, "optim.schedule": "constant", "optim.weight_decay": 0.0,
        "checkpoint.final": False, "checkpoint.export_hf": False,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def torchrun(nproc: int, script: str, *args, timeout: int = 240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
