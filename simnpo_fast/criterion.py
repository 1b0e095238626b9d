"""The unlearning criterion: a method, its retain term and the normalisation, as one object with one call.

    criterion = UnlearningCriterion("simnpo", forget_weight=0.125, normalize="sequence")
    counts = criterion.step_counts(batches, reduce)                  # the optimizer step's global counts
    out = criterion(head, hidden, batch, counts)                     # LossOutput(loss, terms) of one micro-batch
    out = model(batch.input_ids, batch.attention_mask, criterion.head_loss(batch, counts))  # inside the LM head

On one :class:`~simnpo_fast.batch.ForgetRetainBatch` (rows ``[:F]`` forget, ``[F:F + A]`` their alternate answers,
``[F + A:]`` retain) with the final hidden states ``hidden [F + A + R, T, d]`` of all its rows and the LM head
``head = (weight [V, d], bias [V] or None)``:

    loss = w_f * sum_i f_i / N_f + w_r * L_retain

``f_i`` is the method's forget objective (:meth:`Method.forget_objective <simnpo_fast.methods.Method.forget_objective>`)
of forget row ``i`` (a :class:`~simnpo_fast.methods.PairObjective` also sees alternate row ``F + i``); ``L_retain``
is ``sum_r nll_r / N_r`` (NLL) or ``sum_r KL(p_ref || p)_r / N_r`` (KL against a frozen reference) over the retain
answer tokens ``r``. With ``counts`` (:class:`~simnpo_fast.batch.StepCounts`) ``N_f`` and ``N_r`` are the
optimizer step's global counts (``counts.normalizers()``), so the micro-batch losses of every rank add up to the
full-batch loss; without them each term is the batch's own mean. ``normalize="sequence"`` makes the
token-normalised terms (retain NLL / KL, a GA forget term) means over sequences of each sequence's token mean.

Both trainers (``train/step.py`` and ``hf.UnlearningTrainer``) use this object; :class:`simnpo_fast.UnlearningLoss`
is its ``nn.Module`` face for separate forget / retain tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional

import torch

from .backends.filter import FilterSpec, resolve
from .batch import StepCounts
from .methods import PairObjective, get_method
from .objectives import NLL, SequenceMean, check_normalize
from .ops import fused_sequence_loss, kl_loss, sequence_logprob


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


class Head(NamedTuple):
    """An LM head's parameters as a loss sees them inside the head's forward (the all-gathered FSDP weight)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


class UnlearningCriterion:
    """``forget_weight * L_forget + retain_weight * L_retain`` (module docstring) of one method.

    ``objective`` names a registered method (:func:`simnpo_fast.methods.get_method`); ``beta`` / ``gamma`` of
    ``None`` take the method's defaults. ``retain_loss`` (``"nll"`` or ``"kl"``) overrides the method's retain
    term for methods that have one; methods without one (``ga``, ``finetune``) get ``retain_weight = 0``.
    ``ignore_index``, ``shift``, ``backend`` and ``grad_filter`` go to every fused term (:attr:`kw`).
    """

    def __init__(self, objective: str = "simnpo", *, forget_weight: float = 1.0, retain_weight: float = 1.0,
                 beta: Optional[float] = None, gamma: Optional[float] = None, retain_loss: Optional[str] = None,
                 normalize: str = "token", ignore_index: int = -100, shift: bool = True, backend=None,
                 grad_filter: FilterSpec = "auto"):
        self.normalize = check_normalize(normalize)
        try:
            ok = all(math.isfinite(float(w)) and float(w) >= 0 for w in (forget_weight, retain_weight))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"weights must be finite and >= 0, got forget {forget_weight}, retain {retain_weight}")
        resolve(grad_filter, torch.float32)  # a bad spec fails here, not at the first backward
        self.method = get_method(objective)
        self.objective = self.method.name
        self.forget_objective = self.method.forget_objective(beta=beta, gamma=gamma)
        self.pairs = isinstance(self.forget_objective, PairObjective)
        if normalize == "sequence" and not self.pairs and self.forget_objective.per == "token":
            self.forget_objective = SequenceMean(self.forget_objective)  # GA / GradDiff: per-sequence token means
        if retain_loss is not None and retain_loss not in ("nll", "kl"):
            raise ValueError(f"retain_loss must be 'nll' or 'kl', got {retain_loss!r}")
        self.retain_loss = "none" if self.method.retain == "none" else (retain_loss or self.method.retain)
        self.forget_weight = float(forget_weight)
        self.retain_weight = 0.0 if self.retain_loss == "none" else float(retain_weight)
        self.retain_objective = NLL() if normalize == "token" else SequenceMean(NLL())
        self.kw = dict(ignore_index=ignore_index, shift=shift, backend=backend, grad_filter=grad_filter)

    @property
    def uses_retain(self) -> bool:
        """Whether the loss has a retain term (retain rows are then required)."""
        return self.retain_weight > 0

    def step_counts(self, batches, reduce: Optional[Callable] = None) -> StepCounts:
        """The global counts of one optimizer step's ``batches`` for this method and normalisation
        (:meth:`StepCounts.of <simnpo_fast.batch.StepCounts.of>`; ``reduce`` sums them across processes)."""
        return StepCounts.of(batches, self.method, reduce, normalize=self.normalize)

    def __call__(self, head, hidden, batch, counts: Optional[StepCounts] = None, *,
                 reference: Optional[ReferenceHead] = None) -> LossOutput:
        """The loss of one micro-batch ``batch`` from the final hidden states of all its rows (module docstring);
        ``head``: ``(weight, bias)`` (a :class:`Head`, an ``nn.Linear``: anything with ``.weight`` and ``.bias``);
        ``reference``: the frozen reference of the retain rows (retain KL)."""
        F = batch.n_forget
        if self.pairs and batch.n_alternate != F:
            raise ValueError(f"objective {self.objective!r} needs a batch with the alternate answer of every forget "
                             f"row (n_alternate={batch.n_alternate}, n_forget={F})")
        rows = F + batch.n_alternate if self.pairs else F
        refs = {"ref_logp_sum": batch.ref_logp_sum, "ref_alt_logp_sum": batch.ref_alt_logp_sum}
        return self.terms(head, hidden[:rows], batch.labels[:rows], F, batch.split(hidden)[1], batch.retain_labels,
                          refs, counts.normalizers() if counts is not None else (None, None), reference)

    def head_loss(self, batch, counts: Optional[StepCounts] = None,
                  reference: Optional[ReferenceHead] = None) -> Callable[..., LossOutput]:
        """This call as a head loss ``loss_fn(weight, bias, hidden)``, which a fused LM head runs inside its own
        forward (``model.UnlearnModel``, ``model.patch``)."""
        def loss_fn(weight, bias, hidden):
            return self(Head(weight, bias), hidden, batch, counts, reference=reference)

        return loss_fn

    def terms(self, head, hidden, labels, n_forget: int, retain_hidden, retain_labels, refs: dict,
              normalizers=(None, None), reference: Optional[ReferenceHead] = None) -> LossOutput:
        """The forget term on ``hidden`` / ``labels`` (``n_forget`` forget rows; for a pair objective followed by
        their ``n_forget`` alternate rows) plus the retain term; ``refs``: ``ref_logp_sum`` (and
        ``ref_alt_logp_sum``) of the forget rows; ``normalizers``: ``(forget, retain)``, ``None`` for a mean."""
        f_norm, r_norm = normalizers
        extras = {}
        if self.method.reference == "logp":
            need = ("ref_logp_sum", "ref_alt_logp_sum") if self.pairs else ("ref_logp_sum",)
            if any(refs.get(k) is None for k in need):
                raise ValueError(f"objective {self.objective!r} needs {' and '.join(need)} for the forget batch")
            extras = {k: refs[k] for k in need}
        if self.pairs:
            lf, terms = self._pair_term(head, hidden, labels, n_forget, f_norm, extras)
        else:
            lf, logp, n = fused_sequence_loss(hidden, head.weight, labels, self.forget_objective, bias=head.bias,
                                              reduction="sum" if f_norm is not None else "mean", normalizer=f_norm,
                                              return_logp=True, **self.kw, **extras)
            terms = {"forget_loss": lf.detach(), "forget_logp_sum": logp, "forget_n_tokens": n}
        loss = self.forget_weight * lf
        if self.uses_retain:
            if retain_hidden is None or retain_labels is None:
                raise ValueError(f"objective {self.objective!r} with retain_weight > 0 needs a retain batch")
            lr, rterms = self._retain_term(head, retain_hidden, retain_labels, r_norm, reference)
            loss = loss + self.retain_weight * lr
            terms.update(rterms)
        terms["loss"] = loss.detach()
        return LossOutput(loss, terms)

    def _pair_term(self, head, hidden, labels, F: int, normalizer, extras):
        """A :class:`~simnpo_fast.methods.PairObjective` on rows ``[:F]`` (forget) and ``[F:2F]`` (alternates):
        ``sum_i f_i / normalizer`` (or the mean of the objective's ``per``) and its logged terms."""
        for k, v in extras.items():
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != (F,):
                raise ValueError(f"{k} must be a tensor of shape [{F}] (one value per forget row), got "
                                 f"{getattr(v, 'shape', type(v).__name__)}")
        if labels.shape[0] != 2 * F:
            raise ValueError(f"{labels.shape[0]} rows for {F} forget rows and their {F} alternates")
        logp, n = sequence_logprob(hidden, head.weight, labels, bias=head.bias, **self.kw)
        extras = {k: v.detach().to(device=logp.device, dtype=logp.dtype) for k, v in extras.items()}
        f = self.forget_objective(logp[:F], n[:F], logp[F:], n[F:], **extras)
        denom = float(normalizer) if normalizer is not None else self.forget_objective.denominator(n[:F], n[F:])
        lf = f.sum() / denom if denom > 0 else f.sum() * 0.0
        lp = logp.detach()
        return lf, {"forget_loss": lf.detach(), "forget_logp_sum": lp[:F], "forget_n_tokens": n[:F],
                    "alternate_logp_sum": lp[F:], "alternate_n_tokens": n[F:]}

    def _retain_term(self, head, hidden, labels, normalizer, reference):
        """The retain term and its logged terms: token-mean (or sum / normalizer) NLL or KL."""
        red = "sum" if normalizer is not None else "mean"
        if self.retain_loss == "nll":
            lr, rlogp, rn = fused_sequence_loss(hidden, head.weight, labels, self.retain_objective, bias=head.bias,
                                                reduction=red, normalizer=normalizer, return_logp=True, **self.kw)
            return lr, {"retain_loss": lr.detach(), "retain_logp_sum": rlogp, "retain_n_tokens": rn}
        if reference is None:
            raise ValueError(f"objective {self.objective!r} with retain_loss='kl' needs reference= (the frozen "
                             "reference's final hidden states of the retain rows and its LM head)")
        lr, rn = kl_loss(hidden, head.weight, labels, reference.hidden, reference.weight, bias=head.bias,
                         ref_bias=reference.bias, reduction=red, normalizer=normalizer, normalize=self.normalize,
                         return_n_tokens=True, **self.kw)
        return lr, {"retain_loss": lr.detach(), "retain_n_tokens": rn}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(objective={self.objective!r}, forget={self.forget_objective}, "
                f"forget_weight={self.forget_weight}, retain={self.retain_loss!r}, retain_weight={self.retain_weight}, "
                f"normalize={self.normalize!r})")
