"""Every method the benchmarks compare, each built to compute the *same* SimNPO loss and gradients.

A method is a callable ``fn(hidden [B, T, d], weight [V, d], labels [B, T]) -> scalar loss`` with HF label
alignment (position t predicts ``labels[:, t + 1]``; ``-100`` = ignored), giving

    loss = mean over sequences with >= 1 answer token of  -(2/beta) * logsigmoid(-(beta/|y_i|) * log p(y_i|x_i) - gamma)

and its gradients w.r.t. ``hidden`` and ``weight`` through ordinary autograd.

Ours:   naive (ReferenceBackend(None): full [M, V] logits in the model dtype, fp32 log_softmax -- what unlearning
        frameworks run today), chunked (CPU / cuBLAS fused path), triton (GPU kernels), triton-gemm (GPU: torch
        GEMMs + Triton tile epilogue).
Peers:  the peers only give per-token cross-entropy (or, for Liger's chunked losses, an extension point), so
        SimNPO is assembled on top of them here -- our wrapper code, not theirs:
  torch_lce     torch.nn.functional.linear_cross_entropy(reduction="none", options=LinearCrossEntropyOptions())
  liger_flce    Liger LigerFusedLinearCrossEntropyLoss(reduction="none") (Triton: CUDA, or CPU under
                TRITON_INTERPRET=1 at tiny sizes only)
  liger_chunked Liger's chunked compiled loss framework (LigerFusedLinearUnpairedPreferenceBase, the base of its
                KTO loss) with a SimNPO preference_loss_fn, average_log_prob=True, torch.compile on
  cce           Apple Cut Cross-Entropy linear_cross_entropy(reduction="none"), impl "torch_compile" on CPU,
                "cce" on CUDA
The per-token peers are fed the packed valid rows (the same rows our kernels see), so nobody pays for the
prompt / padding rows the others skip.

``check_method`` compares a method with the fp64 oracle (``ReferenceBackend(torch.float64)``) on the loss and
both gradients; the benchmarks time a peer only when it passes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

BETA, GAMMA = 2.5, 0.0
IGNORE = -100

#: relative max-abs error tolerance vs the fp64 oracle: fp32 inputs -> fp32-level; bf16 -> a few bf16 ulps (2^-8)
TOL = {"float32": 1e-4, "bfloat16": 6e-2, "float64": 1e-10}


@dataclass
class Method:
    name: str
    fn: Optional[Callable]  # None when unavailable
    kind: str  # "ours" | "peer"
    note: str = ""
    tiny_only: bool = False  # only meaningful at tiny sizes (Triton interpreter on CPU)
    extra: Dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# SimNPO on top of per-token log-probs (our wrapper around the peers that return per-token cross-entropy)
# --------------------------------------------------------------------------------------------------------------
def packed_rows(hidden, labels, ignore_index: int = IGNORE):
    """HF shift + keep the valid rows: ``(x [M, d], targets [M], seq_ids [M], n_tokens [B])``."""
    import torch

    B, T, d = hidden.shape
    tgt = labels[:, 1:]
    valid = tgt != ignore_index
    flat = valid.reshape(-1)
    rows = flat.nonzero().squeeze(1)
    x = hidden[:, :-1].reshape(-1, d).index_select(0, rows) if hidden.shape[1] > 1 else hidden.reshape(0, d)
    seq_ids = torch.arange(B, device=hidden.device).repeat_interleave(T - 1).index_select(0, rows)
    return x, tgt.reshape(-1).index_select(0, rows), seq_ids, valid.sum(1)


def simnpo_from_logp_sum(logp_sum, n_tokens, beta: float = BETA, gamma: float = GAMMA):
    import torch
    import torch.nn.functional as F

    valid = n_tokens > 0
    n = n_tokens.clamp(min=1).to(logp_sum.dtype)
    f = -(2.0 / beta) * F.logsigmoid(-(beta / n) * logp_sum - gamma)
    f = torch.where(valid, f, torch.zeros_like(f))
    return f.sum() / valid.sum().clamp(min=1)


def simnpo_from_token_ce(ce_fn: Callable):
    """``ce_fn(x [M, d], w [V, d], targets [M]) -> per-token CE [M]`` -> a SimNPO method."""
    import torch

    def method(hidden, weight, labels):
        x, tgt, seq_ids, n = packed_rows(hidden, labels)
        lp = -ce_fn(x, weight, tgt).float()
        logp_sum = torch.zeros(hidden.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, seq_ids, lp)
        return simnpo_from_logp_sum(logp_sum, n)

    return method


# --------------------------------------------------------------------------------------------------------------
# the methods
# --------------------------------------------------------------------------------------------------------------
def _ours(backend):
    import simnpo_fast as sf

    return lambda h, w, lab: sf.simnpo_loss(h, w, lab, beta=BETA, gamma=GAMMA, backend=backend)


def oracle():
    import torch

    from simnpo_fast.backends import ReferenceBackend

    return _ours(ReferenceBackend(torch.float64))


def torch_lce_ce():
    """Per-token CE of torch's native fused linear cross-entropy: ``(ce(x, w, t) -> [M], note)``."""
    import torch
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy"):
        return None, "torch.nn.functional.linear_cross_entropy missing in this torch"
    opts = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
    note = "reduction='none', options=LinearCrossEntropyOptions() (chunked, auto policy)" if opts else \
        "reduction='none' (no LinearCrossEntropyOptions in this torch: reference path)"
    return (lambda x, w, t: F.linear_cross_entropy(x, w, t, reduction="none", options=opts)), note


def liger_flce_ce():
    """Per-token CE of Liger's Triton fused linear cross-entropy (reduction='none')."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # optional peer
        return None, f"liger-kernel not importable: {type(e).__name__}: {e}"
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return (lambda x, w, t: loss(w, x, t)), "LigerFusedLinearCrossEntropyLoss(reduction='none')"


def cce_ce(impl: str):
    """Per-token CE of Apple's Cut Cross-Entropy (``impl``: "cce" Triton on CUDA, "torch_compile" anywhere)."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:
        return None, f"cut-cross-entropy not importable: {type(e).__name__}: {e}"
    return (lambda x, w, t: linear_cross_entropy(x, w, t, reduction="none", impl=impl)), \
        f"linear_cross_entropy(reduction='none', impl='{impl}')"


def _wrap(pair):
    ce, note = pair
    return (simnpo_from_token_ce(ce) if ce is not None else None), note


def torch_lce_method():
    return _wrap(torch_lce_ce())


def liger_flce_method():
    return _wrap(liger_flce_ce())


def cce_method(impl: str):
    return _wrap(cce_ce(impl))


_LIGER_CLS = None


def _liger_simnpo_class():
    """SimNPO as a Liger chunked loss: its unpaired-preference base (KTO's) with our preference_loss_fn."""
    global _LIGER_CLS
    if _LIGER_CLS is not None:
        return _LIGER_CLS
    import torch.nn.functional as F
    from liger_kernel.chunked_loss.fused_linear_unpaired_preference import LigerFusedLinearUnpairedPreferenceBase

    class _LigerSimNPO(LigerFusedLinearUnpairedPreferenceBase):
        @staticmethod
        def preference_loss_fn(avg_logp_chunk, preference_labels_chunk, full_target, beta=BETA, gamma=GAMMA,
                               num_seqs=1):
            # average_log_prob=True: avg_logp = log p(y|x) / |y|, so this is the SimNPO term of each sequence
            f = -(2.0 / beta) * F.logsigmoid(-beta * avg_logp_chunk - gamma)
            return f.sum() / num_seqs

        @classmethod
        def forward(cls, ctx, _input, weight, target, preference_labels, chunk_size, compiled, num_seqs):
            return super().forward(cls=cls, ctx=ctx, _input=_input, weight=weight, target=target,
                                   preference_labels=preference_labels, chunk_size=chunk_size,
                                   compiled=compiled, average_log_prob=True, num_seqs=num_seqs)

        @staticmethod
        def backward(ctx, *grads):
            g = LigerFusedLinearUnpairedPreferenceBase.backward(ctx, grads)
            return g[0], g[1], None, None, None, None, None

    _LIGER_CLS = _LigerSimNPO
    return _LIGER_CLS


def liger_chunked_method(chunk_size: int = 1, compiled: bool = True):
    try:
        cls = _liger_simnpo_class()
    except Exception as e:
        return None, f"liger-kernel chunked losses not importable: {type(e).__name__}: {e}"
    import torch

    def method(hidden, weight, labels):
        h = hidden[:, :-1]
        tgt = labels[:, 1:].contiguous()
        keep = (tgt != IGNORE).any(1)  # a sequence without answer tokens has no SimNPO term (0/0 in Liger)
        if not bool(keep.all()):
            h, tgt = h[keep], tgt[keep]
        pref = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        loss, _aux = cls.apply(h, weight, tgt, pref, chunk_size, compiled, int(keep.sum()))
        return loss

    return method, (f"LigerFusedLinearUnpairedPreferenceBase + SimNPO preference_loss_fn, chunk_size={chunk_size} "
                    f"sequences, average_log_prob=True, compiled={compiled}")


def _interp(interpreter: Optional[bool]) -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" if interpreter is None else interpreter


def _build(name: str, device: str, interpreter: bool) -> Method:
    from simnpo_fast.backends import ReferenceBackend

    triton_ok = device == "cuda" or interpreter
    cpu_only_note = "CUDA only (or CPU under TRITON_INTERPRET=1 at tiny sizes)"
    if name == "naive":
        return Method(name, _ours(ReferenceBackend(None)), "ours",
                      "full [M, V] logits in the model dtype, fp32 log_softmax, autograd (what frameworks do)")
    if name == "chunked":
        return Method(name, _ours("chunked"), "ours", "simnpo_fast backend='chunked'")
    if name == "triton":
        if not triton_ok:
            return Method(name, None, "ours", cpu_only_note)
        return Method(name, _ours("triton"), "ours", "simnpo_fast backend='triton'", tiny_only=device != "cuda")
    if name == "triton-gemm":
        if not triton_ok:
            return Method(name, None, "ours", cpu_only_note)
        return Method(name, _ours("triton-gemm"), "ours", "simnpo_fast backend='triton-gemm' (torch GEMMs + Triton "
                      "tile epilogue)", tiny_only=device != "cuda")
    if name == "torch_lce":
        fn, note = torch_lce_method()
        return Method(name, fn, "peer", note)
    if name == "liger_flce":
        if not triton_ok:
            return Method(name, None, "peer", "Triton kernel: " + cpu_only_note)
        fn, note = liger_flce_method()
        return Method(name, fn, "peer", note, tiny_only=device != "cuda")
    if name == "liger_chunked":
        fn, note = liger_chunked_method()
        return Method(name, fn, "peer", note)
    if name == "cce":
        fn, note = cce_method("cce" if device == "cuda" else "torch_compile")
        return Method(name, fn, "peer", note)
    raise ValueError(f"unknown method {name!r}; choose from {METHOD_NAMES}")


#: every method, ours first
METHOD_NAMES = ("naive", "chunked", "triton", "triton-gemm", "torch_lce", "liger_flce", "liger_chunked", "cce")


def make_method(name: str, device: str = "cpu", interpreter: Optional[bool] = None) -> Method:
    """One method (imports only what it needs); ``fn=None`` and a ``note`` when unavailable."""
    return _build(name, device, _interp(interpreter))


def make_methods(device: str = "cpu", interpreter: Optional[bool] = None, names=None) -> Dict[str, Method]:
    """All (or the named) methods for ``device``; unavailable ones keep ``fn=None`` and say why in ``note``."""
    return {n: make_method(n, device, interpreter) for n in (names or METHOD_NAMES)}


# --------------------------------------------------------------------------------------------------------------
# correctness against the fp64 oracle
# --------------------------------------------------------------------------------------------------------------
def fwd_bwd(fn, h, w, lab):
    import torch

    hh = h.detach().requires_grad_(True)
    ww = w.detach().requires_grad_(True)
    loss = fn(hh, ww, lab)
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


def check_method(fn, h, w, lab, ref=None) -> dict:
    """Relative max errors of loss, d hidden, d weight vs the fp64 oracle and ``ok`` against ``TOL``."""
    import torch

    if ref is None:
        ref = fwd_bwd(oracle(), h, w, lab)
    tol = TOL[str(h.dtype).split(".")[-1]]
    try:
        got = fwd_bwd(fn, h, w, lab)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}", "tol": tol}
    errs = {k: rel_err(a, r) for k, a, r in zip(("loss", "dhidden", "dweight"), got, ref)}
    errs.update({k + "_norm": rel_norm_err(a, r) for k, a, r in zip(("dhidden", "dweight"), got[1:], ref[1:])})
    finite = all(bool(torch.isfinite(t).all()) for t in got)
    # fp32: every max error within tol. bf16: the max error of one gradient entry grows with the logit scale and
    # the shape (bf16 logits rounding), so the gradients are judged by their relative Frobenius error (loss: max)
    keys = ("loss", "dhidden", "dweight") if tol < 1e-2 else ("loss", "dhidden_norm", "dweight_norm")
    return {**errs, "tol": tol, "criterion": "max" if tol < 1e-2 else "norm", "ok": finite and all(errs[k] <= tol for k in keys)}
