"""Token-level likelihood objectives: retain NLL and gradient ascent (GA = negated NLL).

Both are means over answer tokens by default (the HF causal-LM convention): ``f_i = -logp_sum_i`` for
NLL and ``+logp_sum_i`` for GA, divided by the number of answer tokens (or ``normalizer``).
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


class GA(SequenceObjective):
    """Gradient ascent on the forget set: minimising it lowers the forget log-likelihood."""

    name = "ga"
    per = "token"

    def per_sequence(self, logp_sum, n_tokens, **extra):
        return logp_sum

    def weight_bound(self, n_tokens):
        return _ones(n_tokens)
