"""One measurement per fresh subprocess: SimNPO fwd+bwd of one method at one (N, d, V, dtype), or the GEMM floor,
or the oracle check of every method at one shape. Driven by ``bench.suite``; usable alone:

    python -m bench.sweep --method chunked --N 2048 --d 512 --V 32000 --dtype fp32
    python -m bench.sweep --method gemm --N 2048 --d 512 --V 32000
    python -m bench.sweep --check --N 64 --d 48 --V 300 --dtype fp32,bf16  # every method vs the fp64 oracle

Inputs: ``simnpo_fast._batch.lm_batch`` (labels sampled from the head's own softmax, no prompt; sequences of
``--seq-len`` tokens, ``N // seq_len`` of them). The valid target rows are ``M = B * (seq_len - 1)`` (HF shift):
that is the N in every FLOP count (6 M d V for fwd+bwd).

Peak memory = VmHWM during one fwd+bwd minus VmRSS just before it (inputs allocated, libraries warmed up -- and
compiled peers compiled -- by one call at ``min(N, 512)`` tokens of the same d, V), including the gradients the
call leaves in ``.grad`` (a training step must hold them). Times: the measured call plus ``--repeats - 1`` more.
``--points`` (the suite's quick mode) measures several shapes in one process, largest last: freed blocks go back
to the OS (fixed mmap threshold), so each high-water mark still starts from that point's own baseline.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from bench.common import reset_hwm, rss_kib, spread

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def inputs(N, d, V, dtype, seq_len=256, seed=0):
    from simnpo_fast._batch import lm_batch

    T = min(seq_len, N)
    B = max(1, N // T)
    h, W, labels = lm_batch(B, T, d, V, dtype=dtype, prompt_frac=0.0, seed=seed)
    return h, W, labels


def valid_rows(N, seq_len=256):
    T = min(seq_len, N)
    return max(1, N // T) * (T - 1)


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


def _gemm(args, dtype, N=None, d=None, V=None):
    import torch

    from bench.common import median_time

    N, d, V = N or args.N, d or args.d, V or args.V
    M = valid_rows(N, args.seq_len)
    x = torch.randn(M, d).to(dtype)
    w = torch.randn(V, d).to(dtype)
    g = torch.randn(M, V).to(dtype)
    torch.mm(x[:64], w.t())  # library start-up
    # outputs preallocated: the floor is the GEMMs alone, not the page faults of a fresh [M, V] result
    o_z, o_dx, o_dw = torch.empty(M, V, dtype=dtype), torch.empty(M, d, dtype=dtype), torch.empty(V, d, dtype=dtype)
    out = {}
    for k, f in (("logits", lambda: torch.mm(x, w.t(), out=o_z)), ("dx", lambda: torch.mm(g, w, out=o_dx)),
                 ("dw", lambda: torch.mm(g.t(), x, out=o_dw))):
        t, ts = median_time(f, args.repeats, warmup=1)
        out[k] = t
    floor = out["logits"] + out["dx"] + out["dw"]
    return {"method": "gemm", "dtype": args.dtype, "N": N, "M": M, "d": d, "V": V,
            "t_logits": out["logits"], "t_dx": out["dx"], "t_dw": out["dw"], "floor_s": floor,
            "gemm_gflops": 6 * M * d * V / floor / 1e9}


def _check(args, dtypes):
    """Every (named) method vs the fp64 oracle, for each dtype, in this one process (one start-up, one compile)."""
    import torch

    from bench import peers

    names = [n for n in args.methods.split(",") if n] or None
    methods = peers.make_methods("cuda" if torch.cuda.is_available() else "cpu", names=names)
    out = []
    for dt_name, dtype in dtypes:
        h, W, lab = inputs(args.N, args.d, args.V, dtype, args.seq_len, seed=1)
        ref = peers.fwd_bwd(peers.oracle(), h, W, lab)
        res, notes = {}, {}
        for name, m in methods.items():
            if m.fn is None:
                notes[name] = m.note
                continue
            t0 = time.perf_counter()
            res[name] = peers.check_method(m.fn, h, W, lab, ref)
            res[name]["seconds"] = time.perf_counter() - t0
            res[name]["note"] = m.note
        out.append({"check": True, "dtype": dt_name, "N": args.N, "M": int((lab[:, 1:] != -100).sum()),
                    "d": args.d, "V": args.V, "results": res, "unavailable": notes})
    return {"checks": out}


def worker(args) -> dict:
    import torch

    if args.check:
        return _check(args, [(n, getattr(torch, DTYPES[n])) for n in args.dtype.split(",")])
    dtype = getattr(torch, DTYPES[args.dtype])
    if args.method == "gemm":
        if args.points:
            return {"points": [_gemm(args, dtype, *(int(v) for v in p.split(":"))) for p in args.points.split(",")]}
        return _gemm(args, dtype)

    from bench import peers

    m = peers.make_method(args.method, "cuda" if torch.cuda.is_available() else "cpu")
    if m.fn is None:
        raise SystemExit(f"{args.method} unavailable: {m.note}")
    if args.points:  # several points in this one process (quick mode): start-up and compilation paid once
        pts = [tuple(int(v) for v in p.split(":")) for p in args.points.split(",")]
        return {"points": [_measure_point(m.fn, args, N, d, V, dtype) for N, d, V in pts]}
    return _measure_point(m.fn, args, args.N, args.d, args.V, dtype)


def _measure_point(fn, args, N, d, V, dtype) -> dict:
    import torch

    def make_step(h, W, labels):
        def step():
            h.grad = None
            W.grad = None
            loss = fn(h, W, labels)
            loss.backward()
            return loss

        return step

    # library start-up and (for compiled peers) compilation, off the books: same d, V, dtype, fewer tokens
    hw, Ww, lw = inputs(min(N, 512), d, V, dtype, args.seq_len, seed=2)
    make_step(hw.requires_grad_(), Ww.requires_grad_(), lw)()
    del hw, Ww, lw
    h, W, labels = inputs(N, d, V, dtype, args.seq_len)
    h.requires_grad_()
    W.requires_grad_()
    step = make_step(h, W, labels)
    base = rss_kib("VmRSS")
    hwm_reset = reset_hwm()
    t0 = time.perf_counter()
    loss = step()
    t_first = time.perf_counter() - t0
    peak_kib = rss_kib("VmHWM") - base
    ts = [t_first]
    for _ in range(args.repeats - 1):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    M = int((labels[:, 1:] != -100).sum())
    st = spread(ts)
    return {
        "method": args.method, "dtype": args.dtype, "N": N, "M": M, "d": d, "V": V,
        **st, "times_s": ts, "gflops": 6 * M * d * V / st["median_s"] / 1e9,
        "peak_extra_mib": peak_kib / 1024, "hwm_reset": hwm_reset, "rss_base_mib": base / 1024,
        "loss": float(loss), "grad_W_norm": float(W.grad.float().norm()), "grad_h_norm": float(h.grad.float().norm()),
        "grads_mib": (W.numel() * W.element_size() + h.numel() * h.element_size()) / 2**20,
        "threads": torch.get_num_threads(), "shared_process": bool(args.points),
    }


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
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from bench.common import run_worker

    fwd = [a for a in (argv if argv is not None else sys.argv[1:])]
    print(json.dumps(run_worker("bench.sweep", fwd), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
