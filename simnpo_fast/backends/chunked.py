"""Pure-PyTorch chunked backend: the CPU path and the fallback everywhere.

Scalar losses use a *sequence-aligned* schedule: whole sequences are grouped into tiles of <= R rows (the tile
height rule of ``backends/tiles.py``), so every sequence's ``logp_sum`` -- hence its weight ``g_i`` -- is
complete while its logits tile is still live, and the tile is turned into ``dX`` and ``dW`` at once (one logits
GEMM + two gradient GEMMs = 6MdV). A sequence longer than R answer tokens cannot fit one tile; it is handled in
two passes over R-row token tiles (first its ``logp_sum``, then the gradient with the logits recomputed: 8 x its
share of MdV). The generic path (``logprob_forward`` / ``logprob_backward``) runs over R-row token tiles.

The packed rows are gathered tile by tile (``RowSource``) from the flat hidden states: no ``[M, d]`` copy.
The three GEMMs run in the input dtype (fp32 accumulation inside) -- except 16-bit inputs on a CPU whose 16-bit
GEMMs are slow (AVX2-only x86), whose tiles run in fp32 (``gemm_dtype``, ``backends/lowp.py``: one fp32 copy of
``W`` per call) -- and ``dW`` accumulates in fp32 (``backends/grads.py``). The in-tile maths and its precision are in ``backends/tiles.py``; the retain KL in
``backends/kl.py``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .base import Backend
from .grads import TileGrads
from .inputs import GradNeeds, HeadInputs, SeqWeightFn
from .filter import GradFilter, RowRule, entry_threshold
from .kl import chunked_kl
from .lowp import gemm_dtype
from .tiles import (RowSource, TileBuffer, acc_dtype, chunk_rows, compact_rows_, factor_dlogits_, forward_exp_,
                    forward_masked_softmax_, forward_softmax_, put_targets_, relogits_fn, tile_logits)


class ChunkedBackend(Backend):
    """Sequence-aligned tiles with torch GEMMs. The per-tile epilogue (``tile_*`` methods) is the only part a
    GPU subclass needs to replace by fused kernels; the schedule and the GEMMs stay shared."""

    name = "chunked"
    grads_class = TileGrads
    #: what the gradient filter kept in the last call (benchmarks read it; one dict per backend instance)
    last_filter_stats: dict = {}

    def __init__(self, chunk_rows: Optional[int] = None):
        self._chunk_rows = chunk_rows

    def gemm_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of the tile GEMMs for inputs like ``x``: ``x.dtype``, or fp32 for 16-bit inputs on a CPU
        whose 16-bit GEMMs are slow (``backends/lowp.py``; ``SIMNPO_FAST_LOWP_GEMM`` overrides)."""
        return gemm_dtype(x)

    def widen(self, inp: HeadInputs) -> HeadInputs:
        """``inp`` with ``w`` and ``b`` in the GEMM dtype (an fp32 copy of ``W``: ``4 V d`` bytes, when widened;
        ``inp`` itself otherwise). ``x`` stays as it is: its row tiles are converted one at a time."""
        dt = self.gemm_dtype(inp.x)
        if inp.w.dtype == dt:
            return inp
        return inp.replace(w=inp.w.to(dt), b=None if inp.b is None else inp.b.to(dt))

    def tile_rows(self, x: torch.Tensor, longest: int = 0) -> int:
        """The tile height for hidden rows like ``x``: the chunk rule (for the GEMM dtype's element size), raised
        to hold a sequence of ``longest`` rows whole (up to 4x) unless fixed by ``chunk_rows=`` /
        ``SIMNPO_FAST_CHUNK_ROWS``."""
        base = chunk_rows(x.shape[1], self._chunk_rows, torch.finfo(self.gemm_dtype(x)).bits // 8)
        if self._chunk_rows is not None or os.environ.get("SIMNPO_FAST_CHUNK_ROWS"):
            return base
        return min(max(base, longest), 4 * base)

    # -- tile epilogue ------------------------------------------------------------------------------------
    def tile_logits(self, xc, w, b, out=None):
        """Logits tile ``xc w^T (+ b)``; ``out(rows)`` gives a ``[rows, V]`` buffer of the GEMM dtype to write into
        (``TileBuffer.take``; an engine that returns a fresh tile never asks for it)."""
        return tile_logits(xc, w, b, out)

    def tile_forward(self, z, tgt, relogits):
        """``(lse, lp, state)`` of a logits tile (``lp`` = target log-probabilities); overwrites ``z`` (see
        ``backends/tiles.py``: fp32/bf16 softmax, fp64 ``exp(z - m)``, fp16 softmax of the other entries).

        ``relogits(idx)`` returns the logits of tile rows ``idx`` afresh (a ``[len(idx), V]`` tensor), for the
        rare fp32 / bf16 rows whose target probability is below the smallest normal number (``lp_t < -87.3``).
        """
        if z.dtype in (torch.bfloat16, torch.float32):
            return forward_softmax_(z, tgt, relogits)
        if z.dtype == torch.float16:
            return forward_masked_softmax_(z, tgt)
        return forward_exp_(z, tgt)

    def tile_dlogits(self, z, state, tgt, g):
        """``(tile, row_scale)`` with ``diag(row_scale) tile = g * (onehot - softmax)``, from the tile as
        ``tile_forward`` left it (``row_scale=None``: the tile is ``d_logits`` itself); see ``factor_dlogits_``."""
        return factor_dlogits_(z, state, tgt, g)

    def tile_dlogits_from_logits(self, z, lse, lp, tgt, g, relogits=None):
        """``tile_dlogits`` from a raw logits tile and the forward's ``lse`` and ``lp`` of its rows.

        fp32/fp64: ``z <- exp(z - lse)`` (one pass less than ``tile_forward``), ``z_t <- expm1(lp_t)``. 16-bit:
        ``tile_forward`` again (as cheap as rebuilding from ``lse``, which a 16-bit ``z - lse`` would round).
        """
        if z.dtype in (torch.float32, torch.float64):
            z.sub_(lse.unsqueeze(1)).exp_()
            put_targets_(z, tgt, torch.expm1(lp))
            return z, -g
        _, _, state = self.tile_forward(z, tgt, relogits)
        return self.tile_dlogits(z, state, tgt, g)

    # -- generic path -------------------------------------------------------------------------------------
    def _token_tiles(self, inp: HeadInputs, keep: Optional[torch.Tensor] = None):
        """``(r0, r1, xc, z)`` over ``R``-row token tiles of the packed rows: inputs and logits (one reused buffer);
        tiles with no row in the bool mask ``keep`` are skipped."""
        x, w, b, M = inp.x, inp.w, inp.b, inp.num_rows
        R = self.tile_rows(x)
        buf = TileBuffer(min(R, M), x, w)
        src = RowSource(x, inp.rows, R, w.dtype)
        for r0 in range(0, M, R):
            r1 = min(M, r0 + R)
            if keep is not None and not bool(keep[r0:r1].any()):
                continue
            xc = src.get(r0, r1)
            yield r0, r1, xc, self.tile_logits(xc, w, b, out=buf.take)

    def logprob_forward(self, inp: HeadInputs):
        inp = self.widen(inp)
        x, w, b, targets = inp.x, inp.w, inp.b, inp.targets
        lp = torch.empty(inp.num_rows, dtype=acc_dtype(x), device=x.device)
        lse = torch.empty(inp.num_rows, dtype=acc_dtype(x), device=x.device)
        for r0, r1, xc, z in self._token_tiles(inp):
            lse[r0:r1], lp[r0:r1], _ = self.tile_forward(z, targets[r0:r1], relogits_fn(self, xc, w, b))
            del z  # a fresh tile per step (oneDNN): drop this one before the next is made
        return lp, lse

    def logprob_backward(self, inp: HeadInputs, lse, lp, grad_lp, needs: GradNeeds):
        inp = self.widen(inp)
        x, w, b, targets = inp.x, inp.w, inp.b, inp.targets
        acc = self.grads_class(x, w, b, *needs)
        if not acc.any:
            return None, None, None
        grad_lp = grad_lp.to(acc_dtype(x))
        flt, keep = inp.grad_filter, None
        if flt is not None and flt.rows > 0 and grad_lp.numel():  # per token: the call's largest weight
            a = grad_lp.abs()
            keep = a >= flt.rows * a.max()
        for r0, r1, xc, z in self._token_tiles(inp, None if keep is None else keep):
            p, row_scale = self.tile_dlogits_from_logits(z, lse[r0:r1], lp[r0:r1], targets[r0:r1], grad_lp[r0:r1],
                                                         relogits_fn(self, xc, w, b))
            if flt is None:
                acc.add_tile(p, xc, w, r0, r1, inp.rows, scale=row_scale)
            else:
                filtered_backward(acc, flt, p, row_scale, grad_lp[r0:r1], xc, w, targets[r0:r1],
                                  inp.dst_rows(r0, r1), None if keep is None else keep[r0:r1])
            del z, p
        self.last_filter_stats = filter_stats(acc, None, keep)
        return acc.finish()

    # -- scalar-loss path: sequence-aligned, gradients while the tile is live ------------------------------
    def fused_seq_loss(self, inp: HeadInputs, seq_weight_fn: SeqWeightFn, needs: GradNeeds):
        inp = self.widen(inp)
        x, offsets = inp.x, inp.offsets
        R = self.tile_rows(x, longest=max((e - s for s, e in zip(offsets, offsets[1:])), default=0))
        run = _SeqLossRun(self, inp, seq_weight_fn, self.grads_class(x, inp.w, inp.b, *needs), R)
        for kind, s0, s1 in _schedule(offsets, R):
            if kind == "tile":  # whole sequences s0..s1-1 in one tile
                run.whole_sequences(s0, s1)
            else:  # one long sequence: two passes over token tiles
                run.long_sequence(s0)
        run.buf = None
        self.last_filter_stats = filter_stats(run.acc, run.rule, None)
        # Sequences with no answer token never enter a tile; the objective defines their (zero) loss.
        return (run.loss_sum, run.logp_sum, *run.acc.finish())

    def fused_kl(self, inp: HeadInputs, ref: HeadInputs, scale: float, needs: GradNeeds):
        R = chunk_rows(max(inp.x.shape[1], ref.x.shape[1]), self._chunk_rows, 4)
        return chunked_kl(self.widen(inp), self.widen(ref), scale, needs, R)


class _SeqLossRun:
    """The state of one sequence-aligned ``fused_seq_loss`` call: sums, gradient accumulator, reused buffers."""

    def __init__(self, be: ChunkedBackend, inp: HeadInputs, seq_weight_fn: SeqWeightFn, acc, R: int):
        self.be, self.inp, self.fn, self.acc, self.R = be, inp, seq_weight_fn, acc, R
        self.acc_t = acc_dtype(inp.x)
        self.logp_sum = torch.zeros(inp.num_seqs, dtype=self.acc_t, device=inp.x.device)
        self.loss_sum = torch.zeros((), dtype=self.acc_t, device=inp.x.device)
        self.buf = TileBuffer(min(R, inp.num_rows), inp.x, inp.w)
        self.src = RowSource(inp.x, inp.rows, R, inp.w.dtype)
        self.flt = inp.grad_filter
        self.rule = RowRule(self.flt, inp.weight_bound)

    def whole_sequences(self, s0: int, s1: int) -> None:
        be, inp, dev = self.be, self.inp, self.inp.x.device
        w, b = inp.w, inp.b
        r0, r1 = inp.offsets[s0], inp.offsets[s1]
        xc, tgt = self.src.get(r0, r1), inp.targets[r0:r1]
        z = be.tile_logits(xc, w, b, out=self.buf.take)
        _, lp, state = be.tile_forward(z, tgt, relogits_fn(be, xc, w, b))
        local = inp.seq_ids[r0:r1] - s0
        seq_lp = torch.zeros(s1 - s0, dtype=self.acc_t, device=dev).index_add_(0, local, lp.to(self.acc_t))
        self.logp_sum[s0:s1] = seq_lp
        f, g = self.fn(seq_lp, torch.arange(s0, s1, device=dev))
        self.loss_sum += f.sum()
        if not self.acc.any:
            return
        keep = self.rule.keep(g, torch.arange(s0, s1, device=dev)) if self.flt is not None else None
        if keep is not None and not bool(keep.any()):  # every sequence of the tile filtered out
            return
        g_rows = g.index_select(0, local)
        p, row_scale = be.tile_dlogits(z, state, tgt, g_rows)
        if self.flt is None:
            self.acc.add_tile(p, xc, w, r0, r1, inp.rows, scale=row_scale)
        else:
            filtered_backward(self.acc, self.flt, p, row_scale, g_rows, xc, w, tgt, inp.dst_rows(r0, r1),
                              None if keep is None else keep.index_select(0, local))

    def long_sequence(self, s: int) -> None:
        be, inp, R = self.be, self.inp, self.R
        w, b = inp.w, inp.b
        r0, r1 = inp.offsets[s], inp.offsets[s + 1]
        self.buf = None  # logprob_forward takes its own buffer
        xs, rs = self.src.sub(r0, r1)
        lp, lse = be.logprob_forward(inp.replace(x=xs, rows=rs, targets=inp.targets[r0:r1]))
        self.buf = TileBuffer(min(R, inp.num_rows), inp.x, w)
        seq_lp = lp.sum().reshape(1)
        self.logp_sum[s] = seq_lp[0]
        f, g = self.fn(seq_lp, torch.arange(s, s + 1, device=inp.x.device))
        self.loss_sum += f.sum()
        if not self.acc.any:
            return
        if self.flt is not None and self.rule.keep(g, torch.arange(s, s + 1, device=inp.x.device)) is not None:
            return  # filtered out: no second pass
        for t0 in range(r0, r1, R):
            t1 = min(r1, t0 + R)
            xc = self.src.get(t0, t1)
            z = be.tile_logits(xc, w, b, out=self.buf.take)
            g_rows = g.expand(t1 - t0).contiguous()
            p, row_scale = be.tile_dlogits_from_logits(
                z, lse[t0 - r0 : t1 - r0], lp[t0 - r0 : t1 - r0], inp.targets[t0:t1], g_rows, relogits_fn(be, xc, w, b))
            if self.flt is None:
                self.acc.add_tile(p, xc, w, t0, t1, inp.rows, scale=row_scale)
            else:
                filtered_backward(self.acc, self.flt, p, row_scale, g_rows, xc, w, inp.targets[t0:t1],
                                  inp.dst_rows(t0, t1), None)
            del z, p


def filtered_backward(acc, flt: GradFilter, p, row_scale, g_rows, xc, w, tgt, dst, keep_rows) -> None:
    """The ``dX`` / ``dW`` / ``db`` of a factorised tile ``diag(row_scale) p`` under the filter ``flt``
    (``backends/filter.py``): the rows not in ``keep_rows`` (a bool mask, ``None`` = all) are left out (the kept
    rows are moved to the front of the tile, in place), then the softmax filter's sparse products, or the dense
    ones when it is off."""
    if keep_rows is not None:
        idx = keep_rows.nonzero().squeeze(1)
        p = compact_rows_(p, idx)
        xc, tgt, dst, g_rows = xc.index_select(0, idx), tgt.index_select(0, idx), dst.index_select(0, idx), \
            g_rows.index_select(0, idx)
        row_scale = None if row_scale is None else row_scale.index_select(0, idx)
    if flt.probs <= 0:
        acc.add_tile(p, xc, w, 0, p.shape[0], dst, scale=row_scale)
        return
    thr = entry_threshold(flt, g_rows, row_scale)
    acc.add_tile_sparse(p, xc, w, dst, row_scale, thr, tgt, flt.block_rows)


def filter_stats(acc, rule: Optional[RowRule], keep: Optional[torch.Tensor]) -> dict:
    """Kept fractions of the last call: sequences (or rows) of the row filter, tile entries of the softmax filter."""
    out = {}
    if rule is not None and rule.seen:
        out["rows_kept"] = rule.kept / rule.seen
    elif keep is not None and keep.numel():
        out["rows_kept"] = float(keep.float().mean())
    if acc.cols_seen:
        out["entries_kept"] = acc.cols_kept / acc.cols_seen
    return out


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
