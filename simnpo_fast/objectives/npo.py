"""NPO (Zhang et al., 2024, arXiv 2404.05868): preference optimisation with negative samples only.

    f_i = -(2 / beta) * logsigmoid(-beta * (log p(y_i|x_i) - log p_ref(y_i|x_i)))

with summed (not length-normalised) sequence log-likelihoods; ``d f_i / d logp_i = 2 sigmoid(beta (logp_i -
logp_ref_i))``, at most 2. ``ref_logp_sum`` comes from the frozen
reference model; the trainer caches it with one pass over the forget set before unlearning starts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SequenceObjective, check_beta


class NPO(SequenceObjective):
    name = "npo"
    per = "sequence"

    def __init__(self, beta: float):
        self.beta = check_beta(beta)

    def per_sequence(self, logp_sum, n_tokens, *, ref_logp_sum=None, **extra):
        if ref_logp_sum is None:
            raise ValueError("NPO needs ref_logp_sum (the reference model's summed answer log-likelihoods)")
        ref = ref_logp_sum.to(device=logp_sum.device, dtype=logp_sum.dtype)
        return -(2.0 / self.beta) * F.logsigmoid(-self.beta * (logp_sum - ref))

    def weight_bound(self, n_tokens):
        return torch.full(n_tokens.shape, 2.0, dtype=torch.float32, device=n_tokens.device)
