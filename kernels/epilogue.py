"""Triton epilogue kernels on a materialised logits *tile* (the "GEMM + Triton epilogue" design).

The sequence-aligned schedule of ``simnpo_fast/backends/chunked.py`` computes a logits tile
``z [R, V] = x_tile w^T (+ b)`` with one GEMM, the per-sequence sums and weights ``g``, then
``d_logits = g_t (onehot(y_t) - softmax(z_t))`` and the two gradient GEMMs while the tile is live: 6 RdV
flops per tile, i.e. the 6 NdV GEMM floor. Only the element-wise part in between is here, as two
bandwidth-bound passes over the tile (no GEMM in these kernels):

``tile_target_stats(z, tgt)`` one *read* pass: per row the online max / rescaled sum over vocabulary blocks of
                              the *other* columns, ``lo_t = logsumexp_{v != y_t} z_tv``, and the target logit
                              ``z_t[y_t]`` (one scalar load). ``z`` is not written. ``lp_t``, ``lse_t`` and
                              ``1 - p_t`` follow from the two in O(R) (``target_terms.py``), to full
                              relative accuracy however close ``p_t`` is to 1.
``tile_dlogits_(z, lo, tgt, out=None)``
                              one read + write pass: ``q - onehot(y_t)`` with ``q_tv = exp(z_tv - lo_t)`` (the
                              distribution of the other tokens), written in place (``out=None``) or into ``out``
                              (any of fp32/fp16/bf16, e.g. the GEMM dtype). The gradient of the logits is
                              ``d_logits_t = r_t (q - onehot)`` with ``r_t = -g_t (1 - p_t)``: the caller applies
                              ``r_t`` to the ``[R, d]`` side of the GEMMs, so the 16-bit tile holds O(1) numbers
                              even for a memorised row (``1 - p_t ~ 1e-6``) or a saturated weight ``g_t``.

A program owns one row and loops over ``BLOCK_V`` column blocks, so every element of ``out`` is written by
exactly one program (in place is race-free: each element is read before it is written, by the same
program). Rows whose target is ``ignore_index``: ``zt = 0``, ``lo`` is the logsumexp of the whole row, and an
all-zero tile row. ``lo = +inf`` gives a zero ``q`` (a row with ``1 - p_t = 0``).

Bytes per tile element (bf16 tile): 2 (read) + 2 + 2 (read + write) = 6, against the ``6 d`` flops per element
of the tile's three GEMMs.

Precision: every load is cast to fp32 right away, the arithmetic is fp32 (``tl.exp`` / ``tl.log``, no
libdevice), the result is cast to the output dtype only at the store. ``lo`` and ``zt`` are fp32.
The fp32 -> bf16 store rounds to nearest even on a GPU; the Triton interpreter (3.7) truncates instead
(round toward zero, up to 1 bf16 ulp): the interpreter tests allow 1 ulp for bf16 outputs.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

#: whether this module was imported under the Triton interpreter (the jit functions are bound at import).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: default column block under the interpreter: small (>= 16) so test shapes cross several blocks.
INTERPRET_BLOCK_V = 64

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _other_lse_kernel(z_ptr, tgt_ptr, lo_ptr, zt_ptr, V, szr, szc, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    zrow = z_ptr + row.to(tl.int64) * szr
    offs = tl.arange(0, BLOCK_V)
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index
    # the target column is left out (-inf); a block may hold no other column (max -inf): offset 0 then,
    # so the rescale exp(m - off) never sees inf - inf
    z = tl.load(zrow + offs * szc, mask=offs < V, other=float("-inf")).to(tl.float32)
    z = tl.where(offs == tgt, float("-inf"), z)
    m = tl.max(z, axis=0)
    s = tl.sum(tl.exp(z - tl.where(m == float("-inf"), 0.0, m)), axis=0)
    for v0 in range(BLOCK_V, V, BLOCK_V):
        cols = v0 + offs
        z = tl.load(zrow + cols.to(tl.int64) * szc, mask=cols < V, other=float("-inf")).to(tl.float32)
        z = tl.where(cols == tgt, float("-inf"), z)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        off = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - off) + tl.sum(tl.exp(z - off), axis=0)
        m = m_new
    zt = tl.load(zrow + tl.where(valid, tgt, 0).to(tl.int64) * szc, mask=valid, other=0.0).to(tl.float32)
    lo = tl.where(s > 0, tl.where(m == float("-inf"), 0.0, m) + tl.log(tl.where(s > 0, s, 1.0)), float("-inf"))
    tl.store(lo_ptr + row, lo)
    tl.store(zt_ptr + row, tl.where(valid, zt, 0.0))


@triton.jit
def _qtile_kernel(z_ptr, out_ptr, lo_ptr, tgt_ptr, V, szr, szc, sor, soc, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    zrow = z_ptr + row.to(tl.int64) * szr
    orow = out_ptr + row.to(tl.int64) * sor
    offs = tl.arange(0, BLOCK_V)
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index
    lo = tl.load(lo_ptr + row).to(tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        ok = cols < V
        c64 = cols.to(tl.int64)
        z = tl.load(zrow + c64 * szc, mask=ok, other=0.0).to(tl.float32)
        dz = tl.where(cols == tgt, -1.0, tl.exp(z - lo))
        dz = tl.where(valid, dz, 0.0)  # ignored row: exactly 0 even if its lo / z are not finite
        tl.store(orow + c64 * soc, dz.to(out_ptr.dtype.element_ty), mask=ok)


def _config(z: torch.Tensor, block_v: Optional[int]):
    """(BLOCK_V, launch kwargs). GPU: one row of up to 4096 (16-bit) / 2048 (fp32) columns per iteration."""
    V = z.shape[1]
    if block_v is not None:
        if block_v < 16 or block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
        return int(block_v), {}
    if INTERPRET or z.device.type != "cuda":
        return INTERPRET_BLOCK_V, {}
    cap = 2048 if z.dtype == torch.float32 else 4096
    bv = max(16, min(cap, triton.next_power_of_2(V)))
    return bv, {"num_warps": 8 if bv >= 2048 else 4}


def _check(z: torch.Tensor, tgt: torch.Tensor):
    if z.dim() != 2 or z.shape[1] == 0:
        raise ValueError(f"z must be a logits tile [R, V] with V >= 1, got {tuple(z.shape)}")
    if z.dtype not in _DTYPES:
        raise ValueError(f"z must be fp32/fp16/bf16, got {z.dtype}")
    if tgt.shape != (z.shape[0],):
        raise ValueError(f"tgt must be [{z.shape[0]}], got {tuple(tgt.shape)}")
    if tgt.device != z.device:
        raise ValueError(f"tgt on {tgt.device} but z on {z.device}")
    if z.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before import")


def _row_vec(t, R, name, device):
    t = torch.as_tensor(t, device=device)
    if t.shape != (R,):
        raise ValueError(f"{name} must be [{R}], got {tuple(t.shape)}")
    return t.to(torch.float32).contiguous()


def tile_target_stats(z: torch.Tensor, tgt: torch.Tensor, ignore_index: int = -100, *,
                      block_v: Optional[int] = None):
    """``(lo [R] fp32, zt [R] fp32)`` of a logits tile in one read pass: the log-sum-exp of each row's non-target
    columns (``-inf`` if there is none) and its target logit; ``zt = 0`` and ``lo`` = the whole row's
    log-sum-exp on ignored rows."""
    _check(z, tgt)
    R, V = z.shape
    lo = torch.empty(R, dtype=torch.float32, device=z.device)
    zt = torch.empty(R, dtype=torch.float32, device=z.device)
    if R == 0:
        return lo, zt
    bv, kw = _config(z, block_v)
    _other_lse_kernel[(R,)](z, tgt.contiguous(), lo, zt, V, z.stride(0), z.stride(1), ignore_index,
                            BLOCK_V=bv, **kw)
    return lo, zt


def tile_dlogits_(z: torch.Tensor, lo: torch.Tensor, tgt: torch.Tensor, out: Optional[torch.Tensor] = None,
                  ignore_index: int = -100, *, block_v: Optional[int] = None) -> torch.Tensor:
    """``q - onehot(y_t)`` with ``q_tv = exp(z_tv - lo_t)`` into ``out`` (default: ``z`` itself); ignored rows
    -> 0. With ``lo`` from ``tile_target_stats``, ``d_logits = diag(-g (1 - p_t)) (q - onehot)``.

    ``out`` may have another dtype than ``z`` (e.g. a bf16 tile for the gradient GEMMs from an fp32 ``z``)
    but must not partially overlap ``z``; it is returned.
    """
    _check(z, tgt)
    R, V = z.shape
    if out is None:
        out = z
    elif out.shape != z.shape or out.dtype not in _DTYPES or out.device != z.device:
        raise ValueError(f"out must be a {tuple(z.shape)} fp32/fp16/bf16 tensor on {z.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    lo = _row_vec(lo, R, "lo", z.device)
    if R == 0:
        return out
    bv, kw = _config(z, block_v)
    _qtile_kernel[(R,)](z, out, lo, tgt.contiguous(), V, z.stride(0), z.stride(1), out.stride(0),
                        out.stride(1), ignore_index, BLOCK_V=bv, **kw)
    return out


__all__ = ["INTERPRET", "INTERPRET_BLOCK_V", "tile_target_stats", "tile_dlogits_"]
