"""pytest-benchmark form of bench.loss: ``pytest bench/ --benchmark-only``.

Sizes default to the issue's N=2048, d=512, V=32000; shrink them with SIMNPO_BENCH_N / _D / _V.
Peak memory is measured by ``python -m bench.loss`` (fresh subprocess per variant), not here.
"""
import os

import pytest
import torch

import simnpo_fast as sf
from bench.loss import _inputs

N = int(os.environ.get("SIMNPO_BENCH_N", 2048))
D = int(os.environ.get("SIMNPO_BENCH_D", 512))
V = int(os.environ.get("SIMNPO_BENCH_V", 32000))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_simnpo_fwd_bwd(benchmark, backend, dtype):
    h, W, labels = _inputs(N, D, V, getattr(torch, dtype))

    def step():
        h.grad = W.grad = None
        sf.simnpo_loss(h, W, labels, backend=backend).backward()

    benchmark.extra_info.update(N=N, d=D, V=V, flops_6ndv=6 * N * D * V)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(W.grad).all()
