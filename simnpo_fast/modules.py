"""nn.Module wrappers: ``loss = FusedSimNPOLoss(beta=2.5)(hidden, lm_head.weight, labels)``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from .objectives import GA, NLL, NPO, OBJECTIVES, SimNPO
from .objectives.base import check_reduction
from .ops import fused_sequence_loss


class _FusedLossBase(nn.Module):
    def __init__(self, objective, *, ignore_index=-100, reduction="mean", shift=True, backend=None):
        super().__init__()
        check_reduction(reduction, None)
        self.objective = objective
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.shift = shift
        self.backend = backend

    def forward(self, hidden, weight, labels, bias=None, *, normalizer=None, **extras):
        return fused_sequence_loss(hidden, weight, labels, self.objective, bias=bias,
                                   ignore_index=self.ignore_index, reduction=self.reduction,
                                   normalizer=normalizer, shift=self.shift, backend=self.backend, **extras)

    def extra_repr(self) -> str:
        return f"{self.objective}, reduction={self.reduction!r}, backend={self.backend!r}"


class FusedSimNPOLoss(_FusedLossBase):
    def __init__(self, beta: float = 2.5, gamma: float = 0.0, **kw):
        super().__init__(SimNPO(beta, gamma), **kw)


class FusedNPOLoss(_FusedLossBase):
    """Call as ``loss(hidden, weight, labels, ref_logp_sum=ref)``."""

    def __init__(self, beta: float = 0.1, **kw):
        super().__init__(NPO(beta), **kw)


class FusedNLLLoss(_FusedLossBase):
    def __init__(self, **kw):
        super().__init__(NLL(), **kw)


class FusedGALoss(_FusedLossBase):
    def __init__(self, **kw):
        super().__init__(GA(), **kw)


@dataclass
class LossOutput:
    """The combined loss and every term, detached, for logging."""

    loss: torch.Tensor
    terms: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __iter__(self):  # allows ``loss, terms = criterion(...)``
        return iter((self.loss, self.terms))


class UnlearningLoss(nn.Module):
    """``forget_weight * L_forget + retain_weight * L_retain`` on a forget and a retain batch.

    objective: ``simnpo`` (default), ``npo``, ``ga`` (forget term only, unless retain_weight > 0) or
    ``graddiff`` (GA on the forget set + retain NLL). The retain term is the token-mean NLL of the
    retain answers; a KL retain term needs a frozen reference model (:func:`simnpo_fast.kl_loss`, which the
    trainer adds when ``loss.retain_loss: kl``).

    Each batch is ``(hidden, labels)``; the LM-head ``weight`` (and ``bias``) are shared.
    ``forget_normalizer`` / ``retain_normalizer`` switch the terms to ``sum / normalizer`` for exact
    gradient accumulation across micro-batches and ranks.
    """

    def __init__(self, objective: str = "simnpo", *, forget_weight: float = 1.0, retain_weight: float = 1.0,
                 beta: Optional[float] = None, gamma: float = 0.0, ignore_index: int = -100, shift: bool = True,
                 backend=None):
        super().__init__()
        objective = objective.lower()
        if objective == "simnpo":
            self.forget_objective = SimNPO(2.5 if beta is None else beta, gamma)
        elif objective == "npo":
            self.forget_objective = NPO(0.1 if beta is None else beta)
        elif objective in ("ga", "graddiff"):
            self.forget_objective = GA()
        else:
            raise ValueError(f"unknown objective {objective!r}; choose simnpo, npo, ga or graddiff "
                             f"(per-sequence objectives available: {sorted(OBJECTIVES)})")
        if objective == "ga" and retain_weight and retain_weight != 0:
            # plain GA has no retain term by definition; graddiff is GA + retain NLL
            retain_weight = 0.0
        if forget_weight < 0 or retain_weight < 0:
            raise ValueError(f"weights must be >= 0, got forget {forget_weight}, retain {retain_weight}")
        self.objective = objective
        self.forget_weight = float(forget_weight)
        self.retain_weight = float(retain_weight)
        self.retain_objective = NLL()
        self.kw = dict(ignore_index=ignore_index, shift=shift, backend=backend)

    def forward(self, weight, forget_hidden, forget_labels, retain_hidden=None, retain_labels=None, *,
                bias=None, ref_logp_sum=None, forget_normalizer=None, retain_normalizer=None) -> LossOutput:
        extras = {}
        if self.objective == "npo":
            if ref_logp_sum is None:
                raise ValueError("objective 'npo' needs ref_logp_sum for the forget batch")
            extras["ref_logp_sum"] = ref_logp_sum
        red = "sum" if forget_normalizer is not None else "mean"
        lf, logp, n = fused_sequence_loss(forget_hidden, weight, forget_labels, self.forget_objective, bias=bias,
                                          reduction=red, normalizer=forget_normalizer, return_logp=True,
                                          **self.kw, **extras)
        loss = self.forget_weight * lf
        terms = {"forget_loss": lf.detach(), "forget_logp_sum": logp, "forget_n_tokens": n}
        if self.retain_weight > 0:
            if retain_hidden is None or retain_labels is None:
                raise ValueError(f"objective {self.objective!r} with retain_weight > 0 needs a retain batch")
            red = "sum" if retain_normalizer is not None else "mean"
            lr, rlogp, rn = fused_sequence_loss(retain_hidden, weight, retain_labels, self.retain_objective,
                                                bias=bias, reduction=red, normalizer=retain_normalizer,
                                                return_logp=True, **self.kw)
            loss = loss + self.retain_weight * lr
            terms.update(retain_loss=lr.detach(), retain_logp_sum=rlogp, retain_n_tokens=rn)
        terms["loss"] = loss.detach()
        return LossOutput(loss, terms)

    def extra_repr(self) -> str:
        return (f"objective={self.objective!r}, forget={self.forget_objective}, forget_weight={self.forget_weight}, "
                f"retain_weight={self.retain_weight}")
