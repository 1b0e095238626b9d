"""Functional API: fused LM head + log-softmax + target gather + per-sequence reduction + objective.

None of these functions holds a ``[tokens, V]`` logits tensor unless the ``reference`` backend is asked for.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

from ._inputs import check_inputs, pack
from .backends import Backend, get_backend
from .objectives import GA, NLL, NPO, SequenceObjective, SimNPO
from .objectives.base import check_reduction

BackendArg = Union[None, str, Backend]


def _no_autocast(x: torch.Tensor):
    """The backends run at their inputs' dtypes: an enclosing ``torch.autocast`` must not recast their GEMMs
    (the caller casts the inputs if it wants the autocast dtype, as ``model.patch`` does)."""
    return torch.autocast(x.device.type, enabled=False)


class _SeqLogprob(torch.autograd.Function):
    """logp_sum [S] with a recomputing backward: any loss may be built on top of it."""

    @staticmethod
    def forward(ctx, x, w, b, targets, seq_ids, num_seqs, backend, rows):
        kw = {} if rows is None else {"rows": rows}
        with _no_autocast(x):
            lp, lse = backend.token_logprob(x, w, b, targets, **kw)
        out = torch.zeros(num_seqs, dtype=lp.dtype, device=x.device).index_add_(0, seq_ids, lp)
        ctx.save_for_backward(x, w, b, targets, seq_ids, lse, lp, rows)
        ctx.backend = backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, w, b, targets, seq_ids, lse, lp, rows = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        g = grad_out.to(lp.dtype).index_select(0, seq_ids)  # the upstream gradient stays fp32 (fp64)
        kw = {} if rows is None else {"rows": rows}
        with _no_autocast(x):
            dx, dw, db = ctx.backend.token_logprob_backward(
                x, w, b, targets, lse, g, need_dx, need_dw, need_db and b is not None, lp=lp, **kw
            )
        return (
            None if dx is None else dx.to(x.dtype),
            None if dw is None else dw.to(w.dtype),
            None if db is None else db.to(b.dtype),
            None, None, None, None, None,
        )


class _FusedSeqLoss(torch.autograd.Function):
    """Scalar loss whose gradients are computed during the forward (they only need scaling afterwards)."""

    @staticmethod
    def forward(ctx, x, w, b, targets, seq_ids, offsets, num_seqs, backend, head, scale, want_grad, rows):
        """``head`` must already fold ``scale`` into the ``g`` it returns (see ``_make_head``): the gradients
        come out of the backend scaled, with no extra pass (nor, in bf16, an extra rounding)."""
        need = [want_grad and n for n in ctx.needs_input_grad[:3]]
        need[2] = need[2] and b is not None
        kw = {} if rows is None else {"rows": rows}
        with _no_autocast(x):
            loss_sum, logp_sum, dx, dw, db = backend.fused_seq_loss(
                x, w, b, targets, seq_ids, offsets, num_seqs, head, *need, **kw
            )
        ctx.grads = _hold_grads((dx, dw, db), (x, w, b))
        ctx.mark_non_differentiable(logp_sum)
        return loss_sum * scale, logp_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_logp):
        out = _apply_upstream(ctx.grads, grad_loss)
        ctx.grads = None
        return (*out, None, None, None, None, None, None, None, None, None)


def _hold_grads(grads, refs):
    """How the gradients computed in the forward wait for the upstream gradient: ``[(buffer, dtype)]``.

    fp32 / bf16 / fp64 inputs: rounded to the input dtype at once (bf16 has fp32's exponent range: a later
    upstream factor neither overflows nor underflows it). fp16 inputs: held in fp32 (the backends return fp32
    for them), so that a loss scale -- ``GradScaler`` multiplies the loss by 2^16 and its first steps by more --
    is applied before the one rounding to fp16: an fp16 gradient rounded in the forward would have flushed every
    entry below 6e-8 (saturated SimNPO weights are ~1e-7) before any scale could rescue it. Memory: the fp32
    ``dW`` is the accumulator every backend builds anyway; it now lives until this loss's backward instead of
    being replaced by an fp16 copy at the end of the forward: 2 more bytes per ``[V, d]`` element in between
    (the moment both exist, fp32 + fp16, moves from the end of the forward into the backward). fp16 ``dX`` is
    ``[N, d]`` fp32 (2 more bytes per hidden-state element).
    """
    out = []
    for grad, ref in zip(grads, refs):
        if grad is None:
            out.append(None)
        elif ref.dtype == torch.float16:
            out.append((grad if grad.dtype == torch.float32 else grad.float(), ref.dtype))
        else:
            out.append((grad.to(ref.dtype), ref.dtype))
    return out


#: elements per block when a 16-bit gradient is multiplied in fp32 (bounded temporaries)
_UPSTREAM_BLOCK = 1 << 22


def _apply_upstream(held, grad_loss: torch.Tensor):
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
                for i in range(0, flat.numel(), _UPSTREAM_BLOCK):
                    blk = flat[i : i + _UPSTREAM_BLOCK]
                    blk.copy_(blk.float().mul_(u))
        out.append(g.to(dtype))
    return out


class _FusedKL(torch.autograd.Function):
    """``scale * sum_t KL(p_ref || p)`` with its gradients computed during the forward (reference frozen)."""

    @staticmethod
    def forward(ctx, x, w, b, xr, wr, br, rows, scale, want_grad, chunk_rows):
        from .backends.chunked import fused_kl

        need = [want_grad and n for n in ctx.needs_input_grad[:3]]
        need[2] = need[2] and b is not None
        with _no_autocast(x):
            loss, dx, dw, db = fused_kl(x, w, b, xr, wr, br, rows, scale, *need, chunk_rows_override=chunk_rows)
        ctx.grads = _hold_grads((dx, dw, db), (x, w, b))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        out = _apply_upstream(ctx.grads, grad_loss)
        ctx.grads = None
        return (*out, None, None, None, None, None, None, None)


def _make_head(objective: SequenceObjective, n_tokens: torch.Tensor, extras: dict, scale: float = 1.0):
    """``head(logp_sum chunk, seq idx) -> (f, scale * df/dlogp_sum)``: ``f`` unscaled, ``g`` scaled."""
    def head(logp_chunk: torch.Tensor, idx: torch.Tensor):
        with torch.enable_grad():
            s = logp_chunk.detach().requires_grad_(True)
            sub = {k: v.index_select(0, idx) for k, v in extras.items()}
            f = objective(s, n_tokens.index_select(0, idx), **sub)
            (g,) = torch.autograd.grad(f.sum(), s)
        return f.detach(), g * scale

    return head


def _rows_for(pk, be: Backend):
    """``(x, rows)`` for ``be``: the flat hidden view + row index for row-indexed backends (no copy), else the
    materialised packed rows."""
    if be.row_indexed:
        return pk.src, pk.rows
    return pk.x, None


def _prepare(hidden, weight, labels, bias, ignore_index, shift):
    check_inputs(hidden, weight, labels, bias, ignore_index)
    return pack(hidden, labels, ignore_index=ignore_index, shift=shift)


def sequence_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    shift: bool = True,
    backend: BackendArg = None,
):
    """Summed answer log-likelihood and answer-token count of each sequence.

    Returns ``(logp_sum [B] fp32, n_tokens [B] int64)``. Differentiable w.r.t. hidden, weight and bias;
    the backward recomputes the logits tiles (no ``[B*T, V]`` tensor is ever held).
    """
    pk = _prepare(hidden, weight, labels, bias, ignore_index, shift)
    be = get_backend(backend, hidden.device)
    if be.autograd_native:
        lp = be.token_logprob_autograd(pk.x, weight, bias, pk.targets)
        out = torch.zeros(pk.num_seqs, dtype=lp.dtype, device=lp.device).index_add(0, pk.seq_ids, lp)
        return out, pk.n_tokens
    x, rows = _rows_for(pk, be)
    out = _SeqLogprob.apply(x, weight, bias, pk.targets, pk.seq_ids, pk.num_seqs, be, rows)
    return out, pk.n_tokens


def fused_sequence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    objective: SequenceObjective,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Optional[float] = None,
    shift: bool = True,
    backend: BackendArg = None,
    return_logp: bool = False,
    **extras: torch.Tensor,
):
    """Any :class:`SequenceObjective` on top of the fused LM head (see ``objectives/base.py``).

    With ``return_logp=True`` also returns the detached ``(logp_sum [B], n_tokens [B])`` that were computed
    on the way (free: e.g. the trainer logs the forget-set log-likelihood from them).
    """
    check_reduction(reduction, normalizer)
    pk = _prepare(hidden, weight, labels, bias, ignore_index, shift)
    be = get_backend(backend, hidden.device)
    B = pk.num_seqs
    for k, v in extras.items():
        if not isinstance(v, torch.Tensor) or v.shape != (B,):
            raise ValueError(f"{k} must be a tensor of shape [{B}] (one value per sequence), got "
                             f"{getattr(v, 'shape', type(v).__name__)}")
        extras[k] = v.detach().to(device=hidden.device, dtype=torch.float32)

    if reduction == "none":
        logp, n = sequence_logprob(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                   shift=shift, backend=be)
        f = objective(logp, n, **extras)
        return (f, logp.detach(), n) if return_logp else f

    if reduction == "mean" and normalizer is None:
        denom = objective.denominator(pk.n_tokens)
    else:
        denom = float(normalizer) if normalizer is not None else 1.0
    if pk.num_rows == 0:
        warnings.warn("every label is ignore_index: the loss is 0 and all gradients are zero", stacklevel=2)
    scale = 1.0 / denom if denom > 0 else 0.0

    if be.autograd_native:
        lp = be.token_logprob_autograd(pk.x, weight, bias, pk.targets)
        logp = torch.zeros(B, dtype=lp.dtype, device=lp.device).index_add(0, pk.seq_ids, lp)
        loss = objective(logp, pk.n_tokens, **extras).sum() * scale
        logp = logp.detach()
    else:
        head = _make_head(objective, pk.n_tokens, extras, scale)
        x, rows = _rows_for(pk, be)
        loss, logp = _FusedSeqLoss.apply(
            x, weight, bias, pk.targets, pk.seq_ids, pk.offsets, B, be, head, scale,
            torch.is_grad_enabled(), rows,
        )
    return (loss, logp, pk.n_tokens) if return_logp else loss


def simnpo_loss(hidden, weight, labels, *, beta: float = 2.5, gamma: float = 0.0, bias=None,
                ignore_index: int = -100, reduction: str = "mean", normalizer=None, shift: bool = True,
                backend: BackendArg = None):
    """SimNPO: ``-(2/beta) * logsigmoid(-(beta/|y|) * log p(y|x) - gamma)``, mean over forget sequences."""
    return fused_sequence_loss(hidden, weight, labels, SimNPO(beta, gamma), bias=bias,
                               ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                               shift=shift, backend=backend)


def npo_loss(hidden, weight, labels, ref_logp_sum, *, beta: float = 0.1, bias=None, ignore_index: int = -100,
             reduction: str = "mean", normalizer=None, shift: bool = True, backend: BackendArg = None):
    """NPO: ``-(2/beta) * logsigmoid(-beta * (log p - log p_ref))`` with summed log-likelihoods."""
    return fused_sequence_loss(hidden, weight, labels, NPO(beta), bias=bias, ignore_index=ignore_index,
                               reduction=reduction, normalizer=normalizer, shift=shift, backend=backend,
                               ref_logp_sum=ref_logp_sum)


def nll_loss(hidden, weight, labels, *, bias=None, ignore_index: int = -100, reduction: str = "mean",
             normalizer=None, shift: bool = True, backend: BackendArg = None):
    """Retain NLL: token-mean cross-entropy over answer tokens (or the sum divided by ``normalizer``)."""
    return fused_sequence_loss(hidden, weight, labels, NLL(), bias=bias, ignore_index=ignore_index,
                               reduction=reduction, normalizer=normalizer, shift=shift, backend=backend)


def ga_loss(hidden, weight, labels, *, bias=None, ignore_index: int = -100, reduction: str = "mean",
            normalizer=None, shift: bool = True, backend: BackendArg = None):
    """Gradient ascent: the negated token-mean NLL of the forget answers."""
    return fused_sequence_loss(hidden, weight, labels, GA(), bias=bias, ignore_index=ignore_index,
                               reduction=reduction, normalizer=normalizer, shift=shift, backend=backend)


def kl_loss(hidden, weight, labels, ref_hidden, ref_weight, *, bias=None, ref_bias=None, ignore_index: int = -100,
            reduction: str = "mean", normalizer=None, shift: bool = True, chunk_rows: Optional[int] = None):
    """Retain KL: ``sum_t KL(p_ref(.|t) || p(.|t))`` over the answer tokens, token-mean by default (or the sum
    divided by ``normalizer``), where ``p`` comes from ``hidden`` / ``weight`` / ``bias`` and the frozen
    reference ``p_ref`` from ``ref_hidden [B, T, d_ref]`` / ``ref_weight [V, d_ref]`` / ``ref_bias`` (no
    gradient flows to them). Fused like the other losses: two logits tiles at a time, never ``[tokens, V]``
    (8NdV flops: the reference logits are recomputed from its hidden states). Runs on the chunked schedule on
    every device.
    """
    check_reduction(reduction, normalizer)
    if reduction == "none":
        raise ValueError("kl_loss supports reduction='mean' or 'sum'")
    check_inputs(hidden, weight, labels, bias, ignore_index)
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
    pk = pack(hidden, labels, ignore_index=ignore_index, shift=shift)
    ref_src = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
    M = pk.num_rows
    if M == 0:
        warnings.warn("every label is ignore_index: the loss is 0 and all gradients are zero", stacklevel=2)
    if reduction == "mean" and normalizer is None:
        scale = 1.0 / M if M > 0 else 0.0
    else:
        scale = 1.0 / float(normalizer) if normalizer is not None else 1.0
    return _FusedKL.apply(pk.src, weight, bias, ref_src, ref_weight.detach(),
                          None if ref_bias is None else ref_bias.detach(), pk.rows, scale,
                          torch.is_grad_enabled(), chunk_rows)
