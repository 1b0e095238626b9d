"""SimNPO fwd+bwd: chunked (fused, CPU path) vs reference (naive full logits), plus the GEMM floor.

    python -m bench.loss                      # N=2048 (8 x 256), d=512, V=32000, fp32 + bf16
    python -m bench.loss --dtypes fp32 --repeats 3 --out /tmp/x

Every measurement runs in a fresh subprocess.

* Peak memory: one worker per variant with glibc's mmap threshold fixed (freed blocks go back to the OS, see
  ``bench.common.run_worker``); the RSS high-water mark (VmHWM) reached during one fwd+bwd minus the RSS
  just before it (inputs allocated, libraries warmed up on a small shape; the gradients it leaves count,
  since a training step must hold them).
* Time: ``--rounds`` rounds of one worker per variant, alternating (reference, chunked, reference, ...) so
  that drift of a shared VM hits both alike; each worker runs one warm-up fwd+bwd and ``--repeats`` timed
  ones with glibc's default allocator settings (how a program runs); the median is over all rounds.
* The GEMM floor is the time of the three GEMMs any exact method must run (logits, dX, dW: 6NdV flops),
  measured in the same run at the same shapes and dtype.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from bench.common import machine_info, median_time, reset_hwm, rss_kib, run_worker, write_result

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
VARIANTS = ("reference", "chunked")


def _inputs(N, d, V, dtype, seq_len=256, seed=0):
    """Labels sampled from the head's own softmax (mean log p ~ -1.3 nats), no prompt: every token counts."""
    from simnpo_fast._batch import lm_batch

    B = max(1, N // seq_len)
    h, W, labels = lm_batch(B, seq_len, d, V, dtype=dtype, prompt_frac=0.0, seed=seed)
    return h.requires_grad_(), W.requires_grad_(), labels


def worker(args) -> dict:
    import torch

    import simnpo_fast as sf

    dtype = getattr(torch, DTYPES[args.dtype])
    N, d, V = args.N, args.d, args.V
    if args.variant == "gemm":
        x = torch.randn(N, d).to(dtype)
        w = torch.randn(V, d).to(dtype)
        g = torch.randn(N, V).to(dtype)
        # outputs preallocated: the floor is the GEMMs alone, not the page faults of a fresh [N, V] result
        o_fwd = torch.empty(N, V, dtype=dtype)
        o_dx, o_dw = torch.empty(N, d, dtype=dtype), torch.empty(V, d, dtype=dtype)
        t_fwd, _ = median_time(lambda: torch.mm(x, w.t(), out=o_fwd), args.repeats)
        t_dx, _ = median_time(lambda: torch.mm(g, w, out=o_dx), args.repeats)
        t_dw, _ = median_time(lambda: torch.mm(g.t(), x, out=o_dw), args.repeats)
        floor = t_fwd + t_dx + t_dw
        return {"variant": "gemm", "dtype": args.dtype, "t_logits": t_fwd, "t_dx": t_dx, "t_dw": t_dw,
                "floor_s": floor, "gemm_gflops": 6 * N * d * V / floor / 1e9}

    def make_step(h, W, labels):
        def step():
            h.grad = None
            W.grad = None
            loss = sf.simnpo_loss(h, W, labels, beta=2.5, backend=args.variant)
            loss.backward()
            return loss

        return step

    h, W, labels = _inputs(N, d, V, dtype)
    step = make_step(h, W, labels)
    out = {"variant": args.variant, "dtype": args.dtype, "N": N, "d": d, "V": V, "phase": args.phase}
    if args.phase == "time":
        t, ts = median_time(step, args.repeats, warmup=1)
        return dict(out, median_s=t, times_s=ts)
    make_step(*_inputs(512, d, 1024, dtype))()  # library start-up (thread pools, GEMM buffers) off the books
    base = rss_kib("VmRSS")
    hwm_reset = reset_hwm()
    loss = step()
    peak_kib = rss_kib("VmHWM") - base
    return dict(
        out, peak_extra_mib=peak_kib / 1024, hwm_reset=hwm_reset,
        loss=float(loss.detach()), grad_W_norm=float(W.grad.float().norm()), grad_h_norm=float(h.grad.float().norm()),
        grads_mib=(W.numel() * W.element_size() + h.numel() * h.element_size()) / 2**20,
    )


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
        print(json.dumps(worker(args)))
        return 0

    common = ["--N", str(args.N), "--d", str(args.d), "--V", str(args.V), "--repeats", str(args.repeats)]
    rows, gemm = [], {}
    for dt in args.dtypes.split(","):
        gemm[dt] = run_worker("bench.loss", ["--variant", "gemm", "--dtype", dt, *common], exact_rss=False)
        mem = {v: run_worker("bench.loss", ["--variant", v, "--dtype", dt, "--phase", "memory", *common])
               for v in VARIANTS}
        times = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v in VARIANTS:
                r = run_worker("bench.loss", ["--variant", v, "--dtype", dt, "--phase", "time", *common],
                               exact_rss=False)
                times[v] += r["times_s"]
        for v in VARIANTS:
            r = dict(mem[v], median_s=statistics.median(times[v]), times_s=times[v])
            rows.append(r)
            print(f"{dt:5s} {v:10s} {r['median_s']*1e3:9.1f} ms  peak +{r['peak_extra_mib']:8.1f} MiB", flush=True)
    scaling = []
    for n in [int(s) for s in args.scaling.split(",") if s]:
        r = run_worker("bench.loss", ["--variant", "chunked", "--dtype", "fp32", "--N", str(n), "--d", str(args.d),
                                      "--V", str(args.V), "--phase", "memory"])
        scaling.append(r)
        print(f"fp32  chunked N={n:<6d} peak +{r['peak_extra_mib']:8.1f} MiB (grads {r['grads_mib']:.1f} MiB)")

    summary = []
    for dt in args.dtypes.split(","):
        ref = next(r for r in rows if r["dtype"] == dt and r["variant"] == "reference")
        ch = next(r for r in rows if r["dtype"] == dt and r["variant"] == "chunked")
        summary.append({
            "dtype": dt,
            "time_ratio_vs_reference": ch["median_s"] / ref["median_s"],
            "memory_ratio_vs_reference": ch["peak_extra_mib"] / ref["peak_extra_mib"],
            "time_ratio_vs_gemm_floor": ch["median_s"] / gemm[dt]["floor_s"],
            "reference_vs_gemm_floor": ref["median_s"] / gemm[dt]["floor_s"],
            "loss_rel_diff": abs(ch["loss"] - ref["loss"]) / abs(ref["loss"]),
            "grad_W_norm_rel_diff": abs(ch["grad_W_norm"] - ref["grad_W_norm"]) / ref["grad_W_norm"],
        })
    print("\n| dtype | chunked / reference time | chunked / reference peak memory | chunked / GEMM floor |")
    print("|---|---|---|---|")
    for s in summary:
        print(f"| {s['dtype']} | {s['time_ratio_vs_reference']:.2f}x | {s['memory_ratio_vs_reference']*100:.1f}% | "
              f"{s['time_ratio_vs_gemm_floor']:.2f}x |")
    payload = {"benchmark": "loss", "command": "python -m bench.loss " + " ".join(argv or sys.argv[1:]),
               "machine": machine_info(), "config": vars(args), "gemm": gemm, "results": rows,
               "scaling": scaling, "summary": summary}
    path = write_result("loss", payload, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
