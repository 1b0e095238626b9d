"""GEMM rates of the chunked backend's tile shapes vs the full-size GEMMs (fp32, CPU).

    python -m bench.tile_gemm [--d 512 --V 32000]

Prints GFLOP/s of the three products of a tile of R rows -- logits ``x W^T``, ``dX = p W`` and
``dW += p^T x`` -- and of the logits in the ``[V, R]`` layout (``W x^T``), for R = 255 (one 256-token
sequence after the shift, the fp32 tile of the README benchmark), 256, 510 (two sequences), 512 and the full
batch (2048 rows). Outputs go to preallocated buffers, as in the chunked backend: the rates say how much of the
chunked path's time over the GEMM floor comes from tile-sized GEMMs (see README, Results).

    python -m bench.tile_gemm --prepacked [--rounds 7]

Tests the suspected cause of the tile penalty (the GEMM packs all of ``W`` again for every tile): interleaved
rounds over a batch of 8 x 255 rows of the logits products whole (``x W^T`` into a preallocated output), tile by
tile with ``torch.mm`` (what the chunked backend runs), and tile by tile on a ``W`` packed once per batch by
oneDNN (``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``, the packing timed with them; one
packed copy of ``W`` more in memory), and tile by tile by oneDNN on the plain ``W`` (``tiles_onednn``: what
``simnpo_fast/backends/gemm.py`` runs, a fresh tile per call); the same four for the ``dX = g W`` products
(``dx_*``: the prepacked variant packs ``W^T``, the plain one takes ``W^T`` as a view); medians written as a
result JSON (``tile_gemm-<machine>-<date>.json``).
"""
from __future__ import annotations

import argparse

import torch

from bench.harness import median_time, result_header, write_result


def _t(fn, n=7) -> float:
    return median_time(fn, n)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--rows", default="255,256,510,512,2048")
    ap.add_argument("--prepacked", action="store_true", help="the interleaved packed-W A/B (writes a JSON)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None, help="folder of the --prepacked JSON (default bench/results)")
    a = ap.parse_args(argv)
    if a.prepacked:
        return prepacked_ab(a, argv)
    W = torch.randn(a.V, a.d)
    dw = torch.zeros(a.V, a.d)
    xw = torch.randn(2048, a.d)
    for _ in range(3):  # thread pool, MKL buffers and clock ramp-up off the books (else the first row reads low)
        torch.mm(torch.mm(xw, W.t()), W)
    del xw
    print(f"{'rows':>6} {'logits':>8} {'dX':>8} {'dW':>8} {'logitsT':>8}   GFLOP/s (fp32, "
          f"{torch.get_num_threads()} threads; logitsT: the [V, rows] layout, W x^T)")
    for R in (int(r) for r in a.rows.split(",")):
        x, p = torch.randn(R, a.d), torch.randn(R, a.V)
        z, zt, dx = torch.empty(R, a.V), torch.empty(a.V, R), torch.empty(R, a.d)
        gf = 2 * R * a.d * a.V / 1e9
        rates = [gf / _t(f) for f in (lambda: torch.mm(x, W.t(), out=z), lambda: torch.mm(p, W, out=dx),
                                      lambda: dw.addmm_(p.t(), x), lambda: torch.mm(W, x.t(), out=zt))]
        print(f"{R:>6} " + " ".join(f"{r:8.0f}" for r in rates))
    return 0


def prepacked_ab(a, argv) -> int:
    """Whole-batch vs per-tile vs per-tile-on-prepacked-``W`` products, logits and ``dX`` (module docstring)."""
    import statistics
    import time

    R, n_tiles = 255, 8
    x, W = torch.randn(R * n_tiles, a.d), torch.randn(a.V, a.d) / a.d ** 0.5
    z_all, z = torch.empty(R * n_tiles, a.V), torch.empty(R, a.V)

    def tiles_mm():
        for r0 in range(0, R * n_tiles, R):
            torch.mm(x[r0 : r0 + R], W.t(), out=z)

    def tiles_packed():
        pw = torch.ops.mkldnn._reorder_linear_weight(W, None)
        for r0 in range(0, R * n_tiles, R):
            torch.ops.mkldnn._linear_pointwise(x[r0 : r0 + R], pw, None, "none", [], "")

    def tiles_onednn():  # what backends/gemm.py runs: oneDNN on the plain W, a fresh tile per call
        for r0 in range(0, R * n_tiles, R):
            torch.ops.mkldnn._linear_pointwise(x[r0 : r0 + R], W, None, "none", [], "")

    g = torch.randn(R * n_tiles, a.V) / a.V
    dx_all, dx = torch.empty(R * n_tiles, a.d), torch.empty(R, a.d)

    def dx_tiles_mm():
        for r0 in range(0, R * n_tiles, R):
            torch.mm(g[r0 : r0 + R], W, out=dx)

    def dx_tiles_packed():  # dX = g W is a linear layer of weight W^T ([d, V])
        pt = torch.ops.mkldnn._reorder_linear_weight(W.t(), None)
        for r0 in range(0, R * n_tiles, R):
            torch.ops.mkldnn._linear_pointwise(g[r0 : r0 + R], pt, None, "none", [], "")

    def dx_tiles_onednn():  # backends/gemm.py: W^T as a view, no copy
        for r0 in range(0, R * n_tiles, R):
            torch.ops.mkldnn._linear_pointwise(g[r0 : r0 + R], W.t(), None, "none", [], "")

    pw = torch.ops.mkldnn._reorder_linear_weight(W, None)
    err = float((torch.ops.mkldnn._linear_pointwise(x[:R], pw, None, "none", [], "") - x[:R] @ W.t()).abs().max())
    variants = {"whole": lambda: torch.mm(x, W.t(), out=z_all), "tiles_mm": tiles_mm, "tiles_prepacked": tiles_packed,
                "tiles_onednn": tiles_onednn, "dx_whole": lambda: torch.mm(g, W, out=dx_all),
                "dx_tiles_mm": dx_tiles_mm, "dx_tiles_prepacked": dx_tiles_packed, "dx_tiles_onednn": dx_tiles_onednn}
    times = {k: [] for k in variants}
    for f in variants.values():
        f()
    for _ in range(a.rounds):
        for k, f in variants.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    gf = 2 * R * n_tiles * a.d * a.V / 1e9
    over = {k: t / med["dx_whole" if k.startswith("dx_") else "whole"] for k, t in med.items()}
    for k, t in med.items():
        print(f"  {k:18s} {t * 1e3:7.1f} ms  {gf / t:6.1f} GFLOP/s  {over[k]:.2f}x its whole-batch product")
    payload = {**result_header("tile_gemm", "bench.tile_gemm", argv), "config": vars(a), "rows": R,
               "tiles": n_tiles, "times_s": times, "median_s": med, "max_abs_diff_prepacked": err,
               "over_whole": over}
    print(f"wrote {write_result('tile_gemm', payload, a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
