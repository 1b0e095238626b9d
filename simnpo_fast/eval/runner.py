"""Model-side evaluation primitives: fused likelihoods, per-token log-probs, batched greedy generation, and the
world-size-independent sharding that makes 1-rank and N-rank evaluation give bit-identical numbers.

Sharding rule: the examples are ordered by length (stable), cut into *global* batches of ``batch_size`` and
batch ``b`` goes to rank ``b % world_size``. Every batch therefore has the same composition, padding and shapes
whatever the world size, so each number is computed by exactly the same ops; the per-example results are then
gathered and re-assembled in input order on every rank (rank 0 writes the reports). The plan, the gather and
the per-example log-likelihood scorer (:func:`~simnpo_fast.likelihood.sequence_logps`, behind :func:`logprobs`)
live in :mod:`simnpo_fast.likelihood`; padding is the data collator's; the backbone and its final hidden states
come from :mod:`simnpo_fast.model`.

Likelihoods never materialise ``[tokens, V]`` logits: hidden states come from the backbone and go through
:func:`simnpo_fast.sequence_logprob` (or the backend's per-token log-prob kernel for Min-K%). Generation only
ever holds the ``[B, V]`` logits of the last position.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..packing import pack
from ..backends import get_backend
from ..data import DataCollator
from ..distributed import rank, world_size
from ..likelihood import eval_mode, global_batches, model_device, rank_share, run_sharded, sequence_logps
from ..model import backbone_of, final_hidden, last_hidden_state

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


def head_params(model):
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


# ----------------------------------------------------------------------------- sharding

def progress_bar(desc: str, progress: bool):
    """A rank-0 progress bar over a rank's batches (``None``: no bar)."""
    if not (progress and rank() == 0):
        return None
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, leave=False, unit="batch")


def shard_by_length(lengths: Sequence[int], batch_size: int, fn, *, desc: str = "eval",
                    progress: bool = False) -> list:
    """``fn(batch_indices) -> per-item results`` over this rank's share of the length-sorted global batches
    (:func:`~simnpo_fast.likelihood.global_batches`), all results in input order on every rank."""
    mine = rank_share(global_batches(lengths, batch_size), rank(), world_size())
    return run_sharded(fn, mine, len(lengths), each=progress_bar(desc, progress))


# ----------------------------------------------------------------------------- likelihoods

def _final_hidden(model, examples: Sequence[dict], pad_id: int):
    """Pad a list of examples on the model's device and return (final hidden states, head W, head b, labels)."""
    dev = model_device(model)
    b = {k: t.to(dev) for k, t in DataCollator(pad_id).pad(examples).items()}
    return (final_hidden(model, b["input_ids"], b["attention_mask"]), *head_params(model), b["labels"])


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
    """``[(sum of answer-token log p, answer-token count)]`` of every example, in input order on every rank:
    :func:`~simnpo_fast.likelihood.sequence_logps` on the length-sorted global batches."""
    lp = sequence_logps(unwrap(model), examples, DataCollator(pad_id), batch_size=batch_size, by_length=True,
                        backend=backend, each=progress_bar(desc, progress))
    return [(float(s), int(n)) for s, n in lp.tolist()]


def token_logprobs(model, examples: Sequence[dict], pad_id: int, batch_size: int = 8, *, desc: str = "token log p",
                   progress: bool = False, backend=None) -> list[list[float]]:
    return shard_by_length([len(e["input_ids"]) for e in examples], batch_size,
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
    b = DataCollator(pad_id, padding_side="left").pad([{"input_ids": list(p)} for p in prompts])
    ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
    out_tokens = [[] for _ in range(n)]
    done = torch.tensor([lim <= 0 for lim in limits], dtype=torch.bool, device=dev)
    if bool(done.all()):
        return out_tokens
    with eval_mode(model):
        step = _Decoder(model, ids, mask)
        for _ in range(max(limits)):
            nxt = step.next_tokens()
            newly = (nxt == eos_id) & ~done if eos_id is not None else torch.zeros_like(done)
            for i in torch.nonzero(~done & ~newly).flatten().tolist():
                out_tokens[i].append(int(nxt[i]))
                if len(out_tokens[i]) >= limits[i]:
                    newly[i] = True
            done |= newly
            if bool(done.all()):
                break
            step.feed(torch.where(done, torch.full_like(nxt, pad_id), nxt))
    return out_tokens


class _Decoder:
    """Greedy decoding state of a left-padded batch: the backbone's KV cache (or, for a backbone without one,
    the whole sequence so far), the attention mask, the positions and the last position's hidden state. Only
    the ``[B, V]`` logits of the last position are ever built."""

    def __init__(self, model, ids, mask):
        self.base = backbone_of(model)
        self.w, self.b = head_params(model)
        self.ids, self.mask = ids, mask
        self.pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=self.pos, use_cache=True)
        self.cache = _cache_of(out)
        self.cache_kw = _cache_kwarg(self.base)
        self.h = last_hidden_state(out)[:, -1]

    def next_tokens(self) -> torch.Tensor:
        return F.linear(self.h, self.w, self.b).float().argmax(-1)  # [B, V]: the last position only

    def feed(self, nxt: torch.Tensor) -> None:
        ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.pos = self.pos[:, -1:] + 1
        if self.cache is None:  # no KV cache support: recompute on the full sequence
            self.ids = torch.cat([self.ids, nxt[:, None]], dim=1)
            full_pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
            out = self.base(input_ids=self.ids, attention_mask=self.mask, position_ids=full_pos)
        else:
            out = self.base(input_ids=nxt[:, None], attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                            **{self.cache_kw: self.cache})
            c = _cache_of(out)
            self.cache = c if c is not None else self.cache
        self.h = last_hidden_state(out)[:, -1]


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
    return shard_by_length([len(p) for p in prompts], batch_size,
                           lambda b: batch_greedy(model, [prompts[i] for i in b],
                                                  max_new_tokens=[limits[i] for i in b], pad_id=pad_id, eos_id=eos_id),
                           desc=desc, progress=progress)


def prompt_of(example: dict) -> list[int]:
    """The prompt tokens of an encoded QA example (everything before the first target label)."""
    labels = example["labels"]
    for t, lab in enumerate(labels):
        if lab != IGNORE:
            return list(example["input_ids"][:t])
    return list(example["input_ids"])


def pad_id_of(tokenizer) -> int:
    """The padding id of the data collator (:meth:`DataCollator.from_tokenizer`: pad, else EOS)."""
    return DataCollator.from_tokenizer(tokenizer).pad_token_id
