"""Interleaved A/B of the chunked backend's tile height against the naive path (one process, same inputs).

    python -m bench.chunk_rows [--dtype fp32] [--rows 256,512] [--rounds 7] [--profile]

Runs naive, then chunked with each ``--rows`` value, round after round, and prints the median fwd+bwd time of
each and its ratio to naive: alternating in one process cancels the drift of a shared machine, which separate
runs do not. ``--profile`` also splits one chunked step (default tile height) into GEMM time (``aten::mm`` /
``aten::addmm_``) and the rest (the epilogue). Memory is not measured here (see ``bench.loss``).
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench.harness import DTYPES, chunked_backend, lm_inputs, simnpo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--N", type=int, default=2048)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--rows", default="512", help="tile heights to compare (the chunk rule's is printed)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args(argv)

    import torch

    h, W, labels = lm_inputs(a.N, a.d, a.V, getattr(torch, DTYPES[a.dtype]))
    h.requires_grad_()
    W.requires_grad_()
    variants = {"naive": "reference", "chunked (rule)": chunked_backend()}
    variants.update({f"chunked R={r}": chunked_backend(int(r)) for r in a.rows.split(",") if r})

    def step(be):
        h.grad = W.grad = None
        simnpo(be)(h, W, labels).backward()

    times = {k: [] for k in variants}
    for be in variants.values():
        step(be)
    for _ in range(a.rounds):
        for k, be in variants.items():
            t0 = time.perf_counter()
            step(be)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.dtype} N={a.N} d={a.d} V={a.V}, {a.rounds} interleaved rounds, {torch.get_num_threads()} threads")
    for k, t in med.items():
        print(f"  {k:16s} {t * 1e3:8.1f} ms   {t / med['naive']:.3f}x naive")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(variants["chunked (rule)"])
        ev = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        total = sum(ev.values())
        gemm = ev.get("aten::mm", 0) + ev.get("aten::addmm_", 0) + ev.get("aten::addmm", 0)
        print(f"  chunked profile: GEMMs {gemm / 1e3:.0f} ms, everything else {(total - gemm) / 1e3:.0f} ms "
              f"(profiler self CPU time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
