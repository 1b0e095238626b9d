"""Input checks and the packing of valid target rows (the HF-style label shift), shared by every backend.

Every fused op starts from hidden states ``[B, T, d]`` (or ``[N, d]``), the LM-head weight ``[V, d]`` and
labels ``[B, T]`` aligned with ``input_ids`` (prompt and padding = ``ignore_index``). With ``shift=True``
(the HF convention) position ``t`` predicts ``labels[:, t + 1]``. Only *valid* target positions are kept:
the kernels never see prompt or padding rows, which saves their share of the 6NdV work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Packed:
    """Valid (non-ignored) target rows, packed sequence after sequence.

    The rows are described without copying the hidden states: packed row ``r`` is ``src[rows[r]]`` (``rows``
    is ``None`` when every row of ``src`` is used, in order). ``x`` materialises them for consumers that need
    a dense ``[M, d]`` matrix; row-indexed backends gather one tile at a time instead, so nothing of size
    ``[M, d]`` is allocated besides the gradient.
    """

    src: torch.Tensor  # [B*T, d] flat view of hidden (differentiable)
    rows: Optional[torch.Tensor]  # [M] int64 row of src of each packed row, increasing; None = all rows
    targets: torch.Tensor  # [M] int64 in [0, V)
    seq_ids: torch.Tensor  # [M] int64 sequence index of each row, non-decreasing
    n_tokens: torch.Tensor  # [S] int64 answer-token count per sequence (may contain zeros)
    offsets: list[int]  # len S + 1, host-side CSR offsets of each sequence's rows in x
    num_seqs: int

    @property
    def x(self) -> torch.Tensor:
        """``[M, d]`` packed rows (a differentiable gather of hidden; the flat view itself when ``rows is None``)."""
        return self.src if self.rows is None else self.src.index_select(0, self.rows)

    @property
    def num_rows(self) -> int:
        return self.offsets[-1]


def answer_tokens(labels: torch.Tensor, ignore_index: int = -100, *, shift: bool = True) -> torch.Tensor:
    """``[B]`` int64: answer tokens per row of ``labels [B, T]`` (targets after the causal shift when ``shift``:
    position ``t`` predicts ``labels[:, t + 1]``)."""
    tgt = labels[:, 1:] if shift else labels
    return (tgt != ignore_index).sum(dim=1, dtype=torch.int64)


def _fmt(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def check_inputs(hidden, weight, labels, bias=None, ignore_index: int = -100) -> None:
    """Raise ``ValueError`` with both shapes (dtypes, devices) on any mismatch; labels are range-checked."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("hidden and weight must be torch.Tensors")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, d], got shape {tuple(weight.shape)}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, d] or [N, d], got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)} (last dims differ)"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1]; hidden is {tuple(hidden.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"hidden must be a floating tensor, got {_fmt(hidden)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"dtype mismatch: hidden {_fmt(hidden)} vs weight {_fmt(weight)}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(
            f"device mismatch: hidden {_fmt(hidden)}, weight {_fmt(weight)}, labels {_fmt(labels)}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}; weight {tuple(weight.shape)}")
        if bias.device != weight.device:
            raise ValueError(f"device mismatch: bias {_fmt(bias)} vs weight {_fmt(weight)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"dtype mismatch: bias {_fmt(bias)} vs weight {_fmt(weight)} (all in one dtype)")
    V = weight.shape[0]
    if labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            val = int(labels[bad][0])
            raise ValueError(
                f"label {val} is out of range: labels must lie in [0, {V}) (vocab size V={V}) "
                f"or equal ignore_index={ignore_index}"
            )


def check_reference(hidden, weight, ref_hidden, ref_weight, ref_bias=None) -> None:
    """A frozen reference model's ``ref_hidden [..., d_ref]`` / ``ref_weight [V, d_ref]`` / ``ref_bias [V]`` for
    ``hidden`` / ``weight``: same rows and vocabulary, one device, one dtype of its own (``ValueError`` naming both)."""
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ref_hidden must match hidden except in its last dim: ref_hidden {tuple(ref_hidden.shape)}"
                         f" vs hidden {tuple(hidden.shape)}")
    if ref_weight.dim() != 2 or ref_weight.shape != (weight.shape[0], ref_hidden.shape[-1]):
        raise ValueError(f"ref_weight must be [V, d_ref] = [{weight.shape[0]}, {ref_hidden.shape[-1]}], got "
                         f"{tuple(ref_weight.shape)}")
    if ref_bias is not None and ref_bias.shape != (weight.shape[0],):
        raise ValueError(f"ref_bias must be [V] = [{weight.shape[0]}], got {tuple(ref_bias.shape)}")
    for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
        if t is not None and t.dtype != ref_weight.dtype:
            raise ValueError(f"{name} is {t.dtype}, ref_weight {ref_weight.dtype}: the reference is one dtype")


def pack(hidden, labels, *, ignore_index: int = -100, shift: bool = True) -> Packed:
    """Describe the rows whose (shifted) target is valid. Differentiable w.r.t. ``hidden``; copies nothing of
    it (``src`` is a flat view when ``hidden`` is contiguous): the shift is folded into the row index, position
    ``t`` of sequence ``b`` being row ``b * T + t`` of ``src``."""
    if hidden.dim() == 2:  # [N, d] with labels [N]: one sequence
        hidden = hidden.unsqueeze(0)
        labels = labels.unsqueeze(0)
    B, T = labels.shape
    src = hidden.reshape(-1, hidden.shape[-1])
    if shift:
        # target of position t is labels[:, t + 1]; the last position of every sequence has none
        tgt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)
    else:
        tgt = labels
    mask = tgt != ignore_index
    n_tokens = mask.sum(dim=1, dtype=torch.int64)
    row_mask = mask.reshape(-1)
    if bool(row_mask.all()):
        rows = None
        targets = tgt.reshape(-1).long()
    else:
        rows = row_mask.nonzero().squeeze(1)
        targets = tgt.reshape(-1).index_select(0, rows).long()
    seq_ids = torch.repeat_interleave(torch.arange(B, device=labels.device), n_tokens)
    offsets = [0] + torch.cumsum(n_tokens, 0).tolist()
    return Packed(src=src, rows=rows, targets=targets, seq_ids=seq_ids, n_tokens=n_tokens, offsets=offsets,
                  num_seqs=B)
