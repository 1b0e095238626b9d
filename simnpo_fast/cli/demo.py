"""`simnpo-fast demo` (what ``make demo`` runs): :func:`simnpo_fast.demo.run_demo`."""
from __future__ import annotations


def add_parsers(subparsers) -> None:
    """Register ``demo``."""
    p = subparsers.add_parser("demo", help="run the main job on the embedded default")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    p.add_argument("--config", default="demo", help="demo config name or YAML path")
    p.add_argument("--showcase", action="store_true", help="also print the fused-loss showcase")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    return run_demo(args.out, args.config, args.overrides, with_showcase=args.showcase)
