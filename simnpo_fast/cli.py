"""`simnpo-fast` command line (subcommands are added as their issues land)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="simnpo-fast", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="run the main job on the embedded default")
    from .trainer_cli import add_finetune_parser, add_unlearn_parser

    add_unlearn_parser(sub)
    add_finetune_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd in ("unlearn", "finetune"):
        return args.func(args)
    if args.cmd == "demo":
        from .demo import main as demo_main

        return demo_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
