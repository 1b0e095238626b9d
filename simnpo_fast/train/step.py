"""One optimizer step, in named pieces: counts -> forward_backward -> check / clip -> optimizer step -> record.

Exact normalisation. The step's micro-batches (``grad_accum`` on each of ``world_size`` ranks) are counted
first, once, and all-reduced (:meth:`StepCounts.of <simnpo_fast.batch.StepCounts.of>`): forget sequences with an
answer token (answer tokens for a ``per="token"`` method) and retain answer tokens of the *whole* step. Every
micro-batch loss is ``sum / that global count`` and FSDP *sums* the gradients over ranks (divide factor 1), so
the accumulated gradient is the gradient of the mean loss over the global batch, whatever the split into ranks
and micro-batches.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..batch import ForgetRetainBatch, StepCounts
from ..distributed import all_reduce_sum, clip_grad_norm_
from ..errors import NonFiniteError
from .metrics import peak_memory_mb


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


def step_counts(run, batches: List[ForgetRetainBatch]) -> StepCounts:
    """The step's global counts (one all-reduce); an error when no rank holds a forget answer token."""
    dev = run.info.device
    counts = StepCounts.of(batches, run.criterion.method, reduce=lambda c: all_reduce_sum(c.to(dev)),
                           normalize=run.criterion.normalize)
    if counts.forget <= 0:
        raise ValueError("this step holds no forget answer token on any rank (check the labels / template)")
    return counts


def forward_backward(run, batches: List[ForgetRetainBatch], counts: StepCounts) -> StepStats:
    """Forward and backward of every micro-batch (gradients accumulate); the loss runs inside the LM head's
    forward (:meth:`UnlearningLoss.batch_loss <simnpo_fast.modules.UnlearningLoss.batch_loss>`)."""
    stats = StepStats()
    for b in batches:
        b = b.to(run.info.device, non_blocking=True)
        if run.ref_logp is not None:
            b = b.with_ref_logp(run.ref_logp, run.ref_alt_logp)
        reference = None
        if run.reference is not None and b.n_retain > 0:
            reference = run.reference(*b.retain_inputs())
        loss_fn = functools.partial(run.criterion.batch_loss, batch=b, counts=counts, reference=reference)
        out = run.model(b.input_ids, b.attention_mask, loss_fn)
        out.loss.backward()
        stats.add(out.loss, out.terms)
    return stats.all_reduce(run.info.device)


def clip_and_check(run, loss: float) -> float:
    """The global gradient norm (clipped to ``optim.max_grad_norm`` when > 0); a non-finite loss or norm drops
    the gradients and raises :class:`~simnpo_fast.errors.NonFiniteError` before any update."""
    gnorm = float(clip_grad_norm_(run.model.parameters(), run.cfg.optim.max_grad_norm))
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        run.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"step {run.step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'}"
                             f" (loss={loss}, grad_norm={gnorm}); stopping before the optimizer step")
    return gnorm


def optimizer_step(run) -> float:
    """Update, advance the schedule, drop the gradients, count the step; returns the learning rate used."""
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return lr


def record(run, counts: StepCounts, stats: StepStats, gnorm: float, lr: float, dt: float) -> StepRecord:
    """The step's :class:`StepRecord`: log-likelihoods per answer token (forget: over the step's forget answer
    tokens; retain: only when the retain term reports one, i.e. an NLL retain term), throughput over ``dt``."""
    has_retain = counts.retain_tokens > 0
    return StepRecord(
        step=run.step, epoch=run.stream.epoch, loss=stats.loss, forget_loss=stats.forget_loss,
        retain_loss=stats.retain_loss if has_retain else None,
        forget_loglik=stats.forget_logp / max(1.0, float(counts.forget_tokens)),
        retain_loglik=stats.retain_logp / counts.retain_tokens if has_retain and stats.retain_logp != 0 else None,
        grad_norm=gnorm, lr=lr, tokens=counts.tokens, tokens_per_s=counts.tokens / dt, step_time_s=dt,
        peak_mem_mb=peak_memory_mb(run.info.device),
        alternate_loglik=stats.alternate_logp / counts.alternate_tokens if counts.alternate_tokens > 0 else None)


def train_step(run, batches: List[ForgetRetainBatch], hooks: Optional[dict] = None) -> StepRecord:
    """One optimizer step over this rank's micro-batches. ``hooks["after_backward"](run, s)`` runs before
    update ``s`` with the step's gradients complete."""
    counts = step_counts(run, batches)
    t0 = time.perf_counter()
    stats = forward_backward(run, batches, counts)
    if hooks and "after_backward" in hooks:
        hooks["after_backward"](run, run.step + 1)
    gnorm = clip_and_check(run, stats.loss)
    lr = optimizer_step(run)
    return record(run, counts, stats, gnorm, lr, time.perf_counter() - t0)
