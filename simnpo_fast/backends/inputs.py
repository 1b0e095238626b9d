"""The one parameter object of the backend contract (:class:`HeadInputs`), the gradient request
(:class:`GradNeeds`) and the per-sequence weight callback type (:data:`SeqWeightFn`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional

import torch

from .filter import GradFilter

#: ``seq_weight_fn(logp_sum_chunk [k] fp32, seq_index_chunk [k] int64) -> (f [k], scale * df/dlogp_sum [k])``:
#: the per-sequence loss ``f_i`` (unscaled) and the weight ``g_i`` of the logits gradient (scaled).
SeqWeightFn = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


class GradNeeds(NamedTuple):
    """Which gradients the caller wants."""

    dx: bool
    dw: bool
    db: bool

    @property
    def any(self) -> bool:
        return self.dx or self.dw or self.db


@dataclass(frozen=True)
class HeadInputs:
    """The packed target rows of an LM head: the one argument of every backend method.

    Packed row ``r`` is ``x[rows[r]]`` (``x`` itself, in order, when ``rows is None``): the hidden states are
    never copied to form it. ``seq_ids`` / ``offsets`` / ``num_seqs`` group the rows into sequences (CSR:
    sequence ``s`` owns rows ``offsets[s]:offsets[s+1]``); per-token methods do not read them.
    ``grad_filter`` / ``weight_bound``: the optional gradient filter of ``backends/filter.py`` (backends that do
    not implement it compute the exact gradients).
    """

    x: torch.Tensor  # [N, d]
    w: torch.Tensor  # [V, d]
    b: Optional[torch.Tensor]  # [V]
    targets: torch.Tensor  # [M] int64 in [0, V)
    rows: Optional[torch.Tensor] = None  # [M] int64, increasing; None = all rows of x
    seq_ids: Optional[torch.Tensor] = None  # [M] int64, non-decreasing
    offsets: Optional[List[int]] = None  # len num_seqs + 1, host ints
    num_seqs: int = 0
    grad_filter: Optional[GradFilter] = None  # backward filtering (backends/filter.py); None = exact
    weight_bound: Optional[torch.Tensor] = None  # [S] fp32: the largest |g_i| the objective allows (row filter)

    @property
    def num_rows(self) -> int:
        return int(self.targets.shape[0])

    def packed_x(self) -> torch.Tensor:
        """``[M, d]``: the packed rows materialised (a gather; ``x`` itself when ``rows is None``)."""
        return self.x if self.rows is None else self.x.index_select(0, self.rows)

    def dst_rows(self, r0: int, r1: int) -> torch.Tensor:
        """The rows of ``x`` (and of ``dx``) that packed rows ``[r0, r1)`` stand for."""
        if self.rows is None:
            return torch.arange(r0, r1, device=self.x.device)
        return self.rows[r0:r1]

    def unpack_rows(self, packed: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A ``[M, d]`` per-row result (e.g. ``dx`` of the packed rows) placed into a zero tensor shaped like ``x``."""
        if packed is None or self.rows is None:
            return packed
        out = torch.zeros(self.x.shape, dtype=packed.dtype, device=packed.device)
        return out.index_copy_(0, self.rows, packed)

    def replace(self, **kw) -> "HeadInputs":
        return dataclasses.replace(self, **kw)
