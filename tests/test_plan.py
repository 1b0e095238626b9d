"""Planner arithmetic on hand-computed cases (no timing, no memory measurement)."""
import json

import pytest

from simnpo_fast.model import PRESET_CONFIGS
from simnpo_fast.plan import ModelShape, PlanConfig, load_model, plan

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
    cached = plan(m, PlanConfig(device="gpu", gpus=2, loss="npo"))  # this trainer: log-likelihoods cached first
    assert cached["terms_bytes"]["reference_model"] == 0
    live = plan(m, PlanConfig(device="gpu", gpus=2, loss="npo", reference="live"))
    assert live["terms_bytes"]["reference_model"] == m.params() * 2 / 2  # a bf16 copy, sharded
    assert plan(m, PlanConfig(device="gpu", loss="simnpo", reference="live"))["terms_bytes"]["reference_model"] == 0
    with pytest.raises(ValueError, match="reference must be cached or live"):
        plan(m, PlanConfig(reference="frozen"))


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
    assert set(PRESET_CONFIGS) >= {"tiny", "tiny-llama", "llama-2-7b", "llama-3.1-8b"}


@pytest.mark.parametrize("name", sorted(PRESET_CONFIGS))
def test_every_preset_plans_the_model_it_builds(name):
    """One table (model.PRESET_CONFIGS) for ``model.preset`` and ``plan --model``: the planner's parameter count
    of a preset is that of the HF model the trainer builds from it (on the meta device: no memory)."""
    import torch
    transformers = pytest.importorskip("transformers")

    kw = dict(PRESET_CONFIGS[name])
    conf = transformers.AutoConfig.for_model(kw.pop("model_type", "llama"), **kw)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(conf)
    assert load_model(name).params() == sum(p.numel() for p in hf.parameters())


def test_cpu_ranks_shard_the_persistent_state():
    """On CPU ``gpus`` counts gloo ranks: fp32 parameters + gradients + two AdamW moments = 16 bytes per parameter,
    divided by the ranks (bench/memory_scaling.py measures it)."""
    from simnpo_fast.plan import sharded_state_bytes

    m = ModelShape(**TINY)
    for ranks in (1, 2, 4):
        r = plan(m, PlanConfig(device="cpu", gpus=ranks, seq=32, batch=2))
        assert sharded_state_bytes(r) == 16 * 220480 / ranks
        assert (r["terms_bytes"]["fsdp_buffers"] > 0) == (ranks > 1)


LLAMA8B_BODY = 32 * (4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096)  # 6,979,584,000


def test_expected_tokens_per_s_by_hand():
    from simnpo_fast.plan_table import body_params, expected_tokens_per_s

    m = load_model("llama-3.1-8b")
    assert body_params(m) == LLAMA8B_BODY == 6_979_584_000
    rates = {"body_flops_per_s": 4e14, "head_s_per_token_dV": {"fused": {32000: 1e-15, 128256: 2e-15},
                                                               "naive": {32000: 3e-15, 128256: 5e-15}}}
    t_ac = 8 * LLAMA8B_BODY / 4e14 + 2e-15 * 4096 * 128256  # AC recomputes the forward: 8 P flops per token
    assert expected_tokens_per_s(m, rates, gpus=8) == pytest.approx(8 / t_ac)
    t_naive = 6 * LLAMA8B_BODY / 4e14 + 5e-15 * 4096 * 128256
    assert expected_tokens_per_s(m, rates, checkpointing=False, logits="naive") == pytest.approx(1 / t_naive)
    t_lora = 6 * LLAMA8B_BODY / 4e14 + 2e-15 * 4096 * 128256  # no weight gradient of the frozen base: 4 + 2 (AC)
    assert expected_tokens_per_s(m, rates, lora=True) == pytest.approx(1 / t_lora)
    llama2 = load_model("llama-2-7b")  # V = 32000: the rate measured at 32000
    t2 = 8 * body_params(llama2) / 4e14 + 1e-15 * 4096 * 32000
    assert expected_tokens_per_s(llama2, rates) == pytest.approx(1 / t2)


def _gpu_check_payload():
    """A hand-made gpu-check result: bench at V=1000 (M=100 rows, d=10) and a measured unlearning run."""
    bench = {"config": {"M": 100, "d": 10}, "timing": {"1000": {"methods": {"naive": {"ms": 4.0},
                                                                           "triton": {"ms": 1.0}}}}}
    shape = dict(TINY)
    ours = {"model": shape, "tokens_per_s": 1000.0, "activation_checkpointing": True}
    return {"stages": {"b": {"kind": "bench", "result": bench}}, "unlearn": {"ours": ours},
            "backend_rule": {"backend": "triton"}, "path": "x.json"}


def test_rates_from_gpu_check_by_hand(tmp_path):
    from simnpo_fast.plan_table import load_rates, rates_from_gpu_check

    rates = rates_from_gpu_check(_gpu_check_payload())
    fused = 1e-3 / (100 * 10 * 1000)  # s per token per d*V
    assert rates["head_s_per_token_dV"] == {"fused": {1000: pytest.approx(fused)},
                                            "naive": {1000: pytest.approx(4 * fused)}}
    body = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 176 + 2 * 64)
    t_body = 1 / 1000.0 - fused * 64 * 1000  # the run's step time per token minus its head time
    assert rates["body_flops_per_s"] == pytest.approx(8 * body / t_body)
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(_gpu_check_payload()))
    assert load_rates(str(path))["body_flops_per_s"] == pytest.approx(rates["body_flops_per_s"])
    path.write_text(json.dumps({"stages": {}}))
    with pytest.raises(ValueError, match="no measured rates"):
        load_rates(str(path))


def test_scale_table_rows_are_the_planner():
    from simnpo_fast.plan import GiB
    from simnpo_fast.plan_table import format_table, scale_table

    rows = scale_table(seq=2048, batch=4)
    assert [(r["model"], r["gpus"], r["lora"]) for r in rows][:4] == [
        ("llama-3.1-8b", 1, False), ("llama-3.1-8b", 1, True), ("llama-3.1-8b", 8, False), ("llama-3.1-8b", 8, True)]
    assert len(rows) == 12
    m = load_model("llama-3.1-70b")
    for r in rows:
        if r["model"] == "llama-3.1-70b" and r["gpus"] == 64 and not r["lora"]:
            want = plan(m, PlanConfig(gpus=64, seq=2048, batch=4, checkpointing=False, logits="naive"))
            assert r["peak_gib"]["no_ac_naive"] == want["peak_bytes"] / GiB
            live = plan(m, PlanConfig(gpus=64, seq=2048, batch=4, loss="npo", reference="live"))
            assert r["peak_gib"]["npo_live_ac_fused"] == live["peak_bytes"] / GiB
        p = r["peak_gib"]
        assert p["ac_fused"] <= p["ac_naive"] and p["ac_fused"] <= p["no_ac_fused"] <= p["no_ac_naive"]
    lines = format_table(rows).splitlines()
    assert len(lines) == 14
    for r, line in zip(rows, lines[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [r["model"], str(r["gpus"]), "LoRA r=16" if r["lora"] else "full"]
        # * marks a setting over an 80 GB card
        assert cells[3].endswith("*") == (r["peak_gib"]["ac_fused"] > 79.1), (cells, r["peak_gib"])
        assert float(cells[3].rstrip("*").replace(",", "")) == pytest.approx(r["peak_gib"]["ac_fused"], rel=0.05)
