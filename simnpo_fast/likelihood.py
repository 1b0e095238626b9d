"""Per-example answer log-likelihoods of a whole dataset, sharded over the ranks of a process group.

For example ``i`` with answer tokens ``y_i`` (labels != -100 after the causal shift): ``logp_sum_i =
sum_t log p(y_t | x, y_<t)`` and ``n_i = |y_i|``, computed by the fused head (no ``[tokens, V]`` logits).
Rank ``r`` of ``W`` scores the contiguous block ``[r * ceil(n / W), (r + 1) * ceil(n / W))`` in batches; every
rank runs the same number of forwards (a rank with nothing left scores a dummy batch and discards it), as a
sharded (FSDP) model requires, and the ranks' rows are summed with one all-reduce.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Tuple

import torch

from .distributed import all_reduce_sum, rank, world_size
from .model import logprob_head


def rank_batches(n: int, batch_size: int, rank_: int, world: int) -> List[List[int]]:
    """The batches of example indices rank ``rank_`` scores; the same number of batches on every rank (empty
    lists where a rank has run out)."""
    per = -(-n // world)
    steps = -(-per // batch_size)
    end = min(n, (rank_ + 1) * per)
    out = []
    for s in range(steps):
        start = rank_ * per + s * batch_size
        out.append([i for i in range(start, start + batch_size) if i < end])
    return out


@torch.no_grad()
def sharded_logps(score: Callable[[List[int]], Tuple[torch.Tensor, torch.Tensor]], n: int, batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """``[n, 2]`` float64 = (logp_sum, n_tokens) of every example on every rank. ``score(indices)`` returns the
    two ``[len(indices)]`` tensors of a batch; it is called the same number of times on every rank."""
    out = torch.zeros(n, 2, dtype=torch.float64)
    for idx in rank_batches(n, batch_size, rank(), world_size()):
        logp, ntok = score(idx or [0])  # a dummy forward keeps the collectives in step
        for j, i in enumerate(idx):
            out[i, 0] = float(logp[j])
            out[i, 1] = float(ntok[j])
    return all_reduce_sum(out.to(device)).cpu() if world_size() > 1 else out


def sequence_logps(model, dataset, collator, device: torch.device, batch_size: int = 16) -> torch.Tensor:
    """:func:`sharded_logps` of ``dataset`` (encoded examples, padded by ``collator.pad``) under ``model``, a
    :class:`~simnpo_fast.model.UnlearnModel` (called as ``model(input_ids, attention_mask, loss_fn)``), in
    eval mode; the model's training flag is restored."""
    def score(idx):
        b = collator.pad([dataset[i] for i in idx])
        head = functools.partial(logprob_head, labels=b["labels"].to(device))
        return model(b["input_ids"].to(device), b["attention_mask"].to(device), head)

    was_training = model.training
    model.eval()
    try:
        return sharded_logps(score, len(dataset), batch_size, device)
    finally:
        model.train(was_training)


def mean_loglik(model, dataset, collator, device: torch.device) -> float:
    """Mean per-token answer log-likelihood over a dataset: ``sum_i logp_sum_i / sum_i n_i``."""
    lp = sequence_logps(model, dataset, collator, device)
    return float(lp[:, 0].sum() / lp[:, 1].sum().clamp_min(1))
