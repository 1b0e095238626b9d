"""16-bit inputs on CPUs with slow 16-bit GEMMs (backends/lowp.py): the probe, its override, and both tile paths
(native 16-bit tiles and fp32 tile products) of the chunked backend against an fp64 oracle, whatever this
machine's probe decides."""
import pytest
import torch

import simnpo_fast as sf
from simnpo_fast.backends import ChunkedBackend, ReferenceBackend, lowp
from simnpo_fast.synthetic_batch import lm_batch


def test_probe_is_measured_once_and_reports_rates():
    a = lowp.probe("cpu", torch.bfloat16)
    assert lowp.probe("cpu", torch.bfloat16) is a  # cached per process
    assert a["lowp_gflops"] > 0 and a["fp32_gflops"] > 0
    assert a["slow"] == (a["ratio"] > lowp.SLOW_RATIO)
    rep = lowp.report("cpu")
    assert set(rep) >= {"mode", "bfloat16", "float16"}


@pytest.mark.parametrize("mode,dtype,want", [("native", torch.bfloat16, torch.bfloat16),
                                             ("fp32", torch.bfloat16, torch.float32),
                                             ("fp32", torch.float16, torch.float32),
                                             ("fp32", torch.float32, torch.float32),
                                             ("auto", torch.float32, torch.float32)])
def test_override(monkeypatch, mode, dtype, want):
    monkeypatch.setenv("SIMNPO_FAST_LOWP_GEMM", mode)
    assert lowp.gemm_dtype(torch.zeros(2, 2, dtype=dtype)) == want


def test_bad_override_names_the_variable(monkeypatch):
    monkeypatch.setenv("SIMNPO_FAST_LOWP_GEMM", "fast")
    with pytest.raises(ValueError, match="SIMNPO_FAST_LOWP_GEMM"):
        lowp.gemm_dtype(torch.zeros(2, 2, dtype=torch.bfloat16))


def _run(h, w, lab, backend, bias=None):
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = sf.simnpo_loss(hh, ww, lab, bias=bias, backend=backend)
    loss.backward()
    return loss.detach().double(), hh.grad, ww.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widened_tiles_are_fp32_accurate_and_native_tiles_stay_16bit_accurate(monkeypatch, dtype):
    # two long sequences (R forced small: the two-pass path) and short ones, prompt rows masked
    h, w, lab = lm_batch(3, 48, 64, 300, dtype=dtype, prompt_frac=0.25, seed=1)
    want = _run(h, w, lab, ReferenceBackend(torch.float64))
    errs = {}
    for mode in ("native", "fp32"):
        monkeypatch.setenv("SIMNPO_FAST_LOWP_GEMM", mode)
        for be in (ChunkedBackend(), ChunkedBackend(chunk_rows=16)):
            got = _run(h, w, lab, be)
            assert got[1].dtype == dtype and got[2].dtype == dtype  # gradients in the input dtype
            errs[mode, be._chunk_rows] = max(_rel(a, b) for a, b in zip(got, want))
    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -10
    for r in (None, 16):
        assert errs["native", r] <= 8 * unit
        # fp32 products: no 16-bit logits (the native tiles' error is 10-500x this here)
        assert errs["fp32", r] <= 2 ** -12


def test_widened_kl_and_generic_path_match_fp64(monkeypatch):
    monkeypatch.setenv("SIMNPO_FAST_LOWP_GEMM", "fp32")
    h, w, lab = lm_batch(2, 32, 32, 200, dtype=torch.bfloat16, prompt_frac=0.0, seed=2)
    hr, wr = h.detach() * 0.9, w.detach() * 1.1
    outs = {}
    for name, be in (("fused", "chunked"), ("oracle", ReferenceBackend(torch.float64))):
        hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        kl = sf.kl_loss(hh, ww, lab, hr, wr, backend=be)
        lp, _ = sf.sequence_logprob(hh, ww, lab, backend=be)
        (kl + lp.sum() * 1e-2).backward()
        outs[name] = (kl.detach(), hh.grad, ww.grad)
    for a, b in zip(outs["fused"], outs["oracle"]):
        assert _rel(a, b) <= 2 ** -8
