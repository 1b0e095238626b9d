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

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

from .methods import get_method, method_names

GiB = 2**30
MiB = 2**20

#: Built-in configs (hub downloads are impossible): published config.json values.
PRESETS: Dict[str, dict] = {
    "tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}

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


def load_model(model: str) -> ModelShape:
    """A preset name, a local config.json path, or a folder holding one."""
    if model in PRESETS:
        return ModelShape(name=model, **PRESETS[model])
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ValueError(f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) nor a config.json path "
                         "(hub downloads are not supported: pass a local config.json)")
    cfg = json.loads(p.read_text())
    if "text_config" in cfg:  # multimodal wrappers
        cfg = {**cfg, **cfg["text_config"]}
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias")
    return ModelShape(name=str(p), **{k: cfg[k] for k in keys if cfg.get(k) is not None})


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"a local HF config.json (or its folder) or a preset: {', '.join(PRESETS)}")
    p.add_argument("--table", action="store_true", help="the 7-8B / 70B table on 1, 8 and 64 GPUs (Markdown)")
    p.add_argument("--rates", default=None, help="with --table: a make gpu-check JSON for expected tokens/s")
    p.add_argument("--reference", default="cached", choices=["cached", "live"],
                   help="NPO's reference log-likelihoods: cached before training (this trainer) or a live model")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per GPU per micro-step (forget + retain)")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--loss", default="simnpo", choices=method_names())
    p.add_argument("--logits", default="fused", choices=["fused", "naive"])
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    p.add_argument("--param-dtype", default=None, choices=["fp32", "bf16"])
    p.add_argument("--compute-dtype", default=None, choices=["fp32", "bf16"])
    p.add_argument("--overhead-gib", type=float, default=None)
    p.add_argument("--card", default=None, help=f"one of {', '.join(CARDS)} or a size in GiB (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def config_from_args(args) -> PlanConfig:
    return PlanConfig(gpus=args.gpus, seq=args.seq, batch=args.batch, lora=args.lora, lora_r=args.lora_r,
                      loss=args.loss, logits=args.logits, checkpointing=not args.no_checkpointing,
                      device=args.device, param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
                      overhead_gib=args.overhead_gib, reference=args.reference)


def run(args) -> int:
    if args.table:
        from .plan_table import format_table, load_rates, scale_table

        rates = load_rates(args.rates) if args.rates else None
        print(format_table(scale_table(seq=args.seq, batch=args.batch, rates=rates), rates))
        return 0
    if args.model is None:
        raise ValueError("plan needs --model (a preset or a config.json) or --table")
    model = load_model(args.model)
    cfg = config_from_args(args)
    res = plan(model, cfg)
    other = None
    if cfg.logits == "fused":
        other = plan(model, PlanConfig(**{**asdict(cfg), "logits": "naive"}))
    if args.card is None:
        cards = CARDS if cfg.device == "gpu" else {}
    elif args.card in CARDS:
        cards = {args.card: CARDS[args.card]}
    else:
        try:
            cards = {f"{float(args.card):g} GiB card": float(args.card)}
        except ValueError:
            raise SystemExit(f"unknown card {args.card!r}: one of {', '.join(CARDS)} or a number of GiB")
    if args.json:
        print(json.dumps({"fused" if cfg.logits == "fused" else "naive": res,
                          **({"naive": other} if other else {}),
                          "fits": {k: fits(res, v) for k, v in cards.items()}}, indent=2))
    else:
        print(format_plan(model, res, cards, other))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="simnpo-fast plan", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())


def add_plan_parser(sub) -> None:
    """Register ``simnpo-fast plan`` on an argparse subparsers object."""
    p = sub.add_parser("plan", help="per-GPU memory of an unlearning run (analytic) and whether it fits a card",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
