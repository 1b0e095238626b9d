"""`simnpo-fast study`: the CPU-scale TOFU study (:mod:`simnpo_fast.study`) and the Markov-chain study
(:mod:`simnpo_fast.markov.study`), picked by the study config's ``kind``.

    simnpo-fast study tofu-mini                         # the committed study (configs/study_tofu_mini.yaml)
    simnpo-fast study tofu-mini --data ../shared/data/tofu --seeds 0 1 2 --out runs/study
    simnpo-fast study markov [--quick]                  # the mixture-of-Markov-chains study
    simnpo-fast study my.yaml key=value ...             # any study config, dotted overrides
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys


def add_parsers(subparsers) -> argparse.ArgumentParser:
    """Register ``study``."""
    p = subparsers.add_parser("study", help="run a small unlearning study (GA/GradDiff/NPO/SimNPO, relearning)")
    p.add_argument("config", help="study name (tofu-mini) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--data", default=None, help="a TOFU-layout folder (default: the synthetic corpus)")
    p.add_argument("--seeds", type=int, nargs="*", default=None)
    p.add_argument("--methods", nargs="*", default=None,
                   help="GA GradDiff NPO SimNPO, or variants defined under unlearn.methods (with base:)")
    p.add_argument("--out", default=None, help="work folder (default runs/study-<name>)")
    p.add_argument("--results", default=None, help="where the table/plot go (default docs/results)")
    p.add_argument("--quick", action="store_true", help="study markov only: the small end-to-end run (< 1 min)")
    p.set_defaults(func=run)
    return p


def _command() -> str:
    """The command line as typed, for the results page (empty when not run as ``simnpo-fast study``)."""
    return "simnpo-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["study"] else ""


def run(args) -> int:
    from ..errors import ConfigError
    from ..eval.report import text_table
    from ..study import load_study_config, run_study

    raw = load_study_config(args.config)
    if raw.get("kind") == "markov":  # the mixture-of-Markov-chains study (simnpo_fast/markov/) has its own driver
        return _run_markov(args, raw)
    cfg = load_study_config(args.config, args.overrides)
    if getattr(args, "quick", False):
        raise ConfigError("--quick applies to `simnpo-fast study markov` only")
    if args.data:
        cfg.setdefault("data", {})["path"] = args.data
    name = cfg.get("name", "tofu-mini")
    out = args.out or os.path.join("runs", f"study-{name}")
    results = args.results or os.path.join("docs", "results")
    res = run_study(cfg, out, seeds=args.seeds, methods=args.methods, results_dir=results, command=_command())
    print(text_table(res["rows"]))
    print(f"\nresults: {results}/{name}.md, {results}/{name}.png ({res['elapsed_s'] / 60:.1f} min)")
    return 0


def _run_markov(args, config: dict) -> int:
    """``simnpo-fast study markov [--quick] [--seeds ...] [--methods ...] [--out DIR] [--results DIR] [k=v ...]``:
    ``config`` is the study config as read from its file (``--quick`` and the overrides not applied yet)."""
    from ..errors import ConfigError
    from ..markov.report import text_summary
    from ..markov.study import resolve, run_markov

    if getattr(args, "data", None):
        raise ConfigError("study markov generates its own data: --data does not apply")
    quick = bool(getattr(args, "quick", False))
    cfg = resolve(config, quick=quick, overrides=args.overrides)
    name = cfg.get("name", "markov")
    out = args.out or os.path.join("runs", f"study-{name}")
    results = args.results or (os.path.join(out, "results") if quick else os.path.join("docs", "results"))
    study = run_markov(cfg, out, seeds=args.seeds, methods=args.methods, results_dir=results, command=_command())
    print(text_summary(study))
    print(f"\nresults: {', '.join(study['files'].values())} ({study['timing']['elapsed_s'] / 60:.1f} min)")
    return 0
