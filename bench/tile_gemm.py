"""GEMM rates of the chunked backend's tile shapes vs the full-size GEMMs (fp32, CPU).

    python -m bench.tile_gemm [--d 512 --V 32000]

Prints GFLOP/s of the three products of a tile of R rows -- logits ``x W^T``, ``dX = p W`` and
``dW += p^T x`` -- and of the logits in the ``[V, R]`` layout (``W x^T``), for R = 255 (one 256-token
sequence after the shift, the fp32 tile of the README benchmark), 256, 510 (two sequences), 512 and the full
batch (2048 rows). Outputs go to preallocated buffers, as in the chunked backend: the rates say how much of the
chunked path's time over the GEMM floor comes from tile-sized GEMMs (see README, Results).
"""
from __future__ import annotations

import argparse

import torch

from bench.harness import median_time


def _t(fn, n=7) -> float:
    return median_time(fn, n)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--rows", default="255,256,510,512,2048")
    a = ap.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
