"""Launchers of the fused LM head + log-softmax + target gather kernels (``seq_logprob_kernels.py``): launch
configuration, split choice and the O(M) torch steps around the kernels (maths only, no policy).

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

from .seq_logprob_kernels import (_bwd_dw_kernel, _bwd_dx_kernel, _combine_kernel, _fwd_kernel,  # noqa: F401
                                  _seq_sum_kernel)
from .target_terms import other_lse, target_terms

#: whether this module was imported under the Triton interpreter (the jit functions are bound at import).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_TORCH2TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


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


def _bwd_row_terms(lse, lp, g, targets, ignore_index: int, eps: Optional[float]):
    """The O(M) per-row operands of the backward kernels: ``(lo, r, rn, pow2, thr)``.

    ``lo`` the non-target log-sum-exp (``+inf`` where ``1 - p_t = 0``), ``r = -g (1 - p_t)`` (0 on ignored rows:
    ``d_logits = r (q - onehot)``), ``rn = r / pow2`` with ``pow2`` the power of two that puts ``max |rn|`` in
    [1/2, 1) (the dw kernel's dot operand stays inside fp16's range; ``pow2`` is re-applied in fp32), ``thr`` the
    softmax filter's cut on ``q``: ``q >= eps / (1 - p_t)  <=>  p >= eps`` (``+inf`` where ``1 - p_t = 0``: such a
    row has nothing but its target, of factor ``r = 0``); ``lo`` itself (never read) when ``eps`` is None.
    """
    lo, omp = other_lse(lse.to(torch.float32), lp.to(torch.float32))
    valid = targets != ignore_index
    r = torch.where(valid, -g.to(torch.float32) * omp, 0.0).contiguous()
    lo = lo.contiguous()
    amax = r.abs().amax().reshape(1)
    pow2 = torch.ldexp(torch.ones_like(amax), torch.frexp(amax).exponent)
    pow2 = torch.where((amax > 0) & torch.isfinite(amax), pow2, torch.ones_like(pow2))
    rn = (r / pow2).contiguous()
    if eps is None:
        return lo, r, rn, pow2, lo
    thr = torch.where(omp > 0, eps / torch.where(omp > 0, omp, torch.ones_like(omp)), float("inf"))
    return lo, r, rn, pow2, thr.contiguous()


def _tile_counter(counts: Optional[dict], key: str, n_programs: int, n_tiles: int, x, filt: bool):
    """The ``cnt`` operand of a backward kernel: int32 ``[n_programs]`` zeros, recorded as ``counts[key] =
    (cnt, n_tiles)`` when ``counts`` is a dict; ``x`` (a dummy pointer, never written) without the filter."""
    if not filt:
        return x
    cnt = torch.zeros(n_programs, dtype=torch.int32, device=x.device)
    if counts is not None:
        counts[key] = (cnt, n_tiles)
    return cnt


def logits_grad_bwd(x, w, b, targets, lse, g, ignore_index: int = -100, *, lp, need_dx: bool = True,
                    need_dw: bool = True, need_db: Optional[bool] = None,
                    blocks: Optional[Sequence[int]] = None, split_v: Optional[int] = None,
                    split_m: Optional[int] = None, eps: Optional[float] = None, counts: Optional[dict] = None):
    """Gradients of ``sum_t g_t lp_t``: ``(dx [M, d], dw [V, d], db [V])`` in fp32 (``None`` if not needed).

    ``lse`` and ``lp`` are the forward's per-token logsumexp and target log-probability (``lse_target_fwd``);
    ``g`` the per-token scale (e.g. SimNPO's ``2/|y_i| sigmoid(beta/|y_i| logp_sum_i + gamma) / normalizer``
    broadcast to the tokens of sequence i). ``ignore_index`` rows get zero gradient whatever their ``g``.
    ``eps``: the gradient filter (kernel module docstring): tiles whose entries all have ``p < eps`` (and no
    target) skip their products, token blocks of rows with ``g = 0`` are skipped whole (``eps = 0``: only that).
    ``counts`` (with ``eps``): a dict that receives ``{"dx": (kept, tiles), "dw": (kept, tiles)}``, ``kept`` an
    int32 tensor of the tiles whose product each program ran (sum it) and ``tiles`` the number of
    ``(token block x vocabulary block)`` tiles of that kernel.
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
    lo, r, rn, pow2, thr = _bwd_row_terms(lse, lp, g, targets, ignore_index, eps)
    filt = eps is not None
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
        cnt = _tile_counter(counts, "dx", grid_m * split, grid_m * n_vt, x, filt)
        _bwd_dx_kernel[(grid_m, split)](
            x, w, bias, targets, lo, r, thr, cnt, dx, *common, tps, ignore_index,
            HAS_BIAS=b is not None, DOT_DTYPE=dot_dtype, IEEE=ieee, ATOMIC=split > 1, FILTER=filt,
            BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, **kw)
    if need_dw or need_db:
        n_mt = triton.cdiv(M, bm)
        grid_v = triton.cdiv(V, bv)
        split = _split(grid_v, n_mt, x.device, split_m)
        tps = triton.cdiv(n_mt, split)
        split = triton.cdiv(n_mt, tps)
        cnt = _tile_counter(counts, "dw", grid_v * split, grid_v * n_mt, x, filt)
        _bwd_dw_kernel[(grid_v, split)](
            x, w, bias, targets, lo, r, rn, pow2, thr, cnt, dw if need_dw else x, db if need_db else lo, *common, tps,
            ignore_index,
            HAS_BIAS=b is not None, NEED_DW=need_dw, NEED_DB=need_db, DOT_DTYPE=dot_dtype, IEEE=ieee,
            ATOMIC=split > 1, FILTER=filt, BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd, **kw)
    return dx, dw, db


__all__ = ["INTERPRET", "INTERPRET_BLOCKS", "lse_target_fwd", "logits_grad_bwd", "seq_reduce", "seq_logprob_fwd"]
