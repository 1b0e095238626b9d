"""Shared inputs and helpers of the Triton backend tests (both GPU designs are checked the same way)."""
import pytest
import torch

import simnpo_fast as sf

IGN = -100


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


def check_all_ignored(backend, seed: int) -> None:
    """A fully masked batch: loss 0, zero gradients, a warning."""
    h, w, b, lab = batch(seed=seed)
    lab[:] = IGN
    with pytest.warns(UserWarning):
        out, grads = run("simnpo", h, w, b, lab, backend)
    assert out.item() == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads)
