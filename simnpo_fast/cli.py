"""`simnpo-fast` command line: demo, unlearn, finetune, eval, relearn, study, plan, bench."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from .errors import pop_debug_flag, run_command
    from .trainer_cli import normalize_argv

    argv, debug = pop_debug_flag(sys.argv[1:] if argv is None else argv)
    argv = normalize_argv(argv)
    parser = argparse.ArgumentParser(prog="simnpo-fast", description=__doc__,
                                     epilog="Errors print one line and exit with a distinct status (2 config, "
                                            "3 diverged, 4 data, 5 model, 6 tokenizer, 7 run folder, 8 checkpoint, "
                                            "9 bad result, 10 preempted, 11 storage, 1 unexpected); --debug "
                                            "(anywhere) adds the traceback.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="run the main job on the embedded default")
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    demo.add_argument("--config", default="demo", help="demo config name or YAML path")
    demo.add_argument("--showcase", action="store_true", help="also print the fused-loss showcase")
    demo.add_argument("overrides", nargs="*", metavar="key=value")
    from .eval.cli import add_eval_parser, add_relearn_parser
    from .study import add_study_parser

    add_eval_parser(sub)
    add_relearn_parser(sub)
    add_study_parser(sub)
    from .trainer_cli import add_finetune_parser, add_unlearn_parser

    add_unlearn_parser(sub)
    add_finetune_parser(sub)
    from .plan import add_plan_parser

    add_plan_parser(sub)
    _add_bench_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd in ("plan", "bench"):
        return run_command(lambda: _plan_or_bench(args), debug=debug)
    from .distributed import owned_process_group

    def command() -> int:
        from .data.formats import empty_splits_are_errors

        # under torchrun: every rank leaves through a barrier + destroy_process_group
        with owned_process_group(), empty_splits_are_errors():
            if args.cmd == "demo":
                from .demo import main as demo_main

                return demo_main(args.out, args.config, args.overrides, with_showcase=args.showcase)
            return args.func(args)

    return run_command(command, debug=debug)


def _plan_or_bench(args) -> int:
    """``plan`` reads nothing but its options: a ValueError there is a bad option (exit 2)."""
    from .errors import ConfigError, SimnpoError

    try:
        return args.func(args)
    except ValueError as e:
        if args.cmd != "plan" or isinstance(e, SimnpoError):
            raise
        raise ConfigError(str(e)) from e


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark suite (source checkout only): loss vs peers, sweeps, step, planner")
    p.add_argument("--quick", action="store_true", help="small sweeps, < 10 min on a 2-core CPU")
    p.add_argument("--report", action="store_true", help="regenerate plots + README section from the newest JSON")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="more bench.suite options (e.g. --stages check,headline)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    """Run ``python -m bench.suite`` from the source checkout this package is installed from (editable install)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "suite.py").exists():
        print("simnpo-fast bench needs a source checkout (bench/ is not installed): clone the repository, "
              "`pip install -e '.[bench]'` and run it from there", file=sys.stderr)
        return 1
    cmd = [sys.executable, "-m", "bench.suite"] + (["--quick"] if args.quick else []) \
        + (["--report"] if args.report else []) + [a for a in args.rest if a != "--"]
    return subprocess.call(cmd, cwd=str(root))


if __name__ == "__main__":
    sys.exit(main())
