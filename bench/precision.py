"""Numerical error of the fused losses against a float64 oracle, per dtype and regime (README "Precision").

    python -m bench.precision [--backend chunked] [--B 8] [--n 32] [--d 128] [--V 8192] [--out DIR]

Inputs are built in the dtype (bf16, fp16, fp32) and every error is measured against float64 maths on the
*same rounded inputs* (``ReferenceBackend(torch.float64)``; for KL a float64 re-implementation here):

* ``peaked``: a memorising construction -- hidden row ``h_t = a_t W[y_t] / |W[y_t]|^2 + noise`` with ``a_t``
  solved (float64 bisection) so that ``1 - p_t`` is log-uniform in [1e-6, 1e-2], i.e. target probabilities
  between 0.99 and 1 - 1e-6, as on a forget set the model has memorised;
* ``flat``: random hidden states and weights (logit std ~ 3, target probabilities ~ 1e-3): a model that has
  not seen the answers (or has unlearned them: SimNPO's weights are then saturated);
* ``saturated`` (SimNPO only): the flat inputs with ``gamma`` set so that SimNPO's weights are ~1e-7, where an
  unscaled fp16 gradient underflows and a loss scale must rescue it.

For each objective (SimNPO beta 2.5; NPO beta 0.1 with reference log-likelihoods 1 nat above the model's; retain
NLL; retain KL against a reference head 0.05 away) it reports the relative error of the loss, the RMS of the per-token
relative errors of ``lp_t`` (``lp_rms``: the loss's error as a statistic over tokens; one scalar loss error can
cancel by chance) and the relative Frobenius error of the gradients w.r.t. the LM-head weight (dW) and the hidden
states (dH), for the fused path
(``--backend``) and the naive one (``backend="reference"``: logits in the input dtype, float32 log-softmax,
autograd; for KL the same by hand). fp16 rows are also run with the upstream gradient 2^16 of a GradScaler's
first step (errors of grad / 2^16), where a gradient computed in fp16 before the scale is known underflows.

Writes ``bench/results/precision-<machine>-<date>.json`` (machine, CPU flags, command, every number) and prints
the table the README quotes. A few minutes on 2 CPU cores (bf16/fp16 GEMMs are slow on CPUs without native
16-bit matrix units; keep the shapes small there).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OBJECTIVES = ("simnpo", "npo", "nll", "kl")
IGN = -100


def code_version() -> str:
    """``git describe`` of the measured code (with ``-dirty`` if it has uncommitted changes), or '' outside git."""
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def cpu_flags() -> str:
    """The CPU feature flags that matter for GEMM speed and 16-bit arithmetic (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    keep = [f for f in line.split(":", 1)[1].split()
                            if f.startswith(("avx", "amx", "fma", "f16c", "sse4"))]
                    return " ".join(sorted(keep))
    except OSError:
        pass
    return ""


# ------------------------------------------------------------------------------------------------ inputs
def peaked_inputs(B, n, d, V, dtype, seed=0, lo=1e-6, hi=1e-2, noise=0.3):
    """``(hidden [B, n+1, d], weight [V, d], labels [B, n+1])`` in ``dtype`` whose answer tokens have
    ``1 - p_t`` log-uniform in ``[lo, hi]`` (float64 maths on the rounded inputs; position 0 is a prompt)."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(V, d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(dtype).double()
    labels = torch.randint(0, V, (B, n + 1), generator=g)
    labels[:, 0] = IGN
    y = labels[:, 1:].reshape(-1)
    want = torch.exp(torch.empty(B * n, dtype=torch.float64).uniform_(math.log(lo), math.log(hi), generator=g))
    u = W[y] / (W[y] ** 2).sum(1, keepdim=True)                       # u . W[y] = 1
    eps = torch.randn(B * n, d, generator=g, dtype=torch.float64) * noise / math.sqrt(d) * 4
    base, nz = u @ W.t(), eps @ W.t()                                 # z(a) = a * base + nz
    a_lo, a_hi = torch.zeros(B * n, dtype=torch.float64), torch.full((B * n,), 200.0, dtype=torch.float64)
    for _ in range(60):  # 1 - p_t decreases with a
        a = (a_lo + a_hi) / 2
        z = a[:, None] * base + nz
        omp = -torch.expm1(z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, 1))
        big = omp > want
        a_lo, a_hi = torch.where(big, a, a_lo), torch.where(big, a_hi, a)
    h = (a[:, None] * u + eps).reshape(B, n, d)
    h = torch.cat([h, torch.randn(B, 1, d, generator=g, dtype=torch.float64)], dim=1)  # last row: no target
    return h.to(dtype), W.to(dtype), labels


def flat_inputs(B, n, d, V, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, n + 1, d, generator=g, dtype=torch.float64)
    W = torch.randn(V, d, generator=g, dtype=torch.float64) * scale / math.sqrt(d)
    labels = torch.randint(0, V, (B, n + 1), generator=g)
    labels[:, 0] = IGN
    return h.to(dtype), W.to(dtype), labels


def ref_weight(W, seed=1, delta=0.05):
    """A frozen reference head near ``W`` (retain KL): ``W + delta * N(0, 1/d)``, rounded to W's dtype."""
    g = torch.Generator().manual_seed(seed)
    d = W.shape[1]
    return (W.double() + delta * torch.randn(W.shape, generator=g, dtype=torch.float64) / math.sqrt(d)).to(W.dtype)


# ------------------------------------------------------------------------------------------------ losses
def _kl_by_hand(h, W, labels, Wr, wide):
    """Token-mean KL(p_ref || p) over answer tokens with autograd: ``wide=float64`` is the oracle,
    ``wide=float32`` the naive path (logits in the input dtype, widened, float32 log-softmax)."""
    x, y = h[:, :-1], labels[:, 1:]
    mask = y != IGN
    if wide == torch.float64:
        z, zr = x.double() @ W.double().t(), x.detach().double() @ Wr.double().t()
    else:
        z, zr = (x @ W.t()).float(), (x.detach() @ Wr.t()).float()
    lp, lq = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    return (kl * mask).sum() / mask.sum()


def loss_fn(objective, backend, ref_logp=None, Wr=None, gamma=0.0):
    import simnpo_fast as sf

    def f(h, W, labels):
        if objective == "simnpo":
            return sf.simnpo_loss(h, W, labels, beta=2.5, gamma=gamma, backend=backend)
        if objective == "npo":
            return sf.npo_loss(h, W, labels, ref_logp, beta=0.1, backend=backend)
        if objective == "nll":
            return sf.nll_loss(h, W, labels, backend=backend)
        if backend == "oracle":
            return _kl_by_hand(h, W, labels, Wr, torch.float64)
        if backend == "reference":
            return _kl_by_hand(h, W, labels, Wr, torch.float32)
        return sf.kl_loss(h, W, labels, h.detach(), Wr)
    return f


def grads(f, h, W, labels, upstream=1.0, leaf_dtype=None):
    """``(loss, dW, dH)`` of ``upstream * f`` divided by ``upstream``; ``leaf_dtype=float64`` for the oracle (the
    same values, but gradients not rounded to the input dtype)."""
    hh, WW = (t.detach().to(leaf_dtype or t.dtype, copy=True).requires_grad_(True) for t in (h, W))
    loss = f(hh, WW, labels)
    (loss * upstream).backward()
    return loss.detach().double(), WW.grad.double() / upstream, hh.grad.double() / upstream


def token_lp(h, W, labels, backend):
    """Per-answer-token ``lp_t`` through the public API (each token a one-token sequence, no shift)."""
    import simnpo_fast as sf

    x, y = h[:, :-1].reshape(-1, 1, h.shape[-1]), labels[:, 1:].reshape(-1, 1)
    keep = y[:, 0] != IGN
    with torch.no_grad():
        return sf.sequence_logprob(x[keep], W, y[keep], shift=False, backend=backend)[0].double()


def rms_rel(a, ref):
    """Root-mean-square of the per-element relative errors (one number per token: a statistic of many
    independent roundings, unlike the error of one scalar loss, which can cancel by chance)."""
    a, ref = a.double(), ref.double()
    return (((a - ref) / ref) ** 2).mean().sqrt().item() if torch.isfinite(a).all() else float("inf")


def rel(a, ref):
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("inf")
    den = ref.norm().item()
    return (a - ref).norm().item() / den if den > 0 else (a - ref).norm().item()


def measure(objective, regime, dtype, backend, shape, upstream=1.0):
    import simnpo_fast as sf
    from simnpo_fast.backends import ReferenceBackend

    B, n, d, V = shape
    make = peaked_inputs if regime == "peaked" else flat_inputs
    h, W, labels = make(B, n, d, V, dtype)
    oracle_be = ReferenceBackend(torch.float64)
    ref_logp = Wr = None
    gamma = 0.0
    if objective == "npo" or regime == "saturated":
        with torch.no_grad():
            logp = sf.sequence_logprob(h, W, labels, backend=oracle_be)[0].float()
        ref_logp = logp + 1.0
        if regime == "saturated":  # SimNPO weights sigmoid(beta/n logp + gamma) ~ e^-14: g ~ 1e-7
            gamma = float(-(2.5 / n) * logp.mean() - 14.0)
    if objective == "kl":
        Wr = ref_weight(W)
    lf = functools.partial(loss_fn, objective, ref_logp=ref_logp, Wr=Wr, gamma=gamma)
    want = grads(lf("oracle" if objective == "kl" else oracle_be), h, W, labels, leaf_dtype=torch.float64)
    want_lp = token_lp(h.double(), W.double(), labels, oracle_be) if objective != "kl" else None
    out = {}
    for name, be in (("fused", backend), ("naive", "reference")):
        t0 = time.perf_counter()
        got = grads(lf(be), h, W, labels, upstream)
        out[name] = {"loss": rel(got[0], want[0]), "dW": rel(got[1], want[1]), "dH": rel(got[2], want[2]),
                     "seconds": round(time.perf_counter() - t0, 2)}
        if want_lp is not None:
            out[name]["lp_rms"] = rms_rel(token_lp(h, W, labels, be), want_lp)
    with torch.no_grad():
        lp = torch.log_softmax(h[:, :-1].double() @ W.double().t(), -1)
        y = labels[:, 1:]
        pt = lp.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1).exp()[y != IGN]
    out["p_t"] = {"min": pt.min().item(), "median": pt.median().item(), "max": pt.max().item()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="chunked")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--V", type=int, default=8192)
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--tag", default="", help="suffix of the JSON name (e.g. 'before')")
    a = ap.parse_args(argv)

    from bench.harness import RESULTS, machine_info, machine_tag

    shape = (a.B, a.n, a.d, a.V)
    rows = []
    t0 = time.perf_counter()
    for dname in a.dtypes.split(","):
        for regime in ("peaked", "flat", "saturated"):
            for obj in a.objectives.split(","):
                if regime == "saturated" and obj != "simnpo":
                    continue
                ups = [1.0] + ([2.0 ** 16] if dname == "fp16" else [])
                for up in ups:
                    r = measure(obj, regime, DTYPES[dname], a.backend, shape, up)
                    rows.append({"dtype": dname, "regime": regime, "objective": obj, "upstream": up, **r})
                    f, nv = r["fused"], r["naive"]
                    lps = (f" lp {f['lp_rms']:.1e}", f" lp {nv['lp_rms']:.1e}") if "lp_rms" in f else ("", "")
                    print(f"{dname:5s} {regime:9s} {obj:6s} x{up:<7g} fused loss {f['loss']:.1e}{lps[0]} dW "
                          f"{f['dW']:.1e} dH {f['dH']:.1e} | naive loss {nv['loss']:.1e}{lps[1]} dW {nv['dW']:.1e} "
                          f"dH {nv['dH']:.1e}", flush=True)
    payload = {
        "benchmark": "precision",
        "command": "python -m bench.precision " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine_info(), "cpu_flags": cpu_flags()},
        "code": code_version(),
        "config": {"backend": a.backend, "B": a.B, "n": a.n, "d": a.d, "V": a.V,
                   "metric": "relative error vs float64 on the same rounded inputs: |loss|, Frobenius norm "
                             "for dW and dH; upstream = the gradient fed to backward (errors of grad/upstream)"},
        "seconds": round(time.perf_counter() - t0, 1),
        "results": rows,
    }
    out = Path(a.out) if a.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    path = out / f"precision-{machine_tag()}-{date}{('-' + a.tag) if a.tag else ''}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path} ({payload['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
