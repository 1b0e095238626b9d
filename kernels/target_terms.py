"""The target term of a logits row, in plain torch (no Triton import): shared by the kernels' launchers and by
every backend of ``simnpo_fast.backends``.

With ``lo_t = logsumexp_{v != y_t} z_tv`` (the row's *other* logits) and the target logit ``z_t[y_t]``:
``lp_t = log p_t = -softplus(lo_t - z_t[y_t])`` and ``1 - p_t = sigmoid(lo_t - z_t[y_t])``, both to the relative
accuracy of ``lo_t`` however close ``p_t`` is to 1 (``z_t[y_t] - lse_t`` would lose ``1 - p_t`` to the rounding of
``lse_t``; on a memorised forget set, where unlearning starts, every token has ``p_t`` near 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
