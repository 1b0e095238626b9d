"""The planner at scale: per-GPU memory of unlearning 7-8B and 70B models on 1, 8 and 64 GPUs, and the tokens/s
to expect from the per-GPU rates that ``make gpu-check`` measured.

    simnpo-fast plan --table --seq 2048 --batch 4                       # memory (every row from plan.plan)
    simnpo-fast plan --table --seq 2048 --batch 4 --rates bench/results/gpu-<gpu>-<date>.json   # + tokens/s

Every row: FSDP2 full sharding over the GPUs, bf16 compute with fp32 master weights (or LoRA r=16 on a bf16 base),
``seq x batch`` tokens per GPU per micro-step, SimNPO (reference-free; NPO with its cached reference needs the
same memory), with and without activation checkpointing (AC), fused vs naive logits, and NPO with a live
reference model (frameworks that run one next to every step).

Expected throughput (per GPU; FSDP2 is data parallel, so G GPUs give G times that when the all-gathers and
reduce-scatters hide behind compute -- an upper bound until a multi-GPU run measures it)::

    t_token = flops_body / F_body + t_head(V, d)
    flops_body = (6 + 2 AC) * P_body          full fine-tuning (2P forward, 4P backward, 2P recomputed forward)
               = (4 + 2 AC) * P_body          LoRA (no weight gradient of the frozen base)
               + P_body with a live NPO reference (its forward on the forget half of the tokens)

``P_body``: the decoder layers' parameters (attention's T-dependent flops are left out). ``F_body``: the body
flop rate of the measured 1-GPU unlearning run of ``make gpu-check`` (its step time per token minus its head
time). ``t_head``: the measured fwd+bwd time of the LM-head loss per token per ``d * V`` (``bench.gpu`` at
d=4096), fused = the CUDA default backend the gpu-check rule picked, naive = full logits; at the measured
vocabulary nearest to V. :func:`rates_from_gpu_check` derives these numbers from the gpu-check JSON.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Optional

from .methods import get_method, method_names
from .plan import GiB, ModelShape, PlanConfig, load_model, plan

TABLE_MODELS = ("llama-3.1-8b", "llama-3.1-70b")
TABLE_GPUS = (1, 8, 64)
CARD_GIB = 79.1  # an 80 GB H100 as the driver reports it (plan.CARDS["h100-80gb"])


def live_reference_method() -> str:
    """The method of the live-reference column: the first registered method that needs the reference model's
    log-likelihoods and has no alternate rows (NPO)."""
    return next(n for n in method_names() if get_method(n).reference == "logp" and get_method(n).alternate == "none")


def body_params(m: ModelShape) -> int:
    """Parameters of the decoder layers (no embeddings, no LM head, no final norm)."""
    return m.num_hidden_layers * m.layer_params()


def body_flops_per_token(m: ModelShape, *, checkpointing: bool, lora: bool = False,
                         live_reference: bool = False) -> float:
    """Matmul flops per trained token in the decoder layers (see the module docstring)."""
    per = (4 if lora else 6) + (2 if checkpointing else 0) + (1 if live_reference else 0)
    return per * body_params(m)


def _head_rate(rates: dict, kind: str, V: int) -> float:
    """Seconds per token per ``d * V`` of the head loss, at the measured vocabulary nearest to ``V``."""
    by_v = {int(k): v for k, v in rates["head_s_per_token_dV"][kind].items()}
    return by_v[min(by_v, key=lambda x: abs(x - V))]


def expected_tokens_per_s(m: ModelShape, rates: dict, *, gpus: int = 1, checkpointing: bool = True,
                          lora: bool = False, logits: str = "fused", live_reference: bool = False) -> float:
    """Tokens/s over ``gpus`` GPUs predicted from measured per-GPU rates (see the module docstring)."""
    t_body = body_flops_per_token(m, checkpointing=checkpointing, lora=lora,
                                  live_reference=live_reference) / rates["body_flops_per_s"]
    t_head = _head_rate(rates, logits, m.vocab_size) * m.hidden_size * m.vocab_size
    return gpus / (t_body + t_head)


def rates_from_gpu_check(result: dict) -> Optional[dict]:
    """``{"body_flops_per_s", "head_s_per_token_dV": {"fused"|"naive": {V: s}}, "fused_backend", "source"}`` from
    a gpu-check result (its ``bench`` stages and ``unlearn`` stage), or None when a number is missing."""
    default = (result.get("backend_rule") or {}).get("backend")
    head: dict = {"fused": {}, "naive": {}}
    for stage in result.get("stages", {}).values():
        bench = stage.get("result") if stage.get("kind") == "bench" else None
        if not bench:
            continue
        cfg = bench["config"]
        for V, entry in bench["timing"].items():
            for kind, name in (("fused", default), ("naive", "naive")):
                ms = entry["methods"].get(name, {}).get("ms")
                if ms:
                    head[kind][int(V)] = ms / 1e3 / (cfg["M"] * cfg["d"] * int(V))
    run = (result.get("unlearn") or {}).get("ours")
    if not (head["fused"] and head["naive"] and run and run.get("tokens_per_s")):
        return None
    shape = ModelShape(**{k: v for k, v in run["model"].items() if k in ModelShape.__dataclass_fields__})
    t_head = _head_rate({"head_s_per_token_dV": head}, "fused", shape.vocab_size) * shape.hidden_size \
        * shape.vocab_size
    t_body = 1.0 / run["tokens_per_s"] - t_head
    if t_body <= 0:
        return None
    flops = body_flops_per_token(shape, checkpointing=run.get("activation_checkpointing", True))
    return {"body_flops_per_s": flops / t_body, "head_s_per_token_dV": head, "fused_backend": default,
            "source": result.get("path") or result.get("command")}


def load_rates(path: str) -> dict:
    """The rates of a gpu-check JSON file; a ValueError naming the file when it holds none."""
    with open(path) as f:
        result = json.load(f)
    rates = result.get("rates") or rates_from_gpu_check(result)
    if not rates:
        raise ValueError(f"{path}: no measured rates (a make gpu-check JSON whose bench and unlearn stages ran)")
    return rates


def scale_table(seq: int = 2048, batch: int = 4, rates: Optional[dict] = None, models=TABLE_MODELS,
                gpus=TABLE_GPUS) -> list:
    """One row per (model, GPUs, full / LoRA): peak GiB per GPU of each setting, and tokens/s with ``rates``."""
    rows = []
    for name in models:
        m = load_model(name)
        for g in gpus:
            for lora in (False, True):
                base = PlanConfig(gpus=g, seq=seq, batch=batch, lora=lora, device="gpu")
                peak = {}
                for ac in (True, False):
                    for logits in ("fused", "naive"):
                        cfg = replace(base, checkpointing=ac, logits=logits)
                        peak[f"{'ac' if ac else 'no_ac'}_{logits}"] = plan(m, cfg)["peak_bytes"] / GiB
                live = replace(base, loss=live_reference_method(), reference="live")
                peak[f"{live.loss}_live_ac_fused"] = plan(m, live)["peak_bytes"] / GiB
                row = {"model": name, "params_b": m.params() / 1e9, "gpus": g, "lora": lora, "peak_gib": peak}
                if rates:
                    row["tokens_per_s"] = {k: expected_tokens_per_s(m, rates, gpus=g, lora=lora, logits=k)
                                           for k in ("fused", "naive")}
                rows.append(row)
    return rows


def _gib(v: float) -> str:
    mark = "" if v <= CARD_GIB else "*"
    return f"{v:,.0f}{mark}" if v >= 100 else f"{v:.1f}{mark}"


def format_table(rows: list, rates: Optional[dict] = None) -> str:
    """Markdown: peak GiB per GPU (``*``: over an 80 GB H100) and, with rates, expected tokens/s."""
    live = live_reference_method()
    head = ("| model | GPUs | training | AC, fused | AC, naive | no AC, fused | no AC, naive "
            f"| {live.upper()} live ref (AC, fused) |"
            + (" tokens/s (AC, fused) | tokens/s (AC, naive) |" if rates else ""))
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    keys = ("ac_fused", "ac_naive", "no_ac_fused", "no_ac_naive", f"{live}_live_ac_fused")
    for r in rows:
        p = r["peak_gib"]
        cells = [r["model"], str(r["gpus"]), "LoRA r=16" if r["lora"] else "full", *(_gib(p[k]) for k in keys)]
        if rates:
            cells += [f"{r['tokens_per_s'][k]:,.0f}" for k in ("fused", "naive")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


__all__ = ["body_params", "body_flops_per_token", "expected_tokens_per_s", "format_table", "live_reference_method",
           "load_rates", "rates_from_gpu_check", "scale_table"]
