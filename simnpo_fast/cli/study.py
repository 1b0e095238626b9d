"""`simnpo-fast study`: a study config run by the module of :mod:`simnpo_fast.studies` its ``kind`` names (the
CPU-scale TOFU study, :mod:`simnpo_fast.studies.tofu`; the Markov-chain study, :mod:`simnpo_fast.studies.markov`).

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
    from ..studies import load_study_config, study_kind

    raw = load_study_config(args.config)
    study = study_kind(raw)
    quick = bool(getattr(args, "quick", False))
    cfg = study.resolve(raw, overrides=args.overrides, quick=quick, data=args.data)
    out = args.out or os.path.join("runs", f"study-{cfg.get('name', study.DEFAULT_NAME)}")
    results = args.results or study.default_results(out, quick)
    result = study.run(cfg, out, seeds=args.seeds, methods=args.methods, results_dir=results, command=_command())
    print(study.summary_text(result))
    return 0
