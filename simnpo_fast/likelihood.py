"""Per-example results of a whole dataset, sharded over the ranks of a process group: the one home of the
rank shares, the gather in input order and the per-example answer log-likelihood.

For example ``i`` with answer tokens ``y_i`` (labels != -100 after the causal shift): ``logp_sum_i =
sum_t log p(y_t | x, y_<t)`` and ``n_i = |y_i|``, computed by the fused head (no ``[tokens, V]`` logits).

Two plans say which batches a rank runs:

* :func:`rank_batches` (``lengths=None``): rank ``r`` of ``W`` scores the contiguous block ``[r * ceil(n / W),
  (r + 1) * ceil(n / W))`` in dataset order (the training loop's reference caches);
* :func:`global_batches` + :func:`rank_share` (``lengths`` given): the examples sorted by descending length
  (stable) and cut into *global* batches, batch ``b`` on rank ``b % W``. Every batch has the same composition,
  padding and shapes whatever the world size, so 1 and N ranks give bit-identical numbers (evaluation).

:func:`run_sharded` runs a rank's batches and gathers every rank's results in input order. Lock-step plans give
every rank the same number of batches (a rank with nothing left runs a dummy batch and drops its result), as a
sharded (FSDP) model requires.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

from .distributed import gather_objects, rank, world_size
from .model import logprob_head


def rank_batches(n: int, batch_size: int, rank_: int, world: int) -> List[List[int]]:
    """The batches of example indices rank ``rank_`` scores: a contiguous block of ``ceil(n / world)`` examples;
    the same number of batches on every rank (empty lists where a rank has run out)."""
    per = -(-n // world)
    steps = -(-per // batch_size)
    end = min(n, (rank_ + 1) * per)
    out = []
    for s in range(steps):
        start = rank_ * per + s * batch_size
        out.append([i for i in range(start, start + batch_size) if i < end])
    return out


def global_batches(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Indices grouped into batches by descending length (stable); independent of the world size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def rank_share(batches: Sequence[List[int]], rank_: int, world: int, *, lockstep: bool = False) -> List[List[int]]:
    """Rank ``rank_``'s global batches (``batches[rank_::world]``); with ``lockstep`` padded with empty batches
    to ``ceil(len(batches) / world)``, the same count on every rank."""
    mine = list(batches[rank_::world])
    if lockstep:
        mine += [[] for _ in range(-(-len(batches) // world) - len(mine))]
    return mine


def run_sharded(fn: Callable[[List[int]], Sequence], mine: Sequence[List[int]], n_items: int, *,
                each: Optional[Callable[[Sequence], Iterable]] = None) -> list:
    """``fn(indices) -> one result per index`` over this rank's batches ``mine``; returns all ``n_items`` results
    in input order, gathered from every rank (a collective when there are several). An empty batch runs
    ``fn([0])`` and drops its result (lock-step). ``each`` wraps the iteration (e.g. a progress bar)."""
    local: dict = {}
    for b in (each(mine) if each is not None else mine):
        results = fn(b or [0])  # a dummy batch keeps the collectives of a sharded model in step
        for i, r in zip(b, results):
            local[i] = r
    merged: dict = {}
    for part in gather_objects(local):
        merged.update(part)
    if len(merged) != n_items:  # pragma: no cover - a bug, not a user error
        raise RuntimeError(f"gathered {len(merged)} results for {n_items} items")
    return [merged[i] for i in range(n_items)]


@torch.no_grad()
def sharded_logps(score: Callable[[List[int]], Tuple[torch.Tensor, torch.Tensor]], n: int, batch_size: int, *,
                  lengths: Optional[Sequence[int]] = None,
                  each: Optional[Callable[[Sequence], Iterable]] = None) -> torch.Tensor:
    """``[n, 2]`` float64 = (logp_sum, n_tokens) of every example on every rank. ``score(indices)`` returns the
    two ``[len(indices)]`` tensors of a batch; it is called the same number of times on every rank. Batches:
    :func:`rank_batches` without ``lengths``, the world-size-independent :func:`global_batches` with them."""
    r, w = rank(), world_size()
    if lengths is None:
        mine = rank_batches(n, batch_size, r, w)
    else:
        mine = rank_share(global_batches(lengths, batch_size), r, w, lockstep=True)

    def pairs(idx):
        logp, ntok = score(idx)
        return [(float(logp[j]), float(ntok[j])) for j in range(len(idx))]

    return torch.tensor(run_sharded(pairs, mine, n, each=each), dtype=torch.float64).reshape(n, 2)


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
        return sharded_logps(score, len(dataset), batch_size)
    finally:
        model.train(was_training)


def mean_loglik(model, dataset, collator, device: torch.device) -> float:
    """Mean per-token answer log-likelihood over a dataset: ``sum_i logp_sum_i / sum_i n_i``."""
    lp = sequence_logps(model, dataset, collator, device)
    return float(lp[:, 0].sum() / lp[:, 1].sum().clamp_min(1))
