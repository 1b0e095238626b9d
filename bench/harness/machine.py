"""Where a result came from and where it goes: machine facts and result files.

Every result JSON starts with ``benchmark``, the ``command`` that reproduces it and ``machine`` (CPU model and
SIMD flags, torch's CPU capability, GPU, package versions, git commit, date). Files are
``<results>/<benchmark>-<machine tag>-<date>.json``; an existing file is never overwritten (a ``-2``, ``-3``,
... suffix is added instead).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"

#: cpuinfo flags recorded with every result: the vector units the GEMMs and the epilogue can use
SIMD_FLAG_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "asimd", "sve")
VERSIONED_PACKAGES = ("simnpo-fast", "torch", "triton", "liger-kernel", "cut-cross-entropy", "transformers",
                      "numpy")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """CPU model name and its SIMD flags (avx2, avx512f, avx512_bf16, amx_bf16, ...; ARM: asimd, sve) from
    /proc/cpuinfo."""
    model, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not flags:
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = value.split()
                    break
    except OSError:
        pass
    return model, sorted(f for f in flags if f.startswith(SIMD_FLAG_PREFIXES))


def cpu_vendor() -> str:
    """``vendor_id`` of /proc/cpuinfo (GenuineIntel, AuthenticAMD, ...), or '' where there is none (ARM)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_family(vendor: str, flags: list[str]) -> str:
    """The CPU family a result belongs to; figures are compared only within one (the GEMM engines and their
    16-bit paths differ between them): ``intel-avx512-amx``, ``intel-avx512``, ``amd-avx512-bf16``,
    ``amd-avx512``, ``<vendor>-avx2``, ``arm``, or ``other``."""
    fl = set(flags)
    who = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, "")
    if not who:
        return "arm" if "asimd" in fl else "other"
    if "avx512f" in fl:
        if "amx_bf16" in fl:
            return f"{who}-avx512-amx"
        return f"{who}-avx512-bf16" if (who == "amd" and "avx512_bf16" in fl) else f"{who}-avx512"
    return f"{who}-avx2" if "avx2" in fl else "other"


def package_versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (/proc/loadavg): how shared the machine was while it measured."""
    try:
        with open("/proc/loadavg") as fh:
            return [float(v) for v in fh.read().split()[:3]]
    except (OSError, ValueError):
        return None


def machine_info() -> dict:
    """Where a result came from: host, CPU model, vendor, family + SIMD flags, the 16-bit GEMM probe, the tile GEMM
    engine, load average, cores,
    threads, GPU, versions, commit, date."""
    import torch

    cpu, flags = cpu_model_and_flags()
    vendor = cpu_vendor()
    info = {"host": socket.gethostname(), "cpu": cpu, "cpu_vendor": vendor, "cpu_family": cpu_family(vendor, flags),
            "cpu_flags": flags, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    try:
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    try:  # the 16-bit GEMM probe: which tile products our CPU path runs, and why peers' bf16 may crawl here
        from .library import lowp_gemm_report

        info["lowp_gemm"] = lowp_gemm_report()
    except Exception as e:  # an older library: the record says so
        info["lowp_gemm"] = {"error": f"{type(e).__name__}: {e}"}
    try:  # the engine of the fp32 tile products (backends/gemm.py)
        from .library import tile_gemm_report

        info["tile_gemm"] = tile_gemm_report()
    except Exception as e:
        info["tile_gemm"] = {"error": f"{type(e).__name__}: {e}"}
    info["loadavg"] = load_average()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return dict(info, versions=package_versions(), git=git_revision())


def machine_tag() -> str:
    """Short machine name in result file names: ``cpu<cores>``, or the GPU model (``h100``) on CUDA."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace("NVIDIA ", "").split()[0].lower()
    return f"cpu{os.cpu_count()}"


def result_header(benchmark: str, module: str, argv: list[str] | None) -> dict:
    """The fields every result JSON starts with: ``benchmark``, the ``command`` that reproduces it, ``machine``."""
    args = sys.argv[1:] if argv is None else argv
    return {"benchmark": benchmark, "command": " ".join(["python -m " + module, *args]),
            "machine": machine_info()}


def fresh_path(out_dir: Path, stem: str, ext: str = ".json") -> Path:
    """``out_dir/stem.ext``, or ``stem-2.ext``, ``stem-3.ext``, ... -- the first that does not exist."""
    path, n = Path(out_dir) / f"{stem}{ext}", 1
    while path.exists():
        n += 1
        path = Path(out_dir) / f"{stem}-{n}{ext}"
    return path


def write_result(name: str, payload: dict, out_dir: Path | str | None = None, suffix: str = "") -> Path:
    """Write ``payload`` to ``<out_dir or bench/results>/<name>-<machine tag>-<date><suffix>.json`` (``name``
    may be empty) without overwriting anything; returns the path."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "-".join(p for p in (name, machine_tag(), _dt.date.today().isoformat()) if p) + suffix
    path = fresh_path(out_dir, stem)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
