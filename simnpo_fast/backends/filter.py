"""Gradient filtering: skipping backward work whose contribution is provably small (``grad_filter=``).

The logits gradient of token ``r`` of sequence ``i`` is ``g_i (onehot(y_r) - p_r)``. Two kinds of terms are
negligible in a trained, unlearning model:

**Row filter** (``rows = tau``): the whole backward of a sequence -- its ``dX`` rows (left 0) and its ``dW`` /
``db`` contribution -- is skipped when ``|g_i| < tau * G_i``, with ``G_i`` the reference weight:

* ``rows_ref="bound"`` (default): the largest weight the objective can ever give sequence ``i``
  (``SequenceObjective.weight_bound``: SimNPO ``2 / n_i``, NPO ``2``, times the loss's ``1 / normalizer``), so
  ``|g_i| / G_i`` is the sequence's saturation (SimNPO: ``sigmoid((beta/n_i) logp_i + gamma)``); a sequence is
  dropped once its gradient is below ``tau`` times its gradient at full weight. Objectives of constant weight
  (NLL, GA) are never filtered.
* ``rows_ref="batch"``: the largest ``|g_j|`` of the call (the chunked schedule uses the largest seen so far,
  which never exceeds the call's: it drops a subset of what the rule allows).

Bound: a dropped row ``r`` changes ``dX_r`` by ``g_i (onehot - p_r) W`` (per element ``<= 2 tau G_i max_v |W_vk|``)
and ``dW_vk`` by ``sum_{r dropped} g_i (1[y_r = v] - p_rv) x_rk`` (``<= tau sum_{r dropped} G_i (1[y_r = v] + p_rv)
|x_rk|``; ``db`` likewise with ``|x_rk| -> 1``).

**Softmax filter** (``probs = eps``): in the ``dX`` and ``dW`` products of the rows that are kept, the entries
with ``p_rv < eps`` (never the target entry) are left out. On the chunked schedule the tile is cut into blocks of
``block_rows`` rows; a block keeps the vocabulary columns where any of its rows has ``p_rv >= eps`` (or its
target), gathers them (``W[cols]``, ``tile[:, cols]``) and runs both products on them only, adding into
``dW[cols]``. The fused Triton kernel skips each ``(token block x vocabulary block)`` tile of its backward whose
entries are all below ``eps`` (and hold no target).

Bound: per row, ``dX_rk`` changes by ``g_i sum_{v dropped} p_rv W_vk`` (``<= |g_i| m_r max_v |W_vk|``, with
``m_r = sum_{v dropped} p_rv`` the dropped mass, ``< eps`` times the number of dropped columns), and each dropped
entry changes ``dW_vk`` by ``g_i p_rv x_rk`` (``< eps |g_i| |x_rk|``): per element of ``dW``,
``|error| < eps sum_r |g_{i(r)}| |x_rk|``. Dropping only whole blocks of columns (a block keeps a column when
*any* row needs it) never drops more than the per-entry rule.

Both bounds are on the gradient. An optimizer that normalises its update per parameter (Adam: ``m / sqrt(v)``)
is invariant to the gradient's scale, so a sequence whose gradient is ``tau`` times its full-weight gradient
still moves the weights where it is the only contribution: the row filter can change a run's trajectory far
more than its gradient bound suggests (e.g. a forget-only run whose every sequence falls below ``tau``).

``grad_filter`` values: ``None`` / ``"off"`` / ``False`` (exact), ``"auto"`` (the default: exact for fp32 and
fp64 inputs, ``AUTO_16BIT`` for bf16 / fp16), ``"on"`` / ``True`` (``ON``), a :class:`GradFilter`, or a dict of
its fields (the trainer config's ``loss.grad_filter``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch

_REFS = ("bound", "batch")


@dataclass(frozen=True)
class GradFilter:
    """Thresholds of the two filters (module docstring); 0 turns a filter off."""

    rows: float = 0.0
    probs: float = 0.0
    rows_ref: str = "bound"
    block_rows: int = 32

    def __post_init__(self):
        for name in ("rows", "probs"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v < 1.0):
                raise ValueError(f"grad_filter.{name} must be a number in [0, 1), got {v!r}")
        if self.rows_ref not in _REFS:
            raise ValueError(f"grad_filter.rows_ref must be one of {_REFS}, got {self.rows_ref!r}")
        if not (isinstance(self.block_rows, int) and self.block_rows >= 1):
            raise ValueError(f"grad_filter.block_rows must be an integer >= 1, got {self.block_rows!r}")

    @property
    def active(self) -> bool:
        return self.rows > 0 or self.probs > 0


#: ``grad_filter="on"``: CCE's cut for bf16 gradients (2^-12) and sequences below 1/1000 of their full weight
ON = GradFilter(rows=1e-3, probs=2.0 ** -12)
#: what ``grad_filter="auto"`` gives bf16 / fp16 inputs (fp32 / fp64: exact). Exact as well: on the trained
#: model of ``bench.filtering`` neither filter kept its gradient error within the dense bf16 path's (README,
#: "Gradient filtering"); filtering is opt-in (``"on"``, a :class:`GradFilter` or a dict)
AUTO_16BIT: Optional[GradFilter] = None

FilterSpec = Union[None, bool, str, dict, GradFilter]


def resolve(spec: FilterSpec, dtype: torch.dtype) -> Optional[GradFilter]:
    """The :class:`GradFilter` (or ``None``: exact) that ``grad_filter=spec`` means for inputs of ``dtype``."""
    if isinstance(spec, GradFilter):
        flt = spec
    elif spec is None or spec is False or spec == "off":
        return None
    elif spec is True or spec == "on":
        flt = ON
    elif spec == "auto":
        flt = AUTO_16BIT if dtype in (torch.bfloat16, torch.float16) else None
    elif isinstance(spec, dict):
        known = {f.name for f in fields(GradFilter)}
        bad = sorted(set(spec) - known)
        if bad:
            raise ValueError(f"grad_filter: unknown key(s) {bad}; known: {sorted(known)}")
        flt = GradFilter(**spec)
    else:
        raise ValueError(f"grad_filter must be None, 'off', 'auto', 'on', a GradFilter or a dict, got {spec!r}")
    return flt if flt is not None and flt.active else None


class RowRule:
    """The row filter of one call: ``keep(g, seq_index)`` -> bool mask of the sequences whose backward runs."""

    def __init__(self, flt: Optional[GradFilter], bound: Optional[torch.Tensor]):
        self.tau = flt.rows if flt is not None else 0.0
        self.batch = flt is not None and flt.rows_ref == "batch"
        self.bound = bound
        self.gmax = 0.0
        self.kept = self.seen = 0  # sequences

    @property
    def active(self) -> bool:
        return self.tau > 0 and (self.batch or self.bound is not None)

    def keep(self, g: torch.Tensor, idx: torch.Tensor) -> Optional[torch.Tensor]:
        """``None`` (all kept) or a bool mask over ``g``."""
        self.seen += g.numel()
        if not self.active or g.numel() == 0:
            self.kept += g.numel()
            return None
        a = g.abs().float()
        if self.batch:
            self.gmax = max(self.gmax, float(a.max()))
            mask = a >= self.tau * self.gmax
        else:
            mask = a >= self.tau * self.bound.index_select(0, idx).to(a)
        k = int(mask.sum())
        self.kept += k
        return None if k == g.numel() else mask


def entry_threshold(flt: GradFilter, g_rows: torch.Tensor, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Per row, the softmax filter's cut on the entries of a factorised tile ``diag(row_scale) tile`` of
    ``g (onehot - p)``: a non-target entry is ``p_rv |g_r| / |row_scale_r|`` (``p_rv |g_r|`` when ``row_scale`` is
    None), so ``p_rv < eps`` <=> ``|tile_rv| < eps |g_r| / |row_scale_r|`` (inf where the row's factor is 0)."""
    g = g_rows.abs().float()
    if row_scale is None:
        return flt.probs * g
    rs = row_scale.abs().float()
    return torch.where(rs > 0, flt.probs * g / torch.where(rs > 0, rs, torch.ones_like(rs)),
                       torch.full_like(rs, float("inf")))


__all__ = ["AUTO_16BIT", "ON", "GradFilter", "RowRule", "entry_threshold", "resolve"]
