"""pytest-benchmark form of bench.loss (reference vs chunked): ``pytest bench/test_bench_loss.py --benchmark-only``."""
import pytest

from bench.loss import VARIANTS
from bench.methods import make_method


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", list(VARIANTS))
def test_simnpo_fwd_bwd(time_fwd_bwd, backend, dtype):
    time_fwd_bwd(backend, make_method(VARIANTS[backend]).fn, dtype)
