"""The installed layout (setup.py): the repository's top-level ``kernels/`` is ``simnpo_fast.kernels`` and never a
bare ``kernels`` that could shadow another distribution of that name (Hugging Face's, which transformers >= 5.25
requires), from the repository root or from ``PYTHONPATH``; a wheel built from the tree works in a venv outside it.

The oracle is Python's own import system run in a subprocess: a stand-in ``kernels`` distribution (a regular
package plus its dist-info) on ``sys.path`` must be what ``import kernels`` returns, while ``simnpo_fast.kernels``
still resolves to the Triton kernels."""
import importlib.metadata
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import importlib.metadata as md, kernels, simnpo_fast.kernels.seq_logprob as k\n"
         "print(kernels.__file__); print(getattr(kernels, 'STANDIN', None)); print(md.version('kernels'))\n"
         "print(k.__file__)\n")


def _standin(site: Path) -> Path:
    """A distribution named ``kernels`` (version 9.9.9) installed into ``site`` the way pip lays one out."""
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("STANDIN = 'stand-in'\n")
    info = site / "kernels-9.9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 9.9.9\n")
    return site / "kernels" / "__init__.py"


def _probe(cwd: Path, pythonpath: list, code: str = PROBE) -> list:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


@pytest.mark.parametrize("where", ["repository root", "PYTHONPATH first", "PYTHONPATH last"])
def test_repo_kernels_never_shadow_an_installed_kernels(tmp_path, where):
    """``python -c`` from the repository root puts the root first on ``sys.path`` (so do ``python -m`` and pytest);
    a ``PYTHONPATH`` naming the root does too, before or after the folder holding the stand-in."""
    init = _standin(tmp_path / "site")
    cwd, path = {"repository root": (ROOT, [tmp_path / "site"]),
                 "PYTHONPATH first": (tmp_path, [ROOT, tmp_path / "site"]),
                 "PYTHONPATH last": (tmp_path, [tmp_path / "site", ROOT])}[where]
    got_file, standin, version, kernel_file = _probe(cwd, path)
    assert Path(got_file) == init and standin == "stand-in" and version == "9.9.9"
    assert Path(kernel_file).resolve() == ROOT / "kernels" / "seq_logprob.py"


def test_hugging_face_kernels_imports_from_the_repository_root():
    """The issue's check, with the real distribution where the environment has it (transformers >= 5.25)."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed")
    code = ("import kernels, transformers.integrations.hub_kernels, simnpo_fast.kernels.epilogue\n"
            "print(kernels.__file__)\n")
    (got,) = _probe(ROOT, [], code)
    assert Path(got).resolve() == Path(dist.locate_file("kernels/__init__.py")).resolve()


def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    """``pip wheel .``, then the wheel alone in a fresh venv in another folder (its third-party dependencies, HF's
    ``kernels`` among them where installed, seen through a path entry to this environment's site-packages, whose
    editable-install hooks are not run from there): ``simnpo-fast demo --help`` and ``tools/wheel_check.py`` (the
    package and its kernels from the venv, a chunked fwd+bwd against the fp64 formula, a Triton kernel under the
    interpreter, HF's ``kernels`` not shadowed). ``make test-wheel`` does the same with the lock's packages."""
    wheels = tmp_path / "wheels"
    run = dict(capture_output=True, text=True, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(wheels), str(ROOT)], **run)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (whl,) = wheels.glob("simnpo_fast-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                           "--no-index", str(whl)], **run)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], **run)
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (Path(site.stdout.strip()) / "zz_test_deps.pth").write_text("\n".join(deps) + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    cli = subprocess.run([str(env_dir / "bin" / "simnpo-fast"), "demo", "--help"], cwd=work, env=env, **run)
    assert cli.returncode == 0 and "usage" in cli.stdout.lower(), cli.stderr[-2000:]
    proc = subprocess.run([str(py), str(ROOT / "tools" / "wheel_check.py")], cwd=work, env=env, **run)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = dict(line.split("=", 1) for line in proc.stdout.split())
    assert Path(got["kernels_pkg"]).is_relative_to(env_dir) and got["ok"] == "1", got
