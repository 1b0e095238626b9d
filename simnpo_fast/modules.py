"""nn.Module forms of the losses: ``loss = FusedSimNPOLoss(beta=2.5)(hidden, lm_head.weight, labels)``, and
:class:`UnlearningLoss`, the module face of :class:`~simnpo_fast.criterion.UnlearningCriterion`. ``LossOutput`` and
``ReferenceHead`` live in :mod:`simnpo_fast.criterion` (re-exported here)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .backends.filter import FilterSpec, resolve
from .criterion import Head, LossOutput, ReferenceHead, UnlearningCriterion
from .methods.npo import NPO_METHOD
from .methods.simnpo import SIMNPO
from .objectives import GA, NLL
from .objectives.base import check_reduction
from .ops import fused_sequence_loss


class _FusedLossBase(nn.Module):
    def __init__(self, objective, *, ignore_index=-100, reduction="mean", shift=True, backend=None,
                 grad_filter: FilterSpec = "auto"):
        super().__init__()
        check_reduction(reduction, None)
        resolve(grad_filter, torch.float32)  # a bad spec fails here, not at the first backward
        self.objective = objective
        self.grad_filter = grad_filter
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.shift = shift
        self.backend = backend

    def forward(self, hidden, weight, labels, bias=None, *, normalizer=None, **extras):
        return fused_sequence_loss(hidden, weight, labels, self.objective, bias=bias,
                                   ignore_index=self.ignore_index, reduction=self.reduction,
                                   normalizer=normalizer, shift=self.shift, backend=self.backend,
                                   grad_filter=self.grad_filter, **extras)

    def extra_repr(self) -> str:
        return f"{self.objective}, reduction={self.reduction!r}, backend={self.backend!r}"


class FusedSimNPOLoss(_FusedLossBase):
    def __init__(self, beta: float = SIMNPO.defaults["beta"], gamma: float = SIMNPO.defaults["gamma"], **kw):
        super().__init__(SIMNPO.forget_objective(beta, gamma), **kw)


class FusedNPOLoss(_FusedLossBase):
    """Call as ``loss(hidden, weight, labels, ref_logp_sum=ref)``."""

    def __init__(self, beta: float = NPO_METHOD.defaults["beta"], **kw):
        super().__init__(NPO_METHOD.forget_objective(beta), **kw)


class FusedNLLLoss(_FusedLossBase):
    def __init__(self, **kw):
        super().__init__(NLL(), **kw)


class FusedGALoss(_FusedLossBase):
    def __init__(self, **kw):
        super().__init__(GA(), **kw)


def _stack_rows(h1, h2, y1, y2, ignore_index: int):
    """``(cat(h1, h2), cat(y1, y2))`` along the rows, the shorter sequence dimension right-padded (hidden 0,
    labels ``ignore_index``: padding holds no answer token)."""
    T = max(y1.shape[1], y2.shape[1])

    def pad(h, y):
        dt = T - y.shape[1]
        return (torch.nn.functional.pad(h, (0, 0, 0, dt)), torch.nn.functional.pad(y, (0, dt), value=ignore_index))

    (h1, y1), (h2, y2) = pad(h1, y1), pad(h2, y2)
    return torch.cat([h1, h2]), torch.cat([y1, y2])


class UnlearningLoss(nn.Module):
    """``forget_weight * L_forget + retain_weight * L_retain`` on a forget and a retain batch: the ``nn.Module``
    face of :class:`~simnpo_fast.criterion.UnlearningCriterion` (``self.criterion``; every attribute of it --
    ``method``, ``forget_objective``, ``retain_loss``, ``normalize``, ``forget_weight``, ``uses_retain``, ... --
    reads through).

    ``objective`` names a registered method (:func:`simnpo_fast.methods.get_method`: ``simnpo`` (default),
    ``npo``, ``ga``, ``graddiff``, ``finetune``, ...): it gives the forget objective, its default ``beta`` /
    ``gamma`` (``None`` here), whether a reference log-likelihood is needed and the default retain term.
    ``retain_loss="nll"`` (token-mean NLL of the retain answers) or ``"kl"`` (token-mean ``KL(p_ref || p)``
    against a frozen reference, :func:`simnpo_fast.kl_loss`) overrides that default for methods that have a retain
    term; methods without one (``ga``, ``finetune``) ignore ``retain_weight`` and ``retain_loss``.

    :meth:`forward`: each batch is ``(hidden, labels)``; the LM-head ``weight`` (and ``bias``) are shared.
    ``forget_normalizer`` / ``retain_normalizer`` switch the terms to ``sum / normalizer`` for exact gradient
    accumulation across micro-batches and ranks; :meth:`batch_loss` takes one
    :class:`~simnpo_fast.batch.ForgetRetainBatch` and its step's :class:`~simnpo_fast.batch.StepCounts`.

    A method with alternate answers (``method.alternate != "none"``, e.g. ``idk_dpo``) also takes
    ``alternate_hidden`` / ``alternate_labels`` (row ``i``: the alternate answer of forget row ``i``) and, with
    ``reference="logp"``, ``ref_alt_logp_sum``; its :class:`~simnpo_fast.methods.PairObjective` runs on the
    differentiable fused ``sequence_logprob`` of the forget and alternate rows (8NdV instead of 6NdV flops), and
    the terms add ``alternate_logp_sum`` / ``alternate_n_tokens``.

    ``grad_filter`` goes to every fused term (``simnpo_fast.backends.filter``: ``"auto"``, the default, is exact).
    """

    def __init__(self, objective: str = "simnpo", *, forget_weight: float = 1.0, retain_weight: float = 1.0,
                 beta: Optional[float] = None, gamma: Optional[float] = None, ignore_index: int = -100,
                 shift: bool = True, backend=None, retain_loss: Optional[str] = None, grad_filter: FilterSpec = "auto",
                 normalize: str = "token"):
        super().__init__()
        self.criterion = UnlearningCriterion(objective, forget_weight=forget_weight, retain_weight=retain_weight,
                                             beta=beta, gamma=gamma, retain_loss=retain_loss, normalize=normalize,
                                             ignore_index=ignore_index, shift=shift, backend=backend,
                                             grad_filter=grad_filter)

    def __getattr__(self, name: str):
        criterion = self.__dict__.get("criterion")
        if criterion is None or name.startswith("__"):
            return super().__getattr__(name)
        return getattr(criterion, name)

    def forward(self, weight, forget_hidden, forget_labels, retain_hidden=None, retain_labels=None, *,
                bias=None, ref_logp_sum=None, forget_normalizer=None, retain_normalizer=None,
                reference: Optional[ReferenceHead] = None, alternate_hidden=None, alternate_labels=None,
                ref_alt_logp_sum=None) -> LossOutput:
        c = self.criterion
        hidden, labels = forget_hidden, forget_labels
        if c.pairs:
            if alternate_hidden is None or alternate_labels is None:
                raise ValueError(f"objective {c.objective!r} needs alternate_hidden / alternate_labels (the "
                                 "alternate answer of every forget row)")
            hidden, labels = _stack_rows(forget_hidden, alternate_hidden, forget_labels, alternate_labels,
                                         c.kw["ignore_index"])
        refs = {"ref_logp_sum": ref_logp_sum, "ref_alt_logp_sum": ref_alt_logp_sum}
        return c.terms(Head(weight, bias), hidden, labels, forget_labels.shape[0], retain_hidden, retain_labels,
                       refs, (forget_normalizer, retain_normalizer), reference)

    def batch_loss(self, weight, bias, hidden, batch, counts=None, *,
                   reference: Optional[ReferenceHead] = None) -> LossOutput:
        """The criterion's call on one :class:`~simnpo_fast.batch.ForgetRetainBatch` from the final hidden states of
        all its rows ``[F + A + R, T, d]`` (:meth:`UnlearningCriterion.__call__
        <simnpo_fast.criterion.UnlearningCriterion.__call__>`): with ``counts`` (the step's
        :class:`~simnpo_fast.batch.StepCounts`) each term is ``sum / global count``, without them the batch's own
        means. The signature starts ``(weight, bias, hidden)``: a fused LM head calls it inside its own forward."""
        return self.criterion(Head(weight, bias), hidden, batch, counts, reference=reference)

    def extra_repr(self) -> str:
        c = self.criterion
        return (f"objective={c.objective!r}, forget={c.forget_objective}, forget_weight={c.forget_weight}, "
                f"retain={c.retain_loss!r}, retain_weight={c.retain_weight}, normalize={c.normalize!r}")
