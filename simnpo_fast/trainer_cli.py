"""`simnpo-fast unlearn` / `simnpo-fast finetune`: typed YAML configs plus ``key=value`` overrides.

    simnpo-fast unlearn --config default                      # embedded default, CPU, about a minute
    simnpo-fast unlearn --config tofu_forget10 model.path=/models/llama2-7b-tofu data.path=/data/tofu
    torchrun --nnodes 2 --nproc_per_node 8 -m simnpo_fast.trainer_cli unlearn --config tofu_forget10 ...
    simnpo-fast unlearn --config default --resume             # continue from the newest complete checkpoint

Config errors (unknown objective or key, beta <= 0, missing data / model path, bad batch geometry) fail before
any work with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="default",
                   help="a YAML file or a packaged config name: default, tofu_forget10, muse_news")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. optim.lr=1e-5 loss.beta=4.5 output_dir=runs/x")


def add_unlearn_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("unlearn", help="unlearn a forget set (SimNPO, NPO, GA, GradDiff) with FSDP2",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.set_defaults(func=run_unlearn)
    return p


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("finetune", help="only the finetune stage of a config (plain NLL on data.finetune_split)")
    _add_common(p)
    p.set_defaults(func=run_finetune)
    return p


def _load(args):
    from .trainer import load_config

    ov = list(args.overrides or [])
    if args.resume:
        ov.append("checkpoint.resume=true")
    return load_config(args.config, ov)


def _config_or_exit(args):
    try:
        return _load(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"simnpo-fast: config error: {e}", file=sys.stderr)
        return None


def run_unlearn(args) -> int:
    from .trainer import NonFiniteError, train

    cfg = _config_or_exit(args)
    if cfg is None:
        return 2
    try:
        res = train(cfg)
    except NonFiniteError as e:
        print(f"simnpo-fast: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"output_dir": res.output_dir, "steps": res.steps, "eval_before": res.eval_before,
                          "eval_after": res.eval_after, "checkpoint": res.checkpoint, "hf": res.hf_dir}))
    return 0


def run_finetune(args) -> int:
    from .trainer import finetune_config, train

    cfg = _config_or_exit(args)
    if cfg is None:
        return 2
    res = train(finetune_config(cfg))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"output_dir": res.output_dir, "steps": res.steps, "hf": res.hf_dir}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="simnpo_fast.trainer_cli")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_unlearn_parser(sub)
    add_finetune_parser(sub)
    args = parser.parse_args(argv)
    from .distributed import owned_process_group

    with owned_process_group():
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
