"""The backend contract on one HeadInputs with a row index (packed rows = x[rows]): every backend's
logprob_forward / logprob_backward / fused_seq_loss / fused_kl against an fp64 oracle written here, dx shaped
like x and zero off the rows."""
import os

import pytest
import torch

from simnpo_fast.backends import GradNeeds, HeadInputs, get_backend

NAMES = ["chunked", "reference"]
if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    NAMES += ["triton", "triton-gemm"]
ALL = GradNeeds(True, True, True)


def _inputs(seed=0, N=40, d=16, V=70):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    w = torch.randn(V, d, generator=g) / d ** 0.5 * 3
    b = torch.randn(V, generator=g) * 0.1
    rows = torch.tensor([1, 2, 3, 7, 8, 20, 21, 22, 23, 24, 30, 39])
    targets = torch.randint(0, V, (rows.numel(),), generator=g)
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3])
    return HeadInputs(x, w, b, targets, rows=rows, seq_ids=seq_ids, offsets=[0, 3, 5, 10, 12], num_seqs=4)


def _oracle_lp(inp):
    x, w, b = inp.x.double(), inp.w.double(), inp.b.double()
    z = x[inp.rows] @ w.t() + b
    return torch.log_softmax(z, -1).gather(1, inp.targets[:, None])[:, 0]


def _leaves(inp):
    return [t.detach().double().requires_grad_() for t in (inp.x, inp.w, inp.b)]


def _close(got, want, tol=1e-5):
    assert got is not None
    err = (got.double() - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err


@pytest.mark.parametrize("name", NAMES)
def test_logprob_forward_and_backward(name):
    be, inp = get_backend(name, torch.device("cpu")), _inputs()
    lp, lse = be.logprob_forward(inp)
    _close(lp, _oracle_lp(inp))
    grad_lp = torch.linspace(-1, 1, inp.num_rows)
    dx, dw, db = be.logprob_backward(inp, lse, lp, grad_lp, ALL)
    leaves = _leaves(inp)
    (_oracle_lp(inp.replace(x=leaves[0], w=leaves[1], b=leaves[2])) * grad_lp.double()).sum().backward()
    assert dx.shape == inp.x.shape
    for got, leaf in zip((dx, dw, db), leaves):
        _close(got, leaf.grad)
    off = torch.ones(inp.x.shape[0], dtype=torch.bool)
    off[inp.rows] = False
    assert float(dx[off].abs().max()) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_fused_seq_loss(name):
    be, inp = get_backend(name, torch.device("cpu")), _inputs(seed=1)

    def weight_fn(logp, idx):  # f_i = -logp_i^2 / 100, g_i = -2 logp_i / 100 (any smooth per-sequence loss)
        return -logp ** 2 / 100, -2 * logp / 100

    loss, logp_sum, dx, dw, db = be.fused_seq_loss(inp, weight_fn, ALL)
    leaves = _leaves(inp)
    lp = _oracle_lp(inp.replace(x=leaves[0], w=leaves[1], b=leaves[2]))
    want_logp = torch.zeros(4, dtype=torch.float64).index_add(0, inp.seq_ids, lp)
    (-(want_logp ** 2) / 100).sum().backward()
    _close(logp_sum, want_logp.detach())
    _close(loss, (-(want_logp ** 2) / 100).sum().detach())
    for got, leaf in zip((dx, dw, db), leaves):
        _close(got, leaf.grad)


@pytest.mark.parametrize("name", NAMES)
def test_fused_kl(name):
    be, inp = get_backend(name, torch.device("cpu")), _inputs(seed=2)
    g = torch.Generator().manual_seed(3)
    ref = inp.replace(x=torch.randn(40, 8, generator=g), w=torch.randn(70, 8, generator=g) / 3, b=None)
    loss, dx, dw, db = be.fused_kl(inp, ref, 0.25, ALL)
    leaves = _leaves(inp)
    lp = torch.log_softmax(leaves[0][inp.rows] @ leaves[1].t() + leaves[2], -1)
    lq = torch.log_softmax(ref.x.double()[inp.rows] @ ref.w.double().t(), -1)
    want = 0.25 * (lq.exp() * (lq - lp)).sum()
    want.backward()
    _close(loss, want.detach())
    for got, leaf in zip((dx, dw, db), leaves):
        _close(got, leaf.grad)
