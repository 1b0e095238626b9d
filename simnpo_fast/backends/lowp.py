"""Slow 16-bit GEMMs: a measured probe, and the dtype the chunked backend's tile products run in.

On CPUs without native bf16 / fp16 GEMM instructions (x86 with AVX2 only: no AVX-512 BF16 / AMX, no AVX-512
FP16) torch's bf16 and fp16 matmuls fall back to slow kernels, many times slower than fp32 (the measured ratios
are in bench/results/ and the README). There the chunked backend computes the tiles of 16-bit inputs in fp32
(``gemm_dtype``): one fp32 copy of ``W`` (and ``b``) per call -- ``4 V d`` bytes more, the size of the fp32
``dW`` accumulator every training step holds anyway -- fp32 row tiles of ``x`` (``4 R d`` bytes), and an fp32
logits tile at the fp32 tile height (the same bytes as the 16-bit tile at its doubled height). The results are
at least as accurate as the 16-bit products (the logits are not rounded to 16 bits); the gradients come back
in the input dtype as before.

Decision (``lowp_gemm_slow``): a probe at first use, cached per process and (device type, dtype): the best of
a few ``[128, 512] x [512, 256]^T`` products in the 16-bit dtype against the same in fp32 (~34 MFLOP each, on one
thread, interleaved); "slow" when the 16-bit product takes more than ``SLOW_RATIO`` times the fp32 one. CUDA
devices are never probed (tensor cores). ``SIMNPO_FAST_LOWP_GEMM`` overrides it: ``auto`` (default, the probe),
``native`` (always the input dtype), ``fp32`` (always widen).
"""
from __future__ import annotations

import os
import time
from typing import Dict, Tuple

import torch

#: the 16-bit GEMM counts as slow when it takes more than this many times the fp32 product of the same shape
SLOW_RATIO = 1.5
PROBE_SHAPE = (128, 512, 256)  # (rows, d, columns): x [rows, d] @ w[columns, d]^T, the tile GEMM's layout
_MODES = ("auto", "native", "fp32")
_LOWP = (torch.bfloat16, torch.float16)
_PROBES: Dict[Tuple[str, torch.dtype], dict] = {}


def _mode() -> str:
    mode = os.environ.get("SIMNPO_FAST_LOWP_GEMM", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"SIMNPO_FAST_LOWP_GEMM must be one of {_MODES}, got {mode!r}")
    return mode


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def probe(device, dtype: torch.dtype) -> dict:
    """The measured rates (GFLOP/s) of a tile-shaped ``dtype`` GEMM and its fp32 twin on ``device`` (CPU only;
    cached per process): ``{"dtype", "lowp_gflops", "fp32_gflops", "ratio", "slow"}``."""
    key = (torch.device(device).type, dtype)
    if key in _PROBES:
        return _PROBES[key]
    m, d, n = PROBE_SHAPE
    # deterministic operands in [-1, 1]: no use of the global RNG
    a32 = torch.sin(torch.arange(m * d, dtype=torch.float32)).reshape(m, d).to(device)
    b32 = torch.cos(torch.arange(n * d, dtype=torch.float32) * 0.5).reshape(n, d).to(device)
    a, b = a32.to(dtype), b32.to(dtype)
    out32, out = torch.empty(m, n, device=device), torch.empty(m, n, dtype=dtype, device=device)
    f32 = lambda: torch.mm(a32, b32.t(), out=out32)  # noqa: E731
    flp = lambda: torch.mm(a, b.t(), out=out)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: no thread-pool barrier waits on a shared, oversubscribed machine
    try:
        f32(), flp()  # warm-up (library start-up, packing buffers)
        t32, tlp = _best_time(f32, 3), _best_time(flp, 1)
        for _ in range(2):  # interleaved rounds, best of each: the drift of a shared machine hits both
            if tlp > 10 * SLOW_RATIO * t32:  # clearly slow: no need to look closer
                break
            t32, tlp = min(t32, _best_time(f32, 3)), min(tlp, _best_time(flp, 1))
    finally:
        torch.set_num_threads(threads)
    flops = 2.0 * m * d * n
    res = {"dtype": str(dtype).replace("torch.", ""), "lowp_gflops": flops / tlp / 1e9,
           "fp32_gflops": flops / t32 / 1e9, "ratio": tlp / t32, "slow": tlp > SLOW_RATIO * t32}
    _PROBES[key] = res
    return res


def lowp_gemm_slow(device, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` GEMMs on ``device`` should run in fp32 instead (module docstring); False for fp32 /
    fp64 and on CUDA under ``auto``."""
    if dtype not in _LOWP:
        return False
    mode = _mode()
    if mode != "auto":
        return mode == "fp32"
    if torch.device(device).type != "cpu":
        return False
    return bool(probe(device, dtype)["slow"])


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the chunked backend computes ``x``'s tile products in: ``x.dtype``, or fp32 for 16-bit inputs
    whose GEMMs are slow here."""
    return torch.float32 if lowp_gemm_slow(x.device, x.dtype) else x.dtype


def report(device="cpu") -> dict:
    """What the probe decided for bf16 and fp16 on ``device`` (for benchmark JSONs): mode, rates, decision."""
    out = {"mode": _mode(), "slow_ratio": SLOW_RATIO}
    if torch.device(device).type == "cpu":
        for dt in _LOWP:
            out[str(dt).replace("torch.", "")] = dict(probe(device, dt), widened=lowp_gemm_slow(device, dt))
    return out


__all__ = ["SLOW_RATIO", "gemm_dtype", "lowp_gemm_slow", "probe", "report"]
