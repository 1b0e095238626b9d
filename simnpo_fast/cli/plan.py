"""`simnpo-fast plan`: the analytic memory planner (:mod:`simnpo_fast.plan`) and its table at scale
(:mod:`simnpo_fast.plan_table`)."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from .. import plan as planner


def add_parsers(subparsers) -> None:
    """Register ``plan`` (its description: the planner's module docstring)."""
    p = subparsers.add_parser("plan", help="per-GPU memory of an unlearning run (analytic) and whether it fits a card",
                              description=planner.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..methods import method_names
    from ..model import PRESET_CONFIGS

    p.add_argument("--model", default=None,
                   help=f"a local HF config.json (or its folder) or a preset: {', '.join(PRESET_CONFIGS)}")
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
    p.add_argument("--card", default=None, help=f"one of {', '.join(planner.CARDS)} or a size in GiB (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def config_from_args(args) -> planner.PlanConfig:
    return planner.PlanConfig(gpus=args.gpus, seq=args.seq, batch=args.batch, lora=args.lora, lora_r=args.lora_r,
                              loss=args.loss, logits=args.logits, checkpointing=not args.no_checkpointing,
                              device=args.device, param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
                              overhead_gib=args.overhead_gib, reference=args.reference)


def run(args) -> int:
    """``plan`` reads nothing but its options: a ValueError there is a bad option (exit 2)."""
    from ..errors import ConfigError, SimnpoError

    try:
        return _table(args) if args.table else _plan(args)
    except ValueError as e:
        if isinstance(e, SimnpoError):
            raise
        raise ConfigError(str(e)) from e


def _table(args) -> int:
    from ..plan_table import format_table, load_rates, scale_table

    rates = load_rates(args.rates) if args.rates else None
    print(format_table(scale_table(seq=args.seq, batch=args.batch, rates=rates), rates))
    return 0


def _cards(card, device: str) -> dict:
    """``--card``: every known card on GPU (none on CPU) by default, a known card, or a size in GiB."""
    if card is None:
        return planner.CARDS if device == "gpu" else {}
    if card in planner.CARDS:
        return {card: planner.CARDS[card]}
    try:
        return {f"{float(card):g} GiB card": float(card)}
    except ValueError:
        raise SystemExit(f"unknown card {card!r}: one of {', '.join(planner.CARDS)} or a number of GiB")


def _plan(args) -> int:
    if args.model is None:
        raise ValueError("plan needs --model (a preset or a config.json) or --table")
    model = planner.load_model(args.model)
    cfg = config_from_args(args)
    res = planner.plan(model, cfg)
    other = None
    if cfg.logits == "fused":
        other = planner.plan(model, planner.PlanConfig(**{**asdict(cfg), "logits": "naive"}))
    cards = _cards(args.card, cfg.device)
    if args.json:
        print(json.dumps({"fused" if cfg.logits == "fused" else "naive": res,
                          **({"naive": other} if other else {}),
                          "fits": {k: planner.fits(res, v) for k, v in cards.items()}}, indent=2))
    else:
        print(planner.format_plan(model, res, cards, other))
    return 0
