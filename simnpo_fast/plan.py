"""Analytic memory planner: does an unlearning run of this model fit, per GPU, before renting the GPUs?

    simnpo-fast plan --model llama-3.1-8b --gpus 8 --seq 1024 --batch 4
    simnpo-fast plan --model path/to/config.json --gpus 1 --lora --card a100-40gb
    simnpo-fast plan --model tiny --device cpu --seq 256 --batch 4 --logits naive
    simnpo-fast plan --table [--rates bench/results/gpu-<gpu>-<date>.json]   # 7-8B / 70B on 1, 8, 64 GPUs

The model is a Llama-style decoder (Llama / Mistral / Qwen2 configs: embeddings, L x [RMSNorm, GQA attention,
RMSNorm, SwiGLU MLP], final RMSNorm, LM head, optionally tied). Per-GPU bytes, ``G`` = number of GPUs (FSDP2
full sharding: every persistent term is divided by G; on CPU, ``gpus`` counts the gloo processes):

* parameters: ``P * storage bytes / G``. GPU default: fp32 sharded master parameters (FSDP2 mixed precision
  with bf16 compute); ``--param-dtype bf16`` stores bf16 only. LoRA: the frozen base in bf16 + fp32 adapters.
* gradients: trainable params x grad bytes / G (fp32 under FSDP2 mixed precision; the param dtype otherwise).
* AdamW: ``exp_avg`` + ``exp_avg_sq`` = 2 x fp32 x trainable / G, plus the optimizer step's temporaries.
* FSDP buffers (G > 1): two all-gathered layers in the compute dtype (current + prefetched) + one layer's
  unsharded gradient before its reduce-scatter + the all-gathered [norm, lm_head] unit.
* activations: what autograd saves per token per decoder layer (eager HF Llama with SDPA / flash attention:
  layer input, 2 x RMSNorm (normalised + scaled), q, k, v, attention output (+ its contiguous copy for o_proj),
  the log-sum-exp, the residual, and 4 x intermediate for SwiGLU) = ``6h + 3 a + 2 kv + 4 I + heads + 2``
  elements, ``a = heads * head_dim``, ``kv = kv_heads * head_dim``. With checkpointing: the layer inputs
  (``h`` per token per layer) + one layer's activations recomputed in backward.
* logits: naive (HF / unlearning frameworks: ``logits = lm_head(h).float()``, per-token ``cross_entropy``) = at
  the start of backward the fp32 log-softmax kept for backward, the fp32 gradient of the per-token loss w.r.t.
  it and the fp32 logits gradient, plus the compute-dtype logits gradient when that is bf16:
  ``tokens * V * (12 + (c if c != 4 else 0))`` bytes (c = compute bytes); fused (simnpo-fast) = one ``rows x V``
  fp32 logits tile and its dlogits (rows = the chunked backend's ``max(128, h / 2)``; on GPU the Triton kernels
  keep tiles on chip, an fp32 ``[V, h]`` dW accumulator counts instead) + the fp32 ``[tokens, h]`` hidden gradient
  computed in the forward; the LM-head gradient buffer is the LM head's own gradient (counted in gradients).
* reference model: a method with ``reference="logp"`` (NPO) needs the frozen reference log-likelihoods.
  ``reference="cached"`` (this trainer: one pass over the forget set before the first step stores one number per
  example): nothing during training. ``reference="live"`` (frameworks that run a frozen reference model next to
  every step): another copy of the parameters in the compute dtype (sharded), no activations (no_grad). SimNPO
  is reference-free: none either way.
* overhead: CUDA context + allocator fragmentation (``--overhead-gib``, default 1.5 GiB on GPU, 0 on CPU).

The peak of a steady-state step is ``max(forward/backward peak, optimizer-step peak)``:
``fwd/bwd = params + optimizer states + FSDP buffers + activations + logits + LM-head grad`` (the backward starts at
the loss with every activation alive), ``optimizer = params + states + all grads + step temporaries``.
``device="cpu"`` models CPU processes as ``bench/plan_validate.py`` (one process) and ``bench/memory_scaling.py``
(1, 2, 4 gloo ranks) measure them: fp32 everything, single-tensor AdamW (its temporaries are ~2 x the largest
parameter: ``denom`` and the update), no overhead; those scripts compare it with the measured RSS (results:
README). :func:`sharded_state_bytes` is the persistent per-rank state (parameters + gradients + AdamW states).
``simnpo_fast.plan_table``: the table for 7-8B and 70B models and the expected tokens/s.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

from .methods import get_method
from .model import PRESET_CONFIGS

GiB = 2**30
MiB = 2**20

#: usable memory of common cards (GiB, as reported by the driver)
CARDS: Dict[str, float] = {
    "h100-80gb": 79.1, "h200-141gb": 139.8, "a100-80gb": 79.2, "a100-40gb": 39.4, "l40s-48gb": 44.5,
    "a10g-24gb": 22.0, "l4-24gb": 22.0, "rtx4090-24gb": 23.6, "v100-32gb": 31.7,
}

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    name: str = "custom"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def a(self) -> int:  # query width
        return self.num_attention_heads * self.head_dim

    @property
    def kv(self) -> int:  # key / value width
        return self.num_key_value_heads * self.head_dim

    def layer_params(self) -> int:
        h, I = self.hidden_size, self.intermediate_size
        attn = h * self.a + 2 * h * self.kv + self.a * h
        if self.attention_bias:
            attn += self.a + 2 * self.kv
        mlp = 3 * h * I + (2 * I + h if self.mlp_bias else 0)
        return attn + mlp + 2 * h  # + two RMSNorm weights

    def params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return emb + head + self.num_hidden_layers * self.layer_params() + self.hidden_size

    def largest_param(self) -> int:
        return max(self.vocab_size * self.hidden_size, self.hidden_size * self.intermediate_size)

    def lora_params(self, r: int,
                    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) -> int:
        h, I = self.hidden_size, self.intermediate_size
        shapes = {"q_proj": (h, self.a), "k_proj": (h, self.kv), "v_proj": (h, self.kv), "o_proj": (self.a, h),
                  "gate_proj": (h, I), "up_proj": (h, I), "down_proj": (I, h)}
        return self.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)

    def act_elems_per_token_layer(self) -> int:
        """Elements autograd keeps per token per decoder layer (see the module docstring)."""
        return 6 * self.hidden_size + 3 * self.a + 2 * self.kv + 4 * self.intermediate_size \
            + self.num_attention_heads + 2


#: the HF config keys a :class:`ModelShape` reads
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias")


def shape_of(name: str, config: dict) -> ModelShape:
    """The :class:`ModelShape` of an HF config dict (its other keys are ignored)."""
    return ModelShape(name=name, **{k: config[k] for k in SHAPE_KEYS if config.get(k) is not None})


def load_model(model: str) -> ModelShape:
    """A preset name (:data:`simnpo_fast.model.PRESET_CONFIGS`), a local config.json path, or a folder holding
    one."""
    if model in PRESET_CONFIGS:
        return shape_of(model, PRESET_CONFIGS[model])
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ValueError(f"unknown model {model!r}: not a preset ({', '.join(PRESET_CONFIGS)}) nor a config.json "
                         "path (hub downloads are not supported: pass a local config.json)")
    cfg = json.loads(p.read_text())
    if "text_config" in cfg:  # multimodal wrappers
        cfg = {**cfg, **cfg["text_config"]}
    return shape_of(str(p), cfg)


@dataclass
class PlanConfig:
    gpus: int = 1
    seq: int = 1024
    batch: int = 4  # sequences per GPU per micro-step (forget + retain together)
    lora: bool = False
    lora_r: int = 16
    loss: str = "simnpo"  # a registered method; one with a cached reference (NPO) keeps a reference model
    logits: str = "fused"  # fused | naive
    checkpointing: bool = True
    device: str = "gpu"  # gpu | cpu
    param_dtype: Optional[str] = None  # storage; default fp32 (GPU: fp32 master under FSDP2 MP; CPU: fp32)
    compute_dtype: Optional[str] = None  # default bf16 on GPU, fp32 on CPU
    overhead_gib: Optional[float] = None
    fused_rows: Optional[int] = None  # row tile of the fused loss; default: the chunked backend's max(128, h/2)
    reference: str = "cached"  # NPO's reference log-likelihoods: cached before training | live (a reference model)


def plan(model: ModelShape, cfg: PlanConfig) -> dict:
    """Per-device memory terms (bytes) and the peak."""
    cpu = cfg.device == "cpu"
    if cfg.reference not in ("cached", "live"):
        raise ValueError(f"reference must be cached or live, got {cfg.reference!r}")
    G = max(1, cfg.gpus)
    c = DTYPE_BYTES[cfg.compute_dtype or ("fp32" if cpu else "bf16")]
    pbytes = DTYPE_BYTES[cfg.param_dtype or "fp32"]
    P = model.params()
    h, V, L = model.hidden_size, model.vocab_size, model.num_hidden_layers
    tokens = cfg.seq * cfg.batch
    t: Dict[str, float] = {}

    if cfg.lora:
        trainable = model.lora_params(cfg.lora_r)
        t["parameters"] = (P * c + trainable * 4) / G  # frozen base in the compute dtype, fp32 adapters
        grad_bytes = 4
    else:
        trainable = P
        t["parameters"] = P * pbytes / G
        grad_bytes = pbytes
    t["gradients"] = trainable * grad_bytes / G
    t["optimizer_states"] = 2 * 4 * trainable / G
    # single-tensor AdamW (CPU default): denom + update temporaries of the largest tensor;
    # foreach AdamW (CUDA default): one fp32 temporary per shard set (sqrt(exp_avg_sq)) ~ trainable / G
    if cpu:
        t["optimizer_temporaries"] = 2 * 4 * (min(trainable, model.largest_param()) if not cfg.lora else trainable)
    else:
        t["optimizer_temporaries"] = 4 * trainable / G
    if G > 1:
        lp = model.layer_params()
        t["fsdp_buffers"] = 2 * lp * c + lp * 4 + V * h * c
    else:
        t["fsdp_buffers"] = 0.0
    per_tok_layer = model.act_elems_per_token_layer() * c
    if cfg.checkpointing:
        t["activations"] = tokens * (L * h * c + per_tok_layer)
    else:
        t["activations"] = tokens * L * per_tok_layer
    t["activations"] += tokens * 3 * h * c  # final norm (input, normalised, scaled)
    if cfg.logits == "naive":
        t["logits"] = tokens * V * (4 * 3 + (c if c != 4 else 0))
    else:
        if cpu or cfg.fused_rows:  # chunked backend: a row tile of fp32 logits + its in-place dlogits
            rows = min(cfg.fused_rows or max(128, h // 2), tokens)
            t["logits"] = rows * V * 4 * 2 + tokens * h * 4
        else:  # Triton kernels: on-chip tiles; the fp32 hidden grad + an fp32 dW accumulator (bf16 weights)
            t["logits"] = tokens * h * 4 + (V * h * 4 if c != 4 else 0)
    live = get_method(cfg.loss).reference == "logp" and cfg.reference == "live"
    t["reference_model"] = P * c / G if live else 0.0
    t["overhead"] = (cfg.overhead_gib if cfg.overhead_gib is not None else (0.0 if cpu else 1.5)) * GiB

    lm_head_grad = (0 if cfg.lora else V * h * grad_bytes / G)
    persistent = t["parameters"] + t["optimizer_states"] + t["reference_model"] + t["overhead"]
    fwd_bwd = persistent + t["fsdp_buffers"] + t["activations"] + t["logits"] + lm_head_grad
    opt = persistent + t["gradients"] + t["optimizer_temporaries"]
    peak = max(fwd_bwd, opt)
    return {"model": model.name, "params": P, "trainable": trainable, "config": asdict(cfg),
            "terms_bytes": t, "fwd_bwd_bytes": fwd_bwd, "optimizer_step_bytes": opt, "peak_bytes": peak,
            "peak_phase": "forward/backward" if fwd_bwd >= opt else "optimizer step"}


def sharded_state_bytes(result: dict) -> float:
    """Persistent per-device state of a plan: parameters + gradients + AdamW states (bytes)."""
    t = result["terms_bytes"]
    return t["parameters"] + t["gradients"] + t["optimizer_states"]


def fits(result: dict, card_gib: float) -> bool:
    return result["peak_bytes"] <= card_gib * GiB


def format_plan(model: ModelShape, res: dict, cards=None, compare: Optional[dict] = None) -> str:
    cfg = res["config"]
    unit = "GiB" if res["peak_bytes"] > 4 * GiB else "MiB"
    div = GiB if unit == "GiB" else MiB
    out = [f"{model.name}: {res['params'] / 1e9:.3f} B params ({res['trainable'] / 1e6:.1f} M trainable), "
           f"L={model.num_hidden_layers} h={model.hidden_size} I={model.intermediate_size} V={model.vocab_size} "
           f"heads={model.num_attention_heads}/{model.num_key_value_heads}",
           f"{cfg['device']} x{cfg['gpus']}, seq {cfg['seq']} x batch {cfg['batch']}"
           f" per device, loss {cfg['loss']}, logits {cfg['logits']}, checkpointing {cfg['checkpointing']}"
           f", LoRA {'r=' + str(cfg['lora_r']) if cfg['lora'] else 'off'}",
           "", f"{'term':<24}{'per device':>14}" + (f"{'naive logits':>16}" if compare else "")]
    for k, v in res["terms_bytes"].items():
        line = f"{k:<24}{v / div:>10.2f} {unit}"
        if compare:
            line += f"{compare['terms_bytes'][k] / div:>12.2f} {unit}"
        out.append(line)
    out.append(f"{'peak (' + res['peak_phase'] + ')':<24}{res['peak_bytes'] / div:>10.2f} {unit}"
               + (f"{compare['peak_bytes'] / div:>12.2f} {unit}" if compare else ""))
    if cards:
        out.append("")
        for name, gib in cards.items():
            verdict = "fits" if fits(res, gib) else "does NOT fit"
            extra = ""
            if compare:
                extra = f"  (naive logits: {'fits' if fits(compare, gib) else 'does NOT fit'})"
            out.append(f"{name} ({gib:.0f} GiB): {verdict}, {100 * res['peak_bytes'] / (gib * GiB):.0f}% used{extra}")
    return "\n".join(out)
