"""Relearning attack (one step equals a hand-written AdamW step on HF's own loss; relearning raises the
forget probability; the attacked model is a copy), reports, and the eval hook on an FSDP-sharded model."""
import copy
import json
import os

import pytest
import torch

from simnpo_fast.eval.relearn import RelearnConfig, finetune_nll, relearn_attack, relearn_subset
from simnpo_fast.eval.result_files import markdown_table, write_report
from simnpo_fast.eval.tofu import TofuEvalConfig, evaluate_tofu

from .conftest import TINY_TOFU, tiny_llama, write_jsonl


@pytest.fixture
def tofu_with_qa(tiny_tofu):
    rows = [{"question": r["question"], "answer": r["answer"]} for r in TINY_TOFU["forget10_perturbed"]]
    write_jsonl(os.path.join(tiny_tofu, "forget10.json"), rows)
    return tiny_tofu


def test_relearn_subset_seeded_distinct():
    a = relearn_subset(40, 10, seed=3)
    assert a == relearn_subset(40, 10, seed=3)
    assert len(set(a)) == 10 and a == sorted(a) and max(a) < 40
    assert a != relearn_subset(40, 10, seed=4)
    with pytest.raises(ValueError):
        relearn_subset(5, 6, 0)


def test_two_relearn_steps_equal_manual_sgd_on_hf_loss():
    model = tiny_llama(30, seed=4)
    ref = copy.deepcopy(model)
    exs = [{"input_ids": [1, 5, 6, 7, 8], "labels": [-100, -100, 6, 7, 8]},
           {"input_ids": [1, 9, 10, 11], "labels": [-100, 9, 10, 11]}]
    cfg = RelearnConfig(steps=2, lr=0.5, batch_size=2, seed=0, optimizer="sgd")
    finetune_nll(model, exs, cfg, pad_id=0)
    # oracle: HF's own (full-logits) token-mean cross-entropy, two SGD steps on the whole (2-example) set
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 0]])
    mask = torch.tensor([[1] * 5, [1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 6, 7, 8], [-100, 9, 10, 11, -100]])
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref.train()
    for _ in range(2):
        ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n
    assert not torch.equal(model.lm_head.weight, tiny_llama(30, seed=4).lm_head.weight)  # it did move


def test_relearn_attack_raises_forget_probability(tofu_with_qa, wtok):
    model = tiny_llama(len(wtok), seed=5)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    ecfg = TofuEvalConfig(sets=("forget",), generation=False)
    res = relearn_attack(model, wtok, tofu_with_qa, RelearnConfig(n_examples=3, steps=15, lr=1e-2, batch_size=3),
                         eval_cfg=ecfg)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())  # attacked a copy
    direct = evaluate_tofu(model, wtok, tofu_with_qa, copy.deepcopy(ecfg))
    assert res["before"]["summary"] == direct["summary"]
    assert res["after"]["sets"]["forget"]["probability"] > 2 * res["before"]["sets"]["forget"]["probability"]
    assert res["losses"][-1] < res["losses"][0]
    assert res["rows"] == [0, 1, 2]
    json.dumps(res)  # serialisable


def test_report_files_and_table(tmp_path):
    a = {"summary": {"forget/probability": 0.5, "forget_quality": 1e-5, "model_utility": 0.25}}
    b = {"summary": {"forget/probability": 0.125, "forget_quality": 0.5, "model_utility": 0.2}}
    md = markdown_table({"A": a["summary"], "B": b["summary"]})
    assert "| A | 0.5000 | - | - | - | 1.00e-05 | - | - | 0.2500 |" in md
    paths = write_report({"A": a, "B": b}, str(tmp_path / "rep"), title="t",
                         history=[{"step": 0, "summary": a["summary"]}, {"step": 5, "summary": b["summary"]}])
    for k in ("A", "B", "plot", "curves", "markdown"):
        assert os.path.getsize(paths[k]) > 0
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(paths["A"]))["summary"]["forget_quality"] == 1e-5


def test_eval_hook_on_fsdp_model_equals_plain(tiny_tofu, wtok):
    import torch.distributed as dist

    from simnpo_fast.distributed import apply_fsdp, init_distributed
    from simnpo_fast.eval.hook import EvalHook
    from simnpo_fast.model import UnlearnModel

    created = not dist.is_initialized()
    init_distributed("cpu")
    try:
        hf = tiny_llama(len(wtok), seed=6)
        ecfg = TofuEvalConfig(max_new_tokens=4)
        plain = evaluate_tofu(copy.deepcopy(hf), wtok, tiny_tofu, copy.deepcopy(ecfg))
        model = UnlearnModel(hf)
        apply_fsdp(model)
        hook = EvalHook(tiny_tofu, wtok, every=2, cfg=ecfg)

        class Run:
            pass

        run = Run()
        run.model = model
        hook(run, 2)  # before step 2: weights after 1 step -> not a multiple of 2, skipped
        assert hook.history == []
        hook(run, 3)  # weights after 2 steps
        assert [h["step"] for h in hook.history] == [2]
        assert hook.history[0]["summary"] == pytest.approx(plain["summary"], rel=1e-5)
    finally:
        if created:
            dist.destroy_process_group()
