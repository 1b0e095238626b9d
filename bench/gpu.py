"""GPU benchmark of the fused SimNPO loss: every method of bench/methods.py checked against the fp64 oracle, then
fwd+bwd time and peak memory above the inputs, against the 6NdV GEMM floor.

    python -m bench.gpu                        # CUDA: N=8192, d=4096, V in (32000, 128256), bf16
    python -m bench.gpu --small --device cpu   # end-to-end smoke run under TRITON_INTERPRET=1 (tiny sizes)

Inputs: ``harness.lm_inputs`` (sequences of ``--seq-len`` tokens, labels sampled from the head, no prompt; after
the HF shift ``M = B * (seq_len - 1)`` answer rows, the M of every FLOP count).
Step 1 (correctness): at a small shape, every method in bf16 and fp32 against the fp64 oracle
(``harness.check_method``); a method that fails in bf16 is reported and not timed.
Step 2: the GEMM floor, the three GEMMs of 6 M d V flops timed into preallocated outputs (``harness.gemm_floor``).
Step 3: fwd+bwd median time (``triton.testing.do_bench`` on CUDA, a perf_counter median on CPU) and the peak
allocated memory above the inputs (CUDA) of each method and vocabulary size. ``x own`` divides the time by that
of the design's own matmul flops (``methods.DESIGN_NDV``) at the floor's rate.
Filtered variants (``FILTERED``, unless ``--no-filter``): ``triton+filter`` is ``triton`` with ``grad_filter="on"``
(``simnpo_fast/backends/filter.py``: the fused kernels skip the backward tiles of dropped rows and of entries
below 2^-12), timed next to the exact ``triton`` whatever its check (its error is the filter's, reported), with
what the filter kept (``filter_stats``: rows, tiles). The inputs' softmax is that of a random head: few tiles can
be skipped, so this times the filter's cost; its gain needs a trained model's peaked softmax (``bench.filtering``).
JSON: bench/results/gpu-<gpu>-<date>.json (CUDA) or a temporary folder (CPU smoke run; not a result).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback

from bench.harness import (BETA, GAMMA, RESULTS, check_methods, cuda_median_s, cuda_peak_mib, fwd_bwd, gemm_floor,
                           lm_inputs, median_time, result_header, valid_rows, write_result)
from bench.methods import DESIGN_NDV, METHOD_NAMES, make_methods as _table

#: the CPU smoke run skips the peers that compile (minutes under the interpreter for no result)
SMOKE_METHODS = ("naive", "chunked", "triton", "triton-gemm", "torch_lce")
#: filtered variants, timed when their exact method is: name -> (backend, grad_filter)
FILTERED = {"triton+filter": ("triton", "on")}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (interpreter)")
    p.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument("--tokens", type=int, default=None, help="N (default 8192; --small: 64)")
    p.add_argument("--dim", type=int, default=None, help="d (default 4096; --small: 48)")
    p.add_argument("--vocab", type=int, nargs="+", default=None, help="V list (default 32000 128256)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; --small 16)")
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--out", default=None, help="output folder (default bench/results on CUDA, a temp dir on CPU)")
    p.add_argument("--skip-check", action="store_true", help="time without the correctness step")
    p.add_argument("--no-filter", action="store_true", help="no filtered variant (FILTERED)")
    return p.parse_args(argv)


def make_methods(device: str, names=None, filtered: bool = True):
    """``({name: fn}, {name: why not here})`` of the method table's methods for ``device``, plus the
    ``FILTERED`` variants of the methods there (``filtered``)."""
    table = _table(device, names=names or (METHOD_NAMES if device == "cuda" else SMOKE_METHODS))
    fns = {n: m.fn for n, m in table.items() if m.fn is not None}
    for name, (base, spec) in FILTERED.items():
        if filtered and base in fns:
            fns[name] = _filtered_simnpo(base, spec)
    return fns, {n: m.note for n, m in table.items() if m.fn is None}


def _filtered_simnpo(backend: str, spec):
    import simnpo_fast as sf

    return lambda h, w, lab: sf.simnpo_loss(h, w, lab, beta=BETA, gamma=GAMMA, backend=backend, grad_filter=spec)


def check(methods: dict, device: str, small: bool) -> dict:
    """Every method vs the fp64 oracle in bf16 and fp32: ``{"shape": ..., "results": {"name/dtype": errors}}``."""
    import torch

    N, d, V, T = (32, 24, 70, 8) if small else (1024, 512, 5000, 128)
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        h, w, lab = lm_inputs(N, d, V, dtype, T, seed=1, device=device)
        for name, res in check_methods(methods, h, w, lab).items():
            out[f"{name}/{str(dtype).split('.')[-1]}"] = res
    return {"shape": {"N": N, "d": d, "V": V, "T": T}, "results": out}


def _print_check(chk: dict) -> set:
    """Print the check table; returns the methods that failed in bf16 (not timed)."""
    print(f"\ncorrectness vs fp64 oracle at {chk['shape']}  (relative max error)")
    print(f"{'method/dtype':<24}{'loss':>11}{'dhidden':>11}{'dweight':>11}  ok")
    bad = set()
    for k, r in chk["results"].items():
        if "error" in r:
            print(f"{k:<24}  ERROR {r['error'][:80]}")
        else:
            print(f"{k:<24}{r['loss']:>11.2e}{r['dhidden']:>11.2e}{r['dweight']:>11.2e}  {r['ok']}")
        if not r["ok"] and k.endswith("bfloat16"):
            bad.add(k.split("/")[0])
    return bad


def measure(name: str, fn, inputs, device: str, floor_ms: float, reps: int) -> dict:
    """Peak memory above the inputs (CUDA) and median fwd+bwd time of one method."""
    step = lambda: fwd_bwd(fn, *inputs)  # noqa: E731
    res = {}
    try:
        if device == "cuda":
            out, res["peak_above_inputs_MiB"] = cuda_peak_mib(step)
            res["grads_MiB"] = sum(t.numel() * t.element_size() for t in out[1:]) / 2**20
            del out
            res["ms"] = cuda_median_s(step, reps) * 1e3
        else:
            step()
            res["ms"] = median_time(step, reps)[0] * 1e3
        res["x_floor"] = res["ms"] / floor_ms
        res["design_NdV"] = DESIGN_NDV.get(name)
        if res["design_NdV"]:
            res["x_own_flops"] = res["ms"] / (floor_ms * res["design_NdV"] / 6.0)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    return res


def time_vocab(methods: dict, N: int, d: int, V: int, T: int, dtype, device: str, reps: int) -> dict:
    floor = gemm_floor(valid_rows(N, T), d, V, dtype, 20 if device == "cuda" else 3, device)
    floor_ms = floor["floor_s"] * 1e3
    entry = {"gemm": floor, "gemm_tflops": floor["gemm_gflops"] / 1e3, "gemm_ms": floor["t_logits"] * 1e3,
             "floor_6NdV_ms": floor_ms, "methods": {}}
    inputs = lm_inputs(N, d, V, dtype, T, device=device)
    for name, fn in methods.items():
        entry["methods"][name] = measure(name, fn, inputs, device, floor_ms, reps)
        if name in FILTERED:  # what the filter kept in the last timed call
            from simnpo_fast.backends import get_backend

            entry["methods"][name]["filter_stats"] = get_backend(FILTERED[name][0], inputs[0].device).last_filter_stats
    naive = entry["methods"].get("naive", {})
    for res in entry["methods"].values():
        if "peak_above_inputs_MiB" in res and "peak_above_inputs_MiB" in naive:
            extra = res["peak_above_inputs_MiB"] - res["grads_MiB"]
            nextra = naive["peak_above_inputs_MiB"] - naive["grads_MiB"]
            res["extra_MiB"] = extra
            res["extra_vs_naive"] = extra / nextra if nextra > 0 else None
    return entry


def run(argv=None):
    args = _parse(argv)
    device = args.device or ("cuda" if _cuda() else "cpu")
    if device == "cpu":
        # must precede the first import of the kernel module (the jit functions bind at import)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    small = args.small or device == "cpu"
    N, d = args.tokens or (64 if small else 8192), args.dim or (48 if small else 4096)
    vocabs = args.vocab or ([100, 250] if small else [32000, 128256])
    T = args.seq_len or (16 if small else 512)
    if N % T:
        raise SystemExit(f"--tokens {N} must be a multiple of --seq-len {T}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 GEMMs are emulated on CPU
    methods, notes = make_methods(device, args.methods, filtered=not args.no_filter)
    report = {**result_header("gpu", "bench.gpu", argv), "config": {
        "N": N, "M": valid_rows(N, T), "d": d, "V": vocabs, "T": T, "dtype": str(dtype), "beta": BETA,
        "gamma": GAMMA, "small": small, "device": device}, "notes": notes, "design_NdV": DESIGN_NDV, "timing": {}}
    if device == "cpu":
        report["notes"]["smoke"] = "CPU run under TRITON_INTERPRET=1: timings are meaningless, not a result"
    if not args.skip_check:
        report["correctness"] = check(methods, device, small)
        for m in sorted(_print_check(report["correctness"])):
            if m in FILTERED:  # its error is the filter's: timed next to the exact method all the same
                report["notes"][m] = "outside the bf16 check's tolerance (the filter's error): timed anyway"
                continue
            report["notes"][m] = (report["notes"].get(m, "") + " failed the bf16 correctness check: not timed").strip()
            methods.pop(m)
    for V in vocabs:
        report["timing"][str(V)] = time_vocab(methods, N, d, V, T, dtype, device, 20 if device == "cuda" else 2)
        _print_table(V, N, d, report["timing"][str(V)])
    out_dir = args.out or (RESULTS if device == "cuda" else tempfile.mkdtemp(prefix="bench-gpu-"))
    path = write_result("gpu", report, out_dir)
    print(f"\nwrote {path}")
    for k, v in report["notes"].items():
        print(f"note: {k}: {v}")
    return report, path


def _print_table(V, N, d, e):
    print(f"\nN={N} d={d} V={V}: GEMM {e['gemm_tflops']:.1f} TFLOP/s, 6NdV floor {e['floor_6NdV_ms']:.3f} ms")
    print(f"{'method':<14}{'NdV':>4}{'ms':>10}{'x floor':>9}{'x own':>7}{'peak MiB':>11}{'extra MiB':>11}"
          f"{'vs naive':>9}")
    for name, r in e["methods"].items():
        if "error" in r:
            print(f"{name:<14}  ERROR {r['error'][:90]}")
            continue

        def f(k, fmt):
            v = r.get(k)
            return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(int(fmt.split(".")[0]))

        ndv = DESIGN_NDV.get(name)
        print(f"{name:<14}{(str(ndv) if ndv else '?'):>4}{f('ms', '10.3f')}{f('x_floor', '9.2f')}"
              f"{f('x_own_flops', '7.2f')}{f('peak_above_inputs_MiB', '11.0f')}"
              f"{f('extra_MiB', '11.0f')}{f('extra_vs_naive', '9.3f')}")
        if r.get("filter_stats"):
            print(f"{'':<14}kept: " + ", ".join(f"{k} {v:.3f}" for k, v in r["filter_stats"].items()))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def main(argv=None):
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
