"""Shared benchmark plumbing: machine facts, fresh-subprocess peak memory, GEMM rate, JSON output."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    return info


def machine_tag() -> str:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).replace("NVIDIA ", "").split()[0].lower()
        return f"gpu-{name}"
    return f"cpu{os.cpu_count()}"


def rss_kib(field: str = "VmRSS") -> int:
    """Current resident set (VmRSS) or its high-water mark (VmHWM) in KiB, from /proc/self/status."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs). Returns False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def run_worker(module: str, args: list[str], timeout: int = 1800, env: dict | None = None,
               exact_rss: bool = True) -> dict:
    """Run ``python -m module --worker ...`` in a fresh process; it prints one JSON line last.

    ``env``: extra environment variables for the worker (e.g. ``{"TRITON_INTERPRET": "1"}``).
    ``exact_rss``: fix glibc's mmap threshold at 128 KiB, so every large block goes back to the OS when freed
    (no dynamic threshold parking freed tiles in the heap) and the RSS high-water mark measures live memory.
    It also makes every large allocation page-fault afresh, which is not how programs run: workers that only
    time pass ``exact_rss=False`` (glibc defaults).
    """
    cmd = [sys.executable, "-m", module, "--worker", *args]
    base = dict(os.environ)
    if exact_rss:
        base["MALLOC_MMAP_THRESHOLD_"] = "131072"
    else:
        base.pop("MALLOC_MMAP_THRESHOLD_", None)
    env = dict(base, **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(Path(__file__).resolve().parent.parent))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    day = _dt.date.today().isoformat()
    path = out_dir / f"{name}-{machine_tag()}-{day}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def spread(ts: list[float]) -> dict:
    """Summary of repeated timings: median, min, max and (max - min) / median."""
    med = statistics.median(ts)
    return {"median_s": med, "min_s": min(ts), "max_s": max(ts), "n": len(ts),
            "spread": (max(ts) - min(ts)) / med if med > 0 else 0.0}


def mem_available_mib() -> float:
    """MemAvailable from /proc/meminfo (MiB); inf if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")
