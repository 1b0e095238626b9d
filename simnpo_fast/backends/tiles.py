"""Tile maths of the chunked schedule: the tile-height rule, reused tile / row buffers and the in-place
epilogue of one logits tile (forward: ``lse`` and ``lp``; then the factorised logits gradient).

Tile height (the largest temporary is one logits tile ``[R, V]`` in the input dtype)::

    R0 = max(128, d // 2) * (4 // itemsize)    # fp32: d/2 rows, bf16/fp16: d rows
    R  = min(max(R0, longest sequence), 4 * R0)   # scalar losses: let one whole sequence fit a tile
                                               # override: chunk_rows= or SIMNPO_FAST_CHUNK_ROWS

so a tile takes at most half the bytes of the fp32 LM-head gradient ``[V, d]`` that any training step must
hold anyway (at least 128 rows so the GEMMs stay efficient), or up to twice those bytes when that is what it
takes to hold the longest sequence whole.

Within a tile everything happens in place, with no second ``[R, V]`` buffer, and the per-sequence weight ``g``
never touches the tile: ``d_logits = g (onehot - softmax) = diag(row_scale) tile`` where only the target entries
of the tile are rewritten and ``row_scale`` is applied to the ``[R, d]`` sides of the two gradient GEMMs
(``dX = row_scale * (tile W)``, ``dW += tile^T (row_scale * x)``).

The target entries carry ``1 - p_t`` (or ``p_t - 1``) computed from the *other* entries of the row, never as a
difference of rounded numbers (``simnpo_fast.kernels.target_terms``, the repository's ``kernels/target_terms.py``), so
the gradient keeps its relative accuracy however close ``p_t`` is to 1 (a memorised forget set):

- fp32 and bf16 tiles: ``z <- softmax(z)`` (ATen's fused row kernel, fp32 inside: each row is read from memory
  once and written over itself, where the max / ``exp`` / sum passes of separate ops would cross the whole tile
  four times); rows with ``p_t > 1/2``: ``z_t <- 0``, ``so = sum z`` (fp32 accumulation: ``1 - p_t`` to the
  relative rounding of the entries themselves, 2^-24 fp32, 2^-9 bf16), ``lp_t = log1p(-so)``; other rows:
  ``lp_t = log p_t`` (``p_t`` rounded once: 2^-24 / 2^-9 relative on ``p_t``, i.e. <= 6e-8 / 0.002 on
  ``lp_t``); ``z_t <- p_t - 1``; ``row_scale = -g``. The ``so`` sum reads the rows with ``p_t > 1/2`` once more
  (all of them on a memorised forget set, none on random logits).
- fp64 tiles: ``m = max z``; ``z <- exp(z - m)``; ``z_t <- 0``; ``so = sum z`` (the other entries; torch's
  cascade sum, good to ~1 ulp at any V) and ``s = so + exp(z_t - m)``; ``lp_t = -log1p(so / exp(z_t - m))`` when
  ``p_t >= 1/2``, else ``(z_t - m) - log s``; ``z_t <- -so`` (= ``s (p_t - 1)``); ``row_scale = -g / s``.
- fp16 tiles: ``z_t <- -inf``; ``mo = max z``; ``z <- softmax(z)`` = ``q``, the distribution of the *other*
  tokens (``q_v = p_v / (1 - p_t)``); ``lo = mo - log max q``; ``z_t <- -1``; ``row_scale = -g (1 - p_t)``. An
  fp16 softmax of the whole row would flush every ``p_v`` of a peaked row to zero (below 6e-8); ``q`` keeps them
  at their scale relative to each other (entries below 2^-14, e.g. flat rows over V > 16k, are fp16 subnormals
  with fewer bits).

Precision. fp32 inputs: everything in fp32 (fp64 inputs: fp64). bf16/fp16 inputs: the tile stays in the
input dtype like the naive path's logits (halving the memory traffic of the epilogue), every reduction is
fp32 (row sums, ``lse``, per-sequence sums) and each 16-bit number is rounded once. Beyond the rounding of the
logits themselves (``~|z| 2^-9`` each in bf16, as in the naive path, whose GEMM output they are), ``lp_t`` and
``1 - p_t`` carry the relative rounding of the tile's entries (2^-9 bf16, 2^-11 fp16). Where an fp32 or bf16
``p_t`` is below the smallest normal number (``lp_t < -87.3``, the same bound for both) it is ``z_t - lse`` with
the row's logits recomputed (the same GEMM, a few rows at a time) and their ``lse`` taken in fp32: no pass over
the tile is spent on a case that normal tiles never meet.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from simnpo_fast.kernels.target_terms import target_terms

from . import gemm

_MIN_ROWS = 128
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)  # ~ -87.3: below it an fp32 / bf16 p_t is subnormal
_RELOGITS_ELEMS = 1 << 21  # rows recomputed by tile_forward, per block: <= 8 MiB of fp32 logits


def chunk_rows(d: int, override: Optional[int] = None, itemsize: int = 4) -> int:
    """The base tile height ``R0`` for hidden size ``d`` and element size ``itemsize`` (module docstring);
    ``override`` (else ``SIMNPO_FAST_CHUNK_ROWS``) replaces the rule."""
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


def tile_logits(xc: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], out=None) -> torch.Tensor:
    """Logits tile in the GEMM dtype (fp32 accumulation inside) by the tile engine of ``backends/gemm.py``;
    ``out(rows)`` (e.g. ``TileBuffer.take``) gives a buffer to write into where the engine writes in place."""
    return gemm.logits(xc, w, b, out)


class TileBuffer:
    """One ``[R, V]`` buffer per call, reused by every tile (views of its first rows).

    A fresh tile-sized tensor per tile costs a page fault per 4 KiB page wherever the allocator hands large
    blocks back to the OS (glibc above its mmap threshold); reusing one buffer pays them once per call and
    keeps the peak to exactly one tile.
    """

    def __init__(self, rows: int, x: torch.Tensor, w: torch.Tensor, dtype: Optional[torch.dtype] = None):
        # the tile takes w's dtype (the dtype of the tile GEMMs: fp32 for 16-bit x where they are widened) unless
        # ``dtype`` says otherwise; nothing is allocated until the first ``take``
        self.rows, self.V, self.w, self._buf = rows, w.shape[0], w, None
        self.dtype = w.dtype if dtype is None else dtype

    def take(self, r: int) -> torch.Tensor:
        if self._buf is None:
            self._buf = torch.empty(self.rows * self.V, dtype=self.dtype, device=self.w.device)
        return self._buf[: r * self.V].view(r, self.V)


class RowSource:
    """Rows ``[r0, r1)`` of the packed matrix: a view of ``x`` when ``rows is None``, else gathered
    (``x[rows[r0:r1]]``) into one ``[R, d]`` buffer reused by every tile. With ``dtype`` other than ``x``'s
    (16-bit inputs whose tile GEMMs run in fp32, ``backends/lowp.py``) the rows are converted into a reused
    ``[R, d]`` buffer of that dtype."""

    def __init__(self, x: torch.Tensor, rows: Optional[torch.Tensor], R: int, dtype: Optional[torch.dtype] = None):
        self.x, self.rows, self.R, self._buf, self._wide = x, rows, R, None, None
        self.dtype = x.dtype if dtype is None else dtype

    def _gather(self, r0: int, r1: int) -> torch.Tensor:
        if self.rows is None:
            return self.x[r0:r1]
        if self._buf is None:
            self._buf = torch.empty(min(self.R, self.rows.shape[0]), self.x.shape[1], dtype=self.x.dtype,
                                    device=self.x.device)
        return torch.index_select(self.x, 0, self.rows[r0:r1], out=self._buf[: r1 - r0])

    def get(self, r0: int, r1: int) -> torch.Tensor:
        rows = self._gather(r0, r1)
        if self.dtype == self.x.dtype:
            return rows
        if self._wide is None:
            n = self.R if self.rows is None else min(self.R, self.rows.shape[0])
            self._wide = torch.empty(max(n, r1 - r0), self.x.shape[1], dtype=self.dtype, device=self.x.device)
        return self._wide[: r1 - r0].copy_(rows)

    def sub(self, r0: int, r1: int) -> "tuple[torch.Tensor, Optional[torch.Tensor]]":
        """``(x, rows)`` of the packed rows ``[r0, r1)`` for a nested pass."""
        return (self.x[r0:r1], None) if self.rows is None else (self.x, self.rows[r0:r1])


def compact_rows_(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Move rows ``idx`` (increasing) of the tile ``z`` to its front, in place and in order; returns
    ``z[:len(idx)]``. Runs of consecutive rows move as blocks, in pieces that never overlap their source."""
    idx_l = idx.tolist()
    dst, i = 0, 0
    while i < len(idx_l):
        j = i
        while j + 1 < len(idx_l) and idx_l[j + 1] == idx_l[j] + 1:
            j += 1
        src, n = idx_l[i], j - i + 1
        if src != dst:
            step = src - dst  # > 0: a piece of <= step rows never overlaps where it comes from
            for k in range(0, n, step):
                m = min(step, n - k)
                z[dst + k : dst + k + m].copy_(z[src + k : src + k + m])
        dst, i = dst + n, j + 1
    return z[:dst]


def pow2_split(scale: torch.Tensor) -> "tuple[float, torch.Tensor]":
    """``(alpha, scale / alpha)``: ``alpha`` a power of two (a host float) with ``max |scale / alpha|`` in [1/2, 1);
    ``alpha = 1`` for an all-zero or non-finite ``scale`` (exact: only exponents change)."""
    amax = float(scale.abs().amax()) if scale.numel() else 0.0
    if not (amax > 0.0 and math.isfinite(amax)):
        return 1.0, scale
    alpha = math.ldexp(1.0, math.frexp(amax)[1])
    return alpha, scale / alpha


def split_scale(scale: Optional[torch.Tensor], dtype: torch.dtype) -> "tuple[float, Optional[torch.Tensor]]":
    """``(alpha, sn)`` with ``scale = alpha * sn`` for GEMM operands of ``dtype``: fp16 takes ``pow2_split`` (a
    power of two applied in fp32, a factor in [1/2, 1) on the operand, inside fp16's range); other dtypes (and
    ``scale=None``) ``(1.0, scale)``."""
    if scale is not None and dtype == torch.float16:
        return pow2_split(scale)
    return 1.0, scale


def row_pow2_(p: torch.Tensor) -> torch.Tensor:
    """Divide each row of the wide tile ``p`` in place by a power of two ``c_r`` with ``max |p_r / c_r|`` in
    [1/2, 1); return ``c`` (fp32, 1 for all-zero rows): the rows then round to fp16 without underflow."""
    amax = p.abs().amax(dim=1).float()
    c = torch.ldexp(torch.ones_like(amax), torch.frexp(amax).exponent)
    c = torch.where((amax > 0) & torch.isfinite(amax), c, torch.ones_like(c))
    p.div_(c.to(p.dtype).unsqueeze(1))
    return c


def relogits_fn(backend, xc, w, b):
    """``idx -> logits of rows idx of the tile`` (a fresh tensor, the tile's dtype)."""
    return lambda idx: backend.tile_logits(xc.index_select(0, idx), w, b)


def softmax_(z: torch.Tensor) -> torch.Tensor:
    """Row softmax in place (ATen's fused last-dim kernel writes each row over itself: one pass, fp32 inside
    for 16-bit tiles). ``tests/backends/test_chunked_epilogue.py`` checks it against the out-of-place op."""
    return torch._softmax(z, 1, False, out=z)


def put_targets_(z: torch.Tensor, tgt: torch.Tensor, values) -> None:
    """``z[r, tgt[r]] = values[r]`` (a tensor, or one float for every row; rounded to z's dtype)."""
    if not isinstance(values, torch.Tensor):
        values = torch.full(tgt.shape, values, dtype=z.dtype, device=z.device)
    if z.dtype in (torch.float32, torch.float64):
        z.scatter_(1, tgt.unsqueeze(1), values.to(z.dtype).unsqueeze(1))
    else:  # flat index_copy_: 16-bit scatter_ takes a slow generic path on CPU
        flat = torch.arange(z.shape[0], device=z.device) * z.shape[1] + tgt
        z.view(-1).index_copy_(0, flat, values.to(z.dtype))


def gather_targets(z: torch.Tensor, tgt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return z.gather(1, tgt.unsqueeze(1)).squeeze(1).to(dtype)


def forward_exp_(z, tgt):
    """fp64 tile -> ``(lse, lp, ("exp", s, so))``; ``z <- exp(z - m)`` with its target entries zeroed."""
    zt = gather_targets(z, tgt, z.dtype)
    m = z.amax(dim=1)
    z.sub_(m.unsqueeze(1)).exp_()
    put_targets_(z, tgt, 0.0)
    so = z.sum(dim=1)                     # sum of the other entries, exp(z_v - m)
    dt = zt - m                           # <= 0
    et = torch.exp(dt)
    s = so + et
    # p_t >= 1/2: lp = -log1p(so / et) keeps 1 - p_t = so / s to fp32 relative accuracy; else dt - log s
    lp = torch.where(et >= so, -torch.log1p(so / et), dt - torch.log(s))
    return m + torch.log(s), lp, ("exp", s, so)


def forward_softmax_(z, tgt, relogits):
    """fp32 / bf16 tile -> ``(lse, lp, ("p", omp))``; ``z <- softmax(z)`` with its target entries zeroed."""
    zt = gather_targets(z, tgt, torch.float32)
    softmax_(z)
    pt = gather_targets(z, tgt, torch.float32)
    near1 = pt > 0.5
    so = 1.0 - pt
    n1 = int(near1.sum())
    if n1:  # 1 - p_t from the other entries of these rows (fp32 accumulation inside the sum)
        put_targets_(z, tgt, 0.0)
        if 3 * n1 >= z.shape[0]:
            so = torch.where(near1, z.sum(dim=1).float(), so)
        else:  # a few rows: gather them (a copy of n1 rows beats a read of all R)
            idx = near1.nonzero().squeeze(1)
            so = so.index_copy(0, idx, z.index_select(0, idx).sum(dim=1).float())
    lp = torch.where(near1, torch.log1p(-so), torch.log(pt))
    small = (lp < _LOG_TINY).nonzero().squeeze(1)
    if small.numel():  # p_t below the smallest normal bf16: recompute the row, its lse in fp32
        step = max(1, _RELOGITS_ELEMS // z.shape[1])
        for i in range(0, small.numel(), step):
            idx = small[i : i + step]
            lp[idx] = zt[idx] - torch.logsumexp(relogits(idx).float(), dim=1)
    omp = torch.where(near1, so, -torch.expm1(lp))
    return zt - lp, lp, ("p", omp)


def forward_masked_softmax_(z, tgt):
    """fp16 tile -> ``(lse, lp, ("q", omp))``; ``z <- q``, the softmax of the other entries (target entry 0)."""
    zt = gather_targets(z, tgt, torch.float32)
    put_targets_(z, tgt, float("-inf"))
    mo = z.amax(dim=1)
    softmax_(z)
    lo = mo.float() - torch.log(z.amax(dim=1).float())   # max q = exp(mo - lo)
    none = mo == float("-inf")                           # no other finite logit (V = 1): p_t = 1
    if bool(none.any()):
        z[none] = 0.0
        lo = torch.where(none, torch.full_like(lo, float("-inf")), lo)
    lp, lse, omp = target_terms(lo, zt)
    return lse, lp, ("q", omp)


def factor_dlogits_(z, state, tgt, g):
    """``(tile, row_scale)`` with ``diag(row_scale) tile = g * (onehot - softmax)``, from the tile as the
    ``forward_*_`` function left it (``state``); only the target entries are written:

    * ``("exp", s, so)``: ``z = exp(z - m)``; ``z_t <- -so`` (= ``s (p_t - 1)``), ``row_scale = -g / s``;
    * ``("p", omp)``: ``z = softmax``; ``z_t <- -omp`` (= ``p_t - 1``), ``row_scale = -g``;
    * ``("q", omp)``: ``z = q``; ``z_t <- -1``, ``row_scale = -g * omp`` (= ``-g (1 - p_t)``).
    """
    kind = state[0]
    if kind == "exp":
        _, s, so = state
        put_targets_(z, tgt, -so)
        return z, -g / s
    if kind == "p":
        put_targets_(z, tgt, -state[1])
        return z, -g
    put_targets_(z, tgt, -1.0)
    return z, -g * state[1]

