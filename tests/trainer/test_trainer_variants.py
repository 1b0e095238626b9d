"""Retain-KL (frozen sharded reference) and LoRA (peft) paths of the trainer."""

import pytest
import torch

from .conftest import base_overrides


def test_retain_kl_is_zero_at_start_then_positive(corpus, tmp_path):
    from simnpo_fast.train import load_config, train

    cfg = load_config(None, base_overrides(corpus, str(tmp_path / "kl"), max_steps=3, **{
        "loss.retain_loss": "kl", "loss.objective": "simnpo", "optim.lr": 1e-2}))
    res = train(cfg)
    kl = [r["retain_loss"] for r in res.records]
    assert abs(kl[0]) < 1e-6  # the reference is the initial model: KL(ref || model) = 0 at step 1
    assert kl[-1] > 1e-5  # and the frozen reference did not move with the model


def test_lora_trains_adapters_only_and_exports_merged(corpus, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from simnpo_fast.train import load_config, train

    out = tmp_path / "lora"
    cfg = load_config(None, base_overrides(corpus, str(out), max_steps=2, **{
        "model.lora": "{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", "optim.lr": 1e-2,
        "checkpoint.export_hf": True}))
    grads = {}

    def hook(run, step):
        grads.update({n: p.grad is not None for n, p in run.model.named_parameters()})

    train(cfg, hooks={"after_backward": hook})
    trained = [n for n, g in grads.items() if g]
    assert trained and all("lora_" in n for n in trained)
    m = AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    assert not any("lora" in k for k in m.state_dict())  # merged into plain Llama weights
    cfg0 = load_config(None, base_overrides(corpus, str(tmp_path / "base"), max_steps=1, **{
        "optim.lr": 1e-30, "checkpoint.export_hf": True}))
    train(cfg0)
    m0 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base" / "hf"))
    q = "model.layers.0.self_attn.q_proj.weight"
    k = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.allclose(m.state_dict()[q], m0.state_dict()[q])  # adapters merged in
    torch.testing.assert_close(m.state_dict()[k], m0.state_dict()[k])  # untouched module
