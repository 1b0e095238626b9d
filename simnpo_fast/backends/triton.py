"""Triton backend: the default for CUDA tensors.

The generic path (``token_logprob`` / ``token_logprob_backward``) runs the tiled kernels of
``simnpo_fast.kernels.seq_logprob``: one tiled forward pass keeps only ``lp`` and ``lse`` per token (O(M)
floats); the backward recomputes the logits tiles in two race-free kernels (dx: a program owns a block of
token rows; dw/db: a program owns a block of vocabulary rows), as ``q - onehot`` with the per-token factor
``-g_t (1 - p_t)`` applied in fp32 after the dx product and, over one power of two, before the dw one (so a 16-bit
dot operand never underflows). Flops: 2 MdV forward + 8 MdV backward (see the kernel module docstring).

``fused_seq_loss`` is the base-class composition (forward, O(S) per-sequence weights, backward): 10 MdV.

``grad_filter`` (``backends/filter.py``): the row filter gives a dropped sequence (``fused_seq_loss``: the rule of
``filter.RowRule``, ``rows_ref`` "bound" or "batch" -- the call's largest weight) or token (generic path: the call's
largest token weight, as the chunked backend) the weight 0, and the kernels skip every token block whose rows all
have weight 0; the softmax filter (``eps``) skips each ``(token block x vocabulary block)`` tile of the backward
whose kept rows' entries are all ``p < eps`` and hold no target (``kernels/seq_logprob_kernels.py``). Both drop a
subset of what the per-entry rule allows, so the chunked backend's error bounds hold.
``TritonGemmBackend`` (``"triton-gemm"``, below) is the 6 MdV variant: the chunked sequence-aligned schedule
with torch/cuBLAS GEMMs and the Triton tile epilogue of ``simnpo_fast.kernels.epilogue`` (``bench/gpu.py``
times both). The retain KL (``fused_kl``) of both is the chunked torch implementation (``backends/kl.py``),
which runs on CUDA tensors as well.

The kernels take the packed rows as a dense ``[M, d]`` matrix: ``HeadInputs.packed_x`` gathers them and
``dx`` is scattered back to the rows of the hidden states.

On CPU tensors the backend runs only under ``TRITON_INTERPRET=1`` (tests); ``supports`` returns False
otherwise and the dispatcher raises a clear error. fp64 inputs (oracle use only) are delegated to the
chunked backend, which keeps fp64 accumulation.
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from .base import Backend, other_lse, target_terms
from .chunked import ChunkedBackend
from .filter import RowRule
from .grads import TileGrads
from .inputs import GradNeeds, HeadInputs, SeqWeightFn
from .tiles import split_scale


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels_run_on(device, module: str) -> bool:
    """CUDA always; CPU only when the kernel module was imported under TRITON_INTERPRET=1 (bound at import)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type == "cpu" and _interpreting():
        import importlib

        return importlib.import_module(f"simnpo_fast.kernels.{module}").INTERPRET
    return False


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index
        self._chunked = ChunkedBackend()
        self._rows_kept: dict = {}
        self._tile_counts: dict = {}

    @property
    def last_filter_stats(self) -> dict:
        """What the filter kept in the last filtered call: ``rows_kept`` (the row filter's fraction of sequences,
        or of tokens on the generic path) and ``tiles_kept`` (the fraction of the backward kernels' tiles whose
        products ran, dx and dw together); read from the kernels' counters when asked (one device sync)."""
        out = dict(self._rows_kept)
        tiles = sum(n for _, n in self._tile_counts.values())
        if tiles:
            out["tiles_kept"] = sum(int(c.sum()) for c, _ in self._tile_counts.values()) / tiles
        return out

    def supports(self, device) -> bool:
        return _kernels_run_on(device, "seq_logprob")

    @staticmethod
    def _kernels():
        from simnpo_fast.kernels import seq_logprob as K

        return K

    def logprob_forward(self, inp: HeadInputs):
        if inp.x.dtype == torch.float64:
            return self._chunked.logprob_forward(inp)
        return self._kernels().lse_target_fwd(inp.packed_x(), inp.w, inp.b, inp.targets, self.ignore_index)

    def logprob_backward(self, inp: HeadInputs, lse, lp, grad_lp, needs: GradNeeds):
        if inp.x.dtype == torch.float64:
            return self._chunked.logprob_backward(inp, lse, lp, grad_lp, needs)
        if not needs.any:
            return None, None, None
        flt, eps = inp.grad_filter, None
        if flt is not None:  # the row filter per token, against the call's largest weight (as chunked)
            eps, self._rows_kept, self._tile_counts = flt.probs, {}, {}
            if flt.rows > 0 and grad_lp.numel():
                a = grad_lp.abs()
                keep = a >= flt.rows * a.max()
                grad_lp = torch.where(keep, grad_lp, torch.zeros_like(grad_lp))
                self._rows_kept = {"rows_kept": float(keep.float().mean())}
        dx, dw, db = self._kernels().logits_grad_bwd(
            inp.packed_x(), inp.w, inp.b, inp.targets, lse, grad_lp, self.ignore_index, lp=lp,
            need_dx=needs.dx, need_dw=needs.dw, need_db=needs.db, eps=eps, counts=self._tile_counts,
        )
        return inp.unpack_rows(dx), dw, db

    def fused_seq_loss(self, inp: HeadInputs, seq_weight_fn: SeqWeightFn, needs: GradNeeds):
        # Not a speed override: fp64 inputs keep fp64 sums end to end in the chunked backend.
        if inp.x.dtype == torch.float64:
            return self._chunked.fused_seq_loss(inp, seq_weight_fn, needs)
        flt = inp.grad_filter
        if flt is None or flt.rows <= 0:
            return super().fused_seq_loss(inp, seq_weight_fn, needs)
        # the row filter per sequence (filter.RowRule, every weight known at once: "batch" is the call's largest);
        # a dropped sequence's weight is 0, so the kernels skip its rows; the softmax filter stays on (eps)
        rule = RowRule(flt, inp.weight_bound)
        self._rows_kept, self._tile_counts = {}, {}

        def filtered_weights(logp_sum, idx):
            f, g = seq_weight_fn(logp_sum, idx)
            keep = rule.keep(g, idx)
            return f, (g if keep is None else torch.where(keep, g, torch.zeros_like(g)))

        out = super().fused_seq_loss(inp.replace(grad_filter=replace(flt, rows=0.0)), filtered_weights, needs)
        if rule.seen:
            self._rows_kept = {"rows_kept": rule.kept / rule.seen}
        return out

    def fused_kl(self, inp: HeadInputs, ref: HeadInputs, scale: float, needs: GradNeeds):
        return self._chunked.fused_kl(inp, ref, scale, needs)


# ------------------------------------------------------------------------------------------------------------
# "triton-gemm": the chunked 6 NdV schedule with cuBLAS GEMMs and a Triton tile epilogue
# ------------------------------------------------------------------------------------------------------------
_F32_GEMM_OK: dict = {}


def _mm_f32_native(a, b, out=None):
    """``a @ b`` of 16-bit operands written as fp32 (no rounding of the product to 16 bits)."""
    if out is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def _addmm_f32_native(acc, a, b, alpha: float = 1.0):
    """``acc += alpha * (a @ b)`` with fp32 ``acc`` and 16-bit operands, accumulated in fp32 inside the GEMM."""
    return torch.addmm(acc, a, b, out_dtype=torch.float32, alpha=alpha, out=acc)


def f32_gemm_available(device, dtype) -> bool:
    """Whether ``torch.mm/addmm(..., out_dtype=torch.float32)`` work for ``dtype`` operands on ``device``.

    Probed once per (device type, dtype) on 16 x 16 operands against an fp32 product (torch builds CUDA
    kernels for it; the CPU build of torch 2.13 has none)."""
    key = (torch.device(device).type, dtype)
    if key not in _F32_GEMM_OK:
        ok = False
        try:
            i = torch.arange(256, device=device, dtype=torch.float32).reshape(16, 16)
            a = ((i % 7 - 3) / 4).to(dtype)  # exact in fp16/bf16; no use of the global RNG
            b = ((i % 5 - 2) / 8).t().to(dtype)
            ref = a.float() @ b.float()
            acc = torch.ones(16, 16, device=device)
            out = torch.empty(16, 16, device=device)
            r1 = _mm_f32_native(a, b)
            _mm_f32_native(a, b, out=out)
            _addmm_f32_native(acc, a, b, alpha=0.5)
            tol = 1e-3 * ref.abs().max().item()
            ok = (r1.dtype == torch.float32 and (r1 - ref).abs().max().item() <= tol
                  and (out - ref).abs().max().item() <= tol and (acc - 1 - 0.5 * ref).abs().max().item() <= tol)
        except Exception:
            ok = False
        _F32_GEMM_OK[key] = ok
    return _F32_GEMM_OK[key]


class _GemmGrads(TileGrads):
    """Accumulators of the triton-gemm backend: the chunked ``TileGrads`` plus native fp32-result GEMMs.

    A 16-bit tile (the GEMM dtype of 16-bit inputs) feeds 16-bit GEMMs with fp32 results where the device has
    them (``torch.mm/addmm(out_dtype=torch.float32)`` on CUDA): ``dx`` rows written as fp32 (the row scale
    applied to them in fp32) and ``dW`` accumulated in fp32 inside the GEMM (``scale * x`` as the 16-bit
    operand; for fp16 split into a power of two per tile, passed as the GEMM's ``alpha``, and a factor in
    [1/2, 1), see ``tiles.split_scale``: one host sync per fp16 tile). Elsewhere (CPU torch, older torch), and
    for fp32/fp64 tiles, the chunked accumulation runs unchanged.
    """

    def __init__(self, x, w, b, need_dx, need_dw, need_db):
        self._native = x.dtype in (torch.float16, torch.bfloat16) and f32_gemm_available(x.device, x.dtype)
        super().__init__(x, w, b, need_dx, need_dw, need_db)

    def dx_dtype(self, x) -> torch.dtype:
        return self.acc if self._native else super().dx_dtype(x)  # fp32 dX rows straight from the GEMM

    def add_tile(self, p, xc, w, r0, r1, rows=None, scale=None):
        if p.dtype == self.acc or not self._native:
            return super().add_tile(p, xc, w, r0, r1, rows, scale)
        alpha, sn = split_scale(scale, p.dtype)
        self._add_db(p, sn, alpha, lambda q, s: _mm_f32_native(s.to(q.dtype).unsqueeze(0), q).squeeze(0))
        if self.dx is not None:
            if scale is None:
                prod_fn = lambda out: _mm_f32_native(p, w, out=out)  # noqa: E731
            else:
                prod_fn = lambda out: _mm_f32_native(p, w, out=out).mul_(scale.unsqueeze(1))  # noqa: E731
            self._dx_rows(prod_fn, r0, r1, rows, self.acc)
        if self.dw is not None:
            if self._dw_fresh:
                self.dw.zero_()
                self._dw_fresh = False
            _addmm_f32_native(self.dw, p.t(), xc if sn is None else self._scaled_rows(xc, sn), alpha=alpha)


class TritonGemmBackend(ChunkedBackend):
    """``"triton-gemm"``: the sequence-aligned chunked schedule (6 NdV for scalar losses, 8 NdV for the
    generic path) with torch / cuBLAS GEMMs and the Triton tile epilogue of ``simnpo_fast.kernels.epilogue``.

    Per tile: ``z = x_tile w^T (+ b)`` is kept in the GEMM dtype (bf16 inputs -> a bf16 tile, half the
    bytes of the chunked backend's fp32 tile); one read pass gives the non-target ``lo`` and the target logit
    (hence ``lp``, ``lse`` and ``1 - p_t``, ``base.target_terms``); one read+write pass turns the tile, in place,
    into ``q - onehot`` in the GEMM dtype; then the dX and dW GEMMs with the row scale ``-g (1 - p_t)`` on their
    ``[R, d]`` sides (fp32 results, see ``_GemmGrads``). fp64 inputs (oracle use only) keep the chunked fp64 path.

    Precision note: with bf16 inputs the logits are rounded to bf16 by the GEMM before the softmax (as in a
    bf16 model's own LM head), so ``lp`` carries ~2^-9 |z| per token; ``backend="triton"`` keeps the logits
    in fp32 registers instead.
    """

    name = "triton-gemm"
    grads_class = _GemmGrads

    def __init__(self, chunk_rows=None, ignore_index: int = -100, block_v=None):
        super().__init__(chunk_rows)
        self.ignore_index = ignore_index
        self.block_v = block_v  # column block of the epilogue kernels (None: heuristic)

    def supports(self, device) -> bool:
        return _kernels_run_on(device, "epilogue")

    def gemm_dtype(self, x):
        return x.dtype  # a GPU backend: its 16-bit tiles are what it is for (the CPU probe does not apply)

    @staticmethod
    def _kernels():
        from simnpo_fast.kernels import epilogue as E

        return E

    def tile_logits(self, xc, w, b, out=None):
        if xc.dtype == torch.float64:
            return super().tile_logits(xc, w, b, out)
        buf = None if out is None else out(xc.shape[0])
        if b is None:
            return torch.mm(xc, w.t(), out=buf)
        return torch.addmm(b.to(xc.dtype), xc, w.t(), out=buf)  # bias in the GEMM epilogue, GEMM dtype

    def tile_forward(self, z, tgt, relogits=None):
        if z.dtype == torch.float64:
            return super().tile_forward(z, tgt, relogits)
        lo, zt = self._kernels().tile_target_stats(z, tgt, self.ignore_index, block_v=self.block_v)
        lp, lse, omp = target_terms(lo, zt)
        # z is left untouched; lo = +inf where 1 - p_t = 0 (no other column): q = 0 there, never inf * 0
        return lse, lp, (torch.where(omp > 0, lo, torch.full_like(lo, float("inf"))), omp)

    def tile_dlogits(self, z, state, tgt, g):
        if z.dtype == torch.float64:
            return super().tile_dlogits(z, state, tgt, g)
        lo, omp = state
        self._kernels().tile_dlogits_(z, lo, tgt, None, self.ignore_index, block_v=self.block_v)
        return z, -g * omp

    def tile_dlogits_from_logits(self, z, lse, lp, tgt, g, relogits=None):
        if z.dtype == torch.float64:
            return super().tile_dlogits_from_logits(z, lse, lp, tgt, g, relogits)
        return self.tile_dlogits(z, other_lse(lse, lp), tgt, g)
