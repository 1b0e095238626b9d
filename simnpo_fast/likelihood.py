"""Per-example results of a whole dataset, sharded over the ranks of a process group: the one home of the
rank shares, the gather in input order and the per-example answer log-likelihood.

For example ``i`` with answer tokens ``y_i`` (labels != -100 after the causal shift): ``logp_sum_i =
sum_t log p(y_t | x, y_<t)`` and ``n_i = |y_i|``, computed by the fused head (no ``[tokens, V]`` logits).
:func:`sequence_logps` is the one scorer of these (the training loop's reference caches and log-likelihood
metrics, the HF drop-in's :func:`~simnpo_fast.hf.add_reference_logps`, TOFU and multiple-choice
evaluation); :func:`batch_logps` is its step on one padded batch.

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

import contextlib
import functools
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

from .distributed import gather_objects, rank, world_size
from .model import UnlearnModel, final_hidden, logprob_head


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
                each: Optional[Callable[[Sequence], Iterable]] = None, gather: bool = True) -> list:
    """``fn(indices) -> one result per index`` over this rank's batches ``mine``; returns all ``n_items`` results
    in input order, gathered from every rank (a collective when there are several; ``gather=False``: ``mine``
    holds every index, nothing is gathered). An empty batch runs ``fn([0])`` and drops its result (lock-step).
    ``each`` wraps the iteration (e.g. a progress bar)."""
    local: dict = {}
    for b in (each(mine) if each is not None else mine):
        results = fn(b or [0])  # a dummy batch keeps the collectives of a sharded model in step
        for i, r in zip(b, results):
            local[i] = r
    merged: dict = {}
    for part in (gather_objects(local) if gather else [local]):
        merged.update(part)
    if len(merged) != n_items:  # pragma: no cover - a bug, not a user error
        raise RuntimeError(f"gathered {len(merged)} results for {n_items} items")
    return [merged[i] for i in range(n_items)]


@torch.no_grad()
def sharded_logps(score: Callable[[List[int]], Tuple[torch.Tensor, torch.Tensor]], n: int, batch_size: int, *,
                  lengths: Optional[Sequence[int]] = None, each: Optional[Callable[[Sequence], Iterable]] = None,
                  sharded: bool = True) -> torch.Tensor:
    """``[n, 2]`` float64 = (logp_sum, n_tokens) of every example on every rank. ``score(indices)`` returns the
    two ``[len(indices)]`` tensors of a batch; it is called the same number of times on every rank. Batches:
    :func:`rank_batches` without ``lengths``, the world-size-independent :func:`global_batches` with them.
    ``sharded=False``: this process scores every batch itself (no collective), as with one rank."""
    r, w = (rank(), world_size()) if sharded else (0, 1)
    if lengths is None:
        mine = rank_batches(n, batch_size, r, w)
    else:
        mine = rank_share(global_batches(lengths, batch_size), r, w, lockstep=True)

    def pairs(idx):
        logp, ntok = score(idx)
        return [(float(logp[j]), float(ntok[j])) for j in range(len(idx))]

    out = run_sharded(pairs, mine, n, each=each, gather=sharded)
    return torch.tensor(out, dtype=torch.float64).reshape(n, 2)


# ----------------------------------------------------------------------------- the scorer

def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode under ``torch.no_grad()``; its training flag is restored on exit."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def head_loss(model, input_ids, attention_mask, loss_fn: Callable):
    """``loss_fn(weight, bias, hidden)`` with ``model``'s LM head and final hidden states (never logits).

    A model on the head-loss interface (an :class:`~simnpo_fast.model.UnlearnModel`, a
    :func:`~simnpo_fast.model.patch`-ed HF model) is called as ``model(input_ids=, attention_mask=, loss_fn=)``:
    the loss runs inside the head's own forward, where FSDP / ZeRO-3 have gathered its weight. Any other HF
    causal LM runs its backbone (:func:`~simnpo_fast.model.final_hidden`) and ``loss_fn`` gets its output
    embedding's parameters."""
    if isinstance(model, UnlearnModel) or getattr(model, "_simnpo_patched", False):
        return model(input_ids=input_ids, attention_mask=attention_mask, loss_fn=loss_fn)
    head = model.get_output_embeddings()
    return loss_fn(head.weight, getattr(head, "bias", None), final_hidden(model, input_ids, attention_mask))


def batch_logps(model, batch: dict, *, backend=None, shift: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logp_sum [B], n_tokens [B])`` of one padded batch ``{"input_ids", "attention_mask", "labels"}`` (on the
    model's device; ``attention_mask`` may be None): :func:`~simnpo_fast.ops.sequence_logprob` of the labels on
    ``model``'s final hidden states (:func:`head_loss`). No mode or gradient handling: see
    :func:`sequence_logps`."""
    fn = functools.partial(logprob_head, labels=batch["labels"], backend=backend, shift=shift)
    return head_loss(model, batch["input_ids"], batch.get("attention_mask"), fn)


def sequence_logps(model, examples, collator, device: Optional[torch.device] = None, batch_size: int = 16, *,
                   by_length: bool = False, sharded: bool = True, backend=None, shift: bool = True,
                   each: Optional[Callable[[Sequence], Iterable]] = None) -> torch.Tensor:
    """The per-example answer log-likelihoods of ``examples`` under ``model``: ``[n, 2]`` float64, row ``i`` =
    ``(logp_sum_i, n_i)`` (module docstring), every row on every rank, in input order.

    * ``examples``: indexable encoded examples ``{"input_ids", "labels"}`` (labels -100 off the answer; with
      ``shift=False`` already shifted, label ``t`` the target of position ``t``); a batch is
      ``collator.pad([examples[i], ...])`` (e.g. :class:`~simnpo_fast.data.DataCollator`), moved to ``device``
      (default: the model's).
    * ``model``: see :func:`head_loss`; scored in eval mode under ``torch.no_grad()``, its training flag restored.
      The values are those of :func:`batch_logps` (fp32 sums of the fused head for fp32 / bf16 models, fp64 for
      fp64 ones), exactly representable in the float64 result.
    * batches of ``batch_size``: in dataset order cut into contiguous rank blocks (:func:`rank_batches`), or
      with ``by_length`` sorted by length into world-size-independent global batches (:func:`global_batches`:
      1 and N ranks give bit-identical numbers); ``sharded=False`` scores every batch on this process (no
      collective; the batches of one rank). A sharded call is a collective: every rank must make it.
    * ``backend``: the fused backend (:func:`~simnpo_fast.ops.sequence_logprob`); ``each`` wraps the iteration
      over this rank's batches (a progress bar)."""
    dev = model_device(model) if device is None else device

    def score(idx):
        b = collator.pad([examples[i] for i in idx])
        return batch_logps(model, {k: t.to(dev) for k, t in b.items()}, backend=backend, shift=shift)

    lengths = [len(examples[i]["input_ids"]) for i in range(len(examples))] if by_length else None
    with eval_mode(model):
        return sharded_logps(score, len(examples), batch_size, lengths=lengths, each=each, sharded=sharded)


def mean_loglik(model, dataset, collator, device: torch.device) -> float:
    """Mean per-token answer log-likelihood over a dataset: ``sum_i logp_sum_i / sum_i n_i``."""
    lp = sequence_logps(model, dataset, collator, device)
    return float(lp[:, 0].sum() / lp[:, 1].sum().clamp_min(1))
