"""Measurements: fresh-process workers, memory, timing and the GEMM floor.

A worker is ``python -m bench.<script> --worker ...`` in a fresh process; it prints one JSON line last. In
exact-RSS mode glibc's mmap threshold is fixed at 128 KiB, so every large block goes back to the OS when freed
and the RSS high-water mark measures live memory; it also makes every large allocation page-fault afresh, which
is not how programs run, so workers that only time use the default allocator (``exact_rss=False``).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from .library import onednn_available
from .machine import ROOT

EXACT_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_worker(module: str, args: list[str], timeout: int = 1800, env: dict | None = None,
               exact_rss: bool = True) -> dict:
    """Run ``python -m module --worker *args`` in a fresh process from the repository root; its last stdout line
    is the JSON result. ``env``: extra variables; ``exact_rss``: fix glibc's mmap threshold (memory workers)."""
    base = dict(os.environ)
    if exact_rss:
        base.update(EXACT_RSS_ENV)
    else:
        base.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run([sys.executable, "-m", module, "--worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(base, **(env or {})), cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(result: dict) -> int:
    """A worker's answer: one JSON line on stdout (the last line :func:`run_worker` reads)."""
    print(json.dumps(result), flush=True)
    return 0


def alternate(module: str, variants: Iterable[str], worker_args: Callable[[str], list[str]], rounds: int,
              exact_rss: bool, on_result: Callable[[str, dict], None] | None = None) -> dict[str, list[dict]]:
    """``rounds`` rounds of one fresh worker per variant, in the same order every round, so that the drift of a
    shared machine hits every variant alike. Returns each variant's worker results in round order."""
    variants = list(variants)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            runs[v].append(run_worker(module, worker_args(v), exact_rss=exact_rss))
            if on_result:
                on_result(v, runs[v][-1])
    return runs


def run_script(module: str, args: list[str], out_dir: Path, timeout: int = 3600) -> tuple[dict, dict | None]:
    """Run a whole benchmark (``python -m module *args --out out_dir``); returns (process record, its JSON or
    None). The JSON is the newest ``*.json`` that appeared in ``out_dir`` while it ran."""
    out_dir = Path(out_dir)
    before = set(out_dir.glob("*.json"))
    t0 = time.time()
    cmd = [sys.executable, "-m", module, *args, "--out", str(out_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    record = {"command": " ".join(["python", *cmd[1:]]), "returncode": proc.returncode,
              "stdout_tail": proc.stdout[-3000:], "seconds": time.time() - t0}
    if proc.returncode != 0:
        record["stderr_tail"] = proc.stderr[-3000:]
    fresh = [p for p in out_dir.glob("*.json") if p not in before]
    if not fresh:
        return record, None
    newest = max(fresh, key=lambda p: p.stat().st_mtime)
    return dict(record, json_path=str(newest)), json.loads(newest.read_text())


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


class PeakRSS:
    """``with PeakRSS() as m: work()``: ``m.base_kib`` (VmRSS at entry, after which VmHWM is reset),
    ``m.peak_kib`` (VmHWM at exit), ``m.extra_mib`` (their difference), ``m.hwm_reset``."""

    def __enter__(self):
        self.base_kib = rss_kib("VmRSS")
        self.hwm_reset = reset_hwm()
        return self

    def __exit__(self, *exc):
        self.peak_kib = rss_kib("VmHWM")
        self.extra_mib = (self.peak_kib - self.base_kib) / 1024
        return False


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


def fwd_bwd_step(fn: Callable, h, w, labels) -> Callable:
    """A training-like call on leaf tensors ``h``, ``w``: clear their ``.grad``, ``fn(h, w, labels).backward()``;
    returns the loss. The gradients stay in ``.grad`` (a training step must hold them)."""
    def step():
        h.grad = None
        w.grad = None
        loss = fn(h, w, labels)
        loss.backward()
        return loss

    return step


def fwd_bwd_memory(step: Callable, h, w) -> dict:
    """One call of a :func:`fwd_bwd_step` inside a :class:`PeakRSS` window: the peak above the RSS just before
    it (gradients included), the call's time, the loss and gradient norms (to compare methods)."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        loss = step()
        first_call_s = time.perf_counter() - t0
    return {"peak_extra_mib": mem.extra_mib, "hwm_reset": mem.hwm_reset, "rss_base_mib": mem.base_kib / 1024,
            "first_call_s": first_call_s, "loss": float(loss.detach()), "grad_W_norm": float(w.grad.float().norm()),
            "grad_h_norm": float(h.grad.float().norm()),
            "grads_mib": (w.numel() * w.element_size() + h.numel() * h.element_size()) / 2**20}


def cuda_peak_mib(fn: Callable) -> tuple[object, float]:
    """``(fn(), peak allocated MiB above what was allocated before the call)`` on the current CUDA device."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - base) / 2**20


def median_time(fn: Callable, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """``warmup`` untimed calls, then the median (s) and all of ``repeats`` perf_counter-timed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def cuda_median_s(fn: Callable, repeats: int) -> float:
    """Median time (s) of ``fn`` on CUDA by ``triton.testing.do_bench`` (5 warm-up, >= 50 timed calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=max(50, repeats), return_mode="median") * 1e-3


def spread(ts: list[float]) -> dict:
    """Summary of repeated timings: median, min, max and (max - min) / median."""
    med = statistics.median(ts)
    return {"median_s": med, "min_s": min(ts), "max_s": max(ts), "n": len(ts),
            "spread": (max(ts) - min(ts)) / med if med > 0 else 0.0}


def gemm_floor(rows: int, d: int, V: int, dtype, repeats: int, device: str = "cpu") -> dict:
    """Time of the three GEMMs any exact method runs -- logits ``x W^T``, ``dX = G W``, ``dW = G^T x`` with
    ``x [rows, d]``, ``W [V, d]``, ``G [rows, V]`` -- on whole-batch operands; ``floor_s`` is their sum,
    ``gemm_gflops`` = 6 rows d V / floor.

    Each product is timed by ``torch.mm`` into a preallocated output (the GEMM alone, not the page faults of a
    fresh ``[rows, V]`` result) and, on a CPU whose torch has oneDNN, also by oneDNN's matmul on the same
    operands (``mkldnn._linear_pointwise``, a fresh output: its faults included); ``t_<product>`` is the faster
    of the two, so the floor is that of the fastest engine torch offers for each product (both times are kept
    under ``engines``)."""
    import torch

    x = torch.randn(rows, d, device=device).to(dtype)
    w = torch.randn(V, d, device=device).to(dtype)
    g = torch.randn(rows, V, device=device).to(dtype)
    o_logits = torch.empty(rows, V, dtype=dtype, device=device)
    o_dx, o_dw = torch.empty(rows, d, dtype=dtype, device=device), torch.empty(V, d, dtype=dtype, device=device)
    torch.mm(x[:64], w.t())  # library start-up
    engines = {"torch": {"t_logits": lambda: torch.mm(x, w.t(), out=o_logits),
                         "t_dx": lambda: torch.mm(g, w, out=o_dx), "t_dw": lambda: torch.mm(g.t(), x, out=o_dw)}}
    if device == "cpu" and dtype in (torch.float32, torch.bfloat16) and onednn_available():
        lin = torch.ops.mkldnn._linear_pointwise
        engines["onednn"] = {"t_logits": lambda: lin(x, w, None, "none", [], ""),
                             "t_dx": lambda: lin(g, w.t(), None, "none", [], ""),
                             "t_dw": lambda: lin(g.t(), x.t(), None, "none", [], "")}
    times = {e: {} for e in engines}
    for k in engines["torch"]:  # the engines of one product back to back: the same machine state for both
        for e, fs in engines.items():
            times[e][k] = cuda_median_s(fs[k], repeats) if device == "cuda" else median_time(fs[k], repeats)[0]
    out = {k: min(times[e][k] for e in engines) for k in engines["torch"]}
    floor = sum(out.values())
    return dict(out, rows=rows, d=d, V=V, floor_s=floor, gemm_gflops=6 * rows * d * V / floor / 1e9,
                engines=times)

