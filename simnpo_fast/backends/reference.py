"""Reference backend: materialises the full ``[M, V]`` logits, like unlearning frameworks do today.

It is the oracle of the tests (``dtype=torch.float64``) and the "naive" baseline of the benchmarks
(``dtype=None`` keeps the model dtype for the GEMM and upcasts the logits to fp32, as HF causal-LM losses
do). Its differentiable entry points are plain autograd graphs in the caller's graph (one logits GEMM in the
forward, the upstream gradient applied before any rounding, as in a naive training step); the contract methods
run the same maths under ``torch.enable_grad`` on detached leaves.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Backend
from .inputs import GradNeeds, HeadInputs, SeqWeightFn


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self, dtype: Optional[torch.dtype] = None):
        self.dtype = dtype

    def _logits(self, x, w, b) -> torch.Tensor:
        if self.dtype is not None:
            x, w = x.to(self.dtype), w.to(self.dtype)
            b = b.to(self.dtype) if b is not None else None
            return torch.nn.functional.linear(x, w, b)
        return torch.nn.functional.linear(x, w, b).float()

    def _token_lp(self, inp: HeadInputs) -> torch.Tensor:
        """``lp [M]``, differentiable (a graph through the gather of the packed rows and the full logits)."""
        logp = torch.log_softmax(self._logits(inp.packed_x(), inp.w, inp.b), dim=-1)
        return logp.gather(1, inp.targets.unsqueeze(1)).squeeze(1)

    def _seq_sum(self, inp: HeadInputs, lp: torch.Tensor) -> torch.Tensor:
        return torch.zeros(inp.num_seqs, dtype=lp.dtype, device=lp.device).index_add(0, inp.seq_ids, lp)

    # -- differentiable entry points: the caller's autograd graph -----------------------------------------
    def sequence_logprob(self, inp: HeadInputs) -> torch.Tensor:
        return self._seq_sum(inp, self._token_lp(inp))

    def sequence_loss(self, inp: HeadInputs, seq_weight_fn: SeqWeightFn, scale: float):
        logp = self._seq_sum(inp, self._token_lp(inp))
        held = logp.detach()
        f, g = seq_weight_fn(held, torch.arange(inp.num_seqs, device=logp.device))
        # value scale * sum f; gradient g (= scale * f') w.r.t. logp_sum, through the materialised logits
        loss = f.sum() * scale + (g.to(logp.dtype) * (logp - held)).sum()
        return loss, held

    def kl_loss(self, inp: HeadInputs, ref: HeadInputs, scale: float) -> torch.Tensor:
        with torch.no_grad():
            lq = torch.log_softmax(self._logits(ref.packed_x(), ref.w, ref.b), dim=-1)
        lp = torch.log_softmax(self._logits(inp.packed_x(), inp.w, inp.b), dim=-1)
        q = lq.exp()
        kl = torch.where(q > 0, q * (lq - lp), 0.0).sum(-1)
        if isinstance(scale, torch.Tensor):  # per-row scales
            return (kl * scale.to(kl.dtype)).sum()
        return kl.sum() * scale

    # -- the contract ---------------------------------------------------------------------------------------
    def logprob_forward(self, inp: HeadInputs):
        with torch.no_grad():
            lp = self._token_lp(inp).float()
        return lp, None

    def logprob_backward(self, inp: HeadInputs, lse, lp, grad_lp, needs: GradNeeds):
        return self._grads(inp, needs, lambda i: (self._token_lp(i) * grad_lp.to(torch.float32)).sum())

    def fused_kl(self, inp: HeadInputs, ref: HeadInputs, scale: float, needs: GradNeeds):
        out = {}

        def kl(i: HeadInputs) -> torch.Tensor:
            out["loss"] = self.kl_loss(i, ref, scale)
            return out["loss"]

        grads = self._grads(inp, needs, kl)
        return (out["loss"].detach(), *grads)

    @staticmethod
    def _grads(inp: HeadInputs, needs: GradNeeds, scalar_fn):
        """Gradients of ``scalar_fn(inp with detached leaves)`` w.r.t. x, w, b (``None`` where not needed)."""
        leaves = [t.detach().requires_grad_(n) if t is not None else None
                  for t, n in zip((inp.x, inp.w, inp.b), needs)]
        with torch.enable_grad():
            out = scalar_fn(inp.replace(x=leaves[0], w=leaves[1], b=leaves[2]))
            want = [t for t, n in zip(leaves, needs) if t is not None and n]
            got = iter(torch.autograd.grad(out, want) if want else ())
        return tuple(next(got) if t is not None and n else None for t, n in zip(leaves, needs))
