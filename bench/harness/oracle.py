"""Oracle checks: the loss and both gradients of a method against the fp64 oracle, with a verdict."""
from __future__ import annotations

import time
from typing import Callable

from .library import oracle

#: relative error tolerance vs the fp64 oracle: fp32 inputs -> fp32 level; bf16 -> a few bf16 ulps (2^-8)
TOL = {"float32": 1e-4, "bfloat16": 6e-2, "float64": 1e-10}


def fwd_bwd(fn: Callable, h, w, labels):
    """``(loss, d hidden, d weight)`` of ``fn`` on fresh leaf copies of ``h`` and ``w``."""
    import torch

    hh = h.detach().requires_grad_(True)
    ww = w.detach().requires_grad_(True)
    loss = fn(hh, ww, labels)
    dh, dw = torch.autograd.grad(loss, (hh, ww))
    return loss.detach(), dh, dw


def rel_err(a, ref) -> float:
    """max |a - ref| / max |ref|."""
    ref = ref.double()
    return (a.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def rel_norm_err(a, ref) -> float:
    """||a - ref|| / ||ref|| (Frobenius)."""
    ref = ref.double()
    return (a.double() - ref).norm().item() / max(ref.norm().item(), 1e-30)


def check_method(fn: Callable, h, w, labels, ref=None) -> dict:
    """Relative errors of loss, d hidden and d weight vs the fp64 oracle (``ref``: its :func:`fwd_bwd`, computed
    if None) and ``ok``. fp32: every max error within ``TOL``. bf16: the loss by its max error, the gradients by
    their relative Frobenius error (one entry's max error grows with the logit scale and the shape)."""
    import torch

    if ref is None:
        ref = fwd_bwd(oracle(), h, w, labels)
    tol = TOL[str(h.dtype).split(".")[-1]]
    try:
        got = fwd_bwd(fn, h, w, labels)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}", "tol": tol}
    errs = {k: rel_err(a, r) for k, a, r in zip(("loss", "dhidden", "dweight"), got, ref)}
    errs.update({k + "_norm": rel_norm_err(a, r) for k, a, r in zip(("dhidden", "dweight"), got[1:], ref[1:])})
    finite = all(bool(torch.isfinite(t).all()) for t in got)
    by_max = tol < 1e-2
    keys = ("loss", "dhidden", "dweight") if by_max else ("loss", "dhidden_norm", "dweight_norm")
    return {**errs, "tol": tol, "criterion": "max" if by_max else "norm",
            "ok": finite and all(errs[k] <= tol for k in keys)}


def check_methods(fns: dict, h, w, labels) -> dict:
    """:func:`check_method` of every ``name -> fn`` on one batch (the oracle run once), with seconds per method."""
    ref = fwd_bwd(oracle(), h, w, labels)
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        out[name] = dict(check_method(fn, h, w, labels, ref), seconds=time.perf_counter() - t0)
    return out
