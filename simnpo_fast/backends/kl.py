"""Token-level ``KL(p_ref || p)`` (the retain-KL baseline) on the chunked schedule: two logits tiles at a time,
the gradients formed while they are live. Plain torch: it runs on any device (the Triton backends use it too).
"""
from __future__ import annotations

import torch

from .grads import TileGrads
from .inputs import GradNeeds, HeadInputs
from .tiles import RowSource, TileBuffer, acc_dtype, tile_logits

#: rows of the per-row-block epilogue of the KL tiles (three [rows, V] fp32 temporaries)
KL_BLOCK_ROWS = 32


def _fp32_logits(xc, w, b, buf: TileBuffer):
    """``xc w^T (+ b)`` as an fp32 (fp64 for fp64 inputs) tile: by the tile engine (``backends/gemm.py``; into
    ``buf`` where it writes in place) when the GEMM runs in that dtype, else the 16-bit product (fp32 accumulation
    inside) widened once into ``buf``."""
    if xc.dtype == buf.dtype:
        return tile_logits(xc, w, b, buf.take)
    out = buf.take(xc.shape[0]).copy_(torch.mm(xc, w.t()))
    if b is not None:
        out.add_(b.to(out.dtype))
    return out


def _kl_tile_(z, zr, scale, want_grad: bool, total: torch.Tensor) -> None:
    """Add ``sum_r s_r KL(softmax(zr_r) || softmax(z_r))`` of a pair of fp32 logits tiles to ``total`` (``s_r``:
    the rows of a per-row ``scale`` tensor; a float scale is applied by the caller); with ``want_grad`` the policy
    tile ``z`` is overwritten, a few rows at a time, by its logits gradient ``s_r (p - p_ref)``."""
    per_row = isinstance(scale, torch.Tensor)
    for k0 in range(0, z.shape[0], KL_BLOCK_ROWS):
        zb, zrb = z[k0 : k0 + KL_BLOCK_ROWS], zr[k0 : k0 + KL_BLOCK_ROWS]
        s = scale[k0 : k0 + KL_BLOCK_ROWS].to(z.dtype) if per_row else scale
        lq = torch.log_softmax(zrb, dim=1)
        lp = torch.log_softmax(zb, dim=1)
        q = lq.exp()
        # 0 * log 0 := 0 where the reference assigns no mass (lq = -inf); -inf - -inf would give NaN
        kl = torch.where(q > 0, q * (lq - lp), 0.0).sum(1)
        total += (kl * s).sum() if per_row else kl.sum()
        if want_grad:
            torch.exp(lp, out=zb).sub_(q).mul_(s.unsqueeze(1) if per_row else s)
        del lq, lp, q


def chunked_kl(inp: HeadInputs, ref: HeadInputs, scale, needs: GradNeeds, R: int):
    """``(scale * sum_r KL(p_ref(.|r) || p(.|r)), dx, dw, db)`` over the packed rows, 8 M d V flops (``scale``: a
    number, or a ``[M]`` tensor of per-row scales: ``sum_r scale_r KL_r``).

    ``p`` = softmax of ``x_r w^T + b`` (differentiable), ``p_ref`` = softmax of ``xr_r wr^T + br`` (the frozen
    reference ``ref`` on the same rows; its own hidden size allowed). Per tile of ``R`` rows (the fp32 chunk rule
    of the larger hidden size: both tiles together take at most the bytes of the fp32 ``dW``): the two logits
    tiles, then, a few rows at a time, the two log-softmaxes, ``KL_r = sum_v p_ref (log p_ref - log p)`` and the
    logits gradient ``scale (p - p_ref)`` written over the policy tile, which feeds the dX / dW GEMMs while it is
    live. Nothing ``[M, V]``. With ``inp.grad_filter`` (its ``probs`` only) the products leave out the entries with
    ``|p - p_ref| < eps`` (per element of ``dW``: an error below ``eps * scale * sum_r |x_rk|``).
    """
    x, w, b = inp.x, inp.w, inp.b
    acc_t = acc_dtype(x)
    M = inp.num_rows
    acc = TileGrads(x, w, b, *needs)
    total = torch.zeros((), dtype=acc_t, device=x.device)
    if M == 0:
        return (total, *acc.finish())
    n = min(R, M)
    zbuf, rbuf = TileBuffer(n, x, w, dtype=acc_t), TileBuffer(n, ref.x, ref.w, dtype=acc_t)
    flt = inp.grad_filter
    per_row = isinstance(scale, torch.Tensor)
    # the filter needs the tile in the GEMM dtype (fp32 / fp64 inputs, or 16-bit ones widened to fp32)
    sparse = flt is not None and flt.probs > 0 and w.dtype == acc_t
    src, rsrc = RowSource(x, inp.rows, R, w.dtype), RowSource(ref.x, ref.rows, R, ref.w.dtype)
    for r0 in range(0, M, R):
        r1 = min(M, r0 + R)
        xc = src.get(r0, r1)
        z = _fp32_logits(xc, w, b, zbuf)
        zr = _fp32_logits(rsrc.get(r0, r1), ref.w, ref.b, rbuf)
        s = scale[r0:r1] if per_row else scale
        _kl_tile_(z, zr, s, acc.any, total)
        if acc.any and sparse:  # softmax filter: entries with |p - p_ref| < eps left out of the products
            thr = (flt.probs * s.abs()).to(acc_t) if per_row else torch.full(
                (r1 - r0,), flt.probs * abs(scale), dtype=acc_t, device=x.device)
            acc.add_tile_sparse(z, xc, w, inp.dst_rows(r0, r1), None, thr, None, flt.block_rows)
        elif acc.any:
            acc.add_tile(z, xc, w, r0, r1, inp.rows)
        del z, zr  # fresh tiles per step (oneDNN): drop these before the next are made
    return (total if per_row else total * scale, *acc.finish())
