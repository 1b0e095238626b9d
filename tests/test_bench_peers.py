"""The benchmark's peer wrappers compute SimNPO like the fp64 oracle (tiny sizes; no timing)."""
import pytest
import torch

pytest.importorskip("bench.peers")
from bench import peers  # noqa: E402
from simnpo_fast._batch import lm_batch  # noqa: E402


@pytest.fixture(scope="module")
def batch():
    return lm_batch(3, 17, 24, 90, dtype=torch.float32, prompt_frac=0.25, seed=3)


@pytest.mark.parametrize("name", ["naive", "chunked", "torch_lce", "cce", "liger_chunked"])
def test_method_matches_oracle_fp32(name, batch):
    m = peers.make_method(name, "cpu")
    if m.fn is None:
        pytest.skip(m.note)
    r = peers.check_method(m.fn, *batch)
    assert r["ok"], r


def test_wrong_method_is_caught(batch):
    """A peer that computes something else (token-mean CE instead of SimNPO) fails the check."""
    wrong = peers.simnpo_from_token_ce(lambda x, w, t: torch.nn.functional.cross_entropy(x @ w.T, t, reduction="none") * 2)
    assert not peers.check_method(wrong, *batch)["ok"]


def test_unavailable_triton_on_cpu_without_interpreter():
    assert peers.make_method("triton", "cpu", interpreter=False).fn is None
    assert peers.make_method("liger_flce", "cpu", interpreter=False).fn is None
