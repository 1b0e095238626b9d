"""Triton kernels for the fused LM head + log-softmax + target gather (maths only, no policy).

Notation: ``x [M, d]`` hidden rows, ``w [V, d]`` LM-head weight, optional ``b [V]``, ``targets [M]``
(``ignore_index`` rows allowed), ``z = x w^T + b``. Per token ``lse_t = logsumexp(z_t)`` and
``lp_t = z_t[y_t] - lse_t`` (``lp_t = 0`` for an ignored row). The backward of ``sum_t g_t lp_t`` is
``d_logits_t = g_t (onehot(y_t) - softmax(z_t))`` (zero for an ignored row), ``dx = d_logits @ w``,
``dw = d_logits^T @ x``, ``db = sum_t d_logits_t``. No ``[M, V]`` tensor is ever written to memory.

The target term (see ``simnpo_fast/backends/base.py``): the forward's online log-sum-exp runs over the
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

Race-free accumulation
----------------------
With ``SPLIT_V == 1`` (dx) and ``SPLIT_M == 1`` (dw, db) every output element is owned by exactly one
program, which accumulates with plain load-add-store: deterministic, no locks, no atomics. This is the
design: the dw kernel needs the per-token ``lse`` (saved by the forward, O(M) floats) to rebuild the softmax
of its vocabulary slice without seeing the rest of the row. A split > 1 (chosen by the launchers only when
the owner grid alone would leave SMs idle, e.g. few tokens or a small vocabulary) partitions the reduction
dimension across programs and uses fp32 ``tl.atomic_add`` into zero-initialised outputs (race-free but
not bitwise deterministic).

Flops (honest count, one GEMM-like product = 2 M d V)
-----------------------------------------------------
forward 2 MdV; dx kernel 2 MdV recompute + 2 MdV product; dw kernel 2 MdV recompute + 2 MdV product.
Generic path with dx and dw: **10 MdV** (8 MdV in the backward). The chunked GEMM schedule is 8 MdV for
the generic path and 6 MdV for scalar losses; a tiled recompute design cannot reach 6 MdV without
materialising ``d_logits`` (see ``simnpo_fast/backends/triton.py`` for the GEMM + Triton-epilogue variant).

The backward needs the forward's ``lse`` *and* ``lp`` (``lo = lse + log(1 - p_t)``, ``1 - p_t = -expm1(lp)``).

Precision
---------
Every load is cast to fp32 right away (``.to(tl.float32)``; bf16 arithmetic is wrong in the interpreter),
all accumulators are fp32. The operands of ``tl.dot`` are then cast to ``DOT_DTYPE``: on a GPU with
bf16/fp16 inputs that is the input dtype (a lossless round trip for the loaded values, tensor-core rate;
the normalised ``q - onehot`` (times ``r / 2^k`` in the dw kernel) is rounded to it before the two gradient
products, like every GEMM-based implementation); under the interpreter and for fp32 inputs it is fp32
(``IEEE=True`` unless torch allows TF32 matmuls).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from simnpo_fast.backends.base import other_lse, target_terms

#: whether this module was imported under the Triton interpreter (the jit functions are bound at import).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_TORCH2TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


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
def _bwd_dx_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, lo_ptr, r_ptr, dx_ptr, M, V, D, sxm, sxk, swv, swk,
                   tiles_per_split, ignore_index,
                   HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    tgt = tl.load(tgt_ptr + offs_m, mask=m_ok, other=ignore_index)
    row_ok = m_ok & (tgt != ignore_index)
    lo = tl.load(lo_ptr + offs_m, mask=row_ok, other=float("inf"))  # q = 0 on masked rows
    r = tl.load(r_ptr + offs_m, mask=row_ok, other=0.0).to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    dx_rows = dx_ptr + offs_m.to(tl.int64)[:, None] * D
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for t in range(t0, t1):
        offs_v = t * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z = _logits_tile(x_ptr, w_ptr, b_ptr, offs_m, offs_v, M, V, D, sxm, sxk, swv, swk,
                         HAS_BIAS, DOT_DTYPE, IEEE, BLOCK_M, BLOCK_V, BLOCK_D)
        dz = _qtile(z, tgt, lo, row_ok, offs_v, V).to(DOT_DTYPE)
        w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * swv
        for k0 in range(0, D, BLOCK_D):
            dk = k0 + offs_d
            d_ok = dk < D
            wt = tl.load(w_rows + dk[None, :] * swk, mask=v_ok[:, None] & d_ok[None, :], other=0.0)
            upd = _dot_acc(dz, wt.to(tl.float32).to(DOT_DTYPE), IEEE) * r[:, None]  # [BLOCK_M, BLOCK_D], fp32
            ptrs = dx_rows + dk[None, :]
            msk = m_ok[:, None] & d_ok[None, :]
            if ATOMIC:
                tl.atomic_add(ptrs, upd, mask=msk)
            else:  # this program owns these rows: plain read-modify-write
                tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + upd, mask=msk)


@triton.jit
def _bwd_dw_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, lo_ptr, r_ptr, rn_ptr, pow2_ptr, dw_ptr, db_ptr, M, V, D,
                   sxm, sxk, swv, swk, tiles_per_split, ignore_index,
                   HAS_BIAS: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, ATOMIC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_v = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    offs_d = tl.arange(0, BLOCK_D)
    dw_rows = dw_ptr + offs_v.to(tl.int64)[:, None] * D
    db_acc = tl.zeros((BLOCK_V,), tl.float32)
    pow2 = tl.load(pow2_ptr)  # rn = r / pow2: the dot operand stays in range, pow2 comes back in fp32
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(M, BLOCK_M))
    for t in range(t0, t1):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        tgt = tl.load(tgt_ptr + offs_m, mask=m_ok, other=ignore_index)
        row_ok = m_ok & (tgt != ignore_index)
        lo = tl.load(lo_ptr + offs_m, mask=row_ok, other=float("inf"))  # q = 0 on masked rows
        z = _logits_tile(x_ptr, w_ptr, b_ptr, offs_m, offs_v, M, V, D, sxm, sxk, swv, swk,
                         HAS_BIAS, DOT_DTYPE, IEEE, BLOCK_M, BLOCK_V, BLOCK_D)
        qt = _qtile(z, tgt, lo, row_ok, offs_v, V)
        if NEED_DB:
            r = tl.load(r_ptr + offs_m, mask=row_ok, other=0.0)
            db_acc += tl.sum(qt * r[:, None], axis=0)
        if NEED_DW:
            rn = tl.load(rn_ptr + offs_m, mask=row_ok, other=0.0)
            dzt = tl.trans((qt * rn[:, None]).to(DOT_DTYPE))  # [BLOCK_V, BLOCK_M]
            x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * sxm
            for k0 in range(0, D, BLOCK_D):
                dk = k0 + offs_d
                d_ok = dk < D
                xt = tl.load(x_rows + dk[None, :] * sxk, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                upd = _dot_acc(dzt, xt.to(tl.float32).to(DOT_DTYPE), IEEE) * pow2  # [BLOCK_V, BLOCK_D]
                ptrs = dw_rows + dk[None, :]
                msk = v_ok[:, None] & d_ok[None, :]
                if ATOMIC:
                    tl.atomic_add(ptrs, upd, mask=msk)
                else:  # this program owns these rows of dw
                    tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + upd, mask=msk)
    if NEED_DB:
        if ATOMIC:
            tl.atomic_add(db_ptr + offs_v, db_acc, mask=v_ok)
        else:
            tl.store(db_ptr + offs_v, db_acc, mask=v_ok)


# ------------------------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------------------------
#: fixed tiles under the interpreter: the smallest that tl.dot accepts on a GPU too (>= 16), so every test
#: shape crosses several tiles in every dimension.
INTERPRET_BLOCKS = (16, 32, 16)  # BLOCK_M, BLOCK_V, BLOCK_D


def _gpu_blocks(dtype: torch.dtype):
    """(BLOCK_M, BLOCK_V, BLOCK_D, num_warps, num_stages) heuristics for sm80/sm90 when not autotuning."""
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 128, 64, 8, 3


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _dot_cfg(x: torch.Tensor):
    """(DOT_DTYPE, IEEE) for the operands of tl.dot (see the module docstring)."""
    if INTERPRET or x.device.type != "cuda" or x.dtype == torch.float32:
        ieee = not (x.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
        return tl.float32, ieee
    return _TORCH2TL[x.dtype], False


def _check(x, w, b, targets):
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x [M, d] and w [V, d] expected, got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype not in _TORCH2TL or w.dtype != x.dtype:
        raise ValueError(f"x and w must share a dtype in fp32/fp16/bf16, got {x.dtype} and {w.dtype}")
    if targets.shape != (x.shape[0],):
        raise ValueError(f"targets must be [{x.shape[0]}], got {tuple(targets.shape)}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"b must be [{w.shape[0]}], got {tuple(b.shape)}")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before import")


def _blocks(x, blocks: Optional[Sequence[int]]):
    if blocks is not None:
        bm, bv, bd = blocks
        return bm, bv, bd, {}
    if INTERPRET or x.device.type != "cuda":
        bm, bv, bd = INTERPRET_BLOCKS
        return bm, bv, bd, {}
    bm, bv, bd, nw, ns = _gpu_blocks(x.dtype)
    return bm, bv, bd, {"num_warps": nw, "num_stages": ns}


def _split(n_owner_programs: int, n_tiles: int, device: torch.device, split: Optional[int]) -> int:
    """Split of the reduction loop: 1 (owner computes, deterministic) unless the owner grid is too small."""
    if split is None:
        target = 2 * _sm_count(device)
        split = 1 if n_owner_programs >= target else -(-target // max(1, n_owner_programs))
    return int(max(1, min(split, n_tiles)))


def _bias_arg(b, x):
    return b if b is not None else x  # dummy pointer, never read (HAS_BIAS=False)


# ------------------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------------------
def lse_target_fwd(x, w, b, targets, ignore_index: int = -100, *, blocks: Optional[Sequence[int]] = None,
                   split_v: Optional[int] = None):
    """Per-token ``(lp [M] fp32, lse [M] fp32)``; ``lp = 0`` on ``ignore_index`` rows. ``lp`` comes from the
    non-target log-sum-exp (``-softplus(lo - zt)``), not from ``zt - lse``.

    ``blocks=(BLOCK_M, BLOCK_V, BLOCK_D)`` and ``split_v`` override the heuristics (tests use them to cross
    every tile edge and the split/combine path).
    """
    _check(x, w, b, targets)
    M, D = x.shape
    V = w.shape[0]
    lo = torch.empty(M, dtype=torch.float32, device=x.device)
    zt = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return lo, zt
    targets = targets.contiguous()
    bm, bv, bd, kw = _blocks(x, blocks)
    n_vt = triton.cdiv(V, bv)
    grid_m = triton.cdiv(M, bm)
    split = _split(grid_m, n_vt, x.device, split_v)
    tps = triton.cdiv(n_vt, split)
    split = triton.cdiv(n_vt, tps)  # no empty split
    part = torch.empty((3, split, M), dtype=torch.float32, device=x.device)
    dot_dtype, ieee = _dot_cfg(x)
    _fwd_kernel[(grid_m, split)](
        x, w, _bias_arg(b, x), targets, part, M, V, D, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        tps, ignore_index, HAS_BIAS=b is not None, DOT_DTYPE=dot_dtype, IEEE=ieee,
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, **kw)
    cb = 128 if INTERPRET else 1024
    _combine_kernel[(triton.cdiv(M, cb),)](part, targets, lo, zt, M, ignore_index, N_SPLIT=split, BLOCK=cb)
    valid = targets != ignore_index
    lp_v, lse_v, _ = target_terms(lo, zt)
    # an ignored row: lp = 0 and lse = its plain log-sum-exp (nothing was left out of lo)
    return torch.where(valid, lp_v, 0.0), torch.where(valid, lse_v, lo)


def seq_reduce(lp, targets, offsets, ignore_index: int = -100):
    """Per-sequence ``(logp_sum [S] fp32, n_tokens [S] int64)`` from CSR row ``offsets`` (len S + 1)."""
    if not isinstance(offsets, torch.Tensor):
        offsets = torch.tensor(list(offsets), dtype=torch.int64)
    offsets = offsets.to(device=lp.device, dtype=torch.int64).contiguous()
    S = offsets.numel() - 1
    out = torch.zeros(S, dtype=torch.float32, device=lp.device)
    cnt = torch.zeros(S, dtype=torch.int64, device=lp.device)
    if S > 0 and lp.numel() > 0:
        blk = 64 if INTERPRET else 256
        _seq_sum_kernel[(S,)](lp.contiguous(), targets.contiguous(), offsets, out, cnt, ignore_index, BLOCK=blk)
    return out, cnt


def seq_logprob_fwd(x, w, b, targets, offsets, ignore_index: int = -100, **kw):
    """``(logp_sum [S], n_tokens [S], lp [M], lse [M])``: one tiled pass, then the O(M) segment sums."""
    lp, lse = lse_target_fwd(x, w, b, targets, ignore_index, **kw)
    logp_sum, n_tokens = seq_reduce(lp, targets, offsets, ignore_index)
    return logp_sum, n_tokens, lp, lse


def logits_grad_bwd(x, w, b, targets, lse, g, ignore_index: int = -100, *, lp, need_dx: bool = True,
                    need_dw: bool = True, need_db: Optional[bool] = None,
                    blocks: Optional[Sequence[int]] = None, split_v: Optional[int] = None,
                    split_m: Optional[int] = None):
    """Gradients of ``sum_t g_t lp_t``: ``(dx [M, d], dw [V, d], db [V])`` in fp32 (``None`` if not needed).

    ``lse`` and ``lp`` are the forward's per-token logsumexp and target log-probability (``lse_target_fwd``);
    ``g`` the per-token scale (e.g. SimNPO's ``2/|y_i| sigmoid(beta/|y_i| logp_sum_i + gamma) / normalizer``
    broadcast to the tokens of sequence i). ``ignore_index`` rows get zero gradient whatever their ``g``.
    """
    _check(x, w, b, targets)
    if need_db is None:
        need_db = b is not None
    need_db = bool(need_db and b is not None)
    M, D = x.shape
    V = w.shape[0]
    dx = torch.zeros((M, D), dtype=torch.float32, device=x.device) if need_dx else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=x.device) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=x.device) if need_db else None
    if M == 0 or not (need_dx or need_dw or need_db):
        return dx, dw, db
    targets = targets.contiguous()
    lo, omp = other_lse(lse.to(torch.float32), lp.to(torch.float32))
    valid = targets != ignore_index
    r = torch.where(valid, -g.to(torch.float32) * omp, 0.0).contiguous()  # d_logits = r (q - onehot)
    lo = lo.contiguous()
    # dw: the dot operand is q * r / pow2 (max |r / pow2| in [1/2, 1): inside fp16's range), pow2 re-applied in fp32
    amax = r.abs().amax().reshape(1)
    pow2 = torch.ldexp(torch.ones_like(amax), torch.frexp(amax).exponent)
    pow2 = torch.where((amax > 0) & torch.isfinite(amax), pow2, torch.ones_like(pow2))
    rn = (r / pow2).contiguous()
    bm, bv, bd, kw = _blocks(x, blocks)
    dot_dtype, ieee = _dot_cfg(x)
    common = (M, V, D, x.stride(0), x.stride(1), w.stride(0), w.stride(1))
    bias = _bias_arg(b, x)
    if need_dx:
        n_vt = triton.cdiv(V, bv)
        grid_m = triton.cdiv(M, bm)
        split = _split(grid_m, n_vt, x.device, split_v)
        tps = triton.cdiv(n_vt, split)
        split = triton.cdiv(n_vt, tps)
        _bwd_dx_kernel[(grid_m, split)](
            x, w, bias, targets, lo, r, dx, *common, tps, ignore_index,
            HAS_BIAS=b is not None, DOT_DTYPE=dot_dtype, IEEE=ieee, ATOMIC=split > 1,
            BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, **kw)
    if need_dw or need_db:
        n_mt = triton.cdiv(M, bm)
        grid_v = triton.cdiv(V, bv)
        split = _split(grid_v, n_mt, x.device, split_m)
        tps = triton.cdiv(n_mt, split)
        split = triton.cdiv(n_mt, tps)
        _bwd_dw_kernel[(grid_v, split)](
            x, w, bias, targets, lo, r, rn, pow2, dw if need_dw else x, db if need_db else lo, *common, tps,
            ignore_index,
            HAS_BIAS=b is not None, NEED_DW=need_dw, NEED_DB=need_db, DOT_DTYPE=dot_dtype, IEEE=ieee,
            ATOMIC=split > 1, BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, **kw)
    return dx, dw, db


__all__ = ["INTERPRET", "INTERPRET_BLOCKS", "lse_target_fwd", "logits_grad_bwd", "seq_reduce", "seq_logprob_fwd"]
