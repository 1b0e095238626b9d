"""The engine of the chunked backend's two row-tile products: the logits tile ``xc W^T (+ b)`` and ``dX = P W``.

Both multiply a tile of a few hundred rows by all ``V`` rows of ``W``. ``torch.mm`` hands fp32 products to the
BLAS (MKL in the x86 wheels), whose two-thread split at such tile heights packs ``W`` once per thread: on the
2-core AMD EPYC (AVX-512 + BF16) the fp32 logits tiles of the headline shape took 1.3-1.4x the whole-batch GEMM,
``dX`` 1.1-1.2x (``python -m bench.tile_gemm``). oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op
behind inductor's CPU linear) splits the columns instead and runs the tiles at the whole-batch rate. 16-bit
products already go to oneDNN through ``torch.mm`` on CPUs with native bf16 / fp16 GEMMs (and are widened to
fp32 elsewhere, ``backends/lowp.py``); fp64 has no oneDNN path.

Rule (``engine``): ``"onednn"`` for fp32 operands on a CPU whose torch build has oneDNN and the op, else
``"torch"``; ``SIMNPO_FAST_TILE_GEMM=auto|torch|onednn`` overrides (``onednn`` where it cannot run falls back to
``torch``). The rule is a fixed one, not a timing probe: every process and rank of a run (and a resumed run) uses
the same engine, so the same inputs give the same bits. Both engines accumulate in fp32 with their own summation
order; neither rounds below fp32 unless the user lowers ``torch.backends.mkldnn``'s fp32 matmul precision.

``dW += P^T X`` stays ``torch.addmm_``: it accumulates in place into the fp32 ``dW`` (oneDNN's op writes a fresh
output, and its transposed-operand product measured slower).

oneDNN's op returns a fresh tensor (no ``out=``): the logits tile is then a new ``[R, V]`` block per tile, whose
pages are faulted in on first touch where glibc hands large blocks back to the OS (tiles over its 32 MiB mmap
cap, or a fixed ``MALLOC_MMAP_THRESHOLD_``); the measured rate includes that cost.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

_MODES = ("auto", "torch", "onednn")


def _mode() -> str:
    mode = os.environ.get("SIMNPO_FAST_TILE_GEMM", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"SIMNPO_FAST_TILE_GEMM must be one of {_MODES}, got {mode!r}")
    return mode


def onednn_available() -> bool:
    """Whether this torch build runs oneDNN matmuls on CPU tensors through ``mkldnn._linear_pointwise``."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def engine(x: torch.Tensor) -> str:
    """``"onednn"`` or ``"torch"``: the engine of the tile products of operands like ``x`` (module docstring)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "torch"
    mode = _mode()
    if mode == "torch" or not onednn_available():
        return "torch"
    return "onednn"


def _onednn(a: torch.Tensor, b_t: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b_t^T (+ bias)`` by oneDNN (a fresh tensor)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


def logits(xc: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
           out: Optional[Callable[[int], torch.Tensor]] = None) -> torch.Tensor:
    """The logits tile ``xc w^T (+ b)`` in ``w``'s dtype. ``out(rows)`` gives a ``[rows, V]`` buffer to write into
    (used by the ``torch`` engine; oneDNN returns a fresh tile and the buffer is never asked for)."""
    if engine(w) == "onednn" and xc.dtype == w.dtype:
        return _onednn(xc.contiguous(), w, None if b is None else b.to(w.dtype))
    z = torch.mm(xc, w.t()) if out is None else torch.mm(xc, w.t(), out=out(xc.shape[0]))
    if b is not None:
        z.add_(b.to(z.dtype))
    return z


def rows_times_w(p: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                 scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``diag(scale) (p w)`` written into ``out`` (``[rows, d]``, ``p``'s dtype; ``scale=None``: no scaling); the
    per-row ``scale`` (fp32) is applied to the product in ``out``'s dtype, never rounded to 16 bits first."""
    if engine(w) == "onednn" and p.dtype == w.dtype:
        prod = _onednn(p.contiguous(), w.t())
        return out.copy_(prod) if scale is None else torch.mul(prod, scale.unsqueeze(1), out=out)
    torch.mm(p, w, out=out)
    return out if scale is None else out.mul_(scale.unsqueeze(1))


def report() -> dict:
    """The engine choice for benchmark JSONs: mode, oneDNN availability, engine of fp32 / bf16 CPU tiles."""
    return {"mode": _mode(), "onednn": onednn_available(),
            "fp32": engine(torch.empty(0)), "bf16": engine(torch.empty(0, dtype=torch.bfloat16))}


__all__ = ["engine", "logits", "onednn_available", "report", "rows_times_w"]
