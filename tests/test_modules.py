"""nn.Module forms and the combined UnlearningLoss, against the fp64 oracle of test_ops."""
import pytest
import torch

import simnpo_fast as sf
from tests.test_ops import make, oracle_loss, relerr


def test_fused_simnpo_module_equals_function_and_oracle():
    h, W, b, labels, _ = make(4, 24, 37, 1000)
    crit = sf.FusedSimNPOLoss(beta=4.5, gamma=0.5)
    got = crit(h, W, labels, b)
    want = oracle_loss("simnpo", h, W, labels, b, beta=4.5, gamma=0.5)
    assert abs(float(got - want)) < 1e-5 * abs(float(want))
    assert "SimNPO" in repr(crit)


@pytest.mark.parametrize("objective", ["simnpo", "npo", "ga", "graddiff"])
def test_unlearning_loss_combines_terms(objective):
    hf, W, b, yf, ref = make(4, 24, 37, 1000, seed=1)
    hr, _, _, yr, _ = make(6, 20, 37, 1000, seed=2)
    crit = sf.UnlearningLoss(objective, forget_weight=0.125, retain_weight=1.0, beta=4.5 if objective != "npo" else 0.1)
    out = crit(W, hf, yf, hr, yr, bias=b, ref_logp_sum=ref if objective == "npo" else None)
    kind = {"simnpo": "simnpo", "npo": "npo", "ga": "ga", "graddiff": "ga"}[objective]
    beta = 0.1 if objective == "npo" else 4.5
    lf = oracle_loss(kind, hf, W, yf, b, beta=beta, ref=ref)
    want = 0.125 * lf
    if objective != "ga":  # plain GA has no retain term
        want = want + oracle_loss("nll", hr, W, yr, b)
        assert relerr(out.terms["retain_loss"], oracle_loss("nll", hr, W, yr, b)) < 1e-6
    else:
        assert "retain_loss" not in out.terms
    assert relerr(out.loss, want) < 1e-5
    assert relerr(out.terms["forget_loss"], lf) < 1e-5
    loss, terms = out
    gW = torch.autograd.grad(loss, [W, hf])
    gW_want = torch.autograd.grad(want, [W, hf])
    for a, c in zip(gW, gW_want):
        assert relerr(a, c) < 1e-5
    assert torch.equal(terms["forget_n_tokens"], (yf[:, 1:] != -100).sum(1))


def test_unlearning_loss_config_errors():
    with pytest.raises(ValueError, match="unknown objective"):
        sf.UnlearningLoss("dpo")
    for fw, rw in ((float("nan"), 1.0), (1.0, float("inf")), (-1.0, 1.0), ("a", 1.0), (1.0, float("nan"))):
        with pytest.raises(ValueError, match=r"weights must be finite and >= 0"):  # issue 24 item 9
            sf.UnlearningLoss("simnpo", forget_weight=fw, retain_weight=rw)
    with pytest.raises(ValueError, match=r"weights must be finite"):
        sf.UnlearningLoss("ga", retain_weight=float("inf"))  # not silently zeroed by a method without retain
    with pytest.raises(ValueError, match="beta"):
        sf.UnlearningLoss("simnpo", beta=0)
    hf, W, b, yf, ref = make(2, 10, 37, 1000)
    with pytest.raises(ValueError, match="ref_logp_sum"):
        sf.UnlearningLoss("npo")(W, hf, yf, hf, yf)
    with pytest.raises(ValueError, match="retain batch"):
        sf.UnlearningLoss("simnpo")(W, hf, yf)
