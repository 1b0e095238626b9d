"""One optimizer step, in named pieces: counts -> forward_backward -> check / clip -> optimizer step -> record.

    ctx = StepContext(model=model, criterion=UnlearningCriterion("simnpo"), optimizer=opt, max_grad_norm=1.0)
    record = train_step(ctx, batches)       # batches: this rank's ForgetRetainBatch micro-batches of the step

``model(input_ids, attention_mask, loss_fn)`` must run ``loss_fn(weight, bias, final hidden states)`` inside its
LM head's forward (:class:`~simnpo_fast.model.UnlearnModel`, sharded or not). The training loop's
:class:`~simnpo_fast.train.setup.Run` is a :class:`StepContext` with the run's data, config and folder state.

Exact normalisation. The step's micro-batches (``grad_accum`` on each of ``world_size`` ranks) are counted
first, once, and all-reduced (:meth:`StepCounts.of <simnpo_fast.batch.StepCounts.of>`): forget sequences with an
answer token (answer tokens for a ``per="token"`` method) and retain answer tokens of the *whole* step. Every
micro-batch loss is ``sum / that global count`` and FSDP *sums* the gradients over ranks (divide factor 1), so
the accumulated gradient is the gradient of the mean loss over the global batch, whatever the split into ranks
and micro-batches.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from ..batch import ForgetRetainBatch, StepCounts
from ..criterion import UnlearningCriterion
from ..distributed import all_reduce_sum, clip_grad_norm_
from ..errors import NonFiniteError
from ..model import FrozenReference
from .run_log import peak_memory_mb


@dataclass(kw_only=True)
class StepContext:
    """What an optimizer step reads and advances: the model, the criterion (method, retain term, normalisation),
    the optimizer and its optional LR ``scheduler``, the ``device`` of the batches, ``max_grad_norm`` (0: no
    clipping, the norm is still computed), the frozen ``reference`` model of a retain KL, the cached reference
    log-likelihoods ``ref_logp`` (one per forget example) and ``ref_alt_logp`` (one per alternate candidate) of a
    ``reference="logp"`` method, and ``step``, the optimizer steps taken."""

    model: torch.nn.Module
    criterion: UnlearningCriterion
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_grad_norm: float = 0.0
    reference: Optional[FrozenReference] = None
    ref_logp: Optional[torch.Tensor] = None
    ref_alt_logp: Optional[torch.Tensor] = None
    step: int = 0

    @property
    def epoch(self) -> int:
        """The data epoch a step's record names (0: a context without a data stream)."""
        return 0


@dataclass
class StepStats:
    """Sums over a step's micro-batches (over all ranks after :meth:`all_reduce`): the loss, its forget and
    retain terms, and the summed answer log-likelihoods of the forget, retain and alternate rows."""

    loss: float = 0.0
    forget_loss: float = 0.0
    retain_loss: float = 0.0
    forget_logp: float = 0.0
    retain_logp: float = 0.0
    alternate_logp: float = 0.0

    def add(self, loss: torch.Tensor, terms: dict) -> None:
        self.loss += float(loss.detach())
        self.forget_loss += float(terms["forget_loss"])
        self.retain_loss += float(terms.get("retain_loss", 0.0))
        self.forget_logp += float(terms["forget_logp_sum"].sum())
        if "retain_logp_sum" in terms:
            self.retain_logp += float(terms["retain_logp_sum"].sum())
        if "alternate_logp_sum" in terms:
            self.alternate_logp += float(terms["alternate_logp_sum"].sum())

    def all_reduce(self, device: torch.device) -> "StepStats":
        """The sums over every rank (one all-reduce of a float64 vector on ``device``)."""
        t = torch.tensor(dataclasses.astuple(self), dtype=torch.float64)
        return StepStats(*all_reduce_sum(t.to(device)).cpu().tolist())


@dataclass
class StepRecord:
    """What one optimizer step logs (identical on every rank): loss terms, mean answer log-likelihoods per
    token, gradient norm before clipping, learning rate, throughput and peak memory; for a method with alternate
    answers (IdkDPO) also their mean log-likelihood per answer token (``alternate_loglik``; the key is left out of
    :meth:`as_dict` for the other methods)."""

    step: int
    epoch: int
    loss: float
    forget_loss: float
    retain_loss: Optional[float]
    forget_loglik: float
    retain_loglik: Optional[float]
    grad_norm: float
    lr: float
    tokens: int
    tokens_per_s: float
    step_time_s: float
    peak_mem_mb: float
    alternate_loglik: Optional[float] = None

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["alternate_loglik"] is None:
            del d["alternate_loglik"]
        return d


def step_counts(ctx: StepContext, batches: List[ForgetRetainBatch]) -> StepCounts:
    """The step's global counts (one all-reduce); an error when no rank holds a forget answer token."""
    counts = ctx.criterion.step_counts(batches, reduce=lambda c: all_reduce_sum(c.to(ctx.device)))
    if counts.forget <= 0:
        raise ValueError("this step holds no forget answer token on any rank (check the labels / template)")
    return counts


def forward_backward(ctx: StepContext, batches: List[ForgetRetainBatch], counts: StepCounts) -> StepStats:
    """Forward and backward of every micro-batch (gradients accumulate); the loss runs inside the LM head's
    forward (:meth:`UnlearningCriterion.head_loss <simnpo_fast.criterion.UnlearningCriterion.head_loss>`)."""
    stats = StepStats()
    for b in batches:
        b = b.to(ctx.device, non_blocking=True)
        if ctx.ref_logp is not None:
            b = b.with_ref_logp(ctx.ref_logp, ctx.ref_alt_logp)
        reference = None
        if ctx.reference is not None and b.n_retain > 0:
            reference = ctx.reference(*b.retain_inputs())
        out = ctx.model(b.input_ids, b.attention_mask, ctx.criterion.head_loss(b, counts, reference))
        out.loss.backward()
        stats.add(out.loss, out.terms)
    return stats.all_reduce(ctx.device)


def clip_and_check(ctx: StepContext, loss: float) -> float:
    """The global gradient norm (clipped to ``max_grad_norm`` when > 0); a non-finite loss or norm drops the
    gradients and raises :class:`~simnpo_fast.errors.NonFiniteError` before any update."""
    gnorm = float(clip_grad_norm_(ctx.model.parameters(), ctx.max_grad_norm))
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        ctx.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"step {ctx.step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'}"
                             f" (loss={loss}, grad_norm={gnorm}); stopping before the optimizer step")
    return gnorm


def optimizer_step(ctx: StepContext) -> float:
    """Update, advance the schedule (if any), drop the gradients, count the step; returns the learning rate used."""
    lr = ctx.scheduler.get_last_lr()[0] if ctx.scheduler is not None else ctx.optimizer.param_groups[0]["lr"]
    ctx.optimizer.step()
    if ctx.scheduler is not None:
        ctx.scheduler.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.step += 1
    return lr


def record(ctx: StepContext, counts: StepCounts, stats: StepStats, gnorm: float, lr: float, dt: float) -> StepRecord:
    """The step's :class:`StepRecord`: log-likelihoods per answer token (forget: over the step's forget answer
    tokens; retain: only when the retain term reports one, i.e. an NLL retain term), throughput over ``dt``."""
    has_retain = counts.retain_tokens > 0
    return StepRecord(
        step=ctx.step, epoch=ctx.epoch, loss=stats.loss, forget_loss=stats.forget_loss,
        retain_loss=stats.retain_loss if has_retain else None,
        forget_loglik=stats.forget_logp / max(1.0, float(counts.forget_tokens)),
        retain_loglik=stats.retain_logp / counts.retain_tokens if has_retain and stats.retain_logp != 0 else None,
        grad_norm=gnorm, lr=lr, tokens=counts.tokens, tokens_per_s=counts.tokens / dt, step_time_s=dt,
        peak_mem_mb=peak_memory_mb(ctx.device),
        alternate_loglik=stats.alternate_logp / counts.alternate_tokens if counts.alternate_tokens > 0 else None)


def train_step(ctx: StepContext, batches: List[ForgetRetainBatch], hooks: Optional[dict] = None) -> StepRecord:
    """One optimizer step over this rank's micro-batches (``ctx.step`` then counts it).
    ``hooks["after_backward"](ctx, s)`` runs before update ``s`` with the step's gradients complete."""
    counts = step_counts(ctx, batches)
    t0 = time.perf_counter()
    stats = forward_backward(ctx, batches, counts)
    if hooks and "after_backward" in hooks:
        hooks["after_backward"](ctx, ctx.step + 1)
    gnorm = clip_and_check(ctx, stats.loss)
    lr = optimizer_step(ctx)
    return record(ctx, counts, stats, gnorm, lr, time.perf_counter() - t0)
