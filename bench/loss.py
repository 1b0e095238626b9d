"""SimNPO fwd+bwd: chunked (fused, CPU path) vs reference (naive full logits), plus the GEMM floor.

    python -m bench.loss                      # N=2048 (8 x 256), d=512, V=32000, fp32 + bf16
    python -m bench.loss --dtypes fp32 --repeats 3 --out /tmp/x

Every measurement runs in a fresh subprocess (``bench.harness``).

* Peak memory: one exact-RSS worker per variant; the RSS high-water mark during one fwd+bwd minus the RSS just
  before it (inputs allocated, libraries warmed up on a small shape; the gradients it leaves count, since a
  training step must hold them).
* Time: ``--rounds`` rounds of one worker per variant, alternating (reference, chunked, reference, ...) so that
  drift of a shared VM hits both alike; each worker runs one warm-up fwd+bwd and ``--repeats`` timed ones with
  glibc's default allocator settings (how a program runs); the median is over all rounds.
* The GEMM floor is the time of the three GEMMs any exact method must run (logits, dX, dW: 6NdV flops),
  measured in the same run at the same shapes and dtype.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from bench.harness import (DTYPES, alternate, emit, fwd_bwd_memory, fwd_bwd_step, gemm_floor, lm_inputs,
                           median_time, result_header, run_worker, write_result)
from bench.methods import make_method

#: variant name in the results -> method of bench/methods.py
VARIANTS = {"reference": "naive", "chunked": "chunked"}


def worker(args) -> dict:
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    N, d, V = args.N, args.d, args.V
    if args.variant == "gemm":
        return dict(gemm_floor(N, d, V, dtype, args.repeats), variant="gemm", dtype=args.dtype)
    fn = make_method(VARIANTS[args.variant]).fn
    h, W, labels = lm_inputs(N, d, V, dtype)
    step = fwd_bwd_step(fn, h.requires_grad_(), W.requires_grad_(), labels)
    out = {"variant": args.variant, "dtype": args.dtype, "N": N, "d": d, "V": V, "phase": args.phase}
    if args.phase == "time":
        t, ts = median_time(step, args.repeats, warmup=1)
        return dict(out, median_s=t, times_s=ts)
    hw, Ww, lw = lm_inputs(512, d, 1024, dtype)  # library start-up (thread pools, GEMM buffers) off the books
    fwd_bwd_step(fn, hw.requires_grad_(), Ww.requires_grad_(), lw)()
    del hw, Ww, lw
    return dict(out, **fwd_bwd_memory(step, h, W))


def measure_dtype(args, dt: str) -> tuple[dict, list[dict]]:
    """GEMM floor, one memory worker per variant and ``--rounds`` alternating time workers, at one dtype."""
    shape = ["--dtype", dt, "--N", str(args.N), "--d", str(args.d), "--V", str(args.V), "--repeats", str(args.repeats)]
    gemm = run_worker("bench.loss", ["--variant", "gemm", *shape], exact_rss=False)
    mem = {v: run_worker("bench.loss", ["--variant", v, "--phase", "memory", *shape]) for v in VARIANTS}
    times = alternate("bench.loss", VARIANTS, lambda v: ["--variant", v, "--phase", "time", *shape], args.rounds,
                      exact_rss=False)
    rows = []
    for v in VARIANTS:
        ts = [t for r in times[v] for t in r["times_s"]]
        rows.append(dict(mem[v], median_s=statistics.median(ts), times_s=ts))
        print(f"{dt:5s} {v:10s} {rows[-1]['median_s']*1e3:9.1f} ms  peak +{rows[-1]['peak_extra_mib']:8.1f} MiB",
              flush=True)
    return gemm, rows


def summarise(dt: str, gemm: dict, rows: list[dict]) -> dict:
    ref = next(r for r in rows if r["variant"] == "reference")
    ch = next(r for r in rows if r["variant"] == "chunked")
    return {
        "dtype": dt,
        "time_ratio_vs_reference": ch["median_s"] / ref["median_s"],
        "memory_ratio_vs_reference": ch["peak_extra_mib"] / ref["peak_extra_mib"],
        "time_ratio_vs_gemm_floor": ch["median_s"] / gemm["floor_s"],
        "reference_vs_gemm_floor": ref["median_s"] / gemm["floor_s"],
        "loss_rel_diff": abs(ch["loss"] - ref["loss"]) / abs(ref["loss"]),
        "grad_W_norm_rel_diff": abs(ch["grad_W_norm"] - ref["grad_W_norm"]) / ref["grad_W_norm"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="chunked")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--phase", default="memory", choices=("memory", "time"), help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd calls per time worker")
    p.add_argument("--rounds", type=int, default=3, help="alternating time workers per variant")
    p.add_argument("--scaling", default="8192", help="extra N values for the chunked memory-growth check")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    if args.worker:
        return emit(worker(args))

    rows, gemm, summary = [], {}, []
    for dt in args.dtypes.split(","):
        gemm[dt], dt_rows = measure_dtype(args, dt)
        rows += dt_rows
        summary.append(summarise(dt, gemm[dt], dt_rows))
    scaling = []
    for n in [int(s) for s in args.scaling.split(",") if s]:
        r = run_worker("bench.loss", ["--variant", "chunked", "--dtype", "fp32", "--N", str(n), "--d", str(args.d),
                                      "--V", str(args.V), "--phase", "memory"])
        scaling.append(r)
        print(f"fp32  chunked N={n:<6d} peak +{r['peak_extra_mib']:8.1f} MiB (grads {r['grads_mib']:.1f} MiB)")
    print("\n| dtype | chunked / reference time | chunked / reference peak memory | chunked / GEMM floor |")
    print("|---|---|---|---|")
    for s in summary:
        print(f"| {s['dtype']} | {s['time_ratio_vs_reference']:.2f}x | {s['memory_ratio_vs_reference']*100:.1f}% | "
              f"{s['time_ratio_vs_gemm_floor']:.2f}x |")
    payload = {**result_header("loss", "bench.loss", argv), "config": vars(args), "gemm": gemm, "results": rows,
               "scaling": scaling, "summary": summary}
    print(f"\nwrote {write_result('loss', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
