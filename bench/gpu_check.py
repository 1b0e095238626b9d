"""``make gpu-check``: the first thing to run on a GPU machine. One command, <= 6 minutes on one H100 / H200, no
network, no pip install, run from the source tree; it turns the machine into every GPU number the README needs.

    make gpu-check                        # CUDA: JSON + Markdown to bench/results/gpu-<gpu>-<date>.{json,md}
    make gpu-check DRY_RUN=1              # every stage on CPU (Triton interpreter, tiny sizes): a code check only
    python -m bench.gpu_check [--dry-run] [--only tests,bench,unlearn | stage names] [--budget 345] [--out DIR]

Stages, each a fresh subprocess with its own time budget (capped by what is left of ``--budget``):

1. ``kernels``: pytest of the device tests against the fp64 oracle, on CUDA with ``TRITON_INTERPRET=0``:
   ``tests/kernels`` (the Triton kernels in bf16 / fp16 / fp32) and ``tests/test_gpu_check.py``'s device test
   (the ``triton``, ``triton-gemm`` and ``chunked`` backends' losses and gradients in bf16 / fp16 / fp32).
   The other backend tests build CPU tensors and run only under the interpreter (``make test``).
2. ``bench-32000``, ``bench-128256``: ``python -m bench.gpu`` at N=8192, d=4096, bf16, one vocabulary each:
   naive, chunked, triton, triton-gemm, torch's ``linear_cross_entropy``, Liger and CCE when importable (pure-Python
   wheels in ``bench/wheels/`` are unpacked onto the path when present: ``make gpu-wheels`` fetches them); the
   first also times ``triton+filter`` (``grad_filter="on"``), the second leaves it out (``--no-filter``: its
   compile would eat the stage's budget).
3. ``unlearn-hf``, ``unlearn-ours``: ``python -m bench.gpu_unlearn --worker``: a 1.24 B Llama, 20 SimNPO steps,
   bf16 mixed precision + activation checkpointing, HF ``Trainer`` + naive logits vs the FSDP2 trainer.

A stage that fails or runs out of time is recorded (status, seconds, output tail) and the next one runs; the JSON
and the Markdown are rewritten after every stage, so a killed run still leaves its finished stages. The CUDA
default backend follows from the numbers by :func:`bench.gpu_check_report.backend_rule` (stated in both files).
No install is needed (the device image has none): from the source tree ``simnpo_fast.kernels`` is the repository's
``kernels/`` through the committed symlink ``simnpo_fast/kernels``, the layout ``setup.py`` installs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
#: the peers of stage 2 (liger_chunked is left out: its torch.compile takes minutes)
BENCH_METHODS = ("naive", "chunked", "triton", "triton-gemm", "torch_lce", "liger_flce", "cce")
DRY_METHODS = ("naive", "triton", "triton-gemm", "torch_lce")
#: the dry run's device tests (a few, so the whole dry run stays near a minute)
DEVICE_TESTS = "tests/test_gpu_check.py::test_device_backend_matches_fp64"
DRY_KERNEL_TESTS = [DEVICE_TESTS, "-k", "float32 and simnpo"]

_HIDER = '''"""Written by bench.gpu_check --hide: these packages are absent (find_spec gives None)."""
import os, sys

_HIDE = set(filter(None, os.environ.get("SIMNPO_GPU_CHECK_HIDE", "").split(",")))
if os.environ.get("SIMNPO_GPU_CHECK_UNINSTALLED"):  # drop an editable install's finder: a bare source tree
    sys.meta_path[:] = [f for f in sys.meta_path if not (getattr(f, "__module__", None) or
                                                         type(f).__module__).startswith("__editable__")]


class _Hide:
    def __init__(self, finder):
        self._f = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _HIDE:
            return None
        fs = getattr(self._f, "find_spec", None)
        return fs(name, path, target) if fs else None

    def __getattr__(self, k):
        return getattr(self._f, k)


if _HIDE:
    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
'''


@dataclass
class Stage:
    name: str
    kind: str  # tests | bench | unlearn
    budget_s: float
    argv: List[str]
    env: dict = field(default_factory=dict)
    parse: Optional[Callable[[str, Path], Optional[dict]]] = None  # (output, scratch dir) -> result


@dataclass
class Context:
    """Where the stages run: interpreter, working folder, extra environment, scratch folder."""

    python: str
    cwd: Path
    env: dict
    scratch: Path
    dry_run: bool
    cuda: bool


def unpack_wheels(wheels: Path, site: Path) -> List[str]:
    """Unzip every pure-Python wheel of ``wheels`` into ``site`` (no pip); returns their file names."""
    names = []
    for whl in sorted(wheels.glob("*.whl")):
        if not whl.name.endswith("-none-any.whl"):
            continue  # only pure-Python wheels can be unpacked onto the path
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
        names.append(whl.name)
    return names


def make_context(args, scratch: Path) -> tuple:
    """The stages' context and notes on how it was built (hidden packages, source, wheels)."""
    import torch

    notes, paths, env = {}, [], {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.hide or args.as_uninstalled:
        hide = scratch / "hide"
        hide.mkdir()
        (hide / "sitecustomize.py").write_text(_HIDER)
        paths.append(str(hide))
        env.update(SIMNPO_GPU_CHECK_HIDE=args.hide, SIMNPO_GPU_CHECK_UNINSTALLED="1" if args.as_uninstalled else "")
        os.environ.update(env)
        exec(compile(_HIDER, "sitecustomize", "exec"), {})  # this process too
        notes["hidden"] = f"packages made absent in every stage: {args.hide or 'none'}" + (
            "; the package's editable install ignored" if args.as_uninstalled else "")
    import simnpo_fast.kernels.target_terms as kernel_module

    notes["source"] = f"simnpo_fast.kernels from {Path(kernel_module.__file__).parent}"
    wheels = Path(args.wheels) if args.wheels else ROOT / "bench" / "wheels"
    if wheels.is_dir():
        got = unpack_wheels(wheels, scratch / "site")
        if got:
            paths.append(str(scratch / "site"))
            notes["wheels"] = ", ".join(got)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    cuda = torch.cuda.is_available() and not args.dry_run
    env["TRITON_INTERPRET"] = "0" if cuda else "1"
    return Context(sys.executable, ROOT, env, scratch, args.dry_run, cuda), notes


def run_stage(stage: Stage, ctx: Context, budget_s: float) -> dict:
    """Run one stage in its own process group; kill it at ``budget_s``. Returns its record."""
    log = ctx.scratch / f"{stage.name}.log"
    t0 = time.time()
    env = dict(os.environ, **ctx.env, **stage.env)
    with open(log, "w") as fh:
        proc = subprocess.Popen(stage.argv, cwd=ctx.cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, budget_s))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc, status = None, "timeout"
    text = log.read_text(errors="replace")
    rec = {"kind": stage.kind, "status": status, "returncode": rc, "seconds": round(time.time() - t0, 1),
           "budget_s": round(budget_s, 1), "command": " ".join(stage.argv[1:]), "output_tail": text[-4000:]}
    if stage.parse:
        try:
            res = stage.parse(text, ctx.scratch / stage.name)
        except Exception as e:  # a partial or garbled output: keep the stage's record, say why
            res, rec["parse_error"] = None, f"{type(e).__name__}: {e}"
        if res is not None:
            rec["result"] = res
        elif status == "ok":
            rec["status"] = "failed"
    return rec


def _kill(proc) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def _parse_junit(text: str, folder: Path) -> Optional[dict]:
    """Counts and failed tests from pytest's JUnit XML, or from its ``-v`` lines when it was killed early."""
    import xml.etree.ElementTree as ET

    path = folder / "junit.xml"
    if not path.exists():
        words = [ln.split(" ")[1] for ln in text.splitlines() if "::" in ln and ln.count(" ") >= 1
                 and ln.split(" ")[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED")]
        if not words:
            return None
        failed = [ln.split(" ")[0] for ln in text.splitlines() if "::" in ln and " FAILED" in ln]
        return {"tests": len(words), "passed": words.count("PASSED"), "failures": words.count("FAILED"),
                "errors": words.count("ERROR"), "skipped": words.count("SKIPPED"), "failed": failed,
                "partial": True}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def _parse_bench(text: str, folder: Path) -> Optional[dict]:
    found = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def _parse_last_json(text: str, folder: Path) -> Optional[dict]:
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def build_stages(ctx: Context, only: set) -> List[Stage]:
    """The stages of this run (``only``: their kinds), with their budgets and commands."""
    py, dry = ctx.python, ctx.dry_run
    stages: List[Stage] = []
    junit = ctx.scratch / "kernels" / "junit.xml"
    tests = DRY_KERNEL_TESTS if dry else [DEVICE_TESTS, "tests/kernels"]  # the backends first: fewer compiles
    stages.append(Stage("kernels", "tests", 60 if dry else 100,
                        [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests],
                        parse=_parse_junit))
    for i, V in enumerate((70, 90) if dry else (32000, 128256)):
        out = ctx.scratch / f"bench-{V}"
        size = (["--device", "cpu", "--small", "--tokens", "32", "--dim", "32", "--seq-len", "16"] if dry
                else ["--tokens", "8192", "--dim", "4096", "--seq-len", "512"])
        methods = ["--methods", *(DRY_METHODS if dry else BENCH_METHODS)]
        stages.append(Stage(f"bench-{V}", "bench", 60 if dry else 70,
                            [py, "-m", "bench.gpu", *size, "--vocab", str(V), *methods, "--out", str(out),
                             *(["--skip-check", "--no-filter"] if i else [])], parse=_parse_bench))
    for v in ("hf", "ours"):
        stages.append(Stage(f"unlearn-{v}", "unlearn", 60,
                            [py, "-m", "bench.gpu_unlearn", "--worker", "--variant", v,
                             *(["--dry-run"] if dry else [])],
                            parse=_parse_last_json))
    for s in stages:
        (ctx.scratch / s.name).mkdir(exist_ok=True)
    return [s for s in stages if s.kind in only or s.name in only]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny sizes: the code path only")
    p.add_argument("--only", default="tests,bench,unlearn", help="comma list of stage kinds or names")
    p.add_argument("--budget", type=float, default=345.0, help="seconds for all stages together")
    p.add_argument("--stage-budget-scale", type=float, default=1.0,
                   help="multiply every stage's budget (a loaded CPU in CI; the total stays --budget)")
    p.add_argument("--out", default=None, help="folder of the JSON + Markdown (default bench/results on CUDA, "
                                               "a temporary folder in a dry run)")
    p.add_argument("--wheels", default=None, help="folder of pure-Python peer wheels (default bench/wheels)")
    p.add_argument("--hide", default="", help="comma list of packages made absent in every stage (tests)")
    p.add_argument("--as-uninstalled", action="store_true",
                   help="ignore an editable install of the package (tests: as on a machine without one)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ctx, notes = make_context(args, scratch)
    from bench.gpu_check_report import finish, output_path, start_payload

    if not ctx.cuda and not args.dry_run:
        print("gpu-check: no CUDA device here; run `make gpu-check DRY_RUN=1` for the CPU code check", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else (None if ctx.cuda else scratch / "result")
    path = output_path(out_dir)
    payload = start_payload(argv, args, notes, path)
    deadline = time.time() + args.budget
    for stage in build_stages(ctx, set(args.only.split(","))):
        stage.budget_s *= args.stage_budget_scale
        left = deadline - time.time()
        if left < 10:
            payload["stages"][stage.name] = {"kind": stage.kind, "status": "skipped", "why": "no time left"}
        else:
            print(f"gpu-check: {stage.name} (budget {min(stage.budget_s, left):.0f} s) ...", flush=True)
            payload["stages"][stage.name] = run_stage(stage, ctx, min(stage.budget_s, left))
            rec = payload["stages"][stage.name]
            print(f"gpu-check: {stage.name} {rec['status']} in {rec['seconds']} s", flush=True)
        finish(payload, path)
    print(f"gpu-check: wrote {path} and {path.with_suffix('.md')}")
    print(f"gpu-check: CUDA default backend rule -> {payload['backend_rule'].get('backend')}")
    bad = [n for n, s in payload["stages"].items() if s["status"] != "ok"]
    if bad:
        print(f"gpu-check: stages not ok: {', '.join(bad)} (their output tails are in the JSON)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
