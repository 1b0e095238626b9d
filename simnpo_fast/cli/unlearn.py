"""`simnpo-fast unlearn` / `simnpo-fast finetune`: typed YAML configs plus ``key=value`` overrides.

    simnpo-fast unlearn --config default                      # embedded default (CPU, no downloads)
    simnpo-fast unlearn --config tofu_forget10 model.path=/models/llama2-7b-tofu data.path=/data/tofu
    torchrun --nnodes 2 --nproc_per_node 8 -m simnpo_fast.cli unlearn --config tofu_forget10 ...
    simnpo-fast unlearn --config default --resume             # continue from the newest verified checkpoint
    simnpo-fast unlearn --config default --resume=auto        # resume if there is a checkpoint, else start fresh
    simnpo-fast unlearn --config default --overwrite          # move the folder's previous run aside, start fresh

An output folder belongs to one run (see simnpo_fast/train/run_folder.py): a second run into a busy folder, a fresh
run over another run's checkpoints (without --overwrite), --resume with nothing to resume or with a config that
differs outside steps / logging / checkpoint cadence all stop before any work.

Errors end with one line naming the file or key and a distinct exit status (no traceback unless --debug):
2 config, 3 diverged (non-finite loss / gradient), 4 data, 5 model, 6 tokenizer, 7 run folder (busy, another
run, nothing to resume, config changed on resume), 8 checkpoint (none verifies, or saving / loading one failed),
10 preempted (SIGTERM / SIGUSR1: a checkpoint of the last step was written; rerun with --resume), 1 unexpected.
"""
from __future__ import annotations

import argparse
import json


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="default",
                   help="a YAML file or a packaged config name: default, tofu_forget10, muse_news")
    p.add_argument("--resume", action="store_const", const="true", default=None,
                   help="continue from the newest verified checkpoint (an error when there is none); "
                        "--resume=auto resumes when there is one and starts fresh otherwise")
    p.add_argument("--resume-mode", dest="resume", choices=("true", "auto"), help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh even over another run's checkpoints, moving that run's files into "
                        "<output_dir>/replaced/ (nothing is deleted)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. optim.lr=1e-5 loss.beta=4.5 output_dir=runs/x")


def add_parsers(subparsers) -> None:
    """Register ``unlearn`` and ``finetune``."""
    add_unlearn_parser(subparsers)
    add_finetune_parser(subparsers)


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


def normalize_argv(argv):
    """Command-line tokens as argparse needs them: ``--resume=MODE`` -> ``--resume-mode MODE`` (a bare
    ``--resume`` must not swallow the next override), and for ``unlearn`` / ``finetune`` every ``key=value``
    override moved after the options, so options and overrides may be mixed in any order."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--resume=") and "--" not in argv[:i]:
            out += ["--resume-mode", a.split("=", 1)[1]]
        else:
            out.append(a)
    sub = next((k for k, a in enumerate(out) if not a.startswith("-")), None)
    if sub is None or out[sub] not in ("unlearn", "finetune") or "--" in out:
        return out
    opts, overrides, rest, k = [], [], out[sub + 1:], 0
    while k < len(rest):
        a = rest[k]
        if a in ("--config", "--resume-mode") and k + 1 < len(rest):
            opts += rest[k:k + 2]
            k += 2
            continue
        (overrides if "=" in a and not a.startswith("-") else opts).append(a)
        k += 1
    return out[:sub + 1] + opts + overrides


def _load(args):
    from ..train import load_config

    ov = list(args.overrides or [])
    if args.resume:
        ov.append(f"checkpoint.resume={args.resume}")
    return load_config(args.config, ov)


def run_unlearn(args) -> int:
    from ..distributed import rank
    from ..train import train

    cfg = _load(args)
    res = train(cfg, overwrite=args.overwrite)
    if rank() == 0:
        print(json.dumps({"output_dir": res.output_dir, "run_id": res.run_id, "steps": res.steps,
                          "eval_before": res.eval_before, "eval_after": res.eval_after,
                          "checkpoint": res.checkpoint, "hf": res.hf_dir}))
    return 0


def run_finetune(args) -> int:
    from ..distributed import rank
    from ..errors import ConfigError
    from ..train import finetune_config, train

    if args.resume:
        raise ConfigError("finetune: the finetune stage keeps no checkpoints, so --resume does not apply "
                          "(rerun it, or unlearn with --resume)")
    cfg = _load(args)
    res = train(finetune_config(cfg), overwrite=args.overwrite)
    if rank() == 0:
        print(json.dumps({"output_dir": res.output_dir, "run_id": res.run_id, "steps": res.steps, "hf": res.hf_dir}))
    return 0
