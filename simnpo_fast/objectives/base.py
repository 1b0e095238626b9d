"""Shared base of the unlearning objectives.

An objective is a per-sequence function ``f_i = f(logp_sum_i, n_i[, extra_i])`` of the summed answer
log-likelihood ``logp_sum_i`` and the answer-token count ``n_i`` of sequence ``i``; the loss is
``sum_i f_i / normalizer``. That is all the fused kernels need: the logits gradient of every token of
sequence ``i`` is ``f'(logp_sum_i) / normalizer * (onehot - softmax)``.

``reduction="mean"`` divides by the number of sequences that have at least one answer token
(``per="sequence"``) or by the number of answer tokens (``per="token"``); ``reduction="sum"`` divides by
``normalizer`` (default 1) -- pass the *global* count of sequences / tokens there for exact gradient
accumulation and data parallelism; ``reduction="none"`` returns the ``[B]`` vector of ``f_i``.
A sequence with no answer token contributes ``f_i = 0`` and is left out of the mean's denominator.
"""
from __future__ import annotations

import math
import sys
from typing import Dict, Optional

import torch

REDUCTIONS = ("mean", "sum", "none")


class SequenceObjective:
    #: registry name, e.g. "simnpo"
    name = "base"
    #: "sequence": mean over sequences; "token": mean over answer tokens
    per = "sequence"

    def per_sequence(self, logp_sum: torch.Tensor, n_tokens: torch.Tensor, **extra) -> torch.Tensor:
        """``f_i`` for every sequence (any float dtype, differentiable in ``logp_sum``)."""
        raise NotImplementedError

    def __call__(self, logp_sum, n_tokens, **extra):
        valid = n_tokens > 0
        f = self.per_sequence(logp_sum, n_tokens, **extra)
        return torch.where(valid, f, torch.zeros_like(f))

    def weight_bound(self, n_tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """``[B]``: the largest ``|d f_i / d logp_sum_i|`` the objective can give each sequence (the row filter's
        reference, ``backends/filter.py``), or ``None`` when there is none (no row filtering by bound)."""
        return None

    def seq_weight_fn(self, n_tokens: torch.Tensor, extras: Dict[str, torch.Tensor], scale: float = 1.0):
        """The backend's per-sequence weight function (``backends/base.py``, ``fused_seq_loss``): ``fn(logp_sum
        chunk, sequence indices idx) -> (f, scale * df/dlogp_sum)`` of those sequences, ``f`` unscaled, ``g``
        scaled. ``g`` is the autograd derivative of :meth:`__call__` on the chunk (``n_tokens`` and every extra
        indexed by ``idx``), so any objective gets its exact per-sequence weight."""
        def fn(logp_chunk: torch.Tensor, idx: torch.Tensor):
            with torch.enable_grad():
                s = logp_chunk.detach().requires_grad_(True)
                sub = {k: v.index_select(0, idx) for k, v in extras.items()}
                f = self(s, n_tokens.index_select(0, idx), **sub)
                (g,) = torch.autograd.grad(f.sum(), s)
            return f.detach(), g * scale

        return fn

    def denominator(self, n_tokens: torch.Tensor) -> int:
        if self.per == "token":
            return int(n_tokens.sum())
        return int((n_tokens > 0).sum())

    def extras(self) -> Dict[str, torch.Tensor]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def check_reduction(reduction: str, normalizer: Optional[float]) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction == "none":
            raise ValueError("normalizer= has no meaning with reduction='none'")
        if not (float(normalizer) > 0):
            raise ValueError(f"normalizer must be > 0, got {normalizer}")


def check_beta(beta: float, name: str = "beta") -> float:
    """A finite ``beta > 0`` (``beta = inf`` would give a loss of 0 with NaN gradients, ``0 * inf``)."""
    beta = float(beta)
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"{name} must be finite and > 0, got {beta}")
    if not math.isfinite(2.0 / beta):  # a subnormal beta: 2 / beta overflows, the loss is inf, its gradients NaN
        raise ValueError(f"{name} must be >= {2.0 / sys.float_info.max:.3g} (2 / {name} must be finite), "
                         f"got {beta}")
    return beta


def check_finite(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
