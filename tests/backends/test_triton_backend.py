"""The public losses with backend="triton" (under TRITON_INTERPRET=1) against the fp64 reference oracle and
against the chunked backend: values and gradients w.r.t. hidden, weight and bias, plus dispatch rules.

Inputs are scaled so that every objective has O(1) values and gradients (SimNPO with a margin that puts its
sigmoid weight near 1/2), hence the relative tolerances below are meaningful.
"""
import os

import pytest
import torch

import simnpo_fast as sf
from simnpo_fast.backends import ReferenceBackend, get_backend
from simnpo_fast.backends.triton import TritonBackend

from tests.backends.triton_common import LOSSES, batch, check_all_ignored, rel_err, run  # noqa: F401
ORACLE = ReferenceBackend(torch.float64)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton needs TRITON_INTERPRET=1 (conftest sets it) or a GPU")


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_fp64_oracle(loss, bias):
    h, w, b, lab = batch(bias=bias)
    out, grads = run(loss, h, w, b, lab, "triton")
    ref, ref_grads = run(loss, h, w, b, lab, ORACLE)
    assert out.abs().max() > 1e-2, "test inputs must give an O(1) loss"
    assert rel_err(out, ref) < 1e-5
    assert len(grads) == (3 if bias else 2)
    for g, r, name in zip(grads, ref_grads, ("hidden", "weight", "bias")):
        assert g.dtype == torch.float32
        assert rel_err(g, r) < 2e-5, name


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
    h, w, b, lab = batch(seed=1)
    kw = {"reduction": reduction}
    if reduction == "sum":
        kw["normalizer"] = 7.0
    for loss in ("simnpo", "nll"):
        out, grads = run(loss, h, w, b, lab, "triton", **kw)
        ref, ref_grads = run(loss, h, w, b, lab, ORACLE, **kw)
        assert out.shape == ref.shape
        assert rel_err(out, ref) < 1e-5
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) < 2e-5
    if reduction == "none":
        assert out[2] == 0, "a sequence without answer tokens contributes 0"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_vs_fp64_truth(dtype):
    """16-bit hidden/weight: the kernels upcast on load and accumulate in fp32, so the loss matches the fp64
    truth on the same rounded inputs at fp32 level; gradients are returned in the input dtype, so they carry
    one final rounding: 2^-11 (fp16) or 2^-8 (bf16) relative to each element, bounded here by 2 ulps of
    the largest gradient."""
    h, w, b, lab = batch(dtype=dtype, seed=2)
    out, grads = run("simnpo", h, w, b, lab, "triton")
    ref, ref_grads = run("simnpo", h, w, b, lab, ORACLE)
    assert rel_err(out, ref) < 1e-5
    eps = torch.finfo(dtype).eps
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert rel_err(g, r) < 2 * eps


def test_single_token_and_2d_hidden_no_shift():
    h, w, b, lab = batch(single=True, seed=3)
    out, grads = run("simnpo", h, w, b, lab, "triton")
    ref, ref_grads = run("simnpo", h, w, b, lab, ORACLE)
    assert rel_err(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 2e-5
    # [N, d] hidden with labels [N], no shift: one sequence
    h2, lab2 = h[0], lab[0]
    out, grads = run("nll", h2, w, b, lab2, "triton", shift=False)
    ref, ref_grads = run("nll", h2, w, b, lab2, ORACLE, shift=False)
    assert rel_err(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 2e-5


def test_all_ignored_gives_zero_loss_and_grads():
    check_all_ignored("triton", seed=4)


@pytest.mark.parametrize("loss", ["simnpo", "npo", "logp"])
def test_triton_and_chunked_agree(loss):
    h, w, b, lab = batch(B=3, T=13, D=36, V=97, seed=5)
    out_t, g_t = run(loss, h, w, b, lab, "triton")
    out_c, g_c = run(loss, h, w, b, lab, "chunked")
    assert rel_err(out_t, out_c) < 1e-5
    for a, c in zip(g_t, g_c):
        assert rel_err(a, c) < 2e-5


def test_dispatch_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("SIMNPO_FAST_BACKEND", raising=False)
    assert get_backend(None, cpu).name == "chunked"           # CPU tensors default to chunked
    assert get_backend("triton", cpu).name == "triton"        # forced, allowed under the interpreter
    monkeypatch.setenv("SIMNPO_FAST_BACKEND", "triton")
    assert get_backend(None, cpu).name == "triton"            # environment variable forces it too
    assert get_backend("chunked", cpu).name == "chunked"      # the argument wins over the variable
    assert TritonBackend().supports(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not TritonBackend().supports(cpu)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        get_backend("triton", cpu)
    h, w, b, lab = batch()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sf.simnpo_loss(h, w, lab, backend="triton")


def test_fp64_inputs_are_delegated():
    h, w, b, lab = batch(dtype=torch.float64, seed=6)
    out, grads = run("simnpo", h, w, b, lab, "triton")
    ref, ref_grads = run("simnpo", h, w, b, lab, ORACLE)
    assert rel_err(out, ref) < 1e-12
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-10
