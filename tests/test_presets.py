"""Issue 23 point 4: the MUSE presets follow the SimNPO *paper's* loss, not the authors' MUSE code. Both are written
here: the paper's ``-(2/beta) logsigmoid(-(beta/|y|) log p(y|x) - gamma)`` on the answer tokens, and the code's term
(OPTML-Group/Unlearn-Simple MUSE/baselines/baselines/iterative.py ``IterativeUnlearner.compute_loss``, loss type
``simnpo``: ``-F.logsigmoid(beta * (-outputs_f.logits - gamma)).mean() * 2 / beta``, the mean over every element
of the raw logits). The preset's loss equals the first and not the second."""
import pytest
import torch
import torch.nn.functional as F

import simnpo_fast as sf
from simnpo_fast.hf import preset_loss_kwargs


def _batch():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 24, 16, generator=g, dtype=torch.float64)
    W = torch.randn(64, 16, generator=g, dtype=torch.float64) / 4
    y = torch.randint(0, 64, (3, 24), generator=g)
    y[:, :5] = -100
    return h, W, y


def paper_simnpo(h, W, y, beta, gamma):
    lp = torch.log_softmax(h[:, :-1] @ W.T, -1)
    t = y[:, 1:]
    m = t != -100
    logp = (lp.gather(-1, t.clamp(min=0)[..., None])[..., 0] * m).sum(1)
    return (-(2 / beta) * F.logsigmoid(-(beta / m.sum(1).double()) * logp - gamma)).mean()


def muse_code_simnpo(h, W, beta, gamma):
    logits = h @ W.T  # outputs_f.logits: every position, every vocabulary entry
    return -F.logsigmoid(beta * (-logits - gamma)).mean() * 2 / beta


@pytest.mark.parametrize("name", ["muse_news", "muse_books"])
def test_muse_presets_follow_the_paper_not_the_muse_code(name):
    kw = preset_loss_kwargs(name)
    h, W, y = _batch()
    got = sf.simnpo_loss(h, W, y, beta=kw["beta"], gamma=kw["gamma"])
    paper = paper_simnpo(h, W, y, kw["beta"], kw["gamma"])
    code = muse_code_simnpo(h, W, kw["beta"], kw["gamma"])
    assert torch.allclose(got, paper, rtol=1e-12, atol=0)
    assert abs(float(got - code)) > 0.1 * abs(float(paper))


def test_tofu_preset_margin_is_the_papers():
    """TOFU's code computes beta * (NLL/|y| - gamma), i.e. the paper's margin times beta; the presets' gamma is 0,
    where both agree, and the library's gamma is the paper's (not scaled by beta)."""
    kw = preset_loss_kwargs("tofu_forget10")
    assert kw["gamma"] == 0.0 and kw["normalize"] == "sequence"
    h, W, y = _batch()
    beta, gamma = 4.5, 0.7
    got = sf.simnpo_loss(h, W, y, beta=beta, gamma=gamma)
    assert torch.allclose(got, paper_simnpo(h, W, y, beta, gamma), rtol=1e-12, atol=0)
    code_margin = gamma / beta  # the TOFU code's gamma that gives the paper's margin gamma
    lp = torch.log_softmax(h[:, :-1] @ W.T, -1)
    t, m = y[:, 1:], y[:, 1:] != -100
    nll = -(lp.gather(-1, t.clamp(min=0)[..., None])[..., 0] * m).sum(1)
    code = (-F.logsigmoid(beta * (nll / m.sum(1) - code_margin))).mean() * 2 / beta
    assert torch.allclose(got, code, rtol=1e-12, atol=0)
