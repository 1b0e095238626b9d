"""The tile-product engine of the chunked backend (backends/gemm.py): the rule, its override, both engines' products
against fp64, and the whole fused loss under each engine against the fp64 oracle."""
import pytest
import torch

import simnpo_fast as sf
from simnpo_fast.backends import gemm
from simnpo_fast.synthetic_batch import lm_batch

ONEDNN = gemm.onednn_available()


@pytest.mark.parametrize("avx512", [True, False])
def test_rule_and_override(monkeypatch, avx512):
    monkeypatch.setattr(gemm, "_avx512", lambda: avx512)
    x32, x64, x16 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.bfloat16)
    dnn = "onednn" if ONEDNN else "torch"
    monkeypatch.setenv("SIMNPO_FAST_TILE_GEMM", "auto")
    assert gemm.engine(x32, "logits") == dnn
    assert gemm.engine(x32, "dx") == (dnn if avx512 else "torch")  # AVX2: oneDNN's dX tiles measured slower
    for p in gemm.PRODUCTS:  # no fp64 oneDNN; torch.mm's bf16 is oneDNN already
        assert gemm.engine(x64, p) == gemm.engine(x16, p) == "torch"
    monkeypatch.setenv("SIMNPO_FAST_TILE_GEMM", "torch")
    assert gemm.engine(x32, "logits") == gemm.engine(x32, "dx") == "torch"
    monkeypatch.setenv("SIMNPO_FAST_TILE_GEMM", "onednn")
    assert gemm.engine(x32, "logits") == gemm.engine(x32, "dx") == dnn
    rep = gemm.report()
    assert rep["mode"] == "onednn" and rep["onednn"] == ONEDNN and rep["avx512"] == avx512
    assert rep["bf16"] == {"logits": "torch", "dx": "torch"} and rep["fp32"] == {"logits": dnn, "dx": dnn}
    with pytest.raises(ValueError, match="product"):
        gemm.engine(x32, "dw")


def test_bad_override_names_the_variable(monkeypatch):
    monkeypatch.setenv("SIMNPO_FAST_TILE_GEMM", "mkl")
    with pytest.raises(ValueError, match="SIMNPO_FAST_TILE_GEMM"):
        gemm.engine(torch.zeros(2, 2))


@pytest.mark.parametrize("mode", ["torch", "onednn"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("view", [False, True])
def test_products_against_fp64(monkeypatch, mode, bias, view):
    monkeypatch.setenv("SIMNPO_FAST_TILE_GEMM", mode)
    g = torch.Generator().manual_seed(0)
    R, d, V = 37, 48, 301  # odd sizes: every edge of the engines' blocking
    x, p = torch.randn(R, d, generator=g), torch.randn(R, V, generator=g)
    w = torch.randn(V, d + 5, generator=g)[:, 2 : 2 + d] if view else torch.randn(V, d, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    asked = []

    def take(rows):
        asked.append(rows)
        return torch.empty(rows, V)

    z = gemm.logits(x, w, b, take)
    want = x.double() @ w.double().t() + (0 if b is None else b.double())
    assert z.shape == (R, V) and z.dtype == torch.float32
    assert (z.double() - want).abs().max() <= 1e-5 * want.abs().max()
    # the buffer is asked for exactly when the engine writes in place (a W view takes torch.mm)
    assert asked == ([] if gemm.engine(w, "logits") == "onednn" and not view else [R])
    scale = torch.rand(R, generator=g) + 0.5
    for s in (None, scale):
        out = torch.full((R, d), float("nan"))
        got = gemm.rows_times_w(p, w, out, s)
        want = p.double() @ w.double()
        if s is not None:
            want = want * s.double()[:, None]
        assert got.data_ptr() == out.data_ptr()
        assert (out.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("mode", ["torch", "onednn"])
def test_fused_simnpo_under_each_engine_matches_fp64(monkeypatch, mode):
    """SimNPO on a batch whose forget set is memorised (target probabilities near 1) and with a bias."""
    monkeypatch.setenv("SIMNPO_FAST_TILE_GEMM", mode)
    h, w, lab = lm_batch(3, 40, 32, 500, dtype=torch.float32, seed=3)
    w = w * 8.0  # peaked rows: p_t near 1 for most tokens
    b = torch.randn(500, generator=torch.Generator().manual_seed(1))
    # the regime this test is for: most answer tokens memorised (p_t > 0.99)
    z = (h[:, :-1].double() @ w.double().t() + b.double()).log_softmax(-1)
    tgt, valid = lab[:, 1:].clamp_min(0), lab[:, 1:] != -100
    p_t = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).exp()[valid]
    assert (p_t > 0.99).float().mean() > 0.5

    def run(dtype, backend):
        hh = h.to(dtype).detach().requires_grad_()
        ww = w.to(dtype).detach().requires_grad_()
        bb = b.to(dtype).detach().requires_grad_()
        loss = sf.simnpo_loss(hh, ww, lab, bias=bb, backend=backend)
        loss.backward()
        return loss.double(), hh.grad.double(), ww.grad.double(), bb.grad.double()

    got, want = run(torch.float32, "chunked"), run(torch.float64, "reference")
    for a, e in zip(got, want):
        assert (a - e).abs().max() <= 2e-5 * max(e.abs().max().item(), 1e-12)
