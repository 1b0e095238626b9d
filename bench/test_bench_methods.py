"""pytest-benchmark form of the suite's method comparison: ``pytest bench/test_bench_methods.py --benchmark-only``.

Every method of bench/methods.py timed at full size on this device is first checked against the fp64 oracle at
a tiny shape; one that differs (or is unavailable) is skipped with the reason, never timed.
"""
import pytest
import torch

from bench.harness import check_method, lm_inputs
from bench.methods import full_size_names, make_method

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_CHECKED = {}


def _checked(name, dtype):
    """The method's fn if it matches the oracle at a tiny shape, else (None, why)."""
    if (name, dtype) not in _CHECKED:
        m = make_method(name, DEVICE)
        if m.fn is None:
            _CHECKED[name, dtype] = (None, m.note)
        else:
            r = check_method(m.fn, *lm_inputs(64, 48, 300, getattr(torch, dtype), seq_len=16, seed=1, device=DEVICE))
            _CHECKED[name, dtype] = (m.fn if r["ok"] else None, f"differs from the fp64 oracle: {r}")
    return _CHECKED[name, dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", full_size_names(DEVICE))
def test_simnpo_fwd_bwd_vs_peers(time_fwd_bwd, name, dtype):
    fn, why = _checked(name, dtype)
    if fn is None:
        pytest.skip(why)
    time_fwd_bwd(name, fn, dtype)
