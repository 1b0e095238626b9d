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

IGN = -100
ORACLE = ReferenceBackend(torch.float64)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton needs TRITON_INTERPRET=1 (conftest sets it) or a GPU")


def batch(B=3, T=11, D=40, V=150, dtype=torch.float32, bias=True, seed=0, single=False):
    """Non-power-of-two shapes; a prompt prefix, padding, one sequence with no answer token."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=gen).to(dtype)
    w = (torch.randn(V, D, generator=gen) / D ** 0.5).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.3).to(dtype) if bias else None
    lab = torch.randint(0, V, (B, T), generator=gen)
    lab[0, :4] = IGN                       # prompt
    lab[1, -3:] = IGN                      # padding
    if B > 2:
        lab[2, :] = IGN                    # an empty sequence
    if single:
        lab[1, :] = IGN
        lab[1, 5] = 7                      # one answer token
    return h, w, b, lab


LOSSES = {
    "simnpo": lambda h, w, lab, **k: sf.simnpo_loss(h, w, lab, beta=2.5, gamma=12.0, **k),
    "npo": lambda h, w, lab, **k: sf.npo_loss(h, w, lab, torch.tensor([-40.0, -35.0, -30.0]), beta=0.1, **k),
    "nll": lambda h, w, lab, **k: sf.nll_loss(h, w, lab, **k),
    "ga": lambda h, w, lab, **k: sf.ga_loss(h, w, lab, **k),
    "logp": lambda h, w, lab, **k: sf.sequence_logprob(h, w, lab, **k)[0].sum() / 20.0,
}


def run(loss, h, w, b, lab, backend, **kw):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (h, w, b)]
    out = LOSSES[loss](leaves[0], leaves[1], lab, bias=leaves[2], backend=backend, **kw)
    val = out.sum() if out.dim() else out
    grads = torch.autograd.grad(val, [t for t in leaves if t is not None])
    return out.detach(), grads


def rel_err(a, ref):
    ref = ref.double()
    return (a.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)


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
    h, w, b, lab = batch(seed=4)
    lab[:] = IGN
    with pytest.warns(UserWarning):
        out, grads = run("simnpo", h, w, b, lab, "triton")
    assert out.item() == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


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
