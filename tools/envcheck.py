"""Environment checks: does what a machine installs still run the project? Standard library only, so any Python runs
it; every venv it builds is a throwaway one in a temporary folder (``--keep`` keeps it).

    python3 tools/envcheck.py latest    # make test-latest: the newest releases setup.py allows (the drift canary)
    python3 tools/envcheck.py pythons   # make test-pythons: every Python of VERSIONS found on this machine
    python3 tools/envcheck.py wheel     # make test-wheel: the wheel + the lock's packages, outside the repository

``latest`` installs ``TORCH_PIN`` (torch / triton: on a CPU machine the newest torch the index offers is a multi-GB
CUDA build, so they move only when the pin does) in the same pip command as ``.[dev]``, so every other package is
the newest release that setup.py's ranges allow; then it runs ``pip check`` and the canary tests (:data:`CANARY`:
they load an HF model, train, evaluate with TOFU metrics and lm-eval, export, and run the Triton kernels).
``pythons`` does the same per Python, from the lock where the lock was made for that Python. ``wheel`` builds the
wheel and checks it in a fresh venv in another folder (``tools/wheel_check.py``).

Each run writes ``bench/results/env-<kind>-<date>.{json,md}`` (never overwriting: ``-2``, ``-3``, ...): versions, the
packages that differ from the lock, pass / fail of every step. Exit status 0 only when every step passed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "cpu-py311.txt"
LOCK_PYTHON = "3.11"
TORCH_PIN = "torch==2.13.0 triton==3.7.1"
VERSIONS = ("3.10", "3.11", "3.12", "3.13")
#: the drift canary: an HF model loaded, patched and trained (HF Trainer and the FSDP2 trainer's CLI with export),
#: the demo's finetune -> unlearn -> TOFU evaluation, lm-eval's protocol, file formats through `datasets`, the
#: Triton kernels under the interpreter, and the install layout (no shadowing of HF's `kernels`, the wheel)
CANARY = ("tests/test_install.py", "tests/test_model.py", "tests/trainer/test_trainer_hf.py",
          "tests/trainer/test_trainer_cli.py", "tests/eval/test_eval_cli_demo.py", "tests/eval/test_mcq_lmeval.py",
          "tests/data/test_data_formats.py", "tests/kernels/test_triton_kernels.py")
KEY_PACKAGES = ("torch", "triton", "transformers", "kernels", "numpy", "datasets", "accelerate", "lm-eval", "pip")
PYTEST_SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed|error).*?) in [\d.]+s", re.M)


class Steps:
    """The ordered record of one environment's steps: name -> {ok, seconds, tail}."""

    def __init__(self, log: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log, self.steps = log, {}

    def run(self, name: str, argv: list, **kw) -> subprocess.CompletedProcess:
        if not self.ok:  # a failed step skips the rest
            self.steps[name] = {"ok": False, "seconds": 0, "tail": "skipped: an earlier step failed"}
            return subprocess.CompletedProcess(argv, 1, "", "")
        t0 = time.time()
        proc = subprocess.run(argv, capture_output=True, text=True, **kw)
        out = proc.stdout + proc.stderr
        with open(self.log, "a") as fh:
            fh.write(f"\n$ {' '.join(map(str, argv))}\n{out}")
        self.steps[name] = {"ok": proc.returncode == 0, "seconds": round(time.time() - t0, 1),
                            "tail": "\n".join(out.strip().splitlines()[-15:])}
        return proc

    @property
    def ok(self) -> bool:
        return all(s["ok"] for s in self.steps.values())


def python_of(version: str) -> str | None:
    """A working interpreter of ``version`` (``3.12``): pyenv's newest ``3.12.*``, else ``python3.12`` on PATH
    (a pyenv shim on PATH may name a version it will not run, hence the trial run)."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    cands = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"),
                   key=lambda p: [int(x) for x in re.findall(r"\d+", Path(p).parts[-3])])
    for exe in [*reversed(cands), shutil.which(f"python{version}")]:
        if exe and subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
            return exe
    return None


def lock_pins() -> dict:
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", LOCK.read_text(), re.M)
    return {_norm(n): v for n, v in pins}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_env(python: str, mode: str, work: Path, torch_pin: str) -> dict:
    """Build a venv in ``work`` with ``python`` (``mode``: ``lock`` or ``latest``), then pip check + the canary."""
    steps = Steps(work / "log.txt")
    env_dir = work / "venv"
    py = str(env_dir / "bin" / "python")
    steps.run("venv", [python, "-m", "venv", str(env_dir)])
    if mode == "lock":
        steps.run("install", [py, "-m", "pip", "install", "-q", "--require-hashes", "--no-deps", "-r", str(LOCK)])
        steps.run("install-project", [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                      "-e", str(ROOT)])
    else:
        steps.run("install-pip", [py, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools"])
        steps.run("install", [py, "-m", "pip", "install", "-q", *torch_pin.split(), "-e", f"{ROOT}[dev]"])
    versions = {}
    if steps.ok:
        steps.run("pip-check", [py, "-m", "pip", "check"])
        versions = _versions(py)
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        env.pop("PYTHONPATH", None)
        proc = steps.run("canary", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CANARY], cwd=ROOT,
                         env=env, timeout=1800)
        m = PYTEST_SUMMARY.search(proc.stdout)
        steps.steps["canary"]["summary"] = m.group(1) if m else "no pytest summary"
    pins = lock_pins()
    drift = {n: {"lock": pins.get(n), "here": v} for n, v in sorted(versions.items())
             if pins.get(n) != v and n != "simnpo-fast"}
    real = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True).stdout.strip()
    return {"python": real, "interpreter": python, "mode": mode, "ok": steps.ok, "steps": steps.steps,
            "key_versions": {k: versions.get(k) for k in KEY_PACKAGES}, "differs_from_lock": drift,
            "versions": versions}


def check_wheel(python: str, work: Path) -> dict:
    """The lock's packages in a fresh venv outside the repository, the wheel built from the tree, then
    ``simnpo-fast demo --help`` and ``tools/wheel_check.py`` from a folder that is not the repository."""
    steps = Steps(work / "log.txt")
    env_dir = work / "venv"
    py = str(env_dir / "bin" / "python")
    steps.run("venv", [python, "-m", "venv", str(env_dir)])
    steps.run("install-lock", [py, "-m", "pip", "install", "-q", "--require-hashes", "--no-deps", "-r", str(LOCK)])
    steps.run("wheel", [py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(work / "wheels"), str(ROOT)])
    wheels = sorted((work / "wheels").glob("simnpo_fast-*.whl"))
    if wheels:
        steps.run("install-wheel", [py, "-m", "pip", "install", "-q", "--no-deps", str(wheels[-1])])
        steps.run("pip-check", [py, "-m", "pip", "check"])
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    steps.run("cli", [str(env_dir / "bin" / "simnpo-fast"), "demo", "--help"], cwd=elsewhere, env=env)
    proc = steps.run("wheel-check", [py, str(ROOT / "tools" / "wheel_check.py")], cwd=elsewhere, env=env)
    checks = dict(line.split("=", 1) for line in proc.stdout.split() if "=" in line)
    versions = _versions(py) if steps.ok else {}
    return {"python": LOCK_PYTHON, "interpreter": python, "mode": "wheel", "ok": steps.ok, "steps": steps.steps,
            "wheel": wheels[-1].name if wheels else None, "checks": checks,
            "key_versions": {k: versions.get(k) for k in KEY_PACKAGES}, "versions": versions}


def _versions(py: str) -> dict:
    listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True)
    return {_norm(p["name"]): p["version"] for p in json.loads(listed.stdout or "[]")}


def machine() -> dict:
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
        flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
        cpu = (model.group(1) if model else "") + " | " + " ".join(
            f for f in (flags.group(1).split() if flags else []) if f.startswith(("avx512", "amx")) or f == "avx2")
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "git": _git_head()}


def _git_head() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    return proc.stdout.strip() + ("+dirty" if dirty.strip() else "")


def write_result(kind: str, payload: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem, n = f"env-{kind}-{payload['date']}", 1
    while (out_dir / f"{stem}.json").exists() or (out_dir / f"{stem}.md").exists():
        n += 1
        stem = f"env-{kind}-{payload['date']}-{n}"
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(kind, payload))
    return out_dir / f"{stem}.json"


def markdown(kind: str, payload: dict) -> str:
    m = payload["machine"]
    lines = [f"# Environment check `{kind}`, {payload['date']}", "",
             f"Command: `{payload['command']}` at commit {m['git']}; {m['cpu']}, {m['cores']} cores, "
             f"{m['platform']}.", "",
             "| Python | install | result | steps | torch | triton | transformers | kernels (HF) | numpy | datasets |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["runs"]:
        kv = r.get("key_versions", {})
        steps = ", ".join(f"{n} {'ok' if s['ok'] else 'FAILED'}" + (f" ({s['summary']})" if "summary" in s else "")
                          for n, s in r["steps"].items())
        lines.append(f"| {r['python']} | {r['mode']} | {'pass' if r['ok'] else 'FAIL'} | {steps} | "
                     + " | ".join(str(kv.get(k) or "-") for k in ("torch", "triton", "transformers", "kernels",
                                                                    "numpy", "datasets")) + " |")
    for r in payload["runs"]:
        drift = r.get("differs_from_lock")
        if drift:
            lines += ["", f"Python {r['python']} ({r['mode']}): {len(drift)} packages differ from the lock: "
                      + ", ".join(f"{n} {d['lock'] or '(not locked)'} -> {d['here']}" for n, d in drift.items())]
        if r["mode"] == "wheel":
            lines += ["", "wheel_check: " + ", ".join(f"{k}={v}" for k, v in r.get("checks", {}).items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=["latest", "pythons", "wheel"])
    p.add_argument("--python", default=sys.executable, help="interpreter of `latest` and `wheel`")
    p.add_argument("--versions", default=",".join(VERSIONS), help="Pythons of `pythons` (comma list)")
    p.add_argument("--torch-pin", default=TORCH_PIN, help="torch / triton requirements of the unlocked installs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder of the result files")
    p.add_argument("--keep", action="store_true", help="keep the venvs (printed) instead of deleting them")
    args = p.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix=f"envcheck-{args.kind}-"))
    where = machine()  # before the runs: the commit they test
    runs = []
    if args.kind == "wheel":
        runs.append(check_wheel(args.python, scratch / "wheel"))
    elif args.kind == "latest":
        runs.append(check_env(args.python, "latest", scratch / "latest", args.torch_pin))
    else:
        for v in args.versions.split(","):
            exe = python_of(v)
            if exe is None:
                runs.append({"python": v, "mode": "-", "ok": False, "steps": {"find": {
                    "ok": False, "seconds": 0, "tail": f"no python{v} on PATH or in pyenv"}}})
                continue
            mode = "lock" if v == LOCK_PYTHON else "latest"
            runs.append(check_env(exe, mode, scratch / v, args.torch_pin))
            if not args.keep:
                shutil.rmtree(scratch / v / "venv", ignore_errors=True)
    payload = {"kind": args.kind, "date": dt.date.today().isoformat(), "machine": where,
               "command": "python3 tools/envcheck.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "ok": all(r["ok"] for r in runs), "runs": runs}
    path = write_result(args.kind, payload, Path(args.out))
    print(markdown(args.kind, payload))
    print(f"wrote {path} and {path.with_suffix('.md')}; logs in {scratch}")
    if not args.keep:
        for r in scratch.glob("*/venv"):
            shutil.rmtree(r, ignore_errors=True)
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
