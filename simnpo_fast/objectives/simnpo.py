"""SimNPO (Fan et al., 2024, arXiv 2410.07163, eq. 3): reference-free, length-normalised NPO.

    f_i = -(2 / beta) * logsigmoid(-(beta / |y_i|) * log p(y_i | x_i) - gamma)

``gamma`` is the paper's reward margin and is *not* multiplied by beta. The authors' reference code
computes ``logsigmoid(-beta * (loss/|y|) - beta * gamma)`` style margins (gamma scaled by beta); to
reproduce such a run with margin ``gamma_code`` pass ``gamma = beta * gamma_code`` here.
d f_i / d logp_sum_i = (2 / |y_i|) * sigmoid((beta / |y_i|) * logp_sum_i + gamma), at most 2 / |y_i|.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SequenceObjective, check_beta, check_finite


class SimNPO(SequenceObjective):
    name = "simnpo"
    per = "sequence"

    def __init__(self, beta: float, gamma: float):
        self.beta = check_beta(beta)
        self.gamma = check_finite(gamma, "gamma")

    def per_sequence(self, logp_sum, n_tokens, **extra):
        n = n_tokens.clamp(min=1).to(logp_sum.dtype)
        return -(2.0 / self.beta) * F.logsigmoid(-(self.beta / n) * logp_sum - self.gamma)

    def weight_bound(self, n_tokens):
        return 2.0 / n_tokens.clamp(min=1).to(torch.float32)
