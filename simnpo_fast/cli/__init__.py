"""`simnpo-fast` command line: demo, unlearn, finetune, eval, relearn, study, plan, bench."""
from __future__ import annotations

import argparse
import importlib
import sys

#: The subcommand families, in the order of ``--help``: each module of this package registers its subcommands
#: with ``add_parsers(subparsers)`` (a parser's ``func`` runs it).
FAMILIES = (
    "demo",     # demo
    "eval",     # eval, relearn
    "study",    # study
    "unlearn",  # unlearn, finetune (also `torchrun -m simnpo_fast.cli unlearn ...`)
    "plan",     # plan
    "bench",    # bench
)
#: Commands that read nothing but their options: run without a process group or the data checks.
OPTIONS_ONLY = ("plan", "bench")

EPILOG = ("Errors print one line and exit with a distinct status (2 config, 3 diverged, 4 data, 5 model, "
          "6 tokenizer, 7 run folder, 8 checkpoint, 9 bad result, 10 preempted, 11 storage, 1 unexpected); "
          "--debug (anywhere) adds the traceback.")


def build_parser() -> argparse.ArgumentParser:
    """The ``simnpo-fast`` parser with every subcommand of :data:`FAMILIES`."""
    parser = argparse.ArgumentParser(prog="simnpo-fast", description=__doc__, epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for family in FAMILIES:
        importlib.import_module(f"{__name__}.{family}").add_parsers(sub)
    return parser


def main(argv=None) -> int:
    from ..errors import pop_debug_flag, run_command
    from .unlearn import normalize_argv

    argv, debug = pop_debug_flag(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(normalize_argv(argv))
    if args.cmd in OPTIONS_ONLY:
        return run_command(lambda: args.func(args), debug=debug)
    from ..distributed import owned_process_group

    def command() -> int:
        from ..data.formats import empty_splits_are_errors

        # under torchrun: every rank leaves through a barrier + destroy_process_group
        with owned_process_group(), empty_splits_are_errors():
            return args.func(args)

    return run_command(command, debug=debug)
