"""The engine of the chunked backend's two row-tile products: the logits tile ``xc W^T (+ b)`` and ``dX = P W``.

Both multiply a tile of a few hundred rows by all ``V`` rows of ``W``. ``torch.mm`` hands fp32 products to the
BLAS (MKL in the x86 wheels), whose two-thread split at such tile heights packs ``W`` once per thread. Measured
tile by tile over 8 x 255 rows against the whole-batch product (``python -m bench.tile_gemm --prepacked``):

- AMD EPYC with AVX-512 + BF16 (``bench/results/tile_gemm-cpu2-2026-12-07.json``): fp32 logits tiles 1.50x by
  ``torch.mm``, 0.97x by oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op behind inductor's CPU
  linear, which splits the columns); ``dX`` tiles 1.16x by ``torch.mm``, 0.98x by oneDNN;
- AMD EPYC with AVX2 only (``bench/results/tile_gemm-cpu2-2026-12-02.json``, oneDNN on a prepacked ``W``):
  logits tiles 1.25x by ``torch.mm``, 1.02x by oneDNN; ``dX`` tiles 1.06x by ``torch.mm``, 1.41x by oneDNN.

Rule (``engine``), a fixed one so that every process and rank of a run (and a resumed run) computes the same
bits, never a timing probe: fp32 CPU operands on a torch build with oneDNN take oneDNN for the logits tiles, and
for ``dX`` where torch runs AVX-512 code (``torch.backends.cpu.get_cpu_capability()``); everything else takes
``torch.mm`` (16-bit products already go to oneDNN through ``torch.mm`` on CPUs with native bf16 / fp16 GEMMs
and are widened to fp32 elsewhere, ``backends/lowp.py``; fp64 has no oneDNN path; CUDA uses cuBLAS). Intel Xeon
CPUs follow the AVX-512 rule without a measurement of their own. ``SIMNPO_FAST_TILE_GEMM=auto|torch|onednn``
overrides (``onednn``: both products, where oneDNN can run). A ``W`` that is not contiguous (a view) takes
``torch.mm``, which reads any strides, rather than a copy per tile. Both engines accumulate in fp32, each in its own
summation order; neither rounds below fp32 unless the user lowers ``torch.backends.mkldnn``'s fp32 matmul
precision.

``dW += P^T X`` stays ``torch.addmm_``: it accumulates in place into the fp32 ``dW`` (oneDNN's op writes a fresh
output, and its transposed-operand product measured slower).

oneDNN's op returns a fresh tensor (no ``out=``): the logits tile is then a new ``[R, V]`` block per tile, whose
pages are faulted in on first touch where glibc hands large blocks back to the OS (tiles over its 32 MiB mmap
cap, or a fixed ``MALLOC_MMAP_THRESHOLD_``); the measured rates include that cost.
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


PRODUCTS = ("logits", "dx")


def _avx512() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
    except (AttributeError, RuntimeError):
        return False


def engine(x: torch.Tensor, product: str = "logits") -> str:
    """``"onednn"`` or ``"torch"``: the engine of the ``product`` (``"logits"`` or ``"dx"``) of operands like
    ``x`` (module docstring)."""
    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {PRODUCTS}, got {product!r}")
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "torch"
    mode = _mode()
    if mode == "torch" or not onednn_available():
        return "torch"
    if mode == "auto" and product == "dx" and not _avx512():
        return "torch"
    return "onednn"


def _onednn(a: torch.Tensor, b_t: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b_t^T (+ bias)`` by oneDNN (a fresh tensor)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


def logits(xc: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
           out: Optional[Callable[[int], torch.Tensor]] = None) -> torch.Tensor:
    """The logits tile ``xc w^T (+ b)`` in ``w``'s dtype. ``out(rows)`` gives a ``[rows, V]`` buffer to write into
    (used by the ``torch`` engine; oneDNN returns a fresh tile and the buffer is never asked for)."""
    if engine(w, "logits") == "onednn" and xc.dtype == w.dtype and w.is_contiguous():
        return _onednn(xc.contiguous(), w, None if b is None else b.to(w.dtype))
    z = torch.mm(xc, w.t()) if out is None else torch.mm(xc, w.t(), out=out(xc.shape[0]))
    if b is not None:
        z.add_(b.to(z.dtype))
    return z


def rows_times_w(p: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                 scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``diag(scale) (p w)`` written into ``out`` (``[rows, d]``, ``p``'s dtype; ``scale=None``: no scaling); the
    per-row ``scale`` (fp32) is applied to the product in ``out``'s dtype, never rounded to 16 bits first."""
    if engine(w, "dx") == "onednn" and p.dtype == w.dtype and w.is_contiguous():
        prod = _onednn(p.contiguous(), w.t())
        return out.copy_(prod) if scale is None else torch.mul(prod, scale.unsqueeze(1), out=out)
    torch.mm(p, w, out=out)
    return out if scale is None else out.mul_(scale.unsqueeze(1))


def report() -> dict:
    """The engine choice for benchmark JSONs: mode, oneDNN availability, the engine of each product of fp32 and
    bf16 CPU tiles."""
    out = {"mode": _mode(), "onednn": onednn_available(), "avx512": _avx512()}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[name] = {p: engine(torch.empty(0, dtype=dt), p) for p in PRODUCTS}
    return out


__all__ = ["PRODUCTS", "engine", "logits", "onednn_available", "report", "rows_times_w"]
