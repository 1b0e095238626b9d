"""The autograd layer over the backend contract: a recomputing ``logp_sum``, and scalar losses (sequence
objectives, retain KL) whose gradients are computed during the forward and only scaled in the backward.

Upstream gradients. The gradients of a scalar loss wait for ``loss.backward()``'s factor (1, or a loss scale):
fp32 / bf16 / fp64 inputs get theirs rounded to the input dtype at once (bf16 has fp32's exponent range: a
later factor neither overflows nor underflows it); fp16 inputs keep them in fp32 (the backends return fp32 for
them) so that a loss scale -- ``GradScaler`` multiplies the loss by 2^16, its first steps by more -- is applied
before the one rounding to fp16 (an fp16 gradient rounded in the forward would have flushed every entry below
6e-8, e.g. saturated SimNPO weights ~1e-7). Memory: the fp32 ``dW`` is the accumulator every backend builds
anyway; for fp16 it lives until this loss's backward: 2 more bytes per ``[V, d]`` element in between, and fp16
``dX`` is ``[N, d]`` fp32.

The backends run at their inputs' dtypes: an enclosing ``torch.autocast`` does not recast their GEMMs (the
caller casts the inputs if it wants the autocast dtype, as ``model.patch`` does).
"""
from __future__ import annotations

import torch

from .inputs import GradNeeds

#: elements per block when a 16-bit gradient is multiplied in fp32 (bounded temporaries)
UPSTREAM_BLOCK = 1 << 22


def _no_autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


def _needs(ctx, want_grad: bool, b) -> GradNeeds:
    dx, dw, db = (want_grad and n for n in ctx.needs_input_grad[:3])
    return GradNeeds(bool(dx), bool(dw), bool(db and b is not None))


def hold_grads(grads, refs):
    """``[(buffer, dtype)]``: how the gradients computed in the forward wait for the upstream gradient (module
    docstring): rounded to the input dtype now, or fp32 for fp16 inputs."""
    out = []
    for grad, ref in zip(grads, refs):
        if grad is None:
            out.append(None)
        elif ref.dtype == torch.float16:
            out.append((grad if grad.dtype == torch.float32 else grad.float(), ref.dtype))
        else:
            out.append((grad.to(ref.dtype), ref.dtype))
    return out


def apply_upstream(held, grad_loss: torch.Tensor):
    """The held gradients times the upstream gradient of the scalar loss, in fp32 (fp64) arithmetic, each
    rounded once to its input dtype afterwards; never the upstream gradient rounded to 16 bits (2^16 is inf in
    fp16). A product that exceeds the input dtype's range becomes inf (what ``GradScaler`` looks for), never NaN.

    The buffers are ours alone: scaled in place, so dW is never held twice. On CPU an upstream gradient of
    exactly 1 (``loss.backward()``) skips the pass over ``[V, d]`` (x 1.0 is exact); on an accelerator the
    multiply is cheaper than reading the value back. A 16-bit buffer (bf16 inputs) is multiplied block by block
    through fp32 (exact for a power-of-two upstream such as a ``GradScaler`` scale; otherwise one more bf16
    rounding).
    """
    one = grad_loss.device.type == "cpu" and grad_loss.numel() == 1 and float(grad_loss) == 1.0
    out = []
    for item in held:
        if item is None:
            out.append(None)
            continue
        g, dtype = item
        if not one:
            if g.dtype in (torch.float32, torch.float64):
                g.mul_(grad_loss.to(g.dtype))
            else:
                u = grad_loss.float()
                flat = g.view(-1)
                for i in range(0, flat.numel(), UPSTREAM_BLOCK):
                    blk = flat[i : i + UPSTREAM_BLOCK]
                    blk.copy_(blk.float().mul_(u))
        out.append(g.to(dtype))
    return out


class SeqLogprob(torch.autograd.Function):
    """``logp_sum [S]`` with a recomputing backward: any loss may be built on top of it."""

    @staticmethod
    def forward(ctx, x, w, b, inp, backend):
        with _no_autocast(x):
            lp, lse = backend.logprob_forward(inp)
        out = torch.zeros(inp.num_seqs, dtype=lp.dtype, device=x.device).index_add_(0, inp.seq_ids, lp)
        ctx.save_for_backward(x, w, b, lse, lp)
        ctx.inp, ctx.backend = inp, backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, w, b, lse, lp = ctx.saved_tensors
        inp = ctx.inp
        g = grad_out.to(lp.dtype).index_select(0, inp.seq_ids)  # the upstream gradient stays fp32 (fp64)
        with _no_autocast(x):
            dx, dw, db = ctx.backend.logprob_backward(inp, lse, lp, g, _needs(ctx, True, b))
        ctx.inp = None
        return (None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(b.dtype), None, None)


class FusedSeqLoss(torch.autograd.Function):
    """``(scale * sum_i f_i, logp_sum)``: the gradients are computed during the forward (``seq_weight_fn`` already
    folds ``scale`` into its ``g``, so they come out of the backend scaled, with no extra pass)."""

    @staticmethod
    def forward(ctx, x, w, b, inp, backend, seq_weight_fn, scale, want_grad):
        with _no_autocast(x):
            loss_sum, logp_sum, dx, dw, db = backend.fused_seq_loss(inp, seq_weight_fn, _needs(ctx, want_grad, b))
        ctx.grads = hold_grads((dx, dw, db), (x, w, b))
        ctx.mark_non_differentiable(logp_sum)
        return loss_sum * scale, logp_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_logp):
        out = apply_upstream(ctx.grads, grad_loss)
        ctx.grads = None
        return (*out, None, None, None, None, None)


class FusedKL(torch.autograd.Function):
    """``scale * sum_r KL(p_ref || p)`` with its gradients computed during the forward (reference frozen)."""

    @staticmethod
    def forward(ctx, x, w, b, inp, ref, backend, scale, want_grad):
        with _no_autocast(x):
            loss, dx, dw, db = backend.fused_kl(inp, ref, scale, _needs(ctx, want_grad, b))
        ctx.grads = hold_grads((dx, dw, db), (x, w, b))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        out = apply_upstream(ctx.grads, grad_loss)
        ctx.grads = None
        return (*out, None, None, None, None, None)
