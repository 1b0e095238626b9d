"""Pure-PyTorch chunked backend: the CPU path and the fallback everywhere.

Chunk rule (the largest temporary is one logits tile ``[R, V]`` in the input dtype)::

    R0 = max(128, d // 2) * (4 // itemsize)    # fp32: d/2 rows, bf16/fp16: d rows
    R  = min(max(R0, longest sequence), 4 * R0)   # scalar losses: let one whole sequence fit a tile
                                               # override: chunk_rows= or SIMNPO_FAST_CHUNK_ROWS

so a tile takes at most half the bytes of the fp32 LM-head gradient ``[V, d]`` that any training step must
hold anyway (at least 128 rows so the GEMMs stay efficient), or up to twice those bytes when that is what it
takes to hold the longest sequence whole (the 6MdV schedule below instead of the 8MdV two-pass one). Memory therefore does not grow with
the number of tokens beyond the gradients themselves.

Scalar losses use a *sequence-aligned* schedule: whole sequences are grouped into tiles of <= R rows, so
every sequence's ``logp_sum`` -- hence its weight ``g_i`` -- is complete while its logits tile is still
live, and the tile is turned into ``dX`` and ``dW`` at once (one logits GEMM + two gradient GEMMs = 6MdV).
A sequence longer than R answer tokens cannot fit one tile; it is handled in two passes over R-row token
tiles (first its ``logp_sum``, then the gradient with the logits recomputed: 8 x its share of MdV).

Within a tile everything happens in place, with no second [R, V] buffer, and the per-sequence weight ``g``
never touches the tile: ``d_logits = g (onehot - softmax) = diag(row_scale) tile`` where only the target entries
of the tile are rewritten and ``row_scale`` is applied to the ``[R, d]`` sides of the two gradient GEMMs
(``dX = row_scale * (tile W)``, ``dW += tile^T (row_scale * x)``).

The target entries carry ``1 - p_t`` (or ``p_t - 1``) computed from the *other* entries of the row, never as a
difference of rounded numbers (see ``backends/base.py``), so the gradient keeps its relative accuracy however
close ``p_t`` is to 1 (a memorised forget set):

- fp32 / fp64 tiles: ``m = max z``; ``z <- exp(z - m)``; ``z_t <- 0``; ``so = sum z`` (the other entries; torch's
  cascade sum, good to ~1 ulp at any V) and ``s = so + exp(z_t - m)``; ``lp_t = -log1p(so / exp(z_t - m))`` when
  ``p_t >= 1/2``, else ``(z_t - m) - log s``; ``z_t <- -so`` (= ``s (p_t - 1)``); ``row_scale = -g / s``.
- bf16 tiles: ``z <- softmax(z)`` (ATen's fused row kernel, fp32 inside, one pass, no max pass); rows with
  ``p_t > 1/2``: ``z_t <- 0``, ``so = sum z`` (fp32 accumulation: ``1 - p_t`` to the 2^-9 relative rounding of
  the entries themselves), ``lp_t = log1p(-so)``; other rows: ``lp_t = log p_t`` (``p_t`` rounded once to bf16:
  2^-9 relative on ``p_t``, i.e. <= 0.002 on ``lp_t``); ``z_t <- p_t - 1``; ``row_scale = -g``. On CPU, where
  every 16-bit elementwise pass converts to fp32 and back, the fused softmax took a bf16 step (N=2048, d=512,
  V=32000, 2-core Xeon) from 335-365 to ~262 ms (``python -m bench.chunk_rows --dtype bf16``); the ``so`` sum
  reads the rows with ``p_t > 1/2`` once more (all of them on a memorised forget set, none on random logits).
- fp16 tiles: ``z_t <- -inf``; ``mo = max z``; ``z <- softmax(z)`` = ``q``, the distribution of the *other*
  tokens (``q_v = p_v / (1 - p_t)``); ``lo = mo - log max q``; ``z_t <- -1``; ``row_scale = -g (1 - p_t)``. An
  fp16 softmax of the whole row would flush every ``p_v`` of a peaked row to zero (below 6e-8); ``q`` keeps them
  at their scale relative to each other (entries below 2^-14, e.g. flat rows over V > 16k, are fp16 subnormals
  with fewer bits).

Precision. fp32 inputs: everything in fp32 (fp64 inputs: fp64). bf16/fp16 inputs: the tile stays in the
input dtype like the naive path's logits (halving the memory traffic of the epilogue), every reduction is
fp32 (row sums, ``lse``, per-sequence sums) and each 16-bit number is rounded once. Beyond the rounding of the
logits themselves (``~|z| 2^-9`` each in bf16, as in the naive path, whose GEMM output they are), ``lp_t`` and
``1 - p_t`` carry the relative rounding of the tile's entries (2^-9 bf16, 2^-11 fp16). Where a bf16 ``p_t`` is
below the smallest normal bf16 (``lp_t < -87``) it is ``z_t - lse`` with the row's logits recomputed (the same GEMM, a few rows at a time) and
their ``lse`` taken in fp32: no pass over the tile is spent on a case that normal tiles never meet.
The three GEMMs run in the input dtype (fp32 accumulation inside); each tile's dW product is added into an
fp32 ``[V, d]`` accumulator. fp16 row scales are split into a power of two per tile (applied in fp32) and a
factor in [1/2, 1) so that ``row_scale * x`` neither underflows nor overflows in fp16, and fp16 ``dX`` rows are
written in fp32 (``_Grads``): fp16 gradients are returned in fp32 so that the upstream gradient (a loss scale)
is applied before the one rounding to fp16 (``simnpo_fast/ops.py``).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .base import Backend, Head, target_terms

_MIN_ROWS = 128
_BF16_LOG_TINY = math.log(torch.finfo(torch.bfloat16).tiny)  # ~ -87.3: below it a bf16 p_t is subnormal
_RELOGITS_ELEMS = 1 << 21  # rows recomputed by tile_forward, per block: <= 8 MiB of fp32 logits


def chunk_rows(d: int, override: Optional[int] = None, itemsize: int = 4) -> int:
    if override is None:
        env = os.environ.get("SIMNPO_FAST_CHUNK_ROWS")
        override = int(env) if env else None
    if override is not None:
        if override < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {override}")
        return int(override)
    return max(_MIN_ROWS, d // 2) * max(1, 4 // itemsize)


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 accumulation whatever the input precision (fp64 inputs keep fp64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _logits(xc: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits tile in the input dtype (the GEMM accumulates in fp32 internally), into ``out`` if given."""
    z = torch.mm(xc, w.t()) if out is None else torch.mm(xc, w.t(), out=out)
    if b is not None:
        z.add_(b.to(z.dtype))
    return z


class _TileBuffer:
    """One ``[R, V]`` buffer per call, reused by every tile (views of its first rows).

    A fresh 16-32 MB tensor per tile costs a page fault per 4 KiB page wherever the allocator hands large
    blocks back to the OS (glibc above its mmap threshold): ~8k faults per tile, several % of a CPU step.
    Reusing one buffer pays them once per call and keeps the peak to exactly one tile.
    """

    def __init__(self, rows: int, x: torch.Tensor, w: torch.Tensor):
        self.rows, self.V, self.x, self._buf = rows, w.shape[0], x, None

    def take(self, r: int) -> torch.Tensor:
        if self._buf is None:
            self._buf = torch.empty(self.rows * self.V, dtype=self.x.dtype, device=self.x.device)
        return self._buf[: r * self.V].view(r, self.V)


class _RowSource:
    """Rows ``[r0, r1)`` of the packed matrix: a view of ``x`` when ``rows is None``, else gathered
    (``x[rows[r0:r1]]``) into one ``[R, d]`` buffer reused by every tile."""

    def __init__(self, x: torch.Tensor, rows: Optional[torch.Tensor], R: int):
        self.x, self.rows, self.R, self._buf = x, rows, R, None

    def get(self, r0: int, r1: int) -> torch.Tensor:
        if self.rows is None:
            return self.x[r0:r1]
        if self._buf is None:
            self._buf = torch.empty(min(self.R, self.rows.shape[0]), self.x.shape[1], dtype=self.x.dtype,
                                    device=self.x.device)
        return torch.index_select(self.x, 0, self.rows[r0:r1], out=self._buf[: r1 - r0])

    def sub(self, r0: int, r1: int) -> "tuple[torch.Tensor, Optional[torch.Tensor]]":
        """``(x, rows)`` of the packed rows ``[r0, r1)`` for a nested pass."""
        return (self.x[r0:r1], None) if self.rows is None else (self.x, self.rows[r0:r1])


def pow2_split(scale: torch.Tensor) -> "tuple[float, torch.Tensor]":
    """``(alpha, scale / alpha)``: ``alpha`` a power of two (a host float) with ``max |scale / alpha|`` in [1/2, 1);
    ``alpha = 1`` for an all-zero or non-finite ``scale`` (exact: only exponents change)."""
    amax = float(scale.abs().amax()) if scale.numel() else 0.0
    if not (amax > 0.0 and math.isfinite(amax)):
        return 1.0, scale
    alpha = math.ldexp(1.0, math.frexp(amax)[1])
    return alpha, scale / alpha


def _row_pow2_(p: torch.Tensor) -> torch.Tensor:
    """Divide each row of the wide tile ``p`` in place by a power of two ``c_r`` with ``max |p_r / c_r|`` in
    [1/2, 1); return ``c`` (fp32, 1 for all-zero rows): the rows then round to fp16 without underflow."""
    amax = p.abs().amax(dim=1).float()
    c = torch.ldexp(torch.ones_like(amax), torch.frexp(amax).exponent)
    c = torch.where((amax > 0) & torch.isfinite(amax), c, torch.ones_like(c))
    p.div_(c.to(p.dtype).unsqueeze(1))
    return c


class _Grads:
    """Gradient buffers, allocated only for what autograd needs.

    ``dW`` (and ``db``) accumulate over tiles in fp32 (fp64 for fp64 inputs). ``dX`` rows are each written
    once, by the tile that holds them: in the input dtype for fp32/bf16 (a bf16 GEMM rounds its fp32 sum once:
    the same single rounding as an fp32 buffer cast at the end, without the buffer), in fp32 for fp16 inputs
    (``N d`` fp32 instead of fp16: 2 more bytes per hidden-state element, so that a loss scale can still be
    applied before the rounding to fp16; bf16 has fp32's exponent range and needs no such copy). With ``rows``
    the tile rows land at ``dx[rows]`` of a ``dx`` shaped like the flat hidden states (zero elsewhere).

    fp16 GEMM operands are kept inside fp16's range: a per-row ``scale`` is split into a power of two per tile
    (``pow2_split``, applied in fp32 to the GEMM results) and a factor in [1/2, 1) applied to ``x``; a wide
    (fp32) tile is normalised row by row before its rounding to fp16 (``_row_pow2_``). Without this a small
    per-sequence weight (saturated SimNPO: ``g ~ 1e-7``) times ``x`` would underflow in fp16.
    """

    #: bf16/fp16 tiles: the per-tile dW product is formed in vocabulary blocks of this many rows, in a reused
    #: low-precision buffer, widened into a reused fp32 buffer and added into the fp32 accumulator (a mixed-dtype
    #: ``add_`` would allocate a fresh fp32 copy of every block). 2048 rows: fastest on CPU (cache-resident
    #: blocks), 6 MB of buffers at d = 512.
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
                scale = _row_pow2_(p)
            p = p.to(w.dtype)
        alpha, sn = 1.0, scale  # fp16: scale = alpha * sn, alpha a power of two applied in fp32
        if scale is not None and p.dtype == torch.float16:
            alpha, sn = pow2_split(scale)
        if self.db is not None:
            if scale is None:
                self.db.add_(p.sum(dim=0, dtype=self.acc))
            else:
                self.db.add_(torch.mv(p.t(), sn.to(p.dtype)).to(self.acc), alpha=alpha)
        if self.dx is not None:
            if scale is None:
                prod_fn, dt = (lambda out: torch.mm(p, w, out=out)), p.dtype  # noqa: E731
            elif self.dx.dtype == p.dtype:
                # fp32 row scale (not rounded to 16 bits: that would be a systematic 2^-9 error per row)
                prod_fn, dt = (lambda out: torch.mm(p, w, out=out).mul_(scale.unsqueeze(1))), p.dtype  # noqa: E731
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


def _relogits(backend, xc, w, b):
    """``idx -> logits of rows idx of the tile`` (a fresh tensor, the tile's dtype)."""
    return lambda idx: backend.tile_logits(xc.index_select(0, idx), w, b)


def _softmax_(z: torch.Tensor) -> torch.Tensor:
    """Row softmax in place (ATen's fused last-dim kernel writes each row over itself: one pass, fp32 inside
    for 16-bit tiles). ``tests/backends/test_chunked_epilogue.py`` checks it against the out-of-place op."""
    return torch._softmax(z, 1, False, out=z)


def _put_targets_(z: torch.Tensor, tgt: torch.Tensor, values) -> None:
    """``z[r, tgt[r]] = values[r]`` (a tensor, or one float for every row; rounded to z's dtype)."""
    if not isinstance(values, torch.Tensor):
        values = torch.full(tgt.shape, values, dtype=z.dtype, device=z.device)
    if z.dtype in (torch.float32, torch.float64):
        z.scatter_(1, tgt.unsqueeze(1), values.to(z.dtype).unsqueeze(1))
    else:  # flat index_copy_: 16-bit scatter_ takes a slow path on CPU (~300x slower for the same R writes)
        flat = torch.arange(z.shape[0], device=z.device) * z.shape[1] + tgt
        z.view(-1).index_copy_(0, flat, values.to(z.dtype))


def _gather(z: torch.Tensor, tgt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return z.gather(1, tgt.unsqueeze(1)).squeeze(1).to(dtype)


def _forward_exp_(z, tgt):
    """fp32/fp64 tile -> ``(lse, lp, ("exp", s, so))``; ``z <- exp(z - m)`` with its target entries zeroed."""
    zt = _gather(z, tgt, z.dtype)
    m = z.amax(dim=1)
    z.sub_(m.unsqueeze(1)).exp_()
    _put_targets_(z, tgt, 0.0)
    so = z.sum(dim=1)                     # sum of the other entries, exp(z_v - m)
    dt = zt - m                           # <= 0
    et = torch.exp(dt)
    s = so + et
    # p_t >= 1/2: lp = -log1p(so / et) keeps 1 - p_t = so / s to fp32 relative accuracy; else dt - log s
    lp = torch.where(et >= so, -torch.log1p(so / et), dt - torch.log(s))
    return m + torch.log(s), lp, ("exp", s, so)


def _forward_softmax_(z, tgt, relogits):
    """bf16 tile -> ``(lse, lp, ("p", omp))``; ``z <- softmax(z)`` with its target entries zeroed."""
    zt = _gather(z, tgt, torch.float32)
    _softmax_(z)
    pt = _gather(z, tgt, torch.float32)
    near1 = pt > 0.5
    so = 1.0 - pt
    n1 = int(near1.sum())
    if n1:  # 1 - p_t from the other entries of these rows (fp32 accumulation inside the sum)
        _put_targets_(z, tgt, 0.0)
        if 3 * n1 >= z.shape[0]:
            so = torch.where(near1, z.sum(dim=1).float(), so)
        else:  # a few rows: gather them (a copy of n1 rows beats a read of all R)
            idx = near1.nonzero().squeeze(1)
            so = so.index_copy(0, idx, z.index_select(0, idx).sum(dim=1).float())
    lp = torch.where(near1, torch.log1p(-so), torch.log(pt))
    small = (lp < _BF16_LOG_TINY).nonzero().squeeze(1)
    if small.numel():  # p_t below the smallest normal bf16: recompute the row, its lse in fp32
        step = max(1, _RELOGITS_ELEMS // z.shape[1])
        for i in range(0, small.numel(), step):
            idx = small[i : i + step]
            lp[idx] = zt[idx] - torch.logsumexp(relogits(idx).float(), dim=1)
    omp = torch.where(near1, so, -torch.expm1(lp))
    return zt - lp, lp, ("p", omp)


def _forward_masked_softmax_(z, tgt):
    """fp16 tile -> ``(lse, lp, ("q", omp))``; ``z <- q``, the softmax of the other entries (target entry 0)."""
    zt = _gather(z, tgt, torch.float32)
    _put_targets_(z, tgt, float("-inf"))
    mo = z.amax(dim=1)
    _softmax_(z)
    lo = mo.float() - torch.log(z.amax(dim=1).float())   # max q = exp(mo - lo)
    none = mo == float("-inf")                           # no other finite logit (V = 1): p_t = 1
    if bool(none.any()):
        z[none] = 0.0
        lo = torch.where(none, torch.full_like(lo, float("-inf")), lo)
    lp, lse, omp = target_terms(lo, zt)
    return lse, lp, ("q", omp)


def _factor_dlogits_(z, state, tgt, g):
    """``(tile, row_scale)`` with ``diag(row_scale) tile = g * (onehot - softmax)``, from the tile as the
    ``_forward_*_`` function left it (``state``); only the target entries are written:

    * ``("exp", s, so)``: ``z = exp(z - m)``; ``z_t <- -so`` (= ``s (p_t - 1)``), ``row_scale = -g / s``;
    * ``("p", omp)``: ``z = softmax``; ``z_t <- -omp`` (= ``p_t - 1``), ``row_scale = -g``;
    * ``("q", omp)``: ``z = q``; ``z_t <- -1``, ``row_scale = -g * omp`` (= ``-g (1 - p_t)``).
    """
    kind = state[0]
    if kind == "exp":
        _, s, so = state
        _put_targets_(z, tgt, -so)
        return z, -g / s
    if kind == "p":
        _put_targets_(z, tgt, -state[1])
        return z, -g
    _put_targets_(z, tgt, -1.0)
    return z, -g * state[1]


class ChunkedBackend(Backend):
    """Sequence-aligned tiles with torch GEMMs. The per-tile epilogue (``tile_*`` methods) is the only part a
    GPU subclass needs to replace by fused kernels; the schedule and the GEMMs stay shared."""

    name = "chunked"
    grads_class = _Grads
    row_indexed = True

    def __init__(self, chunk_rows: Optional[int] = None):
        self._rows = chunk_rows

    def rows(self, x: torch.Tensor, longest: int = 0) -> int:
        base = chunk_rows(x.shape[1], self._rows, x.element_size())
        if self._rows is not None or os.environ.get("SIMNPO_FAST_CHUNK_ROWS"):
            return base
        return min(max(base, longest), 4 * base)

    # -- tile epilogue ------------------------------------------------------------------------------------
    def tile_logits(self, xc, w, b, out=None):
        """Logits tile ``xc w^T (+ b)``; ``out`` is a ``[rows, V]`` buffer of the input dtype to write into."""
        return _logits(xc, w, b, out)

    def tile_forward(self, z, tgt, relogits):
        """``(lse, lp, state)`` of a logits tile (``lp`` = target log-probabilities); overwrites ``z`` (see the
        module docstring: fp32/fp64 ``exp(z - m)``, bf16 softmax, fp16 softmax of the other entries).

        ``relogits(idx)`` returns the logits of tile rows ``idx`` afresh (a ``[len(idx), V]`` tensor), for the
        rare bf16 rows whose target probability is below the smallest normal bf16.
        """
        if z.dtype == torch.bfloat16:
            return _forward_softmax_(z, tgt, relogits)
        if z.dtype == torch.float16:
            return _forward_masked_softmax_(z, tgt)
        return _forward_exp_(z, tgt)

    def tile_dlogits(self, z, state, tgt, g):
        """``(tile, row_scale)`` with ``diag(row_scale) tile = g * (onehot - softmax)``, from the tile as
        ``tile_forward`` left it (``row_scale=None``: the tile is ``d_logits`` itself); see ``_factor_dlogits_``."""
        return _factor_dlogits_(z, state, tgt, g)

    def tile_dlogits_from_logits(self, z, lse, lp, tgt, g, relogits=None):
        """``tile_dlogits`` from a raw logits tile and the forward's ``lse`` and ``lp`` of its rows.

        fp32/fp64: ``z <- exp(z - lse)`` (one pass less than ``tile_forward``), ``z_t <- expm1(lp_t)``. 16-bit:
        ``tile_forward`` again (as cheap as rebuilding from ``lse``, which a 16-bit ``z - lse`` would round).
        """
        if z.dtype in (torch.float32, torch.float64):
            z.sub_(lse.unsqueeze(1)).exp_()
            _put_targets_(z, tgt, torch.expm1(lp))
            return z, -g
        _, _, state = self.tile_forward(z, tgt, relogits)
        return self.tile_dlogits(z, state, tgt, g)

    # -- generic path -------------------------------------------------------------------------------------
    def _token_tiles(self, x, w, b, rows, M: int):
        """``(r0, r1, xc, z)`` over ``R``-row token tiles of the packed rows: inputs and logits (one reused buffer)."""
        R = self.rows(x)
        buf = _TileBuffer(min(R, M), x, w)
        src = _RowSource(x, rows, R)
        for r0 in range(0, M, R):
            r1 = min(M, r0 + R)
            xc = src.get(r0, r1)
            yield r0, r1, xc, self.tile_logits(xc, w, b, out=buf.take(r1 - r0))

    def token_logprob(self, x, w, b, targets, rows=None):
        M = targets.shape[0]
        lp = torch.empty(M, dtype=acc_dtype(x), device=x.device)
        lse = torch.empty(M, dtype=acc_dtype(x), device=x.device)
        for r0, r1, xc, z in self._token_tiles(x, w, b, rows, M):
            lse[r0:r1], lp[r0:r1], _ = self.tile_forward(z, targets[r0:r1], _relogits(self, xc, w, b))
        return lp, lse

    def token_logprob_backward(self, x, w, b, targets, lse, grad_lp, need_dx, need_dw, need_db, rows=None, *, lp):
        acc = self.grads_class(x, w, b, need_dx, need_dw, need_db)
        if not acc.any:
            return None, None, None
        grad_lp = grad_lp.to(acc_dtype(x))
        for r0, r1, xc, z in self._token_tiles(x, w, b, rows, targets.shape[0]):
            p, row_scale = self.tile_dlogits_from_logits(z, lse[r0:r1], lp[r0:r1], targets[r0:r1], grad_lp[r0:r1],
                                                         _relogits(self, xc, w, b))
            acc.add_tile(p, xc, w, r0, r1, rows, scale=row_scale)
        return acc.finish()

    # -- scalar-loss path: sequence-aligned, gradients while the tile is live ------------------------------
    def fused_seq_loss(self, x, w, b, targets, seq_ids, offsets, num_seqs, head: Head, need_dx, need_dw, need_db,
                       rows=None):
        dev = x.device
        R = self.rows(x, longest=max((e - s for s, e in zip(offsets, offsets[1:])), default=0))
        acc = self.grads_class(x, w, b, need_dx, need_dw, need_db)
        acc_t = acc_dtype(x)
        logp_sum = torch.zeros(num_seqs, dtype=acc_t, device=dev)
        loss_sum = torch.zeros((), dtype=acc_t, device=dev)
        M = targets.shape[0]
        buf = _TileBuffer(min(R, M), x, w)
        src = _RowSource(x, rows, R)
        for kind, s0, s1 in _schedule(offsets, R):
            r0, r1 = offsets[s0], offsets[s1]
            sidx = torch.arange(s0, s1, device=dev)
            if kind == "tile":  # whole sequences s0..s1-1 in one tile
                xc, tgt = src.get(r0, r1), targets[r0:r1]
                z = self.tile_logits(xc, w, b, out=buf.take(r1 - r0))
                _, lp, state = self.tile_forward(z, tgt, _relogits(self, xc, w, b))
                local = seq_ids[r0:r1] - s0
                seq_lp = torch.zeros(s1 - s0, dtype=acc_t, device=dev).index_add_(0, local, lp.to(acc_t))
                logp_sum[s0:s1] = seq_lp
                f, g = head(seq_lp, sidx)
                loss_sum += f.sum()
                if acc.any:
                    p, row_scale = self.tile_dlogits(z, state, tgt, g.index_select(0, local))
                    acc.add_tile(p, xc, w, r0, r1, rows, scale=row_scale)
                    del p
                del z
            else:  # one long sequence: two passes over token tiles
                del buf  # token_logprob takes its own buffer
                xs, rs = src.sub(r0, r1)
                lp, lse = self.token_logprob(xs, w, b, targets[r0:r1], rows=rs)
                buf = _TileBuffer(min(R, M), x, w)
                seq_lp = lp.sum().reshape(1)
                logp_sum[s0] = seq_lp[0]
                f, g = head(seq_lp, sidx)
                loss_sum += f.sum()
                if acc.any:
                    for t0 in range(r0, r1, R):
                        t1 = min(r1, t0 + R)
                        xc = src.get(t0, t1)
                        z = self.tile_logits(xc, w, b, out=buf.take(t1 - t0))
                        p, row_scale = self.tile_dlogits_from_logits(
                            z, lse[t0 - r0 : t1 - r0], lp[t0 - r0 : t1 - r0], targets[t0:t1],
                            g.expand(t1 - t0).contiguous(), _relogits(self, xc, w, b))
                        acc.add_tile(p, xc, w, t0, t1, rows, scale=row_scale)
                        del z, p
        del buf
        # Sequences with no answer token never enter a tile; the head still defines their (zero) loss.
        return (loss_sum, logp_sum, *acc.finish())


# ------------------------------------------------------------------------------------------------------------
# Token-level KL(p_ref || p) (the retain-KL baseline): two logits tiles, gradients while they are live
# ------------------------------------------------------------------------------------------------------------
#: rows of the per-row-block epilogue of the KL tiles (three [rows, V] fp32 temporaries)
KL_BLOCK_ROWS = 32


def _fp32_logits(xc, w, b, out):
    """``xc w^T (+ b)`` written into the fp32 (fp64 for fp64 inputs) buffer ``out``."""
    if xc.dtype == out.dtype:
        torch.mm(xc, w.t(), out=out)
    else:  # low-precision GEMM (fp32 accumulation inside), widened once
        out.copy_(torch.mm(xc, w.t()))
    if b is not None:
        out.add_(b.to(out.dtype))
    return out


def fused_kl(x, w, b, xr, wr, br, rows, scale: float, need_dx: bool, need_dw: bool, need_db: bool,
             chunk_rows_override: Optional[int] = None, grads_class=None):
    """``(scale * sum_t KL(p_ref(.|t) || p(.|t)), dx, dw, db)`` over the packed rows, 8 M d V flops.

    ``p`` = softmax of ``x_t w^T + b`` (differentiable), ``p_ref`` = softmax of ``xr_t wr^T + br`` (frozen
    reference; its own hidden size allowed). Per tile of ``R`` rows (the fp32 chunk rule: both tiles together
    take at most the bytes of the fp32 ``dW``): the two logits tiles, then, a few rows at a time, the two
    log-softmaxes, ``KL_t = sum_v p_ref (log p_ref - log p)`` and the logits gradient ``scale (p - p_ref)``
    written over the policy tile, which feeds the dX / dW GEMMs while it is live. Nothing ``[M, V]``.
    """
    acc_t = acc_dtype(x)
    M = x.shape[0] if rows is None else rows.shape[0]
    V = w.shape[0]
    R = chunk_rows(max(x.shape[1], xr.shape[1]), chunk_rows_override, 4)
    acc = (grads_class or _Grads)(x, w, b, need_dx, need_dw, need_db)
    total = torch.zeros((), dtype=acc_t, device=x.device)
    if M == 0:
        return (total, *acc.finish())
    n = min(R, M)
    zbuf = torch.empty(n * V, dtype=acc_t, device=x.device)
    rbuf = torch.empty(n * V, dtype=acc_t, device=x.device)
    src, rsrc = _RowSource(x, rows, R), _RowSource(xr, rows, R)
    for r0 in range(0, M, R):
        r1 = min(M, r0 + R)
        xc = src.get(r0, r1)
        z = _fp32_logits(xc, w, b, zbuf[: (r1 - r0) * V].view(r1 - r0, V))
        zr = _fp32_logits(rsrc.get(r0, r1), wr, br, rbuf[: (r1 - r0) * V].view(r1 - r0, V))
        for k0 in range(0, r1 - r0, KL_BLOCK_ROWS):
            zb, zrb = z[k0 : k0 + KL_BLOCK_ROWS], zr[k0 : k0 + KL_BLOCK_ROWS]
            lq = torch.log_softmax(zrb, dim=1)
            lp = torch.log_softmax(zb, dim=1)
            q = lq.exp()
            # 0 * log 0 := 0 where the reference assigns no mass (lq = -inf); -inf - -inf would give NaN
            total += torch.where(q > 0, q * (lq - lp), 0.0).sum()
            if acc.any:
                torch.exp(lp, out=zb).sub_(q).mul_(scale)
            del lq, lp, q
        if acc.any:
            acc.add_tile(z, xc, w, r0, r1, rows)
    return (total * scale, *acc.finish())


def _schedule(offsets: "list[int]", R: int):
    """Group consecutive sequences into tiles of <= R rows; sequences longer than R get a 'long' entry."""
    S = len(offsets) - 1
    out = []
    s = 0
    while s < S:
        n = offsets[s + 1] - offsets[s]
        if n == 0:
            s += 1
            continue
        if n > R:
            out.append(("long", s, s + 1))
            s += 1
            continue
        e = s + 1
        while e < S and offsets[e + 1] - offsets[s] <= R:
            e += 1
        out.append(("tile", s, e))
        s = e
    return out
