"""The one method table: every way the benchmarks compute the SimNPO loss, ours and the peers', CPU and GPU.

A method is ``fn(hidden [B, T, d], weight [V, d], labels [B, T]) -> scalar loss`` with HF label alignment
(position t predicts ``labels[:, t + 1]``; ``-100`` = ignored), computing

    loss = mean over sequences with >= 1 answer token of  -(2/beta) * logsigmoid(-(beta/|y_i|) * log p(y_i|x_i) - gamma)

(``harness.BETA``, ``harness.GAMMA``) and its gradients w.r.t. ``hidden`` and ``weight`` through autograd.

Ours:   naive (full [M, V] logits in the model dtype, fp32 log_softmax: what unlearning frameworks run),
        chunked (CPU / cuBLAS fused path), triton (GPU kernels), triton-gemm (torch GEMMs + Triton tile epilogue).
Peers:  they give per-token cross-entropy (Liger's chunked losses: an extension point), so SimNPO is assembled
        on top of them here -- our wrapper code, not theirs:
  torch_lce     torch.nn.functional.linear_cross_entropy(reduction="none", options=LinearCrossEntropyOptions())
  liger_flce    Liger LigerFusedLinearCrossEntropyLoss(reduction="none") (Triton)
  liger_chunked Liger's chunked compiled loss framework (LigerFusedLinearUnpairedPreferenceBase, the base of its
                KTO loss) with a SimNPO preference_loss_fn, average_log_prob=True, torch.compile on
  cce           Apple Cut Cross-Entropy linear_cross_entropy(reduction="none"), impl "cce" on CUDA,
                "torch_compile" elsewhere
The per-token peers get the packed valid rows (the rows our kernels see), so nobody pays for rows others skip.
Methods in ``TRITON`` run on CUDA, or on CPU under TRITON_INTERPRET=1 at tiny shapes only. An optional peer that
does not import is kept in the table with ``fn=None`` and the reason in ``note``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from bench.harness import BETA, GAMMA, IGNORE, reference_backend, simnpo

#: every method, ours first
METHOD_NAMES = ("naive", "chunked", "triton", "triton-gemm", "torch_lce", "liger_flce", "liger_chunked", "cce")
OURS = ("naive", "chunked", "triton", "triton-gemm")
#: methods built on Triton kernels: CUDA, or CPU under TRITON_INTERPRET=1 at tiny sizes
TRITON = ("triton", "triton-gemm", "liger_flce")
#: matmul flops of each design (fwd + bwd: logits, dX, dW) in units of N d V; None: implementation-dependent
DESIGN_NDV = {"naive": 6, "chunked": 6, "triton": 10, "triton-gemm": 6, "torch_lce": None, "liger_flce": 6,
              "liger_chunked": 6, "cce": 8}
_TRITON_ONLY = "CUDA only (or CPU under TRITON_INTERPRET=1 at tiny sizes)"


@dataclass(frozen=True)
class Method:
    name: str
    fn: Optional[Callable]  # None when unavailable here
    kind: str  # "ours" | "peer"
    note: str = ""
    tiny_only: bool = False  # only meaningful at tiny sizes (Triton interpreter on CPU)
    ndv: Optional[int] = None  # DESIGN_NDV


# --------------------------------------------------------------------------------------------------------------
# SimNPO on top of per-token log-probs (our wrapper around the peers that return per-token cross-entropy)
# --------------------------------------------------------------------------------------------------------------
def packed_rows(hidden, labels, ignore_index: int = IGNORE):
    """HF shift + keep the valid rows: ``(x [M, d], targets [M], seq_ids [M], n_tokens [B])``."""
    import torch

    B, T, d = hidden.shape
    tgt = labels[:, 1:]
    valid = tgt != ignore_index
    rows = valid.reshape(-1).nonzero().squeeze(1)
    x = hidden[:, :-1].reshape(-1, d).index_select(0, rows) if T > 1 else hidden.reshape(0, d)
    seq_ids = torch.arange(B, device=hidden.device).repeat_interleave(T - 1).index_select(0, rows)
    return x, tgt.reshape(-1).index_select(0, rows), seq_ids, valid.sum(1)


def simnpo_from_logp_sum(logp_sum, n_tokens, beta: float = BETA, gamma: float = GAMMA):
    """SimNPO from per-sequence ``log p(y|x)`` and answer counts; sequences without answer tokens drop out."""
    import torch
    import torch.nn.functional as F

    valid = n_tokens > 0
    n = n_tokens.clamp(min=1).to(logp_sum.dtype)
    f = -(2.0 / beta) * F.logsigmoid(-(beta / n) * logp_sum - gamma)
    f = torch.where(valid, f, torch.zeros_like(f))
    return f.sum() / valid.sum().clamp(min=1)


def naive_simnpo_trainer(beta: float = BETA, gamma: float = GAMMA):
    """A ``transformers.Trainer`` subclass as an HF user writes SimNPO: full ``[B, T, V]`` logits, fp32
    log-softmax, the answer-token mean log-probability per forget sequence, plus the retain NLL. Its inputs are
    ``{"forget": batch, "retain": batch}`` (HF-aligned labels, -100 outside the answers)."""
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    class NaiveSimNPOTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            f, r = inputs["forget"], inputs["retain"]
            logits = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits
            tgt = f["labels"][:, 1:]
            m = tgt != -100
            lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tgt.clamp_min(0)[..., None])[..., 0]
            seq = (lp * m).sum(1) / m.sum(1)
            return (-(2 / beta) * F.logsigmoid(-beta * seq - gamma)).mean() + model(**r).loss

    return NaiveSimNPOTrainer


def simnpo_from_token_ce(ce_fn: Callable) -> Callable:
    """``ce_fn(x [M, d], w [V, d], targets [M]) -> per-token CE [M]`` -> a SimNPO method."""
    import torch

    def method(hidden, weight, labels):
        x, tgt, seq_ids, n = packed_rows(hidden, labels)
        lp = -ce_fn(x, weight, tgt).float()
        logp_sum = torch.zeros(hidden.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, seq_ids, lp)
        return simnpo_from_logp_sum(logp_sum, n)

    return method


# --------------------------------------------------------------------------------------------------------------
# the peers' per-token cross-entropy: (ce(x, w, t) -> [M] or None, note)
# --------------------------------------------------------------------------------------------------------------
def torch_lce_ce():
    import torch
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy"):
        return None, "torch.nn.functional.linear_cross_entropy missing in this torch"
    opts = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
    note = "reduction='none', options=LinearCrossEntropyOptions() (chunked, auto policy)" if opts else \
        "reduction='none' (no LinearCrossEntropyOptions in this torch: reference path)"
    return (lambda x, w, t: F.linear_cross_entropy(x, w, t, reduction="none", options=opts)), note


def liger_flce_ce():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # optional peer
        return None, f"liger-kernel not importable: {type(e).__name__}: {e}"
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return (lambda x, w, t: loss(w, x, t)), "LigerFusedLinearCrossEntropyLoss(reduction='none')"


def cce_ce(impl: str):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:  # optional peer
        return None, f"cut-cross-entropy not importable: {type(e).__name__}: {e}"
    return (lambda x, w, t: linear_cross_entropy(x, w, t, reduction="none", impl=impl)), \
        f"linear_cross_entropy(reduction='none', impl='{impl}')"


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
    """``(SimNPO method on Liger's chunked loss framework or None, note)``."""
    try:
        cls = _liger_simnpo_class()
    except Exception as e:  # optional peer
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


def _on_top(pair):
    ce, note = pair
    return (simnpo_from_token_ce(ce) if ce is not None else None), note


# --------------------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------------------
_BUILDERS: Dict[str, Callable[[str], tuple]] = {  # name -> (device -> (fn or None, note))
    "naive": lambda dev: (simnpo(reference_backend(None)), "full [M, V] logits in the model dtype, fp32 "
                          "log_softmax, autograd (what frameworks do)"),
    "chunked": lambda dev: (simnpo("chunked"), "simnpo_fast backend='chunked'"),
    "triton": lambda dev: (simnpo("triton"), "simnpo_fast backend='triton'"),
    "triton-gemm": lambda dev: (simnpo("triton-gemm"), "simnpo_fast backend='triton-gemm' (torch GEMMs + Triton "
                                "tile epilogue)"),
    "torch_lce": lambda dev: _on_top(torch_lce_ce()),
    "liger_flce": lambda dev: _on_top(liger_flce_ce()),
    "liger_chunked": lambda dev: liger_chunked_method(),
    "cce": lambda dev: _on_top(cce_ce("cce" if dev == "cuda" else "torch_compile")),
}


def make_method(name: str, device: str = "cpu", interpreter: Optional[bool] = None) -> Method:
    """One method for ``device`` (imports only what it needs); ``fn=None`` and a ``note`` when unavailable.
    ``interpreter``: whether Triton runs on CPU (default: ``TRITON_INTERPRET=1``)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown method {name!r}; choose from {METHOD_NAMES}")
    kind = "ours" if name in OURS else "peer"
    interp = os.environ.get("TRITON_INTERPRET") == "1" if interpreter is None else interpreter
    if name in TRITON and not (device == "cuda" or interp):
        return Method(name, None, kind, ("Triton kernel: " if kind == "peer" else "") + _TRITON_ONLY,
                      ndv=DESIGN_NDV[name])
    fn, note = _BUILDERS[name](device)
    return Method(name, fn, kind, note, tiny_only=name in TRITON and device != "cuda", ndv=DESIGN_NDV[name])


def make_methods(device: str = "cpu", interpreter: Optional[bool] = None, names=None) -> Dict[str, Method]:
    """All (or the named) methods for ``device``; unavailable ones keep ``fn=None`` and say why in ``note``."""
    return {n: make_method(n, device, interpreter) for n in (names or METHOD_NAMES)}


def full_size_names(device: str) -> tuple:
    """The methods timed at full size on ``device`` (on CPU the Triton ones run only in the interpreter)."""
    return METHOD_NAMES if device == "cuda" else tuple(n for n in METHOD_NAMES if n not in TRITON)

