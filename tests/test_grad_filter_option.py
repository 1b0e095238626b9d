"""``grad_filter=`` on the nn.Module losses, the HF trainer and the trainer config (``loss.grad_filter``): the
option reaches the fused terms. Oracle: fp64 SimNPO written here, with the sequences that the row filter's rule
drops (saturation ``sigmoid((beta/n) logp + gamma) < tau``) removed from the sum by hand."""
import pytest
import torch
import torch.nn.functional as F

from simnpo_fast.backends.filter import GradFilter
from simnpo_fast.batch import ForgetRetainBatch
from simnpo_fast.criterion import Head
from simnpo_fast.errors import ConfigError
from simnpo_fast.modules import FusedSimNPOLoss, UnlearningLoss
from simnpo_fast.train.config_io import load_config
from simnpo_fast.train.setup import build_criterion

BETA, GAMMA, TAU = 2.5, 0.0, 0.01


def _batch(seed=0, B=6, T=12, d=16, V=64):
    """Rows 0-2 memorised (SimNPO weight near its bound), rows 3-5 with unlikely targets (weight saturated)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, d, generator=g) / d ** 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    h = torch.randn(B, T, d, generator=g) * 0.3
    h[:3, :-1] += 12.0 * w[labels[:3, 1:]]
    h[3:] *= 3.0
    labels[:, :2] = -100
    return h, w, labels


def _oracle_grads(h, w, labels, drop_saturated: bool):
    """fp64 mean-over-sequences SimNPO; with ``drop_saturated`` the rows under TAU saturation contribute 0."""
    hh, ww = h.double().requires_grad_(), w.double().requires_grad_()
    logits = hh[:, :-1] @ ww.t()
    tgt = labels[:, 1:]
    m = tgt != -100
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    logp, n = (lp * m).sum(1), m.sum(1).double()
    f = -(2 / BETA) * F.logsigmoid(-(BETA / n) * logp - GAMMA)
    keep = torch.sigmoid((BETA / n) * logp.detach() + GAMMA) >= TAU if drop_saturated else torch.ones_like(m[:, 0])
    loss = f.sum() / len(f)
    dh, dw = torch.autograd.grad((f * keep).sum() / len(f), (hh, ww))
    return loss.detach(), dh, dw, keep


def _grads(loss_fn, h, w, labels):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = loss_fn(hh, ww, labels)
    dh, dw = torch.autograd.grad(loss, (hh, ww))
    return loss.detach().double(), dh.double(), dw.double()


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1e-12)


@pytest.mark.parametrize("spec", [GradFilter(rows=TAU), {"rows": TAU}])
def test_module_losses_apply_the_row_filter(spec):
    h, w, labels = _batch()
    loss0, dh0, dw0, keep = _oracle_grads(h, w, labels, drop_saturated=True)
    assert 0 < int(keep.sum()) < len(keep)  # the batch exercises the filter
    for fn in (lambda a, b, y: FusedSimNPOLoss(beta=BETA, gamma=GAMMA, backend="chunked", grad_filter=spec)(a, b, y),
               lambda a, b, y: UnlearningLoss("simnpo", beta=BETA, gamma=GAMMA, retain_weight=0.0,
                                              backend="chunked", grad_filter=spec)(b, a, y).loss):
        loss, dh, dw = _grads(fn, h, w, labels)
        assert _close(loss, loss0) and _close(dh, dh0) and _close(dw, dw0)
        assert (dh[~keep] == 0).all()  # a dropped sequence's backward is skipped
    # exact by default ("auto" on fp32) and with "off": the dropped rows' (small) gradients come back
    _, dhx, dwx, _ = _oracle_grads(h, w, labels, drop_saturated=False)
    for spec_exact in ("auto", "off", None):
        _, dh, dw = _grads(lambda a, b, y: FusedSimNPOLoss(beta=BETA, gamma=GAMMA, grad_filter=spec_exact)(a, b, y),
                           h, w, labels)
        assert _close(dh, dhx) and _close(dw, dwx)
        assert _close(dh[~keep], dhx[~keep], 1e-4) and dh[~keep].abs().max() > 0


def test_bad_spec_fails_at_construction():
    with pytest.raises(ValueError, match="grad_filter"):
        FusedSimNPOLoss(grad_filter="sometimes")
    with pytest.raises(ValueError, match="grad_filter.rows"):
        UnlearningLoss("simnpo", grad_filter={"rows": 2.0})


def test_trainer_config_key_reaches_the_criterion():
    assert build_criterion(load_config()).kw["grad_filter"] == "auto"
    cfg = load_config(overrides=["loss.grad_filter={rows: 0.01}", "loss.retain_weight=0", "loss.beta=2.5"])
    assert cfg.loss.grad_filter == {"rows": 0.01}
    crit = build_criterion(cfg)
    h, w, labels = _batch()
    _, dh0, dw0, _ = _oracle_grads(h, w, labels, drop_saturated=True)
    forget_only = ForgetRetainBatch(torch.zeros_like(labels), torch.ones_like(labels), labels, labels.shape[0])
    _, dh, dw = _grads(lambda a, b, y: crit(Head(b), a, forget_only).loss, h, w, labels)
    assert _close(dh, dh0) and _close(dw, dw0) and (dh[3:] == 0).all()
    for bad in ("loss.grad_filter=sometimes", "loss.grad_filter={rows: 1.5}", "loss.grad_filter={row: 0.1}"):
        with pytest.raises(ConfigError, match="loss.grad_filter"):
            load_config(overrides=[bad])
