"""pytest-benchmark files are ``bench/test_bench_<what>.py``, run with ``pytest bench/ --benchmark-only``.

Each times SimNPO fwd+bwd of methods of bench/methods.py through the ``time_fwd_bwd`` fixture: inputs of
``harness.lm_inputs`` at N=2048, d=512, V=32000 (shrink them with SIMNPO_BENCH_N / _D / _V), on CUDA when
available, 1 warm-up and 3 timed rounds. Peak memory is measured by the scripts (fresh process per method), not
here.
"""
import os

import pytest

from bench.harness import lm_inputs


@pytest.fixture(scope="session")
def bench_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def time_fwd_bwd(benchmark, bench_device):
    """``run(name, fn, dtype)``: time ``fn``'s fwd+bwd with pytest-benchmark and check the gradient is finite."""
    import torch

    N, D, V = (int(os.environ.get(f"SIMNPO_BENCH_{k}", v)) for k, v in (("N", 2048), ("D", 512), ("V", 32000)))

    def run(name: str, fn, dtype: str) -> None:
        h, W, labels = lm_inputs(N, D, V, getattr(torch, dtype), device=bench_device)
        h.requires_grad_()
        W.requires_grad_()

        def step():
            h.grad = W.grad = None
            fn(h, W, labels).backward()
            if bench_device == "cuda":
                torch.cuda.synchronize()

        M = int((labels[:, 1:] != -100).sum())
        benchmark.extra_info.update(method=name, dtype=dtype, N=N, M=M, d=D, V=V, flops_6MdV=6 * M * D * V)
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
        assert torch.isfinite(W.grad).all()

    return run
