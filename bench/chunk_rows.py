"""Interleaved A/B of the chunked backend's tile height against the naive path (one process, same inputs).

    python -m bench.chunk_rows [--dtype fp32] [--rows 256,512] [--rounds 7] [--profile] [--account]

Runs naive, then chunked with each ``--rows`` value, round after round, and prints the median fwd+bwd time of
each and its ratio to naive: alternating in one process cancels the drift of a shared machine, which separate
runs do not. ``--profile`` also splits one chunked step (default tile height) into GEMM time (``aten::mm`` /
``aten::addmm_``) and the rest (the epilogue). Memory is not measured here (see ``bench.loss``).

``--account`` answers "what keeps the exact path above the dense floor": every round also times the floor (the
three whole-batch products of ``bench.harness.gemm_floor``, preallocated outputs) and one profiled chunked step,
whose profiler self time splits into GEMMs and the rest; medians over the rounds, written as a result JSON
(``chunk_rows-<machine>-<date>.json``). Then ``chunked - floor = (its GEMMs - floor) + the rest``: the first
term is what the tile-shaped products cost over the whole-batch ones (each tile's products take all of ``W``), the
second the epilogue (softmax passes, gathers, accumulation) and the Python schedule. Profiling adds a little
time of its own, so the two terms are read as shares of the profiled step.
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench.harness import (DTYPES, chunked_backend, gemm_floor, lm_inputs, result_header, simnpo, valid_rows,
                           write_result)

GEMM_OPS = ("aten::mm", "aten::addmm_", "aten::addmm", "aten::matmul_out", "aten::bmm")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--N", type=int, default=2048)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--rows", default="512", help="tile heights to compare (the chunk rule's is printed)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--account", action="store_true", help="floor + profiled step each round; writes a JSON")
    ap.add_argument("--out", default=None, help="folder of the --account JSON (default bench/results)")
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
    account = {"floor_s": [], "profiled_s": [], "gemm_s": [], "rest_s": [], "top_rest_ops": []}
    for be in variants.values():
        step(be)
    for _ in range(a.rounds):
        for k, be in variants.items():
            t0 = time.perf_counter()
            step(be)
            times[k].append(time.perf_counter() - t0)
        if a.account:
            M = valid_rows(a.N)
            account["floor_s"].append(gemm_floor(M, a.d, a.V, h.dtype, repeats=1)["floor_s"])
            _profiled_step(lambda: step(variants["chunked (rule)"]), account)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.dtype} N={a.N} d={a.d} V={a.V}, {a.rounds} interleaved rounds, {torch.get_num_threads()} threads")
    for k, t in med.items():
        print(f"  {k:16s} {t * 1e3:8.1f} ms   {t / med['naive']:.3f}x naive")
    if a.account:
        _write_account(a, argv, times, account)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(variants["chunked (rule)"])
        ev = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        total = sum(ev.values())
        gemm = sum(ev.get(k, 0) for k in GEMM_OPS)
        print(f"  chunked profile: GEMMs {gemm / 1e3:.0f} ms, everything else {(total - gemm) / 1e3:.0f} ms "
              f"(profiler self CPU time)")
    return 0


def _profiled_step(run, account: dict) -> None:
    """One profiled call of ``run``: its wall time, the profiler's GEMM self time and the rest (appended)."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    account["profiled_s"].append(time.perf_counter() - t0)
    ev = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    gemm = sum(ev.get(k, 0.0) for k in GEMM_OPS)
    account["gemm_s"].append(gemm)
    account["rest_s"].append(sum(ev.values()) - gemm)
    account["top_rest_ops"].append(sorted(((k, v) for k, v in ev.items() if k not in GEMM_OPS),
                                          key=lambda kv: -kv[1])[:8])


def _write_account(a, argv, times: dict, account: dict) -> None:
    """Medians of the rounds -> the account's terms, printed and written as a result JSON."""
    md = {k: statistics.median(v) for k, v in account.items() if k != "top_rest_ops"}
    chunked, floor = statistics.median(times["chunked (rule)"]), md["floor_s"]
    terms = {"chunked_over_floor": chunked / floor, "gemm_over_floor": md["gemm_s"] / floor,
             "rest_share_of_profiled": md["rest_s"] / (md["gemm_s"] + md["rest_s"]),
             "gemm_gflops_floor": 6 * valid_rows(a.N) * a.d * a.V / floor / 1e9,
             "gemm_gflops_tiles": 6 * valid_rows(a.N) * a.d * a.V / md["gemm_s"] / 1e9}
    print(f"  account: chunked {chunked * 1e3:.0f} ms = {terms['chunked_over_floor']:.2f}x the floor "
          f"({floor * 1e3:.0f} ms); profiled step: GEMMs {md['gemm_s'] * 1e3:.0f} ms "
          f"({terms['gemm_over_floor']:.2f}x the floor), the rest {md['rest_s'] * 1e3:.0f} ms")
    payload = {**result_header("chunk_rows", "bench.chunk_rows", argv), "config": vars(a),
               "times_s": times, "account_rounds": account, "account_medians_s": md, "account": terms}
    print(f"wrote {write_result('chunk_rows', payload, a.out)}")


if __name__ == "__main__":
    raise SystemExit(main())
