"""Token-level likelihood objectives: retain NLL and gradient ascent (GA = negated NLL).

Both are means over answer tokens by default (the HF causal-LM convention): ``f_i = -logp_sum_i`` for
NLL and ``+logp_sum_i`` for GA, divided by the number of answer tokens (or ``normalizer``).
"""
from __future__ import annotations

from .base import SequenceObjective


class NLL(SequenceObjective):
    name = "nll"
    per = "token"

    def per_sequence(self, logp_sum, n_tokens, **extra):
        return -logp_sum


class GA(SequenceObjective):
    """Gradient ascent on the forget set: minimising it lowers the forget log-likelihood."""

    name = "ga"
    per = "token"

    def per_sequence(self, logp_sum, n_tokens, **extra):
        return logp_sum
