"""Model-side evaluation primitives: fused likelihoods, per-token log-probs, batched greedy generation, and the
world-size-independent sharding that makes 1-rank and N-rank evaluation give bit-identical numbers.

Sharding rule: the examples are ordered by length (stable), cut into *global* batches of ``batch_size`` and
batch ``b`` goes to rank ``b % world_size``. Every batch therefore has the same composition, padding and shapes
whatever the world size, so each number is computed by exactly the same ops; the per-example results are then
gathered (``all_gather_object``) and re-assembled in input order on every rank (rank 0 writes the reports).

Likelihoods never materialise ``[tokens, V]`` logits: hidden states come from the backbone and go through
:func:`simnpo_fast.sequence_logprob` (or the backend's per-token log-prob kernel for Min-K%). Generation only
ever holds the ``[B, V]`` logits of the last position.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .._inputs import pack
from ..backends import get_backend
from ..ops import sequence_logprob

IGNORE = -100


# ----------------------------------------------------------------------------- model access

def unwrap(model):
    """The HF-like causal LM inside ``model`` (``UnlearnModel.lm``, DDP/FSDP ``.module``), else ``model``."""
    seen = 0
    while seen < 4:
        if hasattr(model, "lm") and hasattr(model.lm, "get_output_embeddings"):
            model = model.lm
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            break
        seen += 1
    return model


def backbone(model) -> torch.nn.Module:
    """The decoder stack returning final hidden states (``model.<base_model_prefix>``, e.g. ``model.model``)."""
    prefix = getattr(model, "base_model_prefix", None) or "model"
    base = getattr(model, prefix, None)
    if base is None or base is model:
        base = getattr(model, "model", None)
    if base is None:
        raise TypeError(f"cannot find the backbone of {type(model).__name__} (expected .{prefix} or .model)")
    return base


def head_params(model):
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _last_hidden(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.last_hidden_state


def hidden_states(model, input_ids, attention_mask, **kw):
    return _last_hidden(backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **kw))


@contextlib.contextmanager
def eval_mode(model):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


# ----------------------------------------------------------------------------- sharding

def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches by descending length (stable); independent of the world size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def run_sharded(n_items: int, lengths: Sequence[int], batch_size: int, fn: Callable[[list[int]], list],
                *, desc: str = "eval", progress: bool = False) -> list:
    """Apply ``fn(batch_indices) -> per-item results`` over this rank's share of the global batches and return
    all ``n_items`` results in input order, gathered from every rank."""
    rank, world = dist_info()
    batches = global_batches(lengths, batch_size)
    mine = batches[rank::world]
    local: dict[int, object] = {}
    it = mine
    if progress and rank == 0:
        from tqdm.auto import tqdm

        it = tqdm(mine, desc=desc, leave=False, unit="batch")
    for b in it:
        for i, r in zip(b, fn(b)):
            local[i] = r
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, local)
        merged: dict[int, object] = {}
        for p in parts:
            merged.update(p)
        local = merged
    if len(local) != n_items:  # pragma: no cover - a bug, not a user error
        raise RuntimeError(f"gathered {len(local)} results for {n_items} items")
    return [local[i] for i in range(n_items)]


# ----------------------------------------------------------------------------- likelihoods

def pad_examples(examples: Sequence[dict], pad_id: int, side: str = "right"):
    """``input_ids``, ``attention_mask``, ``labels`` tensors of encoded ``{"input_ids", "labels"}`` examples."""
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e["input_ids"])
        sl = slice(0, L) if side == "right" else slice(width - L, width)
        ids[i, sl] = torch.as_tensor(e["input_ids"])
        labels[i, sl] = torch.as_tensor(e.get("labels", e["input_ids"]))
        mask[i, sl] = 1
    return ids, mask, labels


def _final_hidden(model, examples: Sequence[dict], pad_id: int):
    """Pad a list of examples on the model's device and return (final hidden states, head W, head b, labels)."""
    dev = model_device(model)
    ids, mask, labels = (t.to(dev) for t in pad_examples(examples, pad_id))
    return (hidden_states(model, ids, mask), *head_params(model), labels)


def batch_logprob(model, examples: Sequence[dict], pad_id: int, backend=None) -> list[tuple[float, int]]:
    """``[(sum of answer-token log p, answer-token count)]`` for each example (fused; no logits held)."""
    model = unwrap(model)
    with eval_mode(model):
        h, w, b, labels = _final_hidden(model, examples, pad_id)
        lp, n = sequence_logprob(h, w, labels, bias=b, backend=backend)
    return [(float(x), int(c)) for x, c in zip(lp.double().cpu(), n.cpu())]


def batch_token_logprobs(model, examples: Sequence[dict], pad_id: int, backend=None) -> list[list[float]]:
    """Per-target-token log-probabilities of each example (the fused backend's per-token kernel)."""
    model = unwrap(model)
    with eval_mode(model):
        h, w, b, labels = _final_hidden(model, examples, pad_id)
        pk = pack(h, labels)
        be = get_backend(backend, h.device)
        lp, _ = be.token_logprob(pk.x, w, b, pk.targets)
    lp = lp.double().cpu().tolist()
    return [lp[pk.offsets[i]:pk.offsets[i + 1]] for i in range(len(examples))]


def logprobs(model, examples: Sequence[dict], pad_id: int, batch_size: int = 16, *, desc: str = "log-likelihood",
             progress: bool = False, backend=None) -> list[tuple[float, int]]:
    """:func:`batch_logprob` over all examples, sharded over the ranks, results in input order on every rank."""
    return run_sharded(len(examples), [len(e["input_ids"]) for e in examples], batch_size,
                       lambda b: batch_logprob(model, [examples[i] for i in b], pad_id, backend),
                       desc=desc, progress=progress)


def token_logprobs(model, examples: Sequence[dict], pad_id: int, batch_size: int = 8, *, desc: str = "token log p",
                   progress: bool = False, backend=None) -> list[list[float]]:
    return run_sharded(len(examples), [len(e["input_ids"]) for e in examples], batch_size,
                       lambda b: batch_token_logprobs(model, [examples[i] for i in b], pad_id, backend),
                       desc=desc, progress=progress)


# ----------------------------------------------------------------------------- generation

def batch_greedy(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: Union[int, Sequence[int]], pad_id: int,
                 eos_id: Optional[int]) -> list[list[int]]:
    """Greedy continuation of left-padded prompts with a KV cache; stops at EOS (not returned) or the limit
    (``max_new_tokens``: one number, or one per prompt). Positions are counted from each prompt's first real
    token, so padding does not shift them."""
    model = unwrap(model)
    dev = model_device(model)
    n = len(prompts)
    limits = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(x) for x in max_new_tokens]
    if len(limits) != n:
        raise ValueError(f"{len(limits)} generation limits for {n} prompts")
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p))
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    w, b = head_params(model)
    out_tokens = [[] for _ in range(n)]
    done = torch.tensor([lim <= 0 for lim in limits], dtype=torch.bool, device=dev)
    if bool(done.all()):
        return out_tokens
    with eval_mode(model):
        base = backbone(model)
        out = base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = _cache_of(out)
        cache_kw = _cache_kwarg(base)
        h = _last_hidden(out)[:, -1]
        for _ in range(max(limits)):
            logits = F.linear(h, w, b).float()  # [B, V]: the last position only
            nxt = logits.argmax(-1)
            if eos_id is not None:
                newly = (nxt == eos_id) & ~done
            else:
                newly = torch.zeros_like(done)
            for i in torch.nonzero(~done & ~newly).flatten().tolist():
                out_tokens[i].append(int(nxt[i]))
                if len(out_tokens[i]) >= limits[i]:
                    newly[i] = True
            done |= newly
            if bool(done.all()):
                break
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=dev)], dim=1)
            pos = pos[:, -1:] + 1
            if cache is None:  # no KV cache support: recompute on the full sequence
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                full_pos = (mask.cumsum(-1) - 1).clamp(min=0)
                out = base(input_ids=ids, attention_mask=mask, position_ids=full_pos)
            else:
                out = base(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                           **{cache_kw: cache})
                c = _cache_of(out)
                cache = c if c is not None else cache
            h = _last_hidden(out)[:, -1]
    return out_tokens


def _cache_of(out):
    for k in ("past_key_values", "cache"):
        c = getattr(out, k, None)
        if c is not None:
            return c
    return None


def _cache_kwarg(base) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (older), whichever ``forward`` accepts."""
    import inspect

    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: Union[int, Sequence[int]], pad_id: int,
             eos_id: Optional[int], batch_size: int = 16, desc: str = "generate",
             progress: bool = False) -> list[list[int]]:
    """Batched greedy generation of every prompt (``max_new_tokens``: one limit or one per prompt), sharded over
    the ranks (results in input order)."""
    limits = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} generation limits for {len(prompts)} prompts")
    return run_sharded(len(prompts), [len(p) for p in prompts], batch_size,
                       lambda b: batch_greedy(model, [prompts[i] for i in b], max_new_tokens=[limits[i] for i in b],
                                              pad_id=pad_id, eos_id=eos_id),
                       desc=desc, progress=progress)


def prompt_of(example: dict) -> list[int]:
    """The prompt tokens of an encoded QA example (everything before the first target label)."""
    labels = example["labels"]
    for t, lab in enumerate(labels):
        if lab != IGNORE:
            return list(example["input_ids"][:t])
    return list(example["input_ids"])


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)
