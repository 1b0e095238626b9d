"""GPU benchmark of the fused SimNPO loss: correctness first, then time and peak memory.

    python -m bench.gpu                        # CUDA: N=8192, d=4096, V in (32000, 128256), bf16
    python -m bench.gpu --small --device cpu   # end-to-end smoke run under TRITON_INTERPRET=1 (tiny sizes)

Methods (each computes the same SimNPO loss, mean over sequences, then dL/dhidden and dL/dweight):
  triton     simnpo_fast backend="triton" (tiled kernels, 10 NdV: see kernels/seq_logprob.py)
  chunked    simnpo_fast backend="chunked" (cuBLAS GEMMs, sequence-aligned 6 NdV schedule)
  triton-gemm simnpo_fast backend="triton-gemm" (the chunked 6 NdV schedule, cuBLAS GEMMs, Triton tile
             epilogue: kernels/epilogue.py). triton vs triton-gemm decides the CUDA default backend.
  naive      eager: full [N, V] logits, log_softmax in fp32, autograd (ReferenceBackend(dtype=None))
  torch_lce  torch.nn.functional.linear_cross_entropy(reduction="none", chunked options) + SimNPO on top
  liger      Liger FLCE (reduction="none") + SimNPO on top, if importable
  cce        Cut Cross-Entropy linear_cross_entropy(reduction="none") + SimNPO on top, if importable

Step 1 (correctness): at a small shape, every method in bf16 and fp32 against the fp64 oracle
(ReferenceBackend(torch.float64)); a method that fails its tolerance is reported and not timed.
Step 2: the measured bf16 GEMM rate (torch.mm [N, d] x [d, V]) and the 6 NdV floor at that rate.
Step 3: fwd+bwd median time (triton.testing.do_bench on CUDA, a perf_counter median on CPU) and peak memory
above the inputs (torch.cuda.max_memory_allocated) for each method and vocabulary size.
JSON goes to bench/results/gpu-<device>-<date>.json (CUDA) or a temp dir (CPU smoke run; not a result).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BETA, GAMMA = 2.5, 0.0
#: matmul flops of each design in units of N*d*V (fwd + bwd, dX and dW): the table's "NdV" column and
#: "x own" = ms / (time of those flops at the measured GEMM rate). None: implementation-dependent.
DESIGN_NDV = {"triton": 10, "triton-gemm": 6, "chunked": 6, "naive": 6, "liger": 6, "cce": 8,
              "torch_lce": None}


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
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------
# the SimNPO loss on top of per-token log-probs (for the peers that only give per-token cross-entropy)
# ------------------------------------------------------------------------------------------------------------
def simnpo_from_token_lp(lp, B, T):
    import torch.nn.functional as F

    logp = lp.float().reshape(B, T).sum(1)
    return (-(2.0 / BETA) * F.logsigmoid(-(BETA / T) * logp - GAMMA)).mean()


def make_methods(device):
    import simnpo_fast as sf
    from simnpo_fast.backends import ReferenceBackend

    def ours(backend):
        return lambda h, w, lab, B, T: sf.simnpo_loss(h.reshape(B, T, -1), w, lab.reshape(B, T), beta=BETA,
                                                       gamma=GAMMA, shift=False, backend=backend)

    methods = {"triton": ours("triton"), "triton-gemm": ours("triton-gemm"), "chunked": ours("chunked"),
               "naive": ours(ReferenceBackend(None))}
    notes = {}
    # the peers' per-token cross-entropy callables are shared with the CPU suite (bench/peers.py)
    from bench.peers import cce_ce, liger_flce_ce, torch_lce_ce

    def on_top(ce):
        return lambda h, w, lab, B, T: simnpo_from_token_lp(-ce(h, w, lab.reshape(-1)), B, T)

    builders = {"torch_lce": torch_lce_ce}
    if device == "cuda":
        builders.update(liger=liger_flce_ce, cce=lambda: cce_ce("cce"))
    else:
        notes["liger"] = notes["cce"] = "CUDA only"
    for name, build in builders.items():
        ce, note = build()
        if ce is None:
            notes[name] = note
        else:
            methods[name] = on_top(ce)
    return methods, notes


def make_inputs(N, d, V, T, dtype, device, seed=0):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    B = N // T
    h = torch.randn(B * T, d, generator=gen).to(device=device, dtype=dtype)
    w = (torch.randn(V, d, generator=gen) / d ** 0.5).to(device=device, dtype=dtype)
    lab = torch.randint(0, V, (B, T), generator=gen).to(device)
    return h, w, lab, B, T


def fwd_bwd(fn, h, w, lab, B, T):
    import torch

    hh = h.detach().requires_grad_(True)
    ww = w.detach().requires_grad_(True)
    loss = fn(hh, ww, lab.reshape(-1), B, T)
    dh, dw = torch.autograd.grad(loss, (hh, ww))
    return loss.detach(), dh, dw


def rel(a, ref):
    ref = ref.double()
    return (a.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


# tolerances: fp32 inputs -> fp32 level (TF32 off); bf16 inputs -> a few bf16 ulps (2^-8) of the largest value
TOL = {"float32": 1e-4, "bfloat16": 3e-2}


def check(methods, device, small):
    import torch

    import simnpo_fast as sf
    from simnpo_fast.backends import ReferenceBackend

    N, d, V, T = (32, 24, 70, 8) if small else (1024, 512, 5000, 128)
    oracle = lambda h, w, lab, B, T: sf.simnpo_loss(h.reshape(B, T, -1), w, lab.reshape(B, T), beta=BETA,  # noqa
                                                     gamma=GAMMA, shift=False,
                                                     backend=ReferenceBackend(torch.float64))
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        h, w, lab, B, T_ = make_inputs(N, d, V, T, dtype, device, seed=1)
        ref = fwd_bwd(oracle, h, w, lab, B, T_)
        for name, fn in methods.items():
            key = f"{name}/{str(dtype).split('.')[-1]}"
            try:
                got = fwd_bwd(fn, h, w, lab, B, T_)
                errs = {k: rel(a, r) for k, a, r in zip(("loss", "dhidden", "dweight"), got, ref)}
                tol = TOL[str(dtype).split(".")[-1]]
                out[key] = {**errs, "tol": tol, "ok": all(e <= tol for e in errs.values())}
            except Exception as e:
                out[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"shape": {"N": N, "d": d, "V": V, "T": T}, "results": out}


def _time(fn, device, reps):
    import torch

    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=max(50, reps), return_mode="median")
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return statistics.median(ts)


def gemm_rate(N, d, V, device, dtype):
    """Measured rate (TFLOP/s) of the logits GEMM [N, d] x [d, V] in the benchmark dtype."""
    import torch

    a = torch.randn(N, d, device=device, dtype=dtype)
    b = torch.randn(V, d, device=device, dtype=dtype)
    ms = _time(lambda: torch.mm(a, b.t()), device, 20 if device == "cuda" else 3)
    return 2.0 * N * d * V / (ms * 1e-3) / 1e12, ms


def run(argv=None):
    args = _parse(argv)
    device = args.device or ("cuda" if _cuda() else "cpu")
    if device == "cpu":
        # must precede the first import of the kernel module (the jit functions bind at import)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    small = args.small or device == "cpu"
    N = args.tokens or (64 if small else 8192)
    d = args.dim or (48 if small else 4096)
    vocabs = args.vocab or ([100, 250] if small else [32000, 128256])
    T = args.seq_len or (16 if small else 512)
    if N % T:
        raise SystemExit(f"--tokens {N} must be a multiple of --seq-len {T}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 GEMMs are emulated on CPU
    reps = 20 if device == "cuda" else 2

    methods, notes = make_methods(device)
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    info = _machine(device)
    report = {"machine": info, "config": {"N": N, "d": d, "V": vocabs, "T": T, "dtype": str(dtype),
                                          "beta": BETA, "gamma": GAMMA, "small": small},
              "notes": notes, "design_NdV": DESIGN_NDV, "timing": {}}
    if device == "cpu":
        report["notes"]["smoke"] = "CPU run under TRITON_INTERPRET=1: timings are meaningless, not a result"

    bad = set()
    if not args.skip_check:
        chk = check(methods, device, small)
        report["correctness"] = chk
        print(f"\ncorrectness vs fp64 oracle at {chk['shape']}  (relative max error; tol fp32 {TOL['float32']}, "
              f"bf16 {TOL['bfloat16']})")
        print(f"{'method/dtype':<20}{'loss':>11}{'dhidden':>11}{'dweight':>11}  ok")
        for k, r in chk["results"].items():
            if "error" in r:
                print(f"{k:<20}  ERROR {r['error'][:80]}")
            else:
                print(f"{k:<20}{r['loss']:>11.2e}{r['dhidden']:>11.2e}{r['dweight']:>11.2e}  {r['ok']}")
            if not r["ok"] and k.endswith("bfloat16"):
                bad.add(k.split("/")[0])
        for m in sorted(bad):
            report["notes"][m] = (report["notes"].get(m, "") + " failed the bf16 correctness check: not timed").strip()

    for V in vocabs:
        rate, gemm_ms = gemm_rate(N, d, V, device, dtype)
        floor_ms = 6.0 * N * d * V / (rate * 1e12) * 1e3
        entry = {"gemm_tflops": rate, "gemm_ms": gemm_ms, "floor_6NdV_ms": floor_ms, "methods": {}}
        h, w, lab, B, T_ = make_inputs(N, d, V, T, dtype, device)
        for name, fn in methods.items():
            if name in bad:
                continue
            res = {}
            try:
                step = lambda: fwd_bwd(fn, h, w, lab, B, T_)  # noqa: E731
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    out = step()
                    torch.cuda.synchronize()
                    res["peak_above_inputs_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                    res["grads_MiB"] = sum(t.numel() * t.element_size() for t in out[1:]) / 2 ** 20
                    del out
                else:
                    step()
                res["ms"] = _time(step, device, reps)
                res["x_floor"] = res["ms"] / floor_ms
                res["design_NdV"] = DESIGN_NDV.get(name)
                if res["design_NdV"]:
                    res["x_own_flops"] = res["ms"] / (floor_ms * res["design_NdV"] / 6.0)
            except Exception as e:
                res["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            entry["methods"][name] = res
        naive = entry["methods"].get("naive", {})
        for name, res in entry["methods"].items():
            if "peak_above_inputs_MiB" in res and "peak_above_inputs_MiB" in naive:
                extra = res["peak_above_inputs_MiB"] - res["grads_MiB"]
                nextra = naive["peak_above_inputs_MiB"] - naive["grads_MiB"]
                res["extra_MiB"] = extra
                res["extra_vs_naive"] = extra / nextra if nextra > 0 else None
        report["timing"][str(V)] = entry
        _print_table(V, N, d, entry)

    out_dir = Path(args.out) if args.out else (RESULTS if device == "cuda" else Path(tempfile.mkdtemp(prefix="bench-gpu-")))
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = info.get("gpu", "cpu").replace("NVIDIA ", "").split()[0].lower() if device == "cuda" else "cpu"
    path = out_dir / f"gpu-{tag}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")
    for k, v in report["notes"].items():
        print(f"note: {k}: {v}")
    return report, path


def _print_table(V, N, d, e):
    print(f"\nN={N} d={d} V={V}: GEMM {e['gemm_tflops']:.1f} TFLOP/s, 6NdV floor {e['floor_6NdV_ms']:.3f} ms")
    print(f"{'method':<12}{'NdV':>4}{'ms':>10}{'x floor':>9}{'x own':>7}{'peak MiB':>11}{'extra MiB':>11}"
          f"{'vs naive':>9}")
    for name, r in e["methods"].items():
        if "error" in r:
            print(f"{name:<12}  ERROR {r['error'][:90]}")
            continue

        def f(k, fmt):
            v = r.get(k)
            width = int(fmt.split(".")[0])
            return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(width)

        ndv = DESIGN_NDV.get(name)
        print(f"{name:<12}{(str(ndv) if ndv else '?'):>4}{f('ms', '10.3f')}{f('x_floor', '9.2f')}"
              f"{f('x_own_flops', '7.2f')}{f('peak_above_inputs_MiB', '11.0f')}"
              f"{f('extra_MiB', '11.0f')}{f('extra_vs_naive', '9.3f')}")


def _cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _machine(device):
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def main(argv=None):
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
