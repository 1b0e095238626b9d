"""Token-level likelihood objectives: retain NLL and gradient ascent (GA = negated NLL).

Both are means over answer tokens by default (the HF causal-LM convention): ``f_i = -logp_sum_i`` for
NLL and ``+logp_sum_i`` for GA, divided by the number of answer tokens (or ``normalizer``).
:class:`SequenceMean` turns either into the mean over sequences of each sequence's token mean.
"""
from __future__ import annotations

import torch

from .base import SequenceObjective


def _ones(n_tokens):
    return torch.ones(n_tokens.shape, dtype=torch.float32, device=n_tokens.device)


class NLL(SequenceObjective):
    name = "nll"
    per = "token"

    def per_sequence(self, logp_sum, n_tokens, **extra):
        return -logp_sum

    def weight_bound(self, n_tokens):  # constant weight: never below a fraction of itself
        return _ones(n_tokens)


class SequenceMean(SequenceObjective):
    """``f_i / n_i`` of a token-normalised objective (NLL, GA): each sequence's mean over its answer tokens, then
    the mean over sequences (``per="sequence"``). ``normalize="sequence"`` of the losses: what a one-row
    micro-batch's HF token mean, averaged over micro-batches, computes (the SimNPO authors' retain term,
    OPTML-Group/Unlearn-Simple TOFU/dataloader.py ``CustomTrainerForgetting.compute_loss``)."""

    per = "sequence"

    def __init__(self, inner: SequenceObjective):
        if inner.per != "token":
            raise ValueError(f"SequenceMean takes a token-normalised objective, got {inner!r}")
        self.inner = inner
        self.name = f"{inner.name}_seqmean"

    def per_sequence(self, logp_sum, n_tokens, **extra):
        return self.inner.per_sequence(logp_sum, n_tokens, **extra) / n_tokens.clamp(min=1).to(logp_sum.dtype)

    def weight_bound(self, n_tokens):
        bound = self.inner.weight_bound(n_tokens)
        return None if bound is None else bound / n_tokens.clamp(min=1).to(bound.dtype)


class GA(SequenceObjective):
    """Gradient ascent on the forget set: minimising it lowers the forget log-likelihood."""

    name = "ga"
    per = "token"

    def per_sequence(self, logp_sum, n_tokens, **extra):
        return logp_sum

    def weight_bound(self, n_tokens):
        return _ones(n_tokens)
