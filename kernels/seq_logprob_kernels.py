"""Triton kernels for the fused LM head + log-softmax + target gather (maths only, no policy; launched by
``seq_logprob.py``).

Notation: ``x [M, d]`` hidden rows, ``w [V, d]`` LM-head weight, optional ``b [V]``, ``targets [M]``
(``ignore_index`` rows allowed), ``z = x w^T + b``. Per token ``lse_t = logsumexp(z_t)`` and
``lp_t = z_t[y_t] - lse_t`` (``lp_t = 0`` for an ignored row). The backward of ``sum_t g_t lp_t`` is
``d_logits_t = g_t (onehot(y_t) - softmax(z_t))`` (zero for an ignored row), ``dx = d_logits @ w``,
``dw = d_logits^T @ x``, ``db = sum_t d_logits_t``. No ``[M, V]`` tensor is ever written to memory.

The target term (see ``target_terms.py``): the forward's online log-sum-exp runs over the
*other* columns (``lo_t = logsumexp_{v != y_t} z_tv``) and ``lp_t = -softplus(lo_t - z_t[y_t])`` is formed from
it, so ``lp_t`` and ``1 - p_t`` keep their relative accuracy as ``p_t -> 1``. The backward writes
``d_logits_t = r_t (q_t - onehot(y_t))`` with ``q_tv = exp(z_tv - lo_t)`` (the distribution of the other
tokens, O(1) entries however peaked the row) and the per-row factor ``r_t = -g_t (1 - p_t)`` applied in fp32
after the product (dx) or, divided by one power of two for the whole call, before it (dw): a 16-bit dot
operand never holds ``g_t p_tv`` itself, which underflows fp16 for a memorised row or a saturated weight.

Kernels
-------
``_fwd_kernel``      grid ``(cdiv(M, BLOCK_M), SPLIT_V)``. A program owns ``BLOCK_M`` rows and a contiguous
                     range of vocabulary tiles. For every ``[BLOCK_M, BLOCK_V]`` logits tile (``tl.dot`` over
                     ``BLOCK_D`` slices of ``d``, fp32 accumulator, bias added in fp32) it updates an online
                     logsumexp of the non-target columns (running max / rescaled running sum) and picks up
                     the target logit. It writes three partials per row and split (max, sum, target logit):
                     ``3 * SPLIT_V * M`` floats.
``_combine_kernel``  grid ``(cdiv(M, BLOCK),)``: merges the ``SPLIT_V`` partials -> ``lo``, ``zt`` (O(M)); the
                     launcher turns them into ``lp`` and ``lse`` (a few O(M) torch ops).
``_seq_sum_kernel``  grid ``(S,)``: per-sequence ``logp_sum`` and ``n_tokens`` over CSR row offsets
                     (deterministic, no atomics).
``_bwd_dx_kernel``   grid ``(cdiv(M, BLOCK_M), SPLIT_V)``: a program owns ``BLOCK_M`` rows of ``dx``; it
                     recomputes each logits tile of its vocabulary range, turns it into ``q - onehot`` with
                     the saved ``lo`` (no second reduction), and adds ``r * ((q - onehot) @ w[tile])`` into its
                     rows of ``dx`` (fp32, in global memory: the ``[BLOCK_M, d]`` accumulator does not fit
                     registers for d = 4096).
``_bwd_dw_kernel``   grid ``(cdiv(V, BLOCK_V), SPLIT_M)``: a program owns ``BLOCK_V`` rows of ``dw`` (and of
                     ``db``); it loops over token tiles, recomputes the logits tile, and adds
                     ``d_logits^T @ x[tile]`` into its rows of ``dw``.

Gradient filter (``FILTER``, ``simnpo_fast/backends/filter.py``): a token block whose rows all have ``r = 0``
(dropped by the row filter) is skipped whole, recompute included; a ``(token block x vocabulary block)`` tile
whose live rows' entries are all below their ``thr`` (``q < eps / (1 - p_t)``, i.e. ``p < eps``) and hold no target
skips its gradient product (the recompute that found it out is spent). Each program writes the number of tiles
whose product it ran to its slot of ``cnt`` (``[grid_0 * grid_1]`` int32; read only under ``FILTER``).

Race-free accumulation
----------------------
With ``SPLIT_V == 1`` (dx) and ``SPLIT_M == 1`` (dw, db) every output element is owned by exactly one
program, which accumulates with plain load-add-store: deterministic, no locks, no atomics. This is the
design: the dw kernel needs the per-token ``lse`` (saved by the forward, O(M) floats) to rebuild the softmax
of its vocabulary slice without seeing the rest of the row. A split > 1 (chosen by the launchers only when
the owner grid alone would leave SMs idle, e.g. few tokens or a small vocabulary) partitions the reduction
dimension across programs and uses fp32 ``tl.atomic_add`` into zero-initialised outputs (race-free but
not bitwise deterministic).
"""
from __future__ import annotations

import triton
import triton.language as tl


# ------------------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(x_ptr, w_ptr, b_ptr, offs_m, offs_v, M, V, D, sxm, sxk, swv, swk,
                 HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 ``[BLOCK_M, BLOCK_V]`` tile of ``x w^T (+ b)``; out-of-range rows/columns read zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    v_ok = offs_v < V
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * sxm
    w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * swv
    for k0 in range(0, D, BLOCK_D):
        dk = k0 + offs_d
        d_ok = dk < D
        xt = tl.load(x_rows + dk[None, :] * sxk, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_rows + dk[None, :] * swk, mask=v_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if IEEE:
            acc = tl.dot(xt.to(DOT_DTYPE), tl.trans(wt.to(DOT_DTYPE)), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt.to(DOT_DTYPE), tl.trans(wt.to(DOT_DTYPE)), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _qtile(z, tgt, lo, row_ok, offs_v, V):
    """``q - onehot``: ``exp(z - lo)`` off the target column, -1 on it; rows ``~row_ok`` and columns ``>= V``
    exactly 0 (``lo = +inf`` gives a zero ``q``)."""
    q = tl.exp(z - lo[:, None])
    t = tl.where(offs_v[None, :] == tgt[:, None], -1.0, q)
    return tl.where(row_ok[:, None] & (offs_v < V)[None, :], t, 0.0)


@triton.jit
def _tile_needed(qt, thr, live):
    """Whether a ``q - onehot`` tile holds an entry of a live row (``r != 0``) that the softmax filter keeps:
    ``q >= thr`` (``thr = eps / (1 - p_t)``, i.e. ``p >= eps``) or the target entry (-1)."""
    keep = live[:, None] & ((qt >= thr[:, None]) | (qt < 0.0))
    return tl.sum(keep.to(tl.int32)) > 0


@triton.jit
def _dot_acc(a, b, IEEE: tl.constexpr):
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


# ------------------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, part_ptr, M, V, D, sxm, sxk, swv, swk, tiles_per_split,
                ignore_index,
                HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    tgt = tl.load(tgt_ptr + offs_m, mask=m_ok, other=ignore_index)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    z_tgt = tl.zeros((BLOCK_M,), tl.float32)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for t in range(t0, t1):
        offs_v = t * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _logits_tile(x_ptr, w_ptr, b_ptr, offs_m, offs_v, M, V, D, sxm, sxk, swv, swk,
                         HAS_BIAS, DOT_DTYPE, IEEE, BLOCK_M, BLOCK_V, BLOCK_D)
        is_t = offs_v[None, :] == tgt[:, None]
        z_tgt += tl.sum(tl.where(is_t, z, 0.0), axis=1)
        # the log-sum-exp runs over the other columns; a row may see none yet (max -inf): offset 0 then
        z = tl.where((offs_v < V)[None, :] & ~is_t, z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        off = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - off) + tl.sum(tl.exp(z - off[:, None]), axis=1)
        run_max = new_max
    base = part_ptr + pid_s * M + offs_m
    tl.store(base, run_max, mask=m_ok)
    tl.store(base + n_split * M, run_sum, mask=m_ok)
    tl.store(base + 2 * n_split * M, z_tgt, mask=m_ok)


@triton.jit
def _combine_kernel(part_ptr, tgt_ptr, lo_ptr, zt_ptr, M, ignore_index,
                    N_SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    mx = tl.full((BLOCK,), float("-inf"), tl.float32)
    for s in tl.static_range(N_SPLIT):
        mx = tl.maximum(mx, tl.load(part_ptr + s * M + offs, mask=ok, other=0.0))
    off = tl.where(mx == float("-inf"), 0.0, mx)  # no other column at all (V = 1): lo = -inf below
    tot = tl.zeros((BLOCK,), tl.float32)
    z_tgt = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(N_SPLIT):
        m_s = tl.load(part_ptr + s * M + offs, mask=ok, other=0.0)
        s_s = tl.load(part_ptr + (N_SPLIT + s) * M + offs, mask=ok, other=0.0)
        tot += s_s * tl.exp(m_s - off)  # an empty split has m_s = -inf, s_s = 0 -> adds 0
        z_tgt += tl.load(part_ptr + (2 * N_SPLIT + s) * M + offs, mask=ok, other=0.0)
    lo = tl.where(tot > 0, off + tl.log(tl.where(tot > 0, tot, 1.0)), float("-inf"))
    tgt = tl.load(tgt_ptr + offs, mask=ok, other=ignore_index)
    tl.store(lo_ptr + offs, lo, mask=ok)
    tl.store(zt_ptr + offs, tl.where(tgt != ignore_index, z_tgt, 0.0), mask=ok)


@triton.jit
def _seq_sum_kernel(lp_ptr, tgt_ptr, off_ptr, out_ptr, cnt_ptr, ignore_index, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    r0 = tl.load(off_ptr + s)
    r1 = tl.load(off_ptr + s + 1)
    acc = tl.zeros((BLOCK,), tl.float32)
    cnt = tl.zeros((BLOCK,), tl.int32)
    for r in range(r0, r1, BLOCK):
        offs = r + tl.arange(0, BLOCK)
        ok = offs < r1
        tgt = tl.load(tgt_ptr + offs, mask=ok, other=ignore_index)
        valid = ok & (tgt != ignore_index)
        acc += tl.where(valid, tl.load(lp_ptr + offs, mask=ok, other=0.0), 0.0)
        cnt += valid.to(tl.int32)
    tl.store(out_ptr + s, tl.sum(acc, axis=0))
    tl.store(cnt_ptr + s, tl.sum(cnt, axis=0).to(tl.int64))


# ------------------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dx_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, lo_ptr, r_ptr, thr_ptr, cnt_ptr, dx_ptr, M, V, D, sxm, sxk, swv,
                   swk,
                   tiles_per_split, ignore_index,
                   HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
                   FILTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    tgt = tl.load(tgt_ptr + offs_m, mask=m_ok, other=ignore_index)
    row_ok = m_ok & (tgt != ignore_index)
    lo = tl.load(lo_ptr + offs_m, mask=row_ok, other=float("inf"))  # q = 0 on masked rows
    r = tl.load(r_ptr + offs_m, mask=row_ok, other=0.0).to(tl.float32)
    dx_rows = dx_ptr + offs_m.to(tl.int64)[:, None] * D
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
    live = row_ok & (r != 0.0)  # rows the row filter dropped have r = 0
    if FILTER:
        thr = tl.load(thr_ptr + offs_m, mask=row_ok, other=float("inf"))
        block_live = tl.sum(live.to(tl.int32)) > 0
    else:
        thr = r
        block_live = True
    n_kept = 0
    for t in range(t0, t1):
        offs_v = t * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        if block_live:  # a block of filtered-out rows is skipped whole (no recompute)
            z = _logits_tile(x_ptr, w_ptr, b_ptr, offs_m, offs_v, M, V, D, sxm, sxk, swv, swk,
                             HAS_BIAS, DOT_DTYPE, IEEE, BLOCK_M, BLOCK_V, BLOCK_D)
            qt = _qtile(z, tgt, lo, row_ok, offs_v, V)
            if FILTER:
                need = _tile_needed(qt, thr, live)
            else:
                need = True
            if need:
                if FILTER:
                    n_kept += 1
                _acc_product(qt.to(DOT_DTYPE), r[:, None], w_ptr + offs_v.to(tl.int64) * swv, v_ok, swk, dx_rows,
                             m_ok, D, DOT_DTYPE, IEEE, ATOMIC, BLOCK_D)
    if FILTER:  # the tiles whose product ran (one slot per program)
        tl.store(cnt_ptr + pid_m * tl.num_programs(1) + pid_s, n_kept)


@triton.jit
def _acc_product(a, scale, src_rows, src_ok, src_sk, out_rows, out_ok, D, DOT_DTYPE: tl.constexpr,
                 IEEE: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[rows] += scale * (a @ src[rows'])`` over ``BLOCK_D`` slices of ``d``: ``a`` ``[P, Q]`` (dot dtype),
    ``src_rows`` the ``Q`` row pointers of the operand (column stride ``src_sk``), ``out_rows`` the ``P`` rows of
    the fp32 output (row length ``D``); ``scale`` a scalar or ``[P, 1]``. dx: ``a = dz``, src = ``w``; dw:
    ``a = dz^T``, src = ``x``."""
    offs_d = tl.arange(0, BLOCK_D)
    for k0 in range(0, D, BLOCK_D):
        dk = k0 + offs_d
        d_ok = dk < D
        st = tl.load(src_rows[:, None] + dk[None, :] * src_sk, mask=src_ok[:, None] & d_ok[None, :], other=0.0)
        upd = _dot_acc(a, st.to(tl.float32).to(DOT_DTYPE), IEEE) * scale  # [P, BLOCK_D], fp32
        ptrs = out_rows + dk[None, :]
        msk = out_ok[:, None] & d_ok[None, :]
        if ATOMIC:
            tl.atomic_add(ptrs, upd, mask=msk)
        else:  # this program owns these output rows: plain read-modify-write
            tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + upd, mask=msk)


@triton.jit
def _bwd_dw_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, lo_ptr, r_ptr, rn_ptr, pow2_ptr, thr_ptr, cnt_ptr, dw_ptr, db_ptr,
                   M, V, D,
                   sxm, sxk, swv, swk, tiles_per_split, ignore_index,
                   HAS_BIAS: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr, FILTER: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_v = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    dw_rows = dw_ptr + offs_v.to(tl.int64)[:, None] * D
    db_acc = tl.zeros((BLOCK_V,), tl.float32)
    pow2 = tl.load(pow2_ptr)  # rn = r / pow2: the dot operand stays in range, pow2 comes back in fp32
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(M, BLOCK_M))
    n_kept = 0
    for t in range(t0, t1):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        tgt = tl.load(tgt_ptr + offs_m, mask=m_ok, other=ignore_index)
        row_ok = m_ok & (tgt != ignore_index)
        r = tl.load(r_ptr + offs_m, mask=row_ok, other=0.0)
        live = row_ok & (r != 0.0)  # rows the row filter dropped have r = 0
        if FILTER:
            thr = tl.load(thr_ptr + offs_m, mask=row_ok, other=float("inf"))
            block_live = tl.sum(live.to(tl.int32)) > 0
        else:
            thr = r
            block_live = True
        if block_live:  # a token block of filtered-out rows: no recompute
            lo = tl.load(lo_ptr + offs_m, mask=row_ok, other=float("inf"))  # q = 0 on masked rows
            z = _logits_tile(x_ptr, w_ptr, b_ptr, offs_m, offs_v, M, V, D, sxm, sxk, swv, swk,
                             HAS_BIAS, DOT_DTYPE, IEEE, BLOCK_M, BLOCK_V, BLOCK_D)
            qt = _qtile(z, tgt, lo, row_ok, offs_v, V)
            if FILTER:
                need = _tile_needed(qt, thr, live)
            else:
                need = True
            if need:
                if FILTER:
                    n_kept += 1
                if NEED_DB:
                    db_acc += tl.sum(qt * r[:, None], axis=0)
                if NEED_DW:
                    rn = tl.load(rn_ptr + offs_m, mask=row_ok, other=0.0)
                    dzt = tl.trans((qt * rn[:, None]).to(DOT_DTYPE))  # [BLOCK_V, BLOCK_M]
                    _acc_product(dzt, pow2, x_ptr + offs_m.to(tl.int64) * sxm, m_ok, sxk, dw_rows, v_ok, D,
                                 DOT_DTYPE, IEEE, ATOMIC, BLOCK_D)
    if NEED_DB:
        if ATOMIC:
            tl.atomic_add(db_ptr + offs_v, db_acc, mask=v_ok)
        else:
            tl.store(db_ptr + offs_v, db_acc, mask=v_ok)
    if FILTER:  # the tiles whose product ran (one slot per program)
        tl.store(cnt_ptr + pid_v * tl.num_programs(1) + pid_s, n_kept)
