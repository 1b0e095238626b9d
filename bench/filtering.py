"""Gradient filtering on realistic softmaxes: how sparse they are, and what filtering buys against the dense
methods and the peers (``simnpo_fast/backends/filter.py``).

    python -m bench.filtering sparsity          # kept fractions on the trained model + the entropy sweep (~3 min)
    python -m bench.filtering loss              # time, memory, error vs fp64 (~30 min on an AVX2 CPU: bf16 peers crawl)
    python -m bench.filtering loss --dtypes fp32 --rounds 2 --out /tmp/x
    python -m bench.filtering dtypes --dtypes fp32,bf16 --rounds 4   # our dense path: bf16 vs fp32 time

Inputs: the final hidden states, LM head and next tokens of ``bench.trained_model`` (built and cached on first
use) on 8 windows of 256 tokens of its training stream (N = 2040 answer rows, d = 512, V = 32000), every token an
answer token; the *entropy sweep* scales those hidden states (``h -> a h``) so that the mean softmax entropy per
token is 0.5 ... 8 nats. SimNPO (beta 2.5, gamma 0) over the 8 sequences.

* ``sparsity``: per eps, on each sequence's 255 rows (the chunked backend's one-sequence tiles): the fraction
  of a row's entries with ``p >= eps`` or the target, the probability mass that leaves out, and, for blocks of
  ``R_b`` rows, the fraction of columns some row of the block needs (the share of the products the chunked
  filter keeps); the share of ``128 x 128`` (token x vocabulary) tiles the fused kernel keeps, with the
  vocabulary in its own order and sorted by token frequency in the training stream (CCE's vocabulary sorting);
  per sequence, SimNPO's saturation (what the row filter compares with its threshold).
* ``loss``: fresh-process workers (``bench.harness``), alternating rounds; per variant the median fwd+bwd time,
  the RSS peak above the inputs, the kept fractions (ours) and the relative Frobenius error of the loss, dX and dW
  against the fp64 oracle on the same (rounded) inputs; the GEMM floor is the three dense products timed in the
  dtype our path runs them in (fp32 for bf16 on a CPU without fast bf16 GEMMs: ``backends/lowp.py``), in every
  round of the alternation (its median round is the floor).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

from bench import trained_model as tm
from bench.harness import (DTYPES, alternate, emit, fwd_bwd_memory, fwd_bwd_step, gemm_floor, median_time,
                           result_header, run_worker, write_result)
from bench.harness.machine import load_average

EPS = (2.0 ** -12, 2.0 ** -10, 2.0 ** -8)
BLOCK_ROWS = (1, 8, 16, 32, 64, 128, 256)
ENTROPIES = (0.5, 1.0, 2.0, 4.0, 6.0, 8.0)
N_SEQS, SEQ_LEN = 8, 256


def batch(scale: float = 1.0):
    """``(hidden [8, 256, d] fp32, W [V, d] fp32, labels [8, 256])`` of the cached trained model."""
    import torch

    folder = tm.build(tm.parse([]), log=lambda m: print(m, file=sys.stderr))
    path = folder / f"batch-{N_SEQS}x{SEQ_LEN}.pt"
    if not path.exists():
        torch.save(tm.hidden_batch(folder, N_SEQS, SEQ_LEN), path)
    h, w, labels = torch.load(path)
    return h * scale, w, labels


def token_frequency():
    import torch

    folder = tm.build(tm.parse([]), log=lambda m: print(m, file=sys.stderr))
    stream = torch.load(folder / "streams.pt")["train"]
    V = tm.load(folder)[3]["vocab_size"]
    return torch.bincount(stream, minlength=V).float()


def probs_rows(h, w, labels):
    """Per sequence (the chunked schedule's one-sequence tiles, HF shift), fp32: yields ``(p [T - 1, V], targets)``."""
    import torch

    for i in range(h.shape[0]):
        yield torch.softmax(h[i, :-1] @ w.t(), dim=-1), labels[i, 1:]


def union_fraction(big, rows: int, cols: int = 1) -> float:
    """Share of the entries of ``big [R, V]`` in kept (``rows`` x ``cols``) blocks (a block is kept when any of
    its entries is); a last partial block counts for its own rows."""
    R, V = big.shape
    kept = 0.0
    for r0 in range(0, R, rows):
        blk = big[r0 : r0 + rows].any(0)
        if cols > 1:  # V = 32000 is a multiple of 128
            blk = blk[: V // cols * cols].view(-1, cols).any(1)
        kept += float(blk.float().mean()) * min(rows, R - r0)
    return kept / R


def sample_logits(h, w, max_rows: int = 512):
    """fp32 logits of the first ``max_rows`` packed rows: the entropy of ``softmax(a h W^T)`` is that of ``a z``."""
    return h[:, :-1].reshape(-1, h.shape[-1])[:max_rows] @ w.t()


def mean_entropy(z, a: float = 1.0) -> float:
    """Mean entropy (nats) of ``softmax(a z)`` over the rows of ``z``."""
    import torch

    logp = torch.log_softmax(a * z, dim=-1)
    return float(-(logp.exp() * logp).sum(1).mean())


def scale_for_entropy(z, target: float) -> float:
    """The factor ``a`` with mean entropy of ``softmax(a z)`` = ``target`` (bisection on a log scale)."""
    lo, hi = 1e-3, 1e2
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        if mean_entropy(z, mid) > target:  # entropy falls as the logits grow
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


def saturation(h, w, labels) -> dict:
    """Per sequence: mean answer log-likelihood per token and SimNPO's saturation ``|g_i| / G_i`` =
    ``sigmoid((beta/n) logp + gamma)`` (what the row filter compares with ``rows``)."""
    import torch

    from bench.harness import BETA, GAMMA

    lp = torch.log_softmax(h[:, :-1] @ w.t(), -1).gather(-1, labels[:, 1:, None]).squeeze(-1).mean(1)
    return {"loglik_per_token": lp.tolist(), "simnpo_saturation": torch.sigmoid(BETA * lp + GAMMA).tolist()}


def kept_fractions(h, w, labels, freq) -> dict:
    """Per eps: entries per row, column unions per block of rows, fused-kernel tiles (own / sorted order)."""
    import torch

    order = torch.argsort(freq, descending=True)
    keys = ("row", "dropped_mass", *(f"block{b}" for b in BLOCK_ROWS), "tiles", "tiles_sorted")
    out = {str(e): {k: [] for k in keys} for e in EPS}
    for p, tgt in probs_rows(h, w, labels):
        for e in EPS:
            big = p >= e
            big[torch.arange(len(tgt)), tgt] = True  # targets are always kept
            rec = out[str(e)]
            rec["row"].append(float(big.float().mean()))
            rec["dropped_mass"].append(float(torch.where(big, 0.0, p).sum(1).mean()))
            for b in BLOCK_ROWS:
                rec[f"block{b}"].append(union_fraction(big, b))
            rec["tiles"].append(union_fraction(big, 128, 128))
            rec["tiles_sorted"].append(union_fraction(big[:, order], 128, 128))
    return {e: {k: statistics.mean(v) for k, v in rec.items() if v} for e, rec in out.items()}


def sparsity(args) -> dict:
    h, w, labels = batch()
    freq, z = token_frequency(), sample_logits(h, w)
    base = {"entropy_nats": mean_entropy(z), "kept": kept_fractions(h, w, labels, freq), **saturation(h, w, labels)}
    report("trained", base)
    sweep = []
    for target in ENTROPIES:
        a = scale_for_entropy(z, target)
        sweep.append({"target_entropy": target, "scale": a, "entropy_nats": mean_entropy(z, a),
                      "kept": kept_fractions(h * a, w, labels, freq)})
        report(f"H={target:4.1f} (a={a:.3f})", sweep[-1])
    return {"trained": base, "sweep": sweep}


def report(name: str, rec: dict) -> None:
    for e in EPS:
        k = rec["kept"][str(e)]
        print(f"{name:18s} H {rec['entropy_nats']:5.2f} nats  eps 2^{math.log2(e):.0f}: row {k['row']:.4f} "
              f"(mass dropped {k['dropped_mass']:.2e})  block8 {k['block8']:.3f}  block32 {k['block32']:.3f}  "
              f"block256 {k['block256']:.3f}  tiles {k['tiles']:.3f} / sorted {k['tiles_sorted']:.3f}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# loss: time, memory, error
# --------------------------------------------------------------------------------------------------------------
OURS = ("dense", "softmax", "filtered")  # chunked backend: exact / softmax filter only / both filters
PEERS = ("naive", "cce", "liger_chunked", "torch_lce")


def method(name: str, args):
    """``(fn(h, w, labels) -> loss, backend or None)`` of a variant."""
    import simnpo_fast as sf
    from simnpo_fast.backends import ChunkedBackend
    from simnpo_fast.backends.filter import GradFilter

    from bench.harness import BETA, GAMMA
    from bench.methods import make_method

    if name in OURS:
        be = ChunkedBackend()
        rows = args.rows if name == "filtered" else 0.0
        flt = None if name == "dense" else GradFilter(rows=rows, probs=args.eps, block_rows=args.block_rows)
        return (lambda h, w, lab: sf.simnpo_loss(h, w, lab, beta=BETA, gamma=GAMMA, backend=be,
                                                 grad_filter=flt)), be
    m = make_method(name)
    if m.fn is None:
        raise RuntimeError(f"{name} unavailable: {m.note}")
    return m.fn, None


def inputs(args):
    import torch

    h, w, labels = batch(args.scale)
    dt = getattr(torch, DTYPES[args.dtype])
    return h.to(dt).contiguous(), w.to(dt).contiguous(), labels


def oracle_path(args):
    folder = tm.build(tm.parse([]), log=lambda m: print(m, file=sys.stderr))
    return folder / f"oracle-{args.dtype}-{args.scale:.6g}.pt"


def make_oracle(args) -> None:
    """fp64 loss and gradients on the (rounded) inputs, saved for the error workers."""
    import torch

    from bench.harness.library import oracle
    from bench.harness.oracle import fwd_bwd

    path = oracle_path(args)
    if not path.exists():
        h, w, labels = inputs(args)
        loss, dh, dw = fwd_bwd(oracle(), h.double(), w.double(), labels)
        torch.save({"loss": loss, "dh": dh, "dw": dw}, path)


def errors(fn, h, w, labels, ref) -> dict:
    from bench.harness.oracle import fwd_bwd, rel_norm_err

    loss, dh, dw = fwd_bwd(fn, h, w, labels)
    return {"err_loss": abs(float(loss) - float(ref["loss"])) / abs(float(ref["loss"])),
            "err_dh": rel_norm_err(dh, ref["dh"]), "err_dw": rel_norm_err(dw, ref["dw"])}


def worker(args) -> dict:
    import torch

    out = {"variant": args.variant, "dtype": args.dtype, "scale": args.scale, "phase": args.phase}
    if args.variant == "gemm":
        dt = torch.float32 if args.dtype == "fp32" else getattr(torch, DTYPES[args.dtype])
        from simnpo_fast.backends.lowp import gemm_dtype

        dt = gemm_dtype(torch.zeros(1, dtype=dt))
        return dict(out, **gemm_floor(N_SEQS * (SEQ_LEN - 1), 512, 32000, dt, args.repeats), gemm_dtype=str(dt))
    if args.variant == "oracle":
        make_oracle(args)
        return out
    h, w, labels = inputs(args)
    fn, be = method(args.variant, args)
    if args.phase in ("error", "once"):  # once (a slow bf16 peer): errors from a first call, then one timed call
        out.update(errors(fn, h, w, labels, torch.load(oracle_path(args))))
        out["filter_stats"] = dict(be.last_filter_stats) if be is not None else None
        if args.phase == "error":
            return out
    step = fwd_bwd_step(fn, h.requires_grad_(), w.requires_grad_(), labels)
    if args.phase == "time":
        t, ts = median_time(step, args.repeats, warmup=args.warmup)
        return dict(out, median_s=t, times_s=ts)
    mem = fwd_bwd_memory(step, h, w)
    if args.phase == "once":
        mem.update(median_s=mem["first_call_s"], times_s=[mem["first_call_s"]], note="one timed call after one warm-up")
    return dict(out, **mem)


def _shape_args(args, dt: str) -> list[str]:
    return ["--dtype", dt, "--scale", str(args.scale), "--eps", str(args.eps), "--rows", str(args.rows),
            "--block-rows", str(args.block_rows)]


def safe_worker(module, wargs, exact_rss=False) -> dict:
    try:
        return run_worker(module, wargs, exact_rss=exact_rss, timeout=1800)
    except Exception as e:  # a peer that fails or is too slow here: recorded, not fatal
        return {"error": f"{type(e).__name__}: {str(e)[-600:]}"}


def slow_lowp(dt: str) -> bool:
    """Whether bf16 GEMMs crawl here (the library's probe): peers then get one timed call each."""
    if dt == "fp32":
        return False
    from bench.harness import lowp_gemm_report

    return bool(lowp_gemm_report().get("bfloat16", {}).get("slow"))


def measure(args, dt: str) -> dict:
    """Oracle, GEMM floor, then per variant its errors, memory and alternating time rounds (module docstring)."""
    sh = _shape_args(args, dt)
    run_worker("bench.filtering", ["--variant", "oracle", *sh], exact_rss=False, timeout=1800)
    peers = [v for v in args.peers.split(",") if v]
    slow = peers if slow_lowp(dt) else []
    res = {v: {} for v in [*OURS, *peers]}
    for v in [*OURS, *[p for p in peers if p not in slow]]:
        res[v].update(safe_worker("bench.filtering", ["--variant", v, "--phase", "error", *sh]))
        res[v].update(safe_worker("bench.filtering", ["--variant", v, "--phase", "memory", *sh], exact_rss=True))
    fast = [v for v in res if v not in slow]
    times = alternate("bench.filtering", ["gemm", *fast], lambda v: ["--variant", v, "--phase", "time", "--repeats",
                                                                     str(args.repeats), *sh], args.rounds,
                      exact_rss=False)  # the floor is timed in every round too: a shared machine drifts
    floors = sorted(times.pop("gemm"), key=lambda r: r["floor_s"])
    gemm = dict(floors[len(floors) // 2], floor_s_rounds=[r["floor_s"] for r in floors])
    for v in fast:
        ts = [t for r in times[v] for t in r.get("times_s", [])]
        res[v].update(median_s=statistics.median(ts) if ts else None, times_s=ts)
    for v in slow:
        res[v].update(safe_worker("bench.filtering", ["--variant", v, "--phase", "once", *sh], exact_rss=True))
    for v, r in res.items():
        ms = r.get("median_s")
        print(f"{dt:5s} {v:14s} {ms * 1e3 if ms else float('nan'):9.1f} ms  peak +{r.get('peak_extra_mib', 0):7.1f} MiB"
              f"  err dW {r.get('err_dw', float('nan')):.2e}  {r.get('filter_stats') or r.get('error', '')}",
              flush=True)
    floor = gemm.get("floor_s")
    summary = {v: {"vs_floor": r["median_s"] / floor if floor and r.get("median_s") else None,
                   "vs_dense": r["median_s"] / res["dense"]["median_s"]
                   if r.get("median_s") and res["dense"].get("median_s") else None} for v, r in res.items()}
    return {"dtype": dt, "gemm": gemm, "variants": res, "summary": summary}


def dtype_ab(args) -> dict:
    """Our dense path in fp32 and in bf16 (``backends/lowp.py`` decides its GEMM dtype), alternating round by
    round in fresh processes: is bf16 on this CPU no slower than fp32?"""
    dts = args.dtypes.split(",")
    runs = alternate("bench.filtering", dts, lambda dt: ["--variant", "dense", "--phase", "time", "--repeats",
                                                          str(args.repeats), *_shape_args(args, dt)],
                     args.rounds, exact_rss=False)
    out = {dt: {"times_s": [t for r in runs[dt] for t in r["times_s"]]} for dt in dts}
    for dt, r in out.items():
        r["median_s"] = statistics.median(r["times_s"])
        print(f"{dt}: dense {r['median_s'] * 1e3:.1f} ms (rounds: {[round(t, 2) for t in r['times_s']]})")
    return {"dtypes": out, "ratio": out[dts[-1]]["median_s"] / out[dts[0]]["median_s"]}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="loss", choices=("sparsity", "loss", "dtypes"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="dense")
    p.add_argument("--phase", default="time", choices=("time", "memory", "error", "once"), help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--scale", type=float, default=1.0, help="hidden states x this (the entropy sweep's knob)")
    p.add_argument("--eps", type=float, default=2.0 ** -12, help="softmax filter threshold")
    p.add_argument("--rows", type=float, default=1e-3, help="row filter threshold (relative to the weight bound)")
    p.add_argument("--block-rows", type=int, default=32)
    p.add_argument("--peers", default="naive,cce,liger_chunked,torch_lce")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        return emit(worker(args))
    t0, load0 = time.time(), load_average()
    if args.what == "sparsity":
        payload = sparsity(args)
    elif args.what == "dtypes":
        payload = dtype_ab(args)
    else:
        payload = {"results": [measure(args, dt) for dt in args.dtypes.split(",")]}
    folder = tm.build(tm.parse([]), log=print)
    meta = tm.load(folder)[3]
    payload = {**result_header(f"filtering-{args.what}", "bench.filtering", argv), "config": vars(args),
               "model": {k: meta[k] for k in ("corpus", "vocab_size", "final_train_loss", "heldout_loss", "model")},
               "loadavg_start": load0, **payload, "wall_s": time.time() - t0}
    print(f"wrote {write_result(f'filtering-{args.what}', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
