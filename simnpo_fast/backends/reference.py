"""Reference backend: materialises the full ``[M, V]`` logits, like unlearning frameworks do today.

It is the oracle of the tests (``dtype=torch.float64``) and the "naive" baseline of the benchmarks
(``dtype=None`` keeps the model dtype for the GEMM and upcasts the logits to fp32, as HF causal-LM losses
do). Autograd builds the whole graph, so every objective's gradient comes out of plain PyTorch.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    autograd_native = True

    def __init__(self, dtype: Optional[torch.dtype] = None):
        self.dtype = dtype

    def token_logprob_autograd(self, x, w, b, targets) -> torch.Tensor:
        if self.dtype is not None:
            x, w = x.to(self.dtype), w.to(self.dtype)
            b = b.to(self.dtype) if b is not None else None
            logits = torch.nn.functional.linear(x, w, b)
        else:
            logits = torch.nn.functional.linear(x, w, b).float()
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(1, targets.unsqueeze(1)).squeeze(1)

    def token_logprob(self, x, w, b, targets):
        with torch.no_grad():
            lp = self.token_logprob_autograd(x, w, b, targets).float()
        return lp, None
