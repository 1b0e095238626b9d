"""pytest-benchmark form of the suite's loss comparison: ``pytest bench/ --benchmark-only``.

Every method (ours and the peers, bench/peers.py) is first checked against the fp64 oracle at a tiny shape; a
method that differs is skipped with the errors as the reason (never timed). Sizes default to the issue's N=2048,
d=512, V=32000 fp32; shrink them with SIMNPO_BENCH_N / _D / _V. Peak memory is measured by
``python -m bench.suite`` (fresh subprocess per method), not here.
"""
import os

import pytest
import torch

from bench import peers
from bench.sweep import inputs

N = int(os.environ.get("SIMNPO_BENCH_N", 2048))
D = int(os.environ.get("SIMNPO_BENCH_D", 512))
V = int(os.environ.get("SIMNPO_BENCH_V", 32000))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = [n for n in peers.METHOD_NAMES if DEVICE == "cuda" or n not in ("triton", "triton-gemm", "liger_flce")]
_CHECKED = {}


def _checked(name, dtype):
    key = (name, dtype)
    if key not in _CHECKED:
        m = peers.make_method(name, DEVICE)
        if m.fn is None:
            _CHECKED[key] = (None, m.note)
        else:
            h, W, lab = inputs(64, 48, 300, dtype, seq_len=16, seed=1)
            r = peers.check_method(m.fn, h.to(DEVICE), W.to(DEVICE), lab.to(DEVICE))
            _CHECKED[key] = (m.fn if r["ok"] else None, f"differs from the fp64 oracle: {r}")
    return _CHECKED[key]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_simnpo_fwd_bwd_vs_peers(benchmark, name, dtype):
    dt = getattr(torch, dtype)
    fn, why = _checked(name, dt)
    if fn is None:
        pytest.skip(why)
    h, W, labels = inputs(N, D, V, dt)
    h, W, labels = h.to(DEVICE).requires_grad_(), W.to(DEVICE).requires_grad_(), labels.to(DEVICE)

    def step():
        h.grad = W.grad = None
        fn(h, W, labels).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    M = int((labels[:, 1:] != -100).sum())
    benchmark.extra_info.update(method=name, N=N, M=M, d=D, V=V, flops_6MdV=6 * M * D * V)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert torch.isfinite(W.grad).all()
