"""The learning-rate schedule: linear warmup, then cosine, linear or constant.

The factor of step ``s`` (0-based, the one the optimizer is about to take) for ``W`` warmup steps and ``N``
steps in total: ``(s + 1) / W`` while ``s < W`` (``warmup_from_zero``: ``s / W``, so the first step takes
learning rate 0, as HF's ``get_linear_schedule_with_warmup`` / ``get_cosine_schedule_with_warmup`` do: the
schedule of the SimNPO authors' runs); then, with progress ``p = min(1, (s - W) / max(1, N - W))``
and floor ``m = min_ratio``: constant ``1``, linear ``m + (1 - m)(1 - p)``, cosine
``m + (1 - m)(1 + cos(pi p)) / 2``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float = 0.0,
              from_zero: bool = False) -> Callable[[int], float]:
    """The factor of the base learning rate at each step (see the module docstring)."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step if from_zero else step + 1) / warmup
        if schedule == "constant":
            return 1.0
        span = max(1, total - warmup)
        prog = min(1.0, (step - warmup) / span)
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - prog)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, total_steps: int):
    """A ``LambdaLR`` for ``optim_cfg`` (schedule, warmup_steps or warmup_ratio of ``total_steps``,
    min_lr_ratio)."""
    o = optim_cfg
    warm = o.warmup_steps or int(round(o.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.schedule, warm, total_steps, o.min_lr_ratio,
                                                                  o.warmup_from_zero))
