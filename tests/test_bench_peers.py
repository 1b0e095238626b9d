"""The benchmark's method table computes SimNPO like the fp64 oracle, and the oracle check catches a method that
does not (tiny sizes; no timing)."""
import pytest
import torch

from bench.harness import check_method, lm_inputs
from bench.methods import make_method, simnpo_from_token_ce
from simnpo_fast.synthetic_batch import lm_batch


@pytest.fixture(scope="module")
def batch():
    return lm_batch(3, 17, 24, 90, dtype=torch.float32, prompt_frac=0.25, seed=3)


@pytest.mark.parametrize("name", ["naive", "chunked", "torch_lce", "cce", "liger_chunked"])
def test_method_matches_oracle_fp32(name, batch):
    m = make_method(name, "cpu")
    if m.fn is None:
        pytest.skip(m.note)
    r = check_method(m.fn, *batch)
    assert r["ok"], r


def test_wrong_method_is_caught(batch):
    """A peer that computes something else (token-mean CE instead of SimNPO) fails the check."""
    wrong = simnpo_from_token_ce(lambda x, w, t: torch.nn.functional.cross_entropy(x @ w.T, t, reduction="none") * 2)
    assert not check_method(wrong, *batch)["ok"]


def test_bf16_check_judges_gradients_by_norm():
    """bf16: the naive path passes on the norm criterion at a bench-like logit scale; a 10% error fails."""
    h, w, lab = lm_inputs(64, 48, 300, torch.bfloat16, seq_len=16, seed=1)
    naive = make_method("naive").fn
    r = check_method(naive, h, w, lab)
    assert r["ok"] and r["criterion"] == "norm", r
    assert not check_method(lambda *a: 1.1 * naive(*a), h, w, lab)["ok"]


def test_unavailable_triton_on_cpu_without_interpreter():
    for name in ("triton", "triton-gemm", "liger_flce"):
        m = make_method(name, "cpu", interpreter=False)
        assert m.fn is None and "CUDA" in m.note
