"""Input checking and the HF-style label shift, shared by every backend.

Every fused op starts from hidden states ``[B, T, d]`` (or ``[N, d]``), the LM-head weight ``[V, d]`` and
labels ``[B, T]`` aligned with ``input_ids`` (prompt and padding = ``ignore_index``). With ``shift=True``
(the HF convention) position ``t`` predicts ``labels[:, t + 1]``. Only *valid* target positions are kept:
the kernels never see prompt or padding rows, which saves their share of the 6NdV work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    """Valid (non-ignored) target rows, packed sequence after sequence."""

    x: torch.Tensor  # [M, d] hidden rows whose target is valid (a differentiable view/gather of hidden)
    targets: torch.Tensor  # [M] int64 in [0, V)
    seq_ids: torch.Tensor  # [M] int64 sequence index of each row, non-decreasing
    n_tokens: torch.Tensor  # [S] int64 answer-token count per sequence (may contain zeros)
    offsets: list[int]  # len S + 1, host-side CSR offsets of each sequence's rows in x
    num_seqs: int


def _fmt(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def check_inputs(hidden, weight, labels, bias=None, ignore_index: int = -100) -> None:
    """Raise ``ValueError`` with both shapes on any mismatch; labels are range-checked."""
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
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}; weight {tuple(weight.shape)}")
        if bias.device != weight.device:
            raise ValueError(f"device mismatch: bias {_fmt(bias)} vs weight {_fmt(weight)}")
    V = weight.shape[0]
    if labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            val = int(labels[bad][0])
            raise ValueError(
                f"label {val} is out of range: labels must lie in [0, {V}) (vocab size V={V}) "
                f"or equal ignore_index={ignore_index}"
            )


def pack(hidden, labels, *, ignore_index: int = -100, shift: bool = True) -> Packed:
    """Keep the rows whose (shifted) target is valid. Differentiable w.r.t. ``hidden``."""
    if hidden.dim() == 2:  # [N, d] with labels [N]: one sequence
        hidden = hidden.unsqueeze(0)
        labels = labels.unsqueeze(0)
    if shift:
        hidden = hidden[:, :-1]
        labels = labels[:, 1:]
    B = labels.shape[0]
    mask = labels != ignore_index
    n_tokens = mask.sum(dim=1, dtype=torch.int64)
    row_mask = mask.reshape(-1)
    flat_x = hidden.reshape(-1, hidden.shape[-1])
    if bool(row_mask.all()):
        x = flat_x
        targets = labels.reshape(-1).long()
    else:
        idx = row_mask.nonzero().squeeze(1)
        x = flat_x.index_select(0, idx)
        targets = labels.reshape(-1).index_select(0, idx).long()
    seq_ids = torch.repeat_interleave(torch.arange(B, device=labels.device), n_tokens)
    offsets = [0] + torch.cumsum(n_tokens, 0).tolist()
    return Packed(x=x, targets=targets, seq_ids=seq_ids, n_tokens=n_tokens, offsets=offsets, num_seqs=B)
