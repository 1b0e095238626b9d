"""1-rank and 2-rank (gloo) evaluation give identical numbers (every per-example value, bit for bit)."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from simnpo_fast.distributed import shutdown_distributed
from simnpo_fast.eval.tofu import TofuEvalConfig, evaluate_tofu

from .conftest import TINY_TOFU, tiny_llama, word_tokenizer, write_jsonl

CFG = dict(batch_size=2, gen_batch_size=2, max_new_tokens=5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate(data_dir):
    tok = word_tokenizer()
    model = tiny_llama(len(tok), seed=7)
    return evaluate_tofu(model, tok, data_dir, TofuEvalConfig(**CFG))


def _worker(rank, world, port, data_dir, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ok = False
    try:
        res = _evaluate(data_dir)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        ok = True
    finally:
        shutdown_distributed(wait=ok)  # the library's own teardown (barrier, destroy, gc) as its CLIs use it


@pytest.fixture
def bigger_tofu(tmp_path):
    # 7 forget / 5 retain questions: odd counts so the two ranks get unequal shares
    d = tmp_path / "tofu"
    d.mkdir()
    for name, rows in TINY_TOFU.items():
        rows = (rows * 3)[: 7 if name.startswith("forget") else 5]
        write_jsonl(d / f"{name}.json", rows)
    return str(d)


def test_two_ranks_equal_one_rank(bigger_tofu, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _evaluate(bigger_tofu)
    finally:
        torch.set_num_threads(threads)
    assert single["world_size"] == 1
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), bigger_tofu, str(out)), nprocs=2, join=True)
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0["world_size"] == 2
    single = json.loads(json.dumps(single))  # same float round-trip as the workers' results
    for name in ("forget", "retain", "real_authors", "world_facts"):
        assert r0["sets"][name]["per_example"] == single["sets"][name]["per_example"], name
        assert r0["sets"][name]["n"] == single["sets"][name]["n"]
    assert r0["summary"] == single["summary"]
    assert r1["summary"] == r0["summary"]  # gathered on every rank
