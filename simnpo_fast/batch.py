"""The forget/retain batch of one micro-batch, and the global counts of one optimizer step.

Layout: one padded ``[F + R, T]`` batch whose first ``F`` rows are the forget examples and the remaining ``R``
rows the retain examples, so that the backbone runs once per micro-batch. Labels are HF-aligned (prompt and
padding = ``-100``); the answer tokens of a row are its positions ``t >= 1`` with ``labels[t] != -100`` (the
causal shift: position ``t - 1`` predicts ``labels[t]``).

Exact normalisation. A loss term that is a mean over the whole optimizer step (all micro-batches, all ranks)
is ``sum over this micro-batch / global count``; :class:`StepCounts` holds those counts, computed once per
step from every micro-batch before any forward (``StepCounts.of``), so that gradient accumulation and data
parallelism give the gradient of the full batch (not a mean of per-micro-batch means).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from ._inputs import answer_tokens

IGNORE_INDEX = -100


def _pad_to(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


@dataclass
class ForgetRetainBatch:
    """Rows ``[:n_forget]`` are the forget examples, rows ``[n_forget:]`` the retain examples (possibly none).

    ``index [F]``: the dataset indices of the forget rows (to look up cached reference values);
    ``ref_logp_sum [F]``: the reference model's summed answer log-likelihood of each forget row, for methods
    with ``reference="logp"``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    n_forget: int
    index: Optional[torch.Tensor] = None
    ref_logp_sum: Optional[torch.Tensor] = None

    def __post_init__(self):
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"input_ids must be [rows, T], got {shape}")
        for name in ("attention_mask", "labels"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} {tuple(getattr(self, name).shape)} must match input_ids {shape}")
        self.n_forget = int(self.n_forget)
        if not 0 <= self.n_forget <= shape[0]:
            raise ValueError(f"n_forget={self.n_forget} must lie in [0, {shape[0]}] (the batch's rows)")
        for name in ("index", "ref_logp_sum"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (self.n_forget,):
                raise ValueError(f"{name} must be [n_forget] = [{self.n_forget}], got {tuple(t.shape)}")

    # -- building ----------------------------------------------------------------------------------------
    @classmethod
    def collate(cls, forget: Sequence[dict], retain: Optional[Sequence[dict]], collator, index=None,
                ref_logp_sum=None) -> "ForgetRetainBatch":
        """Pad ``forget + retain`` examples (``{"input_ids", "labels"}``) together with ``collator.pad``."""
        rows = list(forget) + list(retain or [])
        b = collator.pad(rows)
        if index is not None and not isinstance(index, torch.Tensor):
            index = torch.tensor(list(index), dtype=torch.long)
        return cls(b["input_ids"], b["attention_mask"], b["labels"], len(forget), index, ref_logp_sum)

    @classmethod
    def from_padded(cls, forget: dict, retain: Optional[dict], pad_token_id: int, *, index=None,
                    ref_logp_sum=None) -> "ForgetRetainBatch":
        """Join a padded forget batch and a padded retain batch (dicts of ``input_ids`` / ``attention_mask`` /
        ``labels``), right-padding the narrower one (pad id, mask 0, label -100)."""
        if retain is None:
            return cls(forget["input_ids"], forget["attention_mask"], forget["labels"],
                       forget["input_ids"].shape[0], index, ref_logp_sum)
        T = max(forget["input_ids"].shape[1], retain["input_ids"].shape[1])
        cat = {k: torch.cat([_pad_to(forget[k], T, v), _pad_to(retain[k], T, v)])
               for k, v in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
        return cls(cat["input_ids"], cat["attention_mask"], cat["labels"], forget["input_ids"].shape[0], index,
                   ref_logp_sum)

    def to(self, device, non_blocking: bool = False) -> "ForgetRetainBatch":
        """The batch with every tensor on ``device`` (``index`` stays where it is: it addresses host tables)."""
        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return dataclasses.replace(self, input_ids=mv(self.input_ids), attention_mask=mv(self.attention_mask),
                                   labels=mv(self.labels), ref_logp_sum=mv(self.ref_logp_sum))

    def with_ref_logp(self, table: torch.Tensor) -> "ForgetRetainBatch":
        """The batch with ``ref_logp_sum = table[index]`` (``table``: one value per dataset example)."""
        if self.index is None:
            raise ValueError("this batch has no index: cannot look up cached reference log-likelihoods")
        ref = table[self.index.to(table.device)].to(self.labels.device)
        return dataclasses.replace(self, ref_logp_sum=ref)

    # -- views -------------------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_retain(self) -> int:
        return self.n_rows - self.n_forget

    def split(self, t: torch.Tensor):
        """``(t[:F], t[F:])`` of a tensor with one row per batch row; the retain part is ``None`` when empty."""
        return t[: self.n_forget], (t[self.n_forget:] if self.n_retain > 0 else None)

    @property
    def forget_labels(self) -> torch.Tensor:
        return self.labels[: self.n_forget]

    @property
    def retain_labels(self) -> Optional[torch.Tensor]:
        return self.split(self.labels)[1]

    def retain_inputs(self):
        """``(input_ids, attention_mask)`` of the retain rows (e.g. for a frozen reference model), or ``None``."""
        if self.n_retain == 0:
            return None
        return self.input_ids[self.n_forget:], self.attention_mask[self.n_forget:]


@dataclass(frozen=True)
class StepCounts:
    """The global counts of one optimizer step (every micro-batch of every rank).

    ``forget``: the forget normaliser of the method -- forget sequences with at least one answer token
    (``per="sequence"``) or forget answer tokens (``per="token"``); ``retain_tokens``: retain answer tokens;
    ``forget_tokens``: forget answer tokens (the forget log-likelihood per token); ``tokens``: attention-mask
    tokens of all rows (throughput).
    """

    forget: float
    retain_tokens: float
    forget_tokens: int
    tokens: int

    @classmethod
    def of(cls, batches: List[ForgetRetainBatch], method, reduce: Optional[Callable] = None) -> "StepCounts":
        """Count ``batches`` for ``method`` (a :class:`~simnpo_fast.methods.Method` or anything with ``per``).

        ``reduce``: all-reduces (sums) a ``[4]`` float64 CPU tensor across ranks and returns it (any device),
        e.g. ``distributed.all_reduce_sum``; ``None`` in a single process.
        """
        per = method.per
        if per not in ("sequence", "token"):
            raise ValueError(f"method {getattr(method, 'name', method)!r}: per must be 'sequence' or 'token'")
        c = torch.zeros(4, dtype=torch.float64)
        for b in batches:
            n = answer_tokens(b.labels).cpu()
            nf, nr = n[: b.n_forget], n[b.n_forget:]
            c[0] += int(nf.sum()) if per == "token" else int((nf > 0).sum())
            c[1] += int(nr.sum())
            c[2] += int(b.attention_mask.sum())
            c[3] += int(nf.sum())
        if reduce is not None:
            c = reduce(c).to("cpu", torch.float64).reshape(4)
        return cls(forget=float(c[0]), retain_tokens=float(c[1]), forget_tokens=int(c[3]), tokens=int(c[2]))

    def normalizers(self):
        """``(forget_normalizer, retain_normalizer)``: each count, or ``None`` where it is 0 (the term's own
        mean then applies, which is 0 for an empty term)."""
        return (self.forget if self.forget > 0 else None, self.retain_tokens if self.retain_tokens > 0 else None)
