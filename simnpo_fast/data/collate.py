"""Batching: the padding collator.

The collator builds ``attention_mask`` and the label padding from each example's *length*, never from
``input_ids == pad_token_id``: with ``pad == eos`` tokenizers a real EOS stays a target (open-unlearning #128).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .template import IGNORE_INDEX


class DataCollator:
    """Pad ``{"input_ids", "labels"}`` examples into ``input_ids`` / ``attention_mask`` / ``labels`` tensors.

    ``padding_side`` is ``"right"`` (default, for training) or ``"left"``; ``pad_to_multiple_of`` rounds the
    padded length up; labels are ``-100`` on padding. Examples without ``labels`` get ``labels = input_ids``.
    Nested dict examples (e.g. ``{"forget": ex, "retain": ex}``) are collated key by key.
    """

    def __init__(self, pad_token_id: int, *, padding_side: str = "right", pad_to_multiple_of: int | None = None,
                 label_pad_id: int = IGNORE_INDEX):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = label_pad_id

    @classmethod
    def from_tokenizer(cls, tokenizer, **kw) -> "DataCollator":
        """Pad with the tokenizer's pad id (its EOS id when it has none: padding is masked by length anyway)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        return cls(pad, **kw)

    def __call__(self, features: Sequence[dict]) -> dict:
        if not features:
            raise ValueError("cannot collate an empty batch")
        first = features[0]
        if "input_ids" not in first:  # nested: collate every sub-key
            return {k: self([f[k] for f in features]) for k in first}
        return self.pad(features)

    def pad(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        m = self.pad_to_multiple_of
        if m:
            width = -(-width // m) * m
        n = len(features)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), self.label_pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            L = lengths[i]
            lab = f.get("labels", f["input_ids"])
            if len(lab) != L:
                raise ValueError(f"example {i}: {len(lab)} labels for {L} input_ids")
            sl = slice(0, L) if self.padding_side == "right" else slice(width - L, width)
            ids[i, sl] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, sl] = torch.as_tensor(lab, dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
