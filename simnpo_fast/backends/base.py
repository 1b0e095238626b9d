"""The contract every backend implements.

Notation: ``x [M, d]`` packed hidden rows (all targets valid), ``w [V, d]``, optional ``b [V]``,
``targets [M]``. Per token ``lp_t = z_t[y_t] - logsumexp(z_t)`` with ``z_t = x_t W^T + b``. A sequence's
``logp_sum`` is the sum of its ``lp_t``. For a scalar loss ``L = sum_i f_i(logp_sum_i) / normalizer`` the
gradient of the logits of token ``t`` of sequence ``i`` is ``g_i (onehot(y_t) - softmax(z_t))`` with
``g_i = f_i'(logp_sum_i) / normalizer``: one number per *sequence*, known only once the whole sequence has
been seen. Backends therefore offer two paths:

* ``token_logprob`` / ``token_logprob_backward`` -- the generic path (any loss on top, e.g. a
  ``reduction="none"`` output): forward keeps the per-token ``lse`` (O(M) floats) and the backward
  recomputes the logits tiles and folds the per-token scale ``g_t`` in before the two GEMMs (8 M d V flops).
* ``fused_seq_loss`` -- the scalar-loss path. The default implementation below runs the two halves of the
  generic path back to back inside the forward; the chunked backend overrides it with a sequence-aligned
  scheme that computes the gradients while the logits tile is still live (6 M d V flops).

Backends return gradients in fp32 (or already in the input dtype; fp16 inputs: fp32 always, see
``simnpo_fast/ops.py``); the autograd layer applies the upstream gradient and casts them to the parameter dtypes.

The target term. Every backend computes ``lp_t`` and ``1 - p_t`` from the log-sum-exp of the row's *other*
logits, ``lo_t = logsumexp_{v != y_t} z_tv``, and the target logit ``z_t[y_t]`` (:func:`target_terms`):
``lp_t = -softplus(lo_t - z_t[y_t])`` and ``1 - p_t = sigmoid(lo_t - z_t[y_t])``, both to the relative accuracy
of ``lo_t`` however close ``p_t`` is to 1 (``z_t[y_t] - lse_t`` would lose ``1 - p_t`` to the rounding of
``lse_t``, and ``1 - p_t`` as a difference of rounded numbers loses everything as ``p_t -> 1``: on a memorised
forget set, where unlearning starts, that is every token). ``token_logprob_backward`` receives the forward's
``lp`` next to ``lse`` for the same reason (:func:`other_lse` rebuilds ``lo_t`` from them).

Row-indexed backends (``row_indexed = True``) also accept ``rows=``: then ``x`` is the flat hidden ``[N, d]``
and packed row ``r`` is ``x[rows[r]]``; they gather one tile at a time and return ``dx`` shaped like ``x``
(zero on the rows not in ``rows``), so no ``[M, d]`` copy of the hidden states is made. Other backends get
the packed rows materialised by the autograd layer.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

# head(logp_sum_chunk [k] fp32, seq_index_chunk [k] int64) -> (f [k] fp32, df/dlogp_sum [k] fp32)
Head = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def target_terms(lo: torch.Tensor, zt: torch.Tensor):
    """``(lp, lse, omp)`` of rows from ``lo`` (log-sum-exp of the non-target logits) and ``zt`` (target logit):
    ``lp = log p_t = -softplus(lo - zt)``, ``lse = logaddexp(zt, lo)``, ``omp = 1 - p_t = sigmoid(lo - zt)``.
    ``lo = -inf`` (no other column) gives ``lp = 0``, ``omp = 0``."""
    y = lo - zt
    return -F.softplus(y), torch.logaddexp(zt, lo), torch.sigmoid(y)


def other_lse(lse: torch.Tensor, lp: torch.Tensor):
    """``(lo, omp)``: the non-target log-sum-exp ``lo = lse + log(1 - p_t)`` and ``omp = 1 - p_t = -expm1(lp)``
    from a row's ``lse`` and target log-probability. ``lo = +inf`` where ``1 - p_t`` is 0 in fp32, so that
    ``exp(z - lo)`` is 0 there (never ``inf * 0``)."""
    omp = -torch.expm1(lp)
    lo = lse + torch.log(omp)
    return torch.where(omp > 0, lo, torch.full_like(lo, float("inf"))), omp


class Backend:
    name = "base"
    #: True when the backend builds the autograd graph itself (the reference oracle).
    autograd_native = False
    #: True when the methods below accept ``rows=`` (see the module docstring).
    row_indexed = False

    def supports(self, device: torch.device) -> bool:
        """Whether this backend can run on tensors of ``device`` (pure-torch backends: everywhere)."""
        return True

    # -- generic path -------------------------------------------------------------------------------------
    def token_logprob(self, x, w, b, targets) -> "tuple[torch.Tensor, torch.Tensor]":
        """Return ``(lp [M] fp32, lse [M] fp32)``; no autograd."""
        raise NotImplementedError

    def token_logprob_backward(
        self, x, w, b, targets, lse, grad_lp, need_dx: bool, need_dw: bool, need_db: bool, *, lp
    ) -> "tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]":
        """Gradients of ``sum_t grad_lp[t] * lp_t`` w.r.t. x, w, b (fp32), ``None`` where not needed; ``lse`` and
        ``lp`` are what ``token_logprob`` returned (``lp`` carries ``1 - p_t`` to full relative accuracy)."""
        raise NotImplementedError

    # -- scalar-loss path ---------------------------------------------------------------------------------
    def fused_seq_loss(
        self,
        x,
        w,
        b,
        targets,
        seq_ids,
        offsets: "list[int]",
        num_seqs: int,
        head: Head,
        need_dx: bool,
        need_dw: bool,
        need_db: bool,
    ):
        """Return ``(loss_sum, logp_sum [S], dx, dw, db)`` with ``loss_sum = sum_i f_i`` (unnormalised)."""
        lp, lse = self.token_logprob(x, w, b, targets)
        logp_sum = torch.zeros(num_seqs, dtype=torch.float32, device=x.device).index_add_(0, seq_ids, lp)
        idx = torch.arange(num_seqs, device=x.device)
        f, g = head(logp_sum, idx)
        loss_sum = f.sum()
        dx = dw = db = None
        if need_dx or need_dw or need_db:
            dx, dw, db = self.token_logprob_backward(
                x, w, b, targets, lse, g.index_select(0, seq_ids), need_dx, need_dw, need_db, lp=lp
            )
        return loss_sum, logp_sum, dx, dw, db
