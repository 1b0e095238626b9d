"""Planner arithmetic on hand-computed cases (no timing, no memory measurement)."""
import json

import pytest

from simnpo_fast.plan import PRESETS, ModelShape, PlanConfig, load_model, plan

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)


def _hf_params(cfg):
    transformers = pytest.importorskip("transformers")
    conf = transformers.LlamaConfig(**cfg)
    return sum(p.numel() for p in transformers.LlamaForCausalLM(conf).parameters())


@pytest.mark.parametrize("tie", [False, True])
def test_params_match_instantiated_llama(tie):
    cfg = {**TINY, "tie_word_embeddings": tie}
    assert ModelShape(**cfg).params() == _hf_params(cfg)


def test_params_by_hand():
    # embed 1000*64 + lm_head 1000*64 + 2 layers * (q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*176 + 2 norms 64)
    # + final norm 64
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 176 + 2 * 64
    assert ModelShape(**TINY).params() == 2 * 1000 * 64 + 2 * layer + 64 == 220480


def test_llama_3_1_8b_preset_is_8b():
    assert load_model("llama-3.1-8b").params() == 8_030_261_248  # the published parameter count
    assert load_model("llama-2-7b").params() == 6_738_415_616


def test_config_json_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "llama", "torch_dtype": "bfloat16"}))
    assert load_model(str(tmp_path)).params() == 220480
    with pytest.raises(ValueError, match="hub downloads"):
        load_model("no/such-model")


def test_adamw_states_are_two_fp32_copies_sharded():
    m = ModelShape(**TINY)
    for gpus in (1, 4):
        r = plan(m, PlanConfig(gpus=gpus, device="gpu"))
        assert r["terms_bytes"]["optimizer_states"] == 2 * 4 * m.params() / gpus
        assert r["terms_bytes"]["parameters"] == 4 * m.params() / gpus
    assert plan(m, PlanConfig(gpus=1))["terms_bytes"]["fsdp_buffers"] == 0


def test_lora_trains_adapters_only():
    m = ModelShape(**TINY)
    r = plan(m, PlanConfig(lora=True, lora_r=8))
    # r * (in + out) for q, k, v, o, gate, up, down in each of 2 layers
    per_layer = 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 176) + (176 + 64))
    assert r["trainable"] == 2 * per_layer
    assert r["terms_bytes"]["optimizer_states"] == 2 * 4 * 2 * per_layer


def test_logits_term_naive_vs_fused_cpu():
    m = ModelShape(**TINY)
    seq, batch = 128, 4
    naive = plan(m, PlanConfig(device="cpu", seq=seq, batch=batch, logits="naive"))["terms_bytes"]["logits"]
    fused = plan(m, PlanConfig(device="cpu", seq=seq, batch=batch, logits="fused"))["terms_bytes"]["logits"]
    assert naive == seq * batch * 1000 * 12  # fp32: log-softmax + its grad + logits grad
    rows = 128  # max(128, h / 2)
    assert fused == rows * 1000 * 4 * 2 + seq * batch * 64 * 4


def test_naive_bf16_logits_and_npo_reference_model():
    m = ModelShape(**TINY)
    r = plan(m, PlanConfig(device="gpu", seq=64, batch=2, logits="naive"))
    assert r["terms_bytes"]["logits"] == 64 * 2 * 1000 * 14  # + the bf16 logits gradient
    assert r["terms_bytes"]["reference_model"] == 0  # SimNPO is reference-free
    npo = plan(m, PlanConfig(device="gpu", gpus=2, loss="npo"))
    assert npo["terms_bytes"]["reference_model"] == m.params() * 2 / 2


def test_checkpointing_keeps_layer_inputs_only():
    m = ModelShape(**TINY)
    tok = 256
    full = plan(m, PlanConfig(device="cpu", seq=tok, batch=1, checkpointing=False))["terms_bytes"]["activations"]
    ckpt = plan(m, PlanConfig(device="cpu", seq=tok, batch=1, checkpointing=True))["terms_bytes"]["activations"]
    per = m.act_elems_per_token_layer() * 4
    final_norm = tok * 3 * 64 * 4
    assert full == tok * 2 * per + final_norm
    assert ckpt == tok * (2 * 64 * 4 + per) + final_norm


def test_peak_is_max_of_phases():
    r = plan(load_model("tiny"), PlanConfig(device="cpu", seq=256, batch=4))
    assert r["peak_bytes"] == max(r["fwd_bwd_bytes"], r["optimizer_step_bytes"])
    assert set(PRESETS) >= {"tiny", "llama-2-7b", "llama-3.1-8b"}


def test_cli_plan_runs(capsys):
    from simnpo_fast.cli import main

    assert main(["plan", "--model", "llama-3.1-8b", "--gpus", "8", "--card", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "h100-80gb" in out and "fits" in out and "naive logits" in out
