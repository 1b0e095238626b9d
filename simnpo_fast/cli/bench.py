"""`simnpo-fast bench`: the benchmark suite (``python -m bench.suite``) of the source checkout."""
from __future__ import annotations

import argparse
import sys


def add_parsers(subparsers) -> None:
    """Register ``bench``."""
    p = subparsers.add_parser("bench", help="benchmark suite (source checkout only): loss vs peers, sweeps, step, "
                                            "planner")
    p.add_argument("--quick", action="store_true", help="small sweeps, < 10 min on a 2-core CPU")
    p.add_argument("--report", action="store_true", help="regenerate plots + README section from the newest JSON")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="more bench.suite options (e.g. --stages check,headline)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Run ``python -m bench.suite`` from the source checkout this package is installed from (editable install)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]  # simnpo_fast/cli/bench.py -> the checkout
    if not (root / "bench" / "suite.py").exists():
        print("simnpo-fast bench needs a source checkout (bench/ is not installed): clone the repository, "
              "`pip install -e '.[bench]'` and run it from there", file=sys.stderr)
        return 1
    cmd = [sys.executable, "-m", "bench.suite"] + (["--quick"] if args.quick else []) \
        + (["--report"] if args.report else []) + [a for a in args.rest if a != "--"]
    return subprocess.call(cmd, cwd=str(root))
