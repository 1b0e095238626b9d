"""The forget/retain batch of one micro-batch, and the global counts of one optimizer step.

Layout: one padded ``[F + A + R, T]`` batch whose first ``F`` rows are the forget examples, the next ``A`` rows
(``A = F`` for a method with alternate answers, e.g. IdkDPO, else 0) the alternate answers of the same forget
questions (row ``F + i`` belongs to forget row ``i``), and the remaining ``R`` rows the retain examples, so that
the backbone runs once per micro-batch. Labels are HF-aligned (prompt and
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

from .packing import answer_tokens
from .objectives import check_normalize

IGNORE_INDEX = -100


def _pad_to(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def _long(index) -> Optional[torch.Tensor]:
    """An index list as a long tensor (a tensor or None unchanged)."""
    if index is None or isinstance(index, torch.Tensor):
        return index
    return torch.tensor(list(index), dtype=torch.long)


@dataclass
class ForgetRetainBatch:
    """Rows ``[:F]`` are the forget examples, rows ``[F:F + A]`` their alternate answers (``A = n_alternate``,
    0 or ``F``), rows ``[F + A:]`` the retain examples (possibly none).

    ``index [F]``: the dataset indices of the forget rows (to look up cached reference values);
    ``ref_logp_sum [F]``: the reference model's summed answer log-likelihood of each forget row, for methods
    with ``reference="logp"``; ``alternate_index [A]``: the index of each alternate row in its candidate table
    (:class:`~simnpo_fast.data.alternates.AlternateAnswers`), ``ref_alt_logp_sum [A]`` the reference
    log-likelihood of each alternate row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    n_forget: int
    index: Optional[torch.Tensor] = None
    ref_logp_sum: Optional[torch.Tensor] = None
    n_alternate: int = 0
    alternate_index: Optional[torch.Tensor] = None
    ref_alt_logp_sum: Optional[torch.Tensor] = None

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
        self.n_alternate = int(self.n_alternate)
        if self.n_alternate not in (0, self.n_forget) or self.n_forget + self.n_alternate > shape[0]:
            raise ValueError(f"n_alternate={self.n_alternate} must be 0 or n_forget={self.n_forget}, within the "
                             f"batch's {shape[0]} rows")
        for name, n in (("index", "n_forget"), ("ref_logp_sum", "n_forget"), ("alternate_index", "n_alternate"),
                        ("ref_alt_logp_sum", "n_alternate")):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (getattr(self, n),):
                raise ValueError(f"{name} must be [{n}] = [{getattr(self, n)}], got {tuple(t.shape)}")

    # -- building ----------------------------------------------------------------------------------------
    @classmethod
    def collate(cls, forget: Sequence[dict], retain: Optional[Sequence[dict]], collator, index=None,
                ref_logp_sum=None, *, alternate: Optional[Sequence[dict]] = None,
                alternate_index=None) -> "ForgetRetainBatch":
        """Pad ``forget + alternate + retain`` examples (``{"input_ids", "labels"}``) together with
        ``collator.pad``; ``alternate``: one alternate answer example per forget example, or None."""
        alternate = list(alternate or [])
        rows = list(forget) + alternate + list(retain or [])
        b = collator.pad(rows)
        return cls(b["input_ids"], b["attention_mask"], b["labels"], len(forget), _long(index), ref_logp_sum,
                   len(alternate), _long(alternate_index))

    @classmethod
    def from_padded(cls, forget: dict, retain: Optional[dict], pad_token_id: int, *, index=None,
                    ref_logp_sum=None, alternate: Optional[dict] = None, alternate_index=None,
                    ref_alt_logp_sum=None) -> "ForgetRetainBatch":
        """Join a padded forget batch, an optional padded batch of their alternate answers and an optional padded
        retain batch (dicts of ``input_ids`` / ``attention_mask`` / ``labels``), right-padding the narrower ones
        (pad id, mask 0, label -100)."""
        parts = [p for p in (forget, alternate, retain) if p is not None]
        n_alt = 0 if alternate is None else alternate["input_ids"].shape[0]
        if len(parts) == 1:
            cat = forget
        else:
            T = max(p["input_ids"].shape[1] for p in parts)
            cat = {k: torch.cat([_pad_to(p[k], T, v) for p in parts])
                   for k, v in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
        return cls(cat["input_ids"], cat["attention_mask"], cat["labels"], forget["input_ids"].shape[0], _long(index),
                   ref_logp_sum, n_alt, _long(alternate_index), ref_alt_logp_sum)

    def to(self, device, non_blocking: bool = False) -> "ForgetRetainBatch":
        """The batch with every tensor on ``device`` (``index`` stays where it is: it addresses host tables)."""
        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return dataclasses.replace(self, input_ids=mv(self.input_ids), attention_mask=mv(self.attention_mask),
                                   labels=mv(self.labels), ref_logp_sum=mv(self.ref_logp_sum),
                                   ref_alt_logp_sum=mv(self.ref_alt_logp_sum))

    def with_ref_logp(self, table: torch.Tensor, alt_table: Optional[torch.Tensor] = None) -> "ForgetRetainBatch":
        """The batch with ``ref_logp_sum = table[index]`` (``table``: one value per dataset example) and, given
        ``alt_table`` (one value per alternate candidate), ``ref_alt_logp_sum = alt_table[alternate_index]``."""
        if self.index is None:
            raise ValueError("this batch has no index: cannot look up cached reference log-likelihoods")
        ref = table[self.index.to(table.device)].to(self.labels.device)
        alt = None
        if alt_table is not None and self.n_alternate > 0:
            if self.alternate_index is None:
                raise ValueError("this batch has no alternate_index: cannot look up the alternates' reference values")
            alt = alt_table[self.alternate_index.to(alt_table.device)].to(self.labels.device)
        return dataclasses.replace(self, ref_logp_sum=ref, ref_alt_logp_sum=alt)

    # -- views -------------------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_retain(self) -> int:
        return self.n_rows - self.n_forget - self.n_alternate

    def split(self, t: torch.Tensor):
        """``(t[:F], t[F + A:])`` of a tensor with one row per batch row (the forget and the retain rows); the
        retain part is ``None`` when empty."""
        return t[: self.n_forget], (t[self.n_forget + self.n_alternate:] if self.n_retain > 0 else None)

    def pair_rows(self, t: torch.Tensor) -> torch.Tensor:
        """``t[:F + A]``: the forget rows followed by their alternate rows (a view, no copy)."""
        return t[: self.n_forget + self.n_alternate]

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
        r = self.n_forget + self.n_alternate
        return self.input_ids[r:], self.attention_mask[r:]


@dataclass(frozen=True)
class StepCounts:
    """The global counts of one optimizer step (every micro-batch of every rank).

    ``forget``: the forget normaliser of the method -- forget sequences with at least one answer token
    (``per="sequence"``), forget answer tokens (``per="token"``) or the alternate rows' answer tokens
    (``per="alternate_token"``); ``retain_tokens``: retain answer tokens;
    ``forget_tokens``: forget answer tokens (the forget log-likelihood per token); ``tokens``: attention-mask
    tokens of all rows (throughput); ``alternate_tokens``: answer tokens of the alternate rows.
    """

    forget: float
    retain_tokens: float
    forget_tokens: int
    tokens: int
    alternate_tokens: int = 0
    retain_sequences: float = 0.0
    normalize: str = "token"

    @classmethod
    def of(cls, batches: List[ForgetRetainBatch], method, reduce: Optional[Callable] = None, *,
           normalize: str = "token") -> "StepCounts":
        """Count ``batches`` for ``method`` (a :class:`~simnpo_fast.methods.Method` or anything with ``per``).

        ``reduce``: all-reduces (sums) a ``[6]`` float64 CPU tensor across ranks and returns it (any device),
        e.g. ``distributed.all_reduce_sum``; ``None`` in a single process. ``normalize="sequence"``: the
        token-normalised terms are means over sequences (``UnlearningLoss(normalize=)``), so a ``per="token"``
        forget term counts forget sequences and the retain term retain sequences (with an answer token).
        """
        per = method.per
        if per not in ("sequence", "token", "alternate_token"):
            raise ValueError(f"method {getattr(method, 'name', method)!r}: per must be 'sequence', 'token' or "
                             "'alternate_token'")
        if check_normalize(normalize) == "sequence" and per == "token":
            per = "sequence"
        c = torch.zeros(6, dtype=torch.float64)
        for b in batches:
            n = answer_tokens(b.labels).cpu()
            F, A = b.n_forget, b.n_alternate
            nf, na, nr = n[:F], n[F:F + A], n[F + A:]
            c[0] += {"token": nf.sum(), "alternate_token": na.sum()}.get(per, (nf > 0).sum()).item()
            c[1] += int(nr.sum())
            c[2] += int(b.attention_mask.sum())
            c[3] += int(nf.sum())
            c[4] += int(na.sum())
            c[5] += int((nr > 0).sum())
        if reduce is not None:
            c = reduce(c).to("cpu", torch.float64).reshape(6)
        return cls(forget=float(c[0]), retain_tokens=float(c[1]), forget_tokens=int(c[3]), tokens=int(c[2]),
                   alternate_tokens=int(c[4]), retain_sequences=float(c[5]), normalize=normalize)

    def normalizers(self):
        """``(forget_normalizer, retain_normalizer)``: each count (retain: tokens, or sequences with
        ``normalize="sequence"``), or ``None`` where it is 0 (the term's own mean then applies, which is 0 for an
        empty term)."""
        return (self.forget if self.forget > 0 else None, self.retain if self.retain > 0 else None)

    @property
    def retain(self) -> float:
        """The retain term's count: retain answer tokens, or retain sequences with ``normalize="sequence"``."""
        return self.retain_sequences if self.normalize == "sequence" else self.retain_tokens
