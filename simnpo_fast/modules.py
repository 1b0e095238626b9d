"""nn.Module wrappers: ``loss = FusedSimNPOLoss(beta=2.5)(hidden, lm_head.weight, labels)``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from ._inputs import answer_tokens
from .backends.filter import FilterSpec, resolve
from .methods import PairObjective, get_method
from .objectives import GA, NLL, NPO, SequenceMean, SimNPO, check_normalize
from .objectives.base import check_reduction
from .ops import fused_sequence_loss, kl_loss, sequence_logprob


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


@dataclass
class ReferenceHead:
    """A frozen reference model as the fused retain KL needs it: its final hidden states of the retain rows
    ``[R, T, d_ref]`` and its LM head ``weight [V, d_ref]`` / ``bias [V]`` (no gradient flows to them)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


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
    """``forget_weight * L_forget + retain_weight * L_retain`` on a forget and a retain batch.

    ``objective`` names a registered method (:func:`simnpo_fast.methods.get_method`: ``simnpo`` (default),
    ``npo``, ``ga``, ``graddiff``, ``finetune``, ...): it gives the forget objective, whether a reference
    log-likelihood is needed and the default retain term. ``retain_loss="nll"`` (token-mean NLL of the retain
    answers) or ``"kl"`` (token-mean ``KL(p_ref || p)`` against a frozen reference, :func:`simnpo_fast.kl_loss`)
    overrides that default for methods that have a retain term; methods without one (``ga``, ``finetune``)
    ignore ``retain_weight`` and ``retain_loss``.

    Each batch is ``(hidden, labels)``; the LM-head ``weight`` (and ``bias``) are shared.
    ``forget_normalizer`` / ``retain_normalizer`` switch the terms to ``sum / normalizer`` for exact
    gradient accumulation across micro-batches and ranks; :meth:`batch_loss` takes them from a
    :class:`~simnpo_fast.batch.StepCounts`.

    A method with alternate answers (``method.alternate != "none"``, e.g. ``idk_dpo``) also takes
    ``alternate_hidden`` / ``alternate_labels`` (row ``i``: the alternate answer of forget row ``i``) and, with
    ``reference="logp"``, ``ref_alt_logp_sum``; its :class:`~simnpo_fast.methods.PairObjective` runs on the
    differentiable fused ``sequence_logprob`` of the forget and alternate rows (8NdV instead of 6NdV flops), and
    the terms add ``alternate_logp_sum`` / ``alternate_n_tokens``.

    ``grad_filter`` goes to every fused term (``simnpo_fast.backends.filter``: ``"auto"``, the default, is exact).
    """

    def __init__(self, objective: str = "simnpo", *, forget_weight: float = 1.0, retain_weight: float = 1.0,
                 beta: Optional[float] = None, gamma: float = 0.0, ignore_index: int = -100, shift: bool = True,
                 backend=None, retain_loss: Optional[str] = None, grad_filter: FilterSpec = "auto",
                 normalize: str = "token"):
        super().__init__()
        self.normalize = check_normalize(normalize)
        try:
            ok = all(math.isfinite(float(w)) and float(w) >= 0 for w in (forget_weight, retain_weight))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"weights must be finite and >= 0, got forget {forget_weight}, retain {retain_weight}")
        resolve(grad_filter, torch.float32)  # a bad spec fails here, not at the first backward
        self.method = get_method(objective)
        self.forget_objective = self.method.forget_objective(beta=beta, gamma=gamma)
        self.pairs = isinstance(self.forget_objective, PairObjective)
        if normalize == "sequence" and not self.pairs and self.forget_objective.per == "token":
            self.forget_objective = SequenceMean(self.forget_objective)  # GA / GradDiff: per-sequence token means
        if retain_loss is not None and retain_loss not in ("nll", "kl"):
            raise ValueError(f"retain_loss must be 'nll' or 'kl', got {retain_loss!r}")
        self.retain_loss = "none" if self.method.retain == "none" else (retain_loss or self.method.retain)
        if self.retain_loss == "none":
            retain_weight = 0.0  # e.g. plain GA: no retain term by definition (graddiff is GA + retain NLL)
        self.objective = self.method.name
        self.forget_weight = float(forget_weight)
        self.retain_weight = float(retain_weight)
        self.retain_objective = NLL() if normalize == "token" else SequenceMean(NLL())
        self.kw = dict(ignore_index=ignore_index, shift=shift, backend=backend, grad_filter=grad_filter)

    @property
    def uses_retain(self) -> bool:
        """Whether the loss has a retain term (a retain batch is then required)."""
        return self.retain_weight > 0

    def forward(self, weight, forget_hidden, forget_labels, retain_hidden=None, retain_labels=None, *,
                bias=None, ref_logp_sum=None, forget_normalizer=None, retain_normalizer=None,
                reference: Optional[ReferenceHead] = None, alternate_hidden=None, alternate_labels=None,
                ref_alt_logp_sum=None) -> LossOutput:
        if self.pairs:
            if alternate_hidden is None or alternate_labels is None:
                raise ValueError(f"objective {self.objective!r} needs alternate_hidden / alternate_labels (the "
                                 "alternate answer of every forget row)")
            hidden, labels = _stack_rows(forget_hidden, alternate_hidden, forget_labels, alternate_labels,
                                         self.kw["ignore_index"])
            return self._loss(weight, bias, hidden, labels, forget_labels.shape[0], retain_hidden, retain_labels,
                              ref_logp_sum, ref_alt_logp_sum, forget_normalizer, retain_normalizer, reference)
        return self._loss(weight, bias, forget_hidden, forget_labels, None, retain_hidden, retain_labels,
                          ref_logp_sum, None, forget_normalizer, retain_normalizer, reference)

    def _loss(self, weight, bias, hidden, labels, n_pairs, retain_hidden, retain_labels, ref_logp_sum,
              ref_alt_logp_sum, forget_normalizer, retain_normalizer, reference) -> LossOutput:
        """The forget term on ``hidden`` / ``labels`` (for a pair objective: ``n_pairs`` forget rows, then their
        ``n_pairs`` alternate rows), plus the retain term."""
        extras = {}
        if self.method.reference == "logp":
            if ref_logp_sum is None or (self.pairs and ref_alt_logp_sum is None):
                need = "ref_logp_sum and ref_alt_logp_sum" if self.pairs else "ref_logp_sum"
                raise ValueError(f"objective {self.objective!r} needs {need} for the forget batch")
            extras["ref_logp_sum"] = ref_logp_sum
            if self.pairs:
                extras["ref_alt_logp_sum"] = ref_alt_logp_sum
        if self.pairs:
            lf, terms = self._pair_term(weight, bias, hidden, labels, n_pairs, forget_normalizer, extras)
        else:
            red = "sum" if forget_normalizer is not None else "mean"
            lf, logp, n = fused_sequence_loss(hidden, weight, labels, self.forget_objective, bias=bias,
                                              reduction=red, normalizer=forget_normalizer, return_logp=True,
                                              **self.kw, **extras)
            terms = {"forget_loss": lf.detach(), "forget_logp_sum": logp, "forget_n_tokens": n}
        loss = self.forget_weight * lf
        if self.uses_retain:
            if retain_hidden is None or retain_labels is None:
                raise ValueError(f"objective {self.objective!r} with retain_weight > 0 needs a retain batch")
            lr, rterms = self._retain(weight, bias, retain_hidden, retain_labels, retain_normalizer, reference)
            loss = loss + self.retain_weight * lr
            terms.update(rterms)
        terms["loss"] = loss.detach()
        return LossOutput(loss, terms)

    def _pair_term(self, weight, bias, hidden, labels, F, normalizer, extras):
        """A :class:`~simnpo_fast.methods.PairObjective` on rows ``[:F]`` (forget) and ``[F:2F]`` (alternates):
        ``sum_i f_i / normalizer`` (or the mean of the objective's ``per``) and its logged terms."""
        for k, v in extras.items():
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != (F,):
                raise ValueError(f"{k} must be a tensor of shape [{F}] (one value per forget row), got "
                                 f"{getattr(v, 'shape', type(v).__name__)}")
        if labels.shape[0] != 2 * F:
            raise ValueError(f"{labels.shape[0]} rows for {F} forget rows and their {F} alternates")
        logp, n = sequence_logprob(hidden, weight, labels, bias=bias, **self.kw)
        extras = {k: v.detach().to(device=logp.device, dtype=logp.dtype) for k, v in extras.items()}
        f = self.forget_objective(logp[:F], n[:F], logp[F:], n[F:], **extras)
        denom = float(normalizer) if normalizer is not None else self.forget_objective.denominator(n[:F], n[F:])
        lf = f.sum() / denom if denom > 0 else f.sum() * 0.0
        lp = logp.detach()
        return lf, {"forget_loss": lf.detach(), "forget_logp_sum": lp[:F], "forget_n_tokens": n[:F],
                    "alternate_logp_sum": lp[F:], "alternate_n_tokens": n[F:]}

    def _retain(self, weight, bias, hidden, labels, normalizer, reference):
        """The retain term and its logged terms: token-mean (or sum / normalizer) NLL or KL."""
        red = "sum" if normalizer is not None else "mean"
        if self.retain_loss == "nll":
            lr, rlogp, rn = fused_sequence_loss(hidden, weight, labels, self.retain_objective, bias=bias,
                                                reduction=red, normalizer=normalizer, return_logp=True, **self.kw)
            return lr, {"retain_loss": lr.detach(), "retain_logp_sum": rlogp, "retain_n_tokens": rn}
        if reference is None:
            raise ValueError(f"objective {self.objective!r} with retain_loss='kl' needs reference= (the frozen "
                             "reference's final hidden states of the retain rows and its LM head)")
        lr = kl_loss(hidden, weight, labels, reference.hidden, reference.weight, bias=bias, ref_bias=reference.bias,
                     reduction=red, normalizer=normalizer, normalize=self.normalize, **self.kw)
        rn = answer_tokens(labels, self.kw["ignore_index"], shift=self.kw["shift"])
        return lr, {"retain_loss": lr.detach(), "retain_n_tokens": rn}

    def batch_loss(self, weight, bias, hidden, batch, counts=None, *,
                   reference: Optional[ReferenceHead] = None) -> LossOutput:
        """The loss of one :class:`~simnpo_fast.batch.ForgetRetainBatch` from the final hidden states of all its
        rows ``[F + R, T, d]``: the forget term on rows ``[:F]``, the retain term on rows ``[F:]``; with
        ``counts`` (the step's :class:`~simnpo_fast.batch.StepCounts`) each term is ``sum / global count``,
        without them the batch's own means. ``reference``: the frozen reference of the retain rows (retain KL).
        The signature starts ``(weight, bias, hidden)``: a fused LM head calls it inside its own forward."""
        fh, rh = batch.split(hidden)
        fl, rl = batch.split(batch.labels)
        f_norm, r_norm = counts.normalizers() if counts is not None else (None, None)
        if not self.pairs:
            return self.forward(weight, fh, fl, rh, rl, bias=bias, ref_logp_sum=batch.ref_logp_sum,
                                forget_normalizer=f_norm, retain_normalizer=r_norm, reference=reference)
        if batch.n_alternate != batch.n_forget:
            raise ValueError(f"objective {self.objective!r} needs a batch with the alternate answer of every forget "
                             f"row (n_alternate={batch.n_alternate}, n_forget={batch.n_forget})")
        return self._loss(weight, bias, batch.pair_rows(hidden), batch.pair_rows(batch.labels), batch.n_forget, rh,
                          rl, batch.ref_logp_sum, batch.ref_alt_logp_sum, f_norm, r_norm, reference)

    def extra_repr(self) -> str:
        return (f"objective={self.objective!r}, forget={self.forget_objective}, forget_weight={self.forget_weight}, "
                f"retain={self.retain_loss!r}, retain_weight={self.retain_weight}, normalize={self.normalize!r}")

