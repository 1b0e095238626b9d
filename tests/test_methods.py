"""The method registry: lookup errors, and every built-in method's objective (against the formulas, written
here), retain term, reference need and forget normaliser; a new method is one registration."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import simnpo_fast as sf
from simnpo_fast.methods import base as registry
from simnpo_fast.objectives import SequenceObjective

LOGP = torch.tensor([-3.0, -0.5, -12.0, 0.0], dtype=torch.float64)
N = torch.tensor([4, 1, 6, 0])


def _formula(name, beta, gamma, ref):
    n = N.clamp(min=1).double()
    if name == "simnpo":
        f = -(2 / beta) * F.logsigmoid(-(beta / n) * LOGP - gamma)
    elif name == "npo":
        f = -(2 / beta) * F.logsigmoid(-beta * (LOGP - ref))
    else:
        f = -LOGP if name == "finetune" else LOGP
    return torch.where(N > 0, f, torch.zeros_like(f))


# name: (retain, reference, per, default beta)
EXPECTED = {"simnpo": ("nll", "none", "sequence", 2.5), "npo": ("nll", "logp", "sequence", 0.1),
            "ga": ("none", "none", "token", None), "graddiff": ("nll", "none", "token", None),
            "finetune": ("none", "none", "token", None)}


def test_builtin_methods_are_registered():
    assert set(EXPECTED) <= set(sf.method_names())
    assert sf.method_names() == sorted(sf.method_names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_method_fields_and_objective_formula(name):
    retain, reference, per, default_beta = EXPECTED[name]
    m = sf.get_method(name)
    assert (m.name, m.retain, m.reference, m.per) == (name, retain, reference, per)
    ref = torch.tensor([-2.0, -1.0, -11.0, -1.0], dtype=torch.float64)
    extra = {"ref_logp_sum": ref} if reference == "logp" else {}
    for beta, gamma in ((None, 0.0), (4.5, 0.3)):
        obj = m.forget_objective(beta=beta, gamma=gamma)
        assert isinstance(obj, SequenceObjective) and obj.per == per
        b = default_beta if beta is None else beta
        want = _formula(name, b, gamma if name == "simnpo" else 0.0, ref)
        torch.testing.assert_close(obj(LOGP, N, **extra), want, rtol=1e-12, atol=1e-12)
    # the normaliser of a mean: sequences with an answer token, or answer tokens
    assert m.forget_objective().denominator(N) == (3 if per == "sequence" else 11)


def test_get_method_errors_and_case():
    assert sf.get_method("SimNPO") is sf.get_method("simnpo")
    with pytest.raises(ValueError, match=r"unknown objective 'dpo'.*finetune, ga, graddiff, idk_dpo, npo, simnpo"):
        sf.get_method("dpo")
    with pytest.raises(ValueError, match="unknown objective"):
        sf.get_method(None)
    with pytest.raises(ValueError, match="retain must be one of"):
        sf.Method("x", registry.get_method("ga").forget_objective, retain="kl2")
    with pytest.raises(ValueError, match="reference must be one of"):
        sf.Method("x", registry.get_method("ga").forget_objective, reference="model")
    with pytest.raises(ValueError, match="lower-case"):
        sf.Method("X", registry.get_method("ga").forget_objective)
    with pytest.raises(ValueError, match="already registered"):
        sf.register_method(dataclasses.replace(sf.get_method("ga"), retain="nll"))
    assert sf.register_method(sf.get_method("ga")) is sf.get_method("ga")  # the same method again: no-op


class _Margin(SequenceObjective):
    """A toy forget objective for the registry test: f_i = softplus(logp_sum_i / n_i + c)."""

    name = "margin"
    per = "sequence"

    def __init__(self, c):
        self.c = c

    def per_sequence(self, logp_sum, n_tokens, **extra):
        return F.softplus(logp_sum / n_tokens.clamp(min=1) + self.c)


def test_a_new_method_is_one_registration(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    sf.register_method(sf.Method("margin", lambda beta=None, gamma=0.0: _Margin(gamma), retain="nll"))
    assert "margin" in sf.method_names()
    from tests.test_ops import make, oracle_logp

    hf, W, b, yf, _ = make(3, 12, 16, 50, seed=4)
    hr, _, _, yr, _ = make(2, 10, 16, 50, seed=5)
    out = sf.UnlearningLoss("margin", gamma=0.25, retain_weight=0.5)(W, hf, yf, hr, yr, bias=b)
    s, n = oracle_logp(hf, W, yf, b)
    f = torch.where(n > 0, F.softplus(s / n.clamp(min=1) + 0.25), torch.zeros_like(s))
    rs, rn = oracle_logp(hr, W, yr, b)
    want = f.sum() / (n > 0).sum() + 0.5 * (-rs.sum() / rn.sum())
    got, want = float(out.loss.detach()), float(want.detach())
    assert abs(got - want) < 1e-5 * abs(want)
