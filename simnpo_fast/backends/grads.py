"""Gradient accumulators of the tiled backends: ``dX``, ``dW`` and ``db`` built tile by tile from the
factorised logits gradient ``diag(row_scale) tile`` of ``simnpo_fast/backends/tiles.py``."""
from __future__ import annotations

from typing import Optional

import torch

from . import gemm
from .tiles import acc_dtype, row_pow2_, split_scale


class TileGrads:
    """Gradient buffers, allocated only for what autograd needs.

    ``dW`` (and ``db``) accumulate over tiles in fp32 (fp64 for fp64 inputs). ``dX`` rows are each written
    once, by the tile that holds them: in the input dtype for fp32/bf16 (a bf16 GEMM rounds its fp32 sum once:
    the same single rounding as an fp32 buffer cast at the end, without the buffer), in fp32 for fp16 inputs
    (``N d`` fp32 instead of fp16: 2 more bytes per hidden-state element, so that a loss scale can still be
    applied before the rounding to fp16; bf16 has fp32's exponent range and needs no such copy). With ``rows``
    the tile rows land at ``dx[rows]`` of a ``dx`` shaped like the flat hidden states (zero elsewhere).

    fp16 GEMM operands are kept inside fp16's range: a per-row ``scale`` is split into a power of two per tile
    (``pow2_split``, applied in fp32 to the GEMM results) and a factor in [1/2, 1) applied to ``x``; a wide
    (fp32) tile is normalised row by row before its rounding to fp16 (``row_pow2_``). Without this a small
    per-sequence weight (saturated SimNPO: ``g ~ 1e-7``) times ``x`` would underflow in fp16.
    """

    #: bf16/fp16 tiles: the per-tile dW product is formed in vocabulary blocks of this many rows, in a reused
    #: low-precision buffer, widened into a reused fp32 buffer and added into the fp32 accumulator (a mixed-dtype
    #: ``add_`` would allocate a fresh fp32 copy of every block); the blocks stay cache-resident on CPU
    #: (a 16-bit and an fp32 block: ``6 d dw_block_rows`` bytes).
    dw_block_rows = 2048

    def __init__(self, x, w, b, need_dx, need_dw, need_db):
        self.acc = acc_dtype(x)
        self._blk = self._wide = None  # reused [dw_block_rows, d] buffers of low-precision tiles
        self._dxbuf = None  # reused [R, d] product of row-indexed tiles
        self._prodbuf = None  # reused [R, d] fp16 product of fp16 tiles (dX rows are fp32)
        self._xsbuf = None  # reused [R, d] row-scaled tile inputs
        self.dx = torch.zeros(x.shape, dtype=self.dx_dtype(x), device=x.device) if need_dx else None
        # dW is written (not added) by the first tile: no zero-fill pass over [V, d]; finish() zeroes it if no
        # tile ever came (every sequence empty)
        self.dw = torch.empty(w.shape, dtype=self.acc, device=w.device) if need_dw else None
        self._dw_fresh = True
        self.db = torch.zeros(w.shape[0], dtype=self.acc, device=w.device) if (need_db and b is not None) else None
        self.any = need_dx or need_dw or self.db is not None
        self.cols_kept = self.cols_seen = 0  # softmax filter: tile entries (rows x columns) kept / looked at

    def dx_dtype(self, x) -> torch.dtype:
        return torch.float32 if x.dtype == torch.float16 else x.dtype

    def _dx_rows(self, prod_fn, r0: int, r1: int, rows: Optional[torch.Tensor], dtype: torch.dtype):
        """Write ``prod_fn(out)`` into dx rows ``[r0, r1)`` (or ``dx[rows[r0:r1]]``)."""
        if rows is None and self.dx.dtype == dtype:
            prod_fn(self.dx[r0:r1])
            return
        if self._dxbuf is None or self._dxbuf.shape[0] < r1 - r0 or self._dxbuf.dtype != dtype:
            self._dxbuf = torch.empty(r1 - r0, self.dx.shape[1], dtype=dtype, device=self.dx.device)
        prod = prod_fn(self._dxbuf[: r1 - r0])
        if rows is None:
            self.dx[r0:r1].copy_(prod)
        else:
            self.dx.index_copy_(0, rows[r0:r1], prod.to(self.dx.dtype))

    def _prod16(self, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``p @ w`` in p's (16-bit) dtype, into a reused ``[R, d]`` buffer."""
        r = p.shape[0]
        if self._prodbuf is None or self._prodbuf.shape[0] < r:
            self._prodbuf = torch.empty(r, w.shape[1], dtype=p.dtype, device=p.device)
        return torch.mm(p, w, out=self._prodbuf[:r])

    def add_tile(self, p: torch.Tensor, xc: torch.Tensor, w: torch.Tensor, r0: int, r1: int,
                 rows: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None):
        """Add the d_logits tile ``diag(scale) p`` of packed rows [r0, r1) (``scale=None``: ``p`` itself).

        ``p`` is fp32 (fp64), or the input dtype for bf16/fp16 inputs. A per-row ``scale`` (fp32) is applied to
        the ``[rows, d]`` sides of the GEMMs -- ``dX = scale * (p W)``, ``dW += p^T (scale * x)`` -- instead of a
        read+write pass over the ``[rows, V]`` tile.
        """
        if p.dtype != w.dtype:  # a wide tile (the KL's fp32 d_logits) for GEMMs in the input dtype
            if w.dtype == torch.float16 and scale is None:
                scale = row_pow2_(p)
            p = p.to(w.dtype)
        alpha, sn = split_scale(scale, p.dtype)  # fp16: scale = alpha * sn, alpha a power of two applied in fp32
        self._add_db(p, sn, alpha, lambda q, s: torch.mv(q.t(), s.to(q.dtype)).to(self.acc))
        if self.dx is not None:
            if scale is None or self.dx.dtype == p.dtype:
                # fp32 row scale (not rounded to 16 bits: that would be a systematic 2^-9 error per row)
                prod_fn, dt = (lambda out: gemm.rows_times_w(p, w, out, scale)), p.dtype  # noqa: E731
            else:  # fp16 tile, fp32 dX rows: the fp16 product (|p W| <= 2 max |W|) scaled in fp32
                prod_fn = lambda out: torch.mul(self._prod16(p, w), scale.unsqueeze(1), out=out)  # noqa: E731
                dt = self.dx.dtype
            self._dx_rows(prod_fn, r0, r1, rows, dt)
        if self.dw is not None:
            if sn is not None:
                xc = self._scaled_rows(xc, sn)
            if p.dtype == self.acc:
                if self._dw_fresh:
                    torch.mm(p.t(), xc, out=self.dw)
                else:
                    self.dw.addmm_(p.t(), xc)
            else:
                V, B = p.shape[1], self.dw_block_rows
                if self._blk is None:
                    self._blk = torch.empty(min(B, V), xc.shape[1], dtype=p.dtype, device=p.device)
                    self._wide = torch.empty(self._blk.shape, dtype=self.acc, device=p.device)
                for v0 in range(0, V, B):
                    n = min(B, V - v0)
                    prod = torch.mm(p[:, v0 : v0 + n].t(), xc, out=self._blk[:n])
                    if self._dw_fresh:
                        self.dw[v0 : v0 + n].copy_(prod)
                        if alpha != 1.0:
                            self.dw[v0 : v0 + n].mul_(alpha)
                    else:
                        self.dw[v0 : v0 + n].add_(self._wide[:n].copy_(prod), alpha=alpha)
            self._dw_fresh = False

    def add_tile_sparse(self, p: torch.Tensor, xc: torch.Tensor, w: torch.Tensor, dst: torch.Tensor,
                        scale: Optional[torch.Tensor], thr: torch.Tensor, tgt: Optional[torch.Tensor],
                        block_rows: int) -> None:
        """``add_tile`` of the tile rows ``p`` (``dX`` rows ``dst``) without the entries ``|p_rv| < thr_r`` (the
        softmax filter, ``backends/filter.py``): per block of ``block_rows`` rows, only the vocabulary columns
        where some row has ``|p_rv| >= thr_r`` (or its target ``tgt_r``) enter the two products, on gathered
        ``W[cols]`` / ``p[:, cols]``, and ``dW[cols]`` (``db[cols]``) is added to. ``p`` must have ``w``'s dtype."""
        alpha, sn = split_scale(scale, p.dtype)
        if self.dw is not None and self._dw_fresh:
            self.dw.zero_()
            self._dw_fresh = False
        V = p.shape[1]
        thr = thr.to(p.dtype)
        needed = _column_rule(p, thr, factorised=scale is not None and tgt is not None, block_rows=block_rows)
        for b0 in range(0, p.shape[0], block_rows):
            b1 = min(p.shape[0], b0 + block_rows)
            pb = p[b0:b1]
            keep = needed(pb, b0, b1)
            if tgt is not None:
                keep[tgt[b0:b1]] = True
            cols = keep.nonzero().squeeze(1)
            self.cols_kept += cols.numel() * (b1 - b0)
            self.cols_seen += V * (b1 - b0)
            if cols.numel() == 0:
                continue
            pc = pb.index_select(1, cols)
            sb = None if scale is None else scale[b0:b1]
            if self.dx is not None:
                prod = torch.mm(pc, w.index_select(0, cols))
                if sb is not None:
                    prod = prod.float().mul_(sb.unsqueeze(1))
                self.dx.index_copy_(0, dst[b0:b1], prod.to(self.dx.dtype))
            snb = None if sn is None else sn[b0:b1]
            if self.db is not None:
                part = pc.sum(dim=0, dtype=self.acc) if snb is None else torch.mv(pc.t(), snb.to(pc.dtype)).to(self.acc)
                self.db.index_add_(0, cols, part, alpha=alpha)
            if self.dw is not None:
                xs = xc[b0:b1] if snb is None else torch.mul(xc[b0:b1], snb.unsqueeze(1)).to(xc.dtype)
                self.dw.index_add_(0, cols, torch.mm(pc.t(), xs).to(self.acc), alpha=alpha)

    def _add_db(self, p: torch.Tensor, sn: Optional[torch.Tensor], alpha: float, matvec) -> None:
        """``db += alpha * p^T sn`` (``p``'s column sums when ``sn`` is None), ``matvec(p, sn)`` giving ``p^T sn``
        in the accumulator's dtype."""
        if self.db is None:
            return
        if sn is None:
            self.db.add_(p.sum(dim=0, dtype=self.acc))
        else:
            self.db.add_(matvec(p, sn), alpha=alpha)

    def _scaled_rows(self, xc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale * xc`` (rows scaled in fp32, rounded once to ``xc``'s dtype) in a reused ``[R, d]`` buffer."""
        if self._xsbuf is None or self._xsbuf.shape[0] < xc.shape[0]:
            self._xsbuf = torch.empty(xc.shape, dtype=xc.dtype, device=xc.device)
        return torch.mul(xc, scale.unsqueeze(1), out=self._xsbuf[: xc.shape[0]])

    def finish(self):
        self._blk = self._wide = self._dxbuf = self._xsbuf = self._prodbuf = None
        if self.dw is not None and self._dw_fresh:
            self.dw.zero_()
            self._dw_fresh = False
        return self.dx, self.dw, self.db


def _column_rule(p: torch.Tensor, thr: torch.Tensor, factorised: bool, block_rows: int):
    """``needed(pb, b0, b1) -> bool [V]``: the columns where some row ``r`` of the block ``p[b0:b1]`` has
    ``|p_rv| >= thr_r`` (targets are added by the caller).

    A factorised tile's non-target entries are probabilities (>= 0, ``tiles.factor_dlogits_``) and its targets
    are always kept, so there a column is needed iff ``max_r p_rv / thr_r >= 1``: one (scaled) max pass instead
    of the abs / compare / any temporaries, 3-10x cheaper on CPU; when every row has the same threshold (``eps``
    when ``row_scale = -g``) the scaling is skipped and the cut is the smallest threshold. The scaled cut is
    lowered by a few units of fp32 rounding: the fast rules keep a superset of the columns (never fewer, so the
    error bound holds), equal to the per-entry rule's but for entries within that rounding of their cut."""
    if not (factorised and thr.numel() and bool((thr > 0).all())):
        return lambda pb, b0, b1: (pb.abs() >= thr[b0:b1].unsqueeze(1)).any(0)
    inv = thr.float().reciprocal()  # an infinite threshold (a row that needs no column) -> 0
    lo, hi = float(inv.amin()), float(inv.amax())
    if hi <= lo * (1.0 + 1e-6):  # one threshold (up to rounding): the smallest, exactly as the tile holds it
        cut = float(thr.float().amin())
        return lambda pb, b0, b1: pb.amax(0) >= cut
    slack = 1.0 - 4.0 * torch.finfo(torch.float32).eps  # the fp32 product's rounding
    buf = torch.empty(min(block_rows, p.shape[0]), p.shape[1], dtype=torch.float32, device=p.device)
    return lambda pb, b0, b1: torch.mul(pb, inv[b0:b1].unsqueeze(1), out=buf[: b1 - b0]).amax(0) >= slack
