"""The suite's worker: SimNPO fwd+bwd of one method at one (N, d, V, dtype), or the GEMM floor, or the oracle check
of every method at one shape, in a fresh process. Driven by ``bench.suite``; usable alone:

    python -m bench.sweep --method chunked --N 2048 --d 512 --V 32000 --dtype fp32
    python -m bench.sweep --method gemm --N 2048 --d 512 --V 32000
    python -m bench.sweep --check --N 64 --d 48 --V 300 --dtype fp32,bf16  # every method vs the fp64 oracle

Inputs: ``harness.lm_inputs`` (sequences of ``--seq-len`` tokens, ``N // seq_len`` of them, no prompt). The valid
target rows are ``M = B * (seq_len - 1)`` (HF shift): that is the N in every FLOP count (6 M d V for fwd+bwd).

Peak memory = VmHWM during one fwd+bwd minus VmRSS just before it (inputs allocated, libraries warmed up -- and
compiled peers compiled -- by one call at ``min(N, 512)`` tokens of the same d, V), including the gradients the
call leaves in ``.grad``. Times: the measured call plus ``--repeats - 1`` more. ``--points`` (the suite's quick
mode) measures several shapes in one process, largest last: freed blocks go back to the OS (fixed mmap
threshold), so each high-water mark still starts from that point's own baseline.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from bench.harness import (DTYPES, check_methods, emit, fwd_bwd_memory, fwd_bwd_step, gemm_floor, lm_inputs,
                           run_worker, spread, valid_rows)
from bench.methods import make_method, make_methods

def est_peak_mib(method: str, N: int, d: int, V: int, elt: int) -> float:
    """Rough upper estimate of a method's peak above its inputs (used only to skip points that cannot fit)."""
    M = valid_rows(N)
    nv = M * V
    grads = (M * d + V * d) * elt
    if method == "naive":  # model-dtype logits, fp32 logits, fp32 log_softmax, fp32 grad, model-dtype grad
        b = nv * (4 * 3 + 2 * elt)
    elif method == "cce":  # torch_compile: full logits + fp32 softmax / grad inside the compiled graph
        b = nv * (4 * 2 + 2 * elt)
    elif method == "oracle":
        b = nv * 8 * 4
    elif method == "gemm":  # the [M, V] operand of the dX / dW GEMMs + the logits output
        b = nv * elt * 2
    else:  # chunked / tiled: row tiles + grads
        b = 64 * V * 4 * 4
    return (b + grads) / 2**20


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _gemm(args, dtype, N: int, d: int, V: int) -> dict:
    M = valid_rows(N, args.seq_len)
    return dict(gemm_floor(M, d, V, dtype, args.repeats), method="gemm", dtype=args.dtype, N=N, M=M)


def _check(args, dtypes) -> dict:
    """Every (named) method vs the fp64 oracle, for each dtype, in this one process (one start-up, one compile)."""
    names = [n for n in args.methods.split(",") if n] or None
    methods = make_methods(_device(), names=names)
    out = []
    for dt_name, dtype in dtypes:
        h, W, lab = lm_inputs(args.N, args.d, args.V, dtype, args.seq_len, seed=1)
        res = check_methods({n: m.fn for n, m in methods.items() if m.fn is not None}, h, W, lab)
        for name, r in res.items():
            r["note"] = methods[name].note
        out.append({"check": True, "dtype": dt_name, "N": args.N, "M": int((lab[:, 1:] != -100).sum()),
                    "d": args.d, "V": args.V, "results": res,
                    "unavailable": {n: m.note for n, m in methods.items() if m.fn is None}})
    return {"checks": out}


def _measure_point(fn, args, N: int, d: int, V: int, dtype) -> dict:
    import torch

    # library start-up and (for compiled peers) compilation, off the books: same d, V, dtype, fewer tokens
    hw, Ww, lw = lm_inputs(min(N, 512), d, V, dtype, args.seq_len, seed=2)
    fwd_bwd_step(fn, hw.requires_grad_(), Ww.requires_grad_(), lw)()
    del hw, Ww, lw
    h, W, labels = lm_inputs(N, d, V, dtype, args.seq_len)
    step = fwd_bwd_step(fn, h.requires_grad_(), W.requires_grad_(), labels)
    if args.what == "time":  # a full-size call off the books, then --repeats timed ones (no RSS window)
        mem = {"first_call_s": _timed(step), "timing_only": True}
        ts = []
    else:
        mem = fwd_bwd_memory(step, h, W)
        ts = [mem["first_call_s"]]
    for _ in range(args.repeats - len(ts)):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    M = int((labels[:, 1:] != -100).sum())
    st = spread(ts)
    return {"method": args.method, "dtype": args.dtype, "N": N, "M": M, "d": d, "V": V, **st, "times_s": ts,
            "gflops": 6 * M * d * V / st["median_s"] / 1e9, **mem, "threads": torch.get_num_threads(),
            "shared_process": bool(args.points)}


def _timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def worker(args) -> dict:
    import torch

    if args.check:
        return _check(args, [(n, getattr(torch, DTYPES[n])) for n in args.dtype.split(",")])
    dtype = getattr(torch, DTYPES[args.dtype])
    points = [tuple(int(v) for v in p.split(":")) for p in args.points.split(",") if p] or \
        [(args.N, args.d, args.V)]
    if args.method == "gemm":
        measure = lambda N, d, V: _gemm(args, dtype, N, d, V)  # noqa: E731
    else:
        m = make_method(args.method, _device())
        if m.fn is None:
            raise SystemExit(f"{args.method} unavailable: {m.note}")
        measure = lambda N, d, V: _measure_point(m.fn, args, N, d, V, dtype)  # noqa: E731
    # several points in this one process (quick mode): start-up and compilation paid once
    return {"points": [measure(*p) for p in points]} if args.points else measure(*points[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help="check every method against the fp64 oracle")
    p.add_argument("--methods", default="", help="with --check: comma list (default all available)")
    p.add_argument("--method", default="chunked")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16 (--check: a comma list)")
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--points", default="", help="N:d:V,N:d:V,... measured one after the other in this process")
    p.add_argument("--what", choices=("both", "time"), default="both",
                   help="both: the first call's peak memory and time plus --repeats - 1 more; time: one untimed "
                        "full-size call, then --repeats timed ones")
    args = p.parse_args(argv)
    if args.worker:
        return emit(worker(args))
    print(json.dumps(run_worker("bench.sweep", list(argv if argv is not None else sys.argv[1:])), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
