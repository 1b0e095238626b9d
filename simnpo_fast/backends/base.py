"""The contract every backend implements, and its one parameter object :class:`HeadInputs`.

Notation: packed rows ``r = 0..M-1`` (every target valid), hidden row ``x_r [d]``, ``w [V, d]``, optional
``b [V]``, ``targets [M]``. Per token ``lp_r = z_r[y_r] - logsumexp(z_r)`` with ``z_r = x_r W^T + b``. A sequence's
``logp_sum`` is the sum of its ``lp_r``. For a scalar loss ``L = sum_i f_i(logp_sum_i) / normalizer`` the gradient
of the logits of token ``r`` of sequence ``i`` is ``g_i (onehot(y_r) - softmax(z_r))`` with
``g_i = f_i'(logp_sum_i) / normalizer``: one number per *sequence*, known only once the whole sequence has been
seen. A backend therefore offers, on a :class:`HeadInputs`:

* ``logprob_forward`` / ``logprob_backward`` -- the generic path (any loss on top, e.g. ``reduction="none"``):
  the forward keeps the per-token ``lse`` and ``lp`` (O(M) floats); the backward recomputes the logits tiles and
  folds the per-token scale ``g_r`` in before the two GEMMs (8 MdV flops).
* ``fused_seq_loss`` -- the scalar-loss path: ``(sum_i f_i, logp_sum, dx, dw, db)`` with the gradients computed
  during the forward (they only need the upstream factor afterwards). The default below runs the two halves
  of the generic path back to back; the chunked backend overrides it with a sequence-aligned schedule that
  computes the gradients while the logits tile is live (6 MdV flops).
* ``fused_kl`` -- the retain KL ``scale * sum_r KL(p_ref(.|r) || p(.|r))`` against a frozen reference given as
  a second :class:`HeadInputs` on the same rows, with its gradients.

The differentiable entry points :meth:`Backend.sequence_logprob`, :meth:`Backend.sequence_loss` and
:meth:`Backend.kl_loss` wrap these in autograd (``simnpo_fast/backends/autograd.py``); a backend may replace them
with plain autograd instead (the reference backend does).

Gradients come back in fp32 (or already in the input dtype; fp16 inputs: fp32 always, see
``backends/autograd.py``), ``dx`` shaped like ``HeadInputs.x`` (zero on the rows not in ``rows``).

The target term: every backend computes ``lp_r`` and ``1 - p_r`` from the log-sum-exp of the row's *other*
logits (``simnpo_fast.kernels.target_terms``, the repository's ``kernels/target_terms.py``); ``logprob_backward``
receives the forward's ``lp`` next to ``lse`` for that reason (``other_lse`` rebuilds ``lo_r`` from them).
"""
from __future__ import annotations

from typing import Optional

import torch

from simnpo_fast.kernels.target_terms import other_lse, target_terms

from .autograd import FusedKL, FusedSeqLoss, SeqLogprob
from .inputs import GradNeeds, HeadInputs, SeqWeightFn


class Backend:
    name = "base"

    def supports(self, device: torch.device) -> bool:
        """Whether this backend can run on tensors of ``device`` (pure-torch backends: everywhere)."""
        return True

    # -- the contract -------------------------------------------------------------------------------------
    def logprob_forward(self, inp: HeadInputs) -> "tuple[torch.Tensor, torch.Tensor]":
        """``(lp [M] fp32, lse [M] fp32)`` of the packed rows; no autograd."""
        raise NotImplementedError

    def logprob_backward(self, inp: HeadInputs, lse, lp, grad_lp, needs: GradNeeds):
        """Gradients of ``sum_r grad_lp[r] * lp_r`` w.r.t. x, w, b (fp32), ``None`` where not needed; ``lse`` and
        ``lp`` are what ``logprob_forward`` returned (``lp`` carries ``1 - p_r`` to full relative accuracy)."""
        raise NotImplementedError

    def fused_seq_loss(self, inp: HeadInputs, seq_weight_fn: SeqWeightFn, needs: GradNeeds):
        """``(loss_sum, logp_sum [S], dx, dw, db)`` with ``loss_sum = sum_i f_i`` (unnormalised) and the gradients
        of ``sum_i g_i logp_sum_i``."""
        lp, lse = self.logprob_forward(inp)
        logp_sum = torch.zeros(inp.num_seqs, dtype=torch.float32, device=inp.x.device)
        logp_sum.index_add_(0, inp.seq_ids, lp.to(torch.float32))
        f, g = seq_weight_fn(logp_sum, torch.arange(inp.num_seqs, device=inp.x.device))
        dx = dw = db = None
        if needs.any:
            dx, dw, db = self.logprob_backward(inp, lse, lp, g.index_select(0, inp.seq_ids), needs)
        return f.sum(), logp_sum, dx, dw, db

    def fused_kl(self, inp: HeadInputs, ref: HeadInputs, scale: float, needs: GradNeeds):
        """``(scale * sum_r KL(p_ref(.|r) || p(.|r)), dx, dw, db)``: ``p`` from ``inp``, the frozen ``p_ref`` from
        ``ref`` (same ``rows``; its own hidden size allowed); no gradient flows to ``ref``. ``scale``: a number, or
        a ``[M]`` tensor of per-row scales (``sum_r scale_r KL_r``: the per-sequence normalisation)."""
        raise NotImplementedError

    # -- differentiable entry points (what simnpo_fast.ops calls) ----------------------------------------
    def sequence_logprob(self, inp: HeadInputs) -> torch.Tensor:
        """``logp_sum [S]``, differentiable w.r.t. ``inp.x``, ``inp.w``, ``inp.b`` (recomputing backward)."""
        return SeqLogprob.apply(inp.x, inp.w, inp.b, inp, self)

    def sequence_loss(self, inp: HeadInputs, seq_weight_fn: SeqWeightFn, scale: float):
        """``(scale * sum_i f_i, logp_sum [S] detached)``; ``seq_weight_fn`` must fold ``scale`` into its ``g``."""
        return FusedSeqLoss.apply(inp.x, inp.w, inp.b, inp, self, seq_weight_fn, scale, torch.is_grad_enabled())

    def kl_loss(self, inp: HeadInputs, ref: HeadInputs, scale: float) -> torch.Tensor:
        """``scale * sum_r KL(p_ref || p)``, differentiable w.r.t. ``inp.x``, ``inp.w``, ``inp.b``."""
        return FusedKL.apply(inp.x, inp.w, inp.b, inp, ref, self, scale, torch.is_grad_enabled())

    # -- convenience ----------------------------------------------------------------------------------------
    def token_logprob(self, x, w, b, targets) -> "tuple[torch.Tensor, Optional[torch.Tensor]]":
        """``(lp [M], lse [M])`` of the rows of ``x [M, d]`` (no autograd)."""
        with torch.no_grad():
            return self.logprob_forward(HeadInputs(x, w, b, targets))


__all__ = ["Backend", "GradNeeds", "HeadInputs", "SeqWeightFn", "other_lse", "target_terms"]
