"""Functional API: fused LM head + log-softmax + target gather + per-sequence reduction + objective.

None of these functions holds a ``[tokens, V]`` logits tensor unless the ``reference`` backend is asked for.

``grad_filter=`` (every loss and ``sequence_logprob``): skip backward terms that are provably small -- sequences
whose weight ``g_i`` has collapsed (row filter), softmax entries below ``eps`` (softmax filter); thresholds,
error bounds and the ``"auto"`` default in ``simnpo_fast/backends/filter.py``. Backends that do not implement it
(``reference``) compute the exact gradients.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Union

import torch

from .packing import check_inputs, check_reference, pack
from .backends import Backend, ChunkedBackend, HeadInputs, get_backend
from .backends.filter import FilterSpec, resolve
from .backends.tiles import acc_dtype
from .methods.npo import NPO_METHOD
from .methods.simnpo import SIMNPO
from .objectives import GA, NLL, SequenceObjective, check_normalize
from .objectives.base import check_reduction

BackendArg = Union[None, str, Backend]


def _head_inputs(hidden, weight, labels, bias, ignore_index, shift, grad_filter: FilterSpec = None):
    """``(HeadInputs, n_tokens [B])`` of the valid target rows, after checking the inputs."""
    check_inputs(hidden, weight, labels, bias, ignore_index)
    flt = resolve(grad_filter, hidden.dtype)
    pk = pack(hidden, labels, ignore_index=ignore_index, shift=shift)
    inp = HeadInputs(pk.src, weight, bias, pk.targets, rows=pk.rows, seq_ids=pk.seq_ids, offsets=pk.offsets,
                     num_seqs=pk.num_seqs, grad_filter=flt)
    return inp, pk.n_tokens


def sequence_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    shift: bool = True,
    backend: BackendArg = None,
    grad_filter: FilterSpec = "auto",
):
    """Summed answer log-likelihood and answer-token count of each sequence.

    Returns ``(logp_sum [B] fp32, n_tokens [B] int64)``. Differentiable w.r.t. hidden, weight and bias;
    the backward recomputes the logits tiles (no ``[B*T, V]`` tensor is ever held). ``grad_filter``: module
    docstring (the row filter compares each token's upstream weight with the call's largest).
    """
    inp, n_tokens = _head_inputs(hidden, weight, labels, bias, ignore_index, shift, grad_filter)
    return get_backend(backend, hidden.device).sequence_logprob(inp), n_tokens


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
    grad_filter: FilterSpec = "auto",
    **extras: torch.Tensor,
):
    """Any :class:`SequenceObjective` on top of the fused LM head (see ``objectives/base.py``).

    With ``return_logp=True`` also returns the detached ``(logp_sum [B], n_tokens [B])`` that were computed
    on the way (free: e.g. the trainer logs the forget-set log-likelihood from them). ``grad_filter``: module
    docstring.
    """
    check_reduction(reduction, normalizer)
    inp, n_tokens = _head_inputs(hidden, weight, labels, bias, ignore_index, shift, grad_filter)
    be = get_backend(backend, hidden.device)
    B = inp.num_seqs
    for k, v in extras.items():
        if not isinstance(v, torch.Tensor) or v.shape != (B,):
            raise ValueError(f"{k} must be a tensor of shape [{B}] (one value per sequence), got "
                             f"{getattr(v, 'shape', type(v).__name__)}")
        extras[k] = v.detach().to(device=hidden.device, dtype=acc_dtype(hidden))

    if reduction == "none":
        logp = be.sequence_logprob(inp)
        f = objective(logp, n_tokens, **extras)
        return (f, logp.detach(), n_tokens) if return_logp else f

    if reduction == "mean" and normalizer is None:
        denom = objective.denominator(n_tokens)
    else:
        denom = float(normalizer) if normalizer is not None else 1.0
    if inp.num_rows == 0:
        warnings.warn("every label is ignore_index: the loss is 0 and all gradients are zero", stacklevel=2)
    scale = 1.0 / denom if denom > 0 else 0.0
    if inp.grad_filter is not None and inp.grad_filter.rows > 0 and inp.grad_filter.rows_ref == "bound":
        bound = objective.weight_bound(n_tokens)
        inp = inp.replace(weight_bound=None if bound is None else bound.to(hidden.device) * scale)
    loss, logp = be.sequence_loss(inp, objective.seq_weight_fn(n_tokens, extras, scale), scale)
    return (loss, logp, n_tokens) if return_logp else loss


def simnpo_loss(hidden, weight, labels, *, beta: float = SIMNPO.defaults["beta"],
                gamma: float = SIMNPO.defaults["gamma"], bias=None, ignore_index: int = -100, reduction: str = "mean",
                normalizer=None, shift: bool = True, backend: BackendArg = None, grad_filter: FilterSpec = "auto"):
    """SimNPO: ``-(2/beta) * logsigmoid(-(beta/|y|) * log p(y|x) - gamma)``, mean over forget sequences (defaults:
    the method registry's, ``methods/simnpo.py``)."""
    return fused_sequence_loss(hidden, weight, labels, SIMNPO.forget_objective(beta, gamma), bias=bias,
                               ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                               shift=shift, backend=backend, grad_filter=grad_filter)


def npo_loss(hidden, weight, labels, ref_logp_sum, *, beta: float = NPO_METHOD.defaults["beta"], bias=None,
             ignore_index: int = -100, reduction: str = "mean", normalizer=None, shift: bool = True,
             backend: BackendArg = None, grad_filter: FilterSpec = "auto"):
    """NPO: ``-(2/beta) * logsigmoid(-beta * (log p - log p_ref))`` with summed log-likelihoods (default beta: the
    method registry's, ``methods/npo.py``)."""
    return fused_sequence_loss(hidden, weight, labels, NPO_METHOD.forget_objective(beta), bias=bias,
                               ignore_index=ignore_index, reduction=reduction, normalizer=normalizer, shift=shift,
                               backend=backend, grad_filter=grad_filter, ref_logp_sum=ref_logp_sum)


def nll_loss(hidden, weight, labels, *, bias=None, ignore_index: int = -100, reduction: str = "mean",
             normalizer=None, shift: bool = True, backend: BackendArg = None, grad_filter: FilterSpec = "auto"):
    """Retain NLL: token-mean cross-entropy over answer tokens (or the sum divided by ``normalizer``)."""
    return fused_sequence_loss(hidden, weight, labels, NLL(), bias=bias, ignore_index=ignore_index,
                               reduction=reduction, normalizer=normalizer, shift=shift, backend=backend,
                               grad_filter=grad_filter)


def ga_loss(hidden, weight, labels, *, bias=None, ignore_index: int = -100, reduction: str = "mean",
            normalizer=None, shift: bool = True, backend: BackendArg = None, grad_filter: FilterSpec = "auto"):
    """Gradient ascent: the negated token-mean NLL of the forget answers."""
    return fused_sequence_loss(hidden, weight, labels, GA(), bias=bias, ignore_index=ignore_index,
                               reduction=reduction, normalizer=normalizer, shift=shift, backend=backend,
                               grad_filter=grad_filter)


def kl_loss(hidden, weight, labels, ref_hidden, ref_weight, *, bias=None, ref_bias=None, ignore_index: int = -100,
            reduction: str = "mean", normalizer=None, shift: bool = True, backend: BackendArg = None,
            chunk_rows: Optional[int] = None, grad_filter: FilterSpec = "auto", normalize: str = "token",
            return_n_tokens: bool = False):
    """Retain KL: ``sum_t KL(p_ref(.|t) || p(.|t))`` over the answer tokens, token-mean by default (or the sum
    divided by ``normalizer``), where ``p`` comes from ``hidden`` / ``weight`` / ``bias`` and the frozen
    reference ``p_ref`` from ``ref_hidden [B, T, d_ref]`` / ``ref_weight [V, d_ref]`` / ``ref_bias`` (no
    gradient flows to them). Fused like the other losses: two logits tiles at a time, never ``[tokens, V]``
    (8NdV flops: the reference logits are recomputed from its hidden states), on the backend's ``fused_kl``
    (chunked and Triton backends: the chunked schedule; ``reference``: materialised). ``chunk_rows`` fixes the
    chunked backend's tile height (instead of ``backend=``). ``grad_filter``: only its softmax filter applies
    (entries with ``|p - p_ref| < eps`` left out of the products); a row threshold is an error.
    ``normalize="sequence"``: each sequence's KL is its mean over its answer tokens, and the mean (or the sum over
    ``normalizer``) is over sequences with an answer token (a per-row scale ``1 / n_i`` in the kernels).
    ``return_n_tokens=True``: ``(loss, n_tokens [B])``, the answer-token counts found on the way.
    """
    check_reduction(reduction, normalizer)
    check_normalize(normalize)
    if reduction == "none":
        raise ValueError("kl_loss supports reduction='mean' or 'sum'")
    if chunk_rows is not None:
        if backend is not None:
            raise ValueError("kl_loss: give chunk_rows= (the chunked backend's tile height) or backend=, not both")
        backend = ChunkedBackend(chunk_rows=chunk_rows)
    inp, n_tokens = _head_inputs(hidden, weight, labels, bias, ignore_index, shift, grad_filter)
    if grad_filter == "auto" and inp.grad_filter is not None:  # the default's softmax part only
        inp = inp.replace(grad_filter=resolve(dataclasses.replace(inp.grad_filter, rows=0.0), hidden.dtype))
    if inp.grad_filter is not None and inp.grad_filter.rows > 0:
        raise ValueError("kl_loss: grad_filter.rows has no meaning for the retain KL (no per-sequence weight); "
                         "give probs only")
    check_reference(hidden, weight, ref_hidden, ref_weight, ref_bias)
    ref = inp.replace(x=ref_hidden.detach().reshape(-1, ref_hidden.shape[-1]), w=ref_weight.detach(),
                      b=None if ref_bias is None else ref_bias.detach())
    M = inp.num_rows
    if M == 0:
        warnings.warn("every label is ignore_index: the loss is 0 and all gradients are zero", stacklevel=2)
    count = M if normalize == "token" else int((n_tokens > 0).sum())
    if reduction == "mean" and normalizer is None:
        scale = 1.0 / count if count > 0 else 0.0
    else:
        scale = 1.0 / float(normalizer) if normalizer is not None else 1.0
    if normalize == "sequence" and M > 0:  # row r of sequence i: scale / n_i
        per_seq = 1.0 / n_tokens.clamp(min=1).to(device=hidden.device, dtype=torch.float64)
        scale = (per_seq[inp.seq_ids.to(hidden.device)] * scale).to(acc_dtype(hidden))
    loss = get_backend(backend, hidden.device).kl_loss(inp, ref, scale)
    return (loss, n_tokens) if return_n_tokens else loss
