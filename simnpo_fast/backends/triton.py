"""Triton backend: the default for CUDA tensors.

The generic path (``token_logprob`` / ``token_logprob_backward``) runs the tiled kernels of
``simnpo_fast.kernels.seq_logprob``: one tiled forward pass keeps only ``lp`` and ``lse`` per token (O(M)
floats); the backward recomputes the logits tiles in two race-free kernels (dx: a program owns a block of
token rows; dw/db: a program owns a block of vocabulary rows), with the per-token scale ``g_t`` folded in
before the two products. Flops: 2 MdV forward + 8 MdV backward (see the kernel module docstring).

``fused_seq_loss`` is the base-class composition (forward, O(S) head, backward). No GPU measurement has been
made yet that would justify overriding it with a 6 MdV GEMM + epilogue schedule; ``bench/gpu.py`` times
both this backend and the chunked one so that the choice can be made from numbers.

On CPU tensors the backend runs only under ``TRITON_INTERPRET=1`` (tests); ``supports`` returns False
otherwise and the dispatcher raises a clear error. fp64 inputs (oracle use only) are delegated to the
chunked backend, which keeps fp64 accumulation.
"""
from __future__ import annotations

import os

import torch

from .base import Backend
from .chunked import ChunkedBackend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index
        self._fp64 = ChunkedBackend()

    def supports(self, device) -> bool:
        device = torch.device(device)
        if device.type == "cuda":
            return True
        if device.type == "cpu" and _interpreting():
            from simnpo_fast.kernels import seq_logprob as K  # bound at import: must agree with the env var

            return K.INTERPRET
        return False

    @staticmethod
    def _kernels():
        from simnpo_fast.kernels import seq_logprob as K

        return K

    def token_logprob(self, x, w, b, targets):
        if x.dtype == torch.float64:
            return self._fp64.token_logprob(x, w, b, targets)
        return self._kernels().lse_target_fwd(x, w, b, targets, self.ignore_index)

    def token_logprob_backward(self, x, w, b, targets, lse, grad_lp, need_dx, need_dw, need_db):
        if x.dtype == torch.float64:
            return self._fp64.token_logprob_backward(x, w, b, targets, lse, grad_lp, need_dx, need_dw, need_db)
        if not (need_dx or need_dw or (need_db and b is not None)):
            return None, None, None
        return self._kernels().logits_grad_bwd(
            x, w, b, targets, lse, grad_lp, self.ignore_index,
            need_dx=need_dx, need_dw=need_dw, need_db=bool(need_db and b is not None),
        )

    def fused_seq_loss(self, x, w, b, targets, seq_ids, offsets, num_seqs, head, need_dx, need_dw, need_db):
        # Not a speed override: fp64 inputs keep fp64 sums end to end in the chunked backend.
        if x.dtype == torch.float64:
            return self._fp64.fused_seq_loss(x, w, b, targets, seq_ids, offsets, num_seqs, head,
                                             need_dx, need_dw, need_db)
        return super().fused_seq_loss(x, w, b, targets, seq_ids, offsets, num_seqs, head,
                                      need_dx, need_dw, need_db)
