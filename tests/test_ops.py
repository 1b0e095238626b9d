"""Fused losses vs an independent fp64 naive oracle written here from the formulas.

The oracle never calls into simnpo_fast: it materialises the fp64 logits of every position, applies the HF
shift by hand and the loss formulas of the SimNPO / NPO papers.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import simnpo_fast as sf
from simnpo_fast.backends import ChunkedBackend, ReferenceBackend

# ----------------------------------------------------------------------------------------------------------
# oracle


def oracle_logp(h, W, labels, b=None, ignore=-100):
    """fp64 (logp_sum [B], n [B]) with the HF shift, computed position by position."""
    h, W = h.double(), W.double()
    b = None if b is None else b.double()
    if h.dim() == 2:
        h, labels = h[None], labels[None]
    logits = h[:, :-1] @ W.T + (0 if b is None else b)
    logp = torch.log_softmax(logits, dim=-1)
    tgt = labels[:, 1:]
    mask = tgt != ignore
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return tok.sum(1), mask.sum(1)


def oracle_loss(kind, h, W, labels, b=None, reduction="mean", normalizer=None, beta=None, gamma=0.0, ref=None):
    s, n = oracle_logp(h, W, labels, b)
    if beta is None:  # the library defaults: SimNPO 2.5, NPO 0.1
        beta = 0.1 if kind == "npo" else 2.5
    valid = n > 0
    nn_ = n.clamp(min=1).double()
    if kind == "simnpo":
        f = -(2 / beta) * F.logsigmoid(-(beta / nn_) * s - gamma)
        denom = valid.sum()
    elif kind == "npo":
        f = -(2 / beta) * F.logsigmoid(-beta * (s - ref.double()))
        denom = valid.sum()
    elif kind == "nll":
        f = -s
        denom = n.sum()
    elif kind == "ga":
        f = s
        denom = n.sum()
    f = torch.where(valid, f, torch.zeros_like(f))
    if reduction == "none":
        return f
    if reduction == "sum":
        return f.sum() / (normalizer or 1.0)
    if normalizer is not None:
        return f.sum() / normalizer
    return f.sum() / max(int(denom), 1)


def call(kind, h, W, labels, b=None, ref=None, **kw):
    if kind == "simnpo":
        return sf.simnpo_loss(h, W, labels, bias=b, **kw)
    if kind == "npo":
        return sf.npo_loss(h, W, labels, ref, bias=b, **kw)
    if kind == "nll":
        return sf.nll_loss(h, W, labels, bias=b, **kw)
    if kind == "ga":
        return sf.ga_loss(h, W, labels, bias=b, **kw)
    raise AssertionError(kind)


def make(B, T, d, V, dtype=torch.float32, mask_p=0.3, empty_rows=(), bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, d, generator=g) * 1.0).to(dtype).requires_grad_()
    W = (torch.randn(V, d, generator=g) / math.sqrt(d) * 2).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < mask_p] = -100
    labels[:, : max(1, T // 4)] = -100  # a prompt
    for r in empty_rows:
        labels[r] = -100
    ref = torch.randn(B, generator=g) * 5 - 20
    return h, W, b, labels, ref


def relerr(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def grads(loss, params):
    params = [p for p in params if p is not None]
    return torch.autograd.grad(loss, params)


KINDS = ["simnpo", "npo", "nll", "ga"]

# B, T, d, V, empty rows, chunk rows (None = the default rule)
SHAPES = [
    (16, 37, 37, 1000, (3, 7), 5),  # tiny tiles: sequences longer than a tile take the two-pass route
    (1, 300, 256, 1000, (), None),  # one long sequence: the default rule grows the tile to hold it whole
    (16, 12, 37, 32001, (0,), None),  # big odd vocabulary, whole sequences per tile
    (4, 2, 256, 1000, (), 16),  # T = 2: one target per row
    (3, 1, 37, 1000, (), None),  # T = 1: no target at all after the shift
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_fp32_values_and_grads_vs_fp64_oracle(kind, shape):
    B, T, d, V, empty, rows = shape
    h, W, b, labels, ref = make(B, T, d, V, empty_rows=empty)
    backend = ChunkedBackend(chunk_rows=rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # T == 1 is a fully masked batch (warns; tested below)
        got = call(kind, h, W, labels, b, ref, backend=backend)
        want = oracle_loss(kind, h, W, labels, b, ref=ref)
    assert got.dtype == torch.float32
    assert abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want)))
    if T == 1:
        for g in grads(got, [h, W, b]):
            assert torch.count_nonzero(g) == 0
        return
    g_got = grads(got, [h, W, b])
    g_want = grads(want, [h, W, b])
    for gg, gw, name in zip(g_got, g_want, "hWb"):
        assert gg.dtype == torch.float32
        assert relerr(gg, gw) <= 1e-5, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction,normalizer", [("sum", None), ("sum", 7.0), ("mean", 3.0), ("none", None)])
def test_reductions_and_normalizer(kind, reduction, normalizer):
    h, W, b, labels, ref = make(5, 20, 37, 1000, empty_rows=(2,))
    got = call(kind, h, W, labels, b, ref, reduction=reduction, normalizer=normalizer, backend="chunked")
    want = oracle_loss(kind, h, W, labels, b, reduction=reduction, normalizer=normalizer, ref=ref)
    assert got.shape == want.shape
    assert relerr(got, want) <= 1e-5
    # a random upstream gradient for the vector output exercises the recomputing backward
    up = torch.randn(got.shape, dtype=torch.float64)
    g_got = torch.autograd.grad(got, [h, W, b], up.to(got.dtype) if got.dim() else None)
    g_want = torch.autograd.grad(want, [h, W, b], up if want.dim() else None)
    for gg, gw in zip(g_got, g_want):
        assert relerr(gg, gw) <= 1e-5


def test_sequence_logprob_matches_oracle_with_random_upstream_grad():
    h, W, b, labels, _ = make(6, 40, 37, 1000, empty_rows=(1,))
    s, n = sf.sequence_logprob(h, W, labels, bias=b, backend=ChunkedBackend(chunk_rows=16))
    s0, n0 = oracle_logp(h, W, labels, b)
    assert s.dtype == torch.float32 and n.dtype == torch.int64
    assert torch.equal(n, n0)
    assert relerr(s, s0) <= 1e-6
    assert s[1] == 0  # the empty row
    up = torch.randn(6, dtype=torch.float64)
    for gg, gw in zip(torch.autograd.grad(s, [h, W, b], up.float()), torch.autograd.grad(s0, [h, W, b], up)):
        assert relerr(gg, gw) <= 1e-5


def test_unshifted_and_2d_inputs():
    h, W, b, labels, _ = make(1, 30, 37, 1000, bias=False)
    # shift=False with pre-shifted labels equals the shifted call
    shifted = torch.cat([labels[:, 1:], torch.full((1, 1), -100)], dim=1)
    a = sf.simnpo_loss(h, W, labels)
    c = sf.simnpo_loss(h, W, shifted, shift=False)
    d2 = sf.simnpo_loss(h[0], W, labels[0])  # [N, d] with [N] labels: one sequence
    assert torch.allclose(a, c, rtol=1e-6) and torch.allclose(a, d2, rtol=1e-6)


def test_gamma_is_the_paper_margin_not_scaled_by_beta():
    h, W, b, labels, _ = make(4, 20, 37, 1000)
    beta, gamma = 3.0, 1.5
    got = sf.simnpo_loss(h, W, labels, bias=b, beta=beta, gamma=gamma)
    s, n = oracle_logp(h, W, labels, b)
    by_hand = (-(2 / beta) * torch.log(torch.sigmoid(-(beta / n.double()) * s - gamma))).mean()
    assert abs(float(got) - float(by_hand)) < 1e-5 * abs(float(by_hand))


def test_hand_computed_single_token_case():
    # d = 1, V = 2, one target: logits = [w0*h, w1*h]; h=1, w=(0, log 3): p(target=1) = 3/4.
    h = torch.tensor([[[1.0], [1.0]]], requires_grad=True)
    W = torch.tensor([[0.0], [math.log(3.0)]], requires_grad=True)
    labels = torch.tensor([[-100, 1]])
    s, n = sf.sequence_logprob(h, W, labels)
    assert abs(float(s) - math.log(0.75)) < 1e-6 and int(n) == 1
    beta = 2.0
    loss = sf.simnpo_loss(h, W, labels, beta=beta)
    want = -(2 / beta) * math.log(1 / (1 + math.exp(beta * math.log(0.75))))
    assert abs(float(loss) - want) < 1e-6
    # dL/dlogits = (2/|y|) sigmoid(beta*s) * (onehot - softmax) ; dL/dh0 = that @ W
    w = 2 * (1 / (1 + math.exp(-beta * math.log(0.75))))
    dlog = w * torch.tensor([0 - 0.25, 1 - 0.75])
    (gh,) = torch.autograd.grad(loss, h)
    assert abs(float(gh[0, 0, 0]) - float(dlog @ W.detach()[:, 0])) < 1e-6
    assert float(gh[0, 1, 0]) == 0.0  # the last position predicts nothing


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_no_worse_than_naive_bf16(kind):
    """Judged as CCE does: error vs the fp64 truth no worse than the naive path computed in bf16 (+ tol)."""
    h, W, b, labels, ref = make(8, 64, 128, 2000, dtype=torch.bfloat16, empty_rows=(5,))
    want = oracle_loss(kind, h, W, labels, b, ref=ref)
    g_want = grads(want, [h, W, b])
    fused = call(kind, h, W, labels, b, ref, backend=ChunkedBackend(chunk_rows=32))
    naive = call(kind, h, W, labels, b, ref, backend="reference")  # bf16 GEMM, fp32 softmax: HF style
    g_fused = grads(fused, [h, W, b])
    g_naive = grads(naive, [h, W, b])
    assert abs(float(fused) - float(want)) <= abs(float(naive) - float(want)) + 2e-3 * abs(float(want)) + 1e-4
    for gf, gn, gw, name in zip(g_fused, g_naive, g_want, "hWb"):
        assert gf.dtype == torch.bfloat16
        assert relerr(gf, gw) <= relerr(gn, gw) + 1e-2, name


def test_fp16_inputs_run_and_match():
    h, W, b, labels, _ = make(4, 30, 64, 1000, dtype=torch.float16)
    got = sf.nll_loss(h, W, labels, bias=b)
    want = oracle_loss("nll", h, W, labels, b)
    assert abs(float(got) - float(want)) < 1e-2 * abs(float(want))
    gh, gw, gb = grads(got, [h, W, b])
    assert gh.dtype == torch.float16 and gw.dtype == torch.float16


def test_fully_masked_batch_is_zero_with_zero_grads_and_warns():
    h, W, b, labels, ref = make(3, 10, 37, 1000)
    labels[:] = -100
    for kind in KINDS:
        with pytest.warns(UserWarning, match="ignore_index"):
            loss = call(kind, h, W, labels, b, ref)
        assert float(loss) == 0.0
        for g in grads(loss, [h, W, b]):
            assert torch.isfinite(g).all() and torch.count_nonzero(g) == 0


def test_empty_sequences_leave_the_mean_denominator():
    h, W, b, labels, ref = make(4, 20, 37, 1000, empty_rows=(1, 3))
    full = sf.simnpo_loss(h, W, labels, bias=b)
    keep = [0, 2]
    sub = sf.simnpo_loss(h[keep], W, labels[keep], bias=b)
    assert torch.allclose(full, sub, rtol=1e-6)


def test_nonfinite_inputs_are_not_hidden():
    h, W, b, labels, _ = make(2, 10, 37, 1000)
    h = h.detach().clone()
    labels[:, 5] = 3
    h[0, 4, 0] = float("nan")
    assert torch.isnan(sf.simnpo_loss(h, W, labels, bias=b))
    s, _ = sf.sequence_logprob(h, W, labels, bias=b)
    assert torch.isnan(s[0]) and torch.isfinite(s[1])


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda h, W, y: (h, W, y.masked_fill(y == y[0, -1], 1000)), "label 1000"),
        (lambda h, W, y: (h, W, torch.where(y == -100, torch.full_like(y, -7), y)), "label -7"),
        (lambda h, W, y: (h[:, :, :10], W, y), r"\(2, 10, 10\).*\(1000, 37\)"),
        (lambda h, W, y: (h, W, y[:, :5]), r"\(2, 5\).*\(2, 10, 37\)"),
        (lambda h, W, y: (h.double(), W, y), "dtype mismatch"),
        (lambda h, W, y: (h, W, y.float()), "integer"),
        (lambda h, W, y: (h, W[None], y), "weight must be"),
    ],
)
def test_bad_input_raises_clear_valueerror(mutate, match):
    h, W, b, labels, _ = make(2, 10, 37, 1000, bias=False)
    labels[0, -1] = 5
    h, W, labels = mutate(h.detach(), W.detach(), labels)
    with pytest.raises(ValueError, match=match):
        sf.simnpo_loss(h, W, labels)


def test_bad_options_raise():
    h, W, b, labels, ref = make(2, 10, 37, 1000)
    with pytest.raises(ValueError, match="reduction"):
        sf.simnpo_loss(h, W, labels, reduction="avg")
    with pytest.raises(ValueError, match="beta"):
        sf.simnpo_loss(h, W, labels, beta=-1)
    with pytest.raises(ValueError, match="normalizer"):
        sf.simnpo_loss(h, W, labels, reduction="sum", normalizer=0)
    with pytest.raises(ValueError, match="ref_logp_sum"):
        sf.npo_loss(h, W, labels, ref[:1])
    with pytest.raises(ValueError, match="unknown backend"):
        sf.simnpo_loss(h, W, labels, backend="cuda-magic")
    with pytest.raises(ValueError, match="bias"):
        sf.simnpo_loss(h, W, labels, bias=b[:-1])


@pytest.mark.parametrize("beta", [float("inf"), float("nan"), 0.0, -1.0])
def test_beta_must_be_finite_and_positive(beta):
    """beta = inf used to give loss 0 with NaN gradients (0 * inf); now a one-line ValueError naming beta."""
    h, W, b, labels, ref = make(2, 10, 37, 1000)
    for call in (lambda: sf.simnpo_loss(h, W, labels, beta=beta), lambda: sf.npo_loss(h, W, labels, ref, beta=beta),
                 lambda: sf.FusedSimNPOLoss(beta=beta), lambda: sf.UnlearningLoss("npo", beta=beta)):
        with pytest.raises(ValueError, match=r"^beta must be finite and > 0, got"):
            call()


@pytest.mark.parametrize("beta", [1e-310, 5e-324])
def test_a_subnormal_beta_is_refused_not_an_inf_loss(beta):
    """Issue 24 item 9: 2 / beta overflows for a subnormal beta (the loss was inf, its gradients NaN)."""
    h, W, b, labels, ref = make(2, 10, 37, 1000)
    for call in (lambda: sf.simnpo_loss(h, W, labels, beta=beta), lambda: sf.npo_loss(h, W, labels, ref, beta=beta),
                 lambda: sf.UnlearningLoss("simnpo", beta=beta)):
        with pytest.raises(ValueError, match=r"^beta must be >= .*2 / beta must be finite"):
            call()
    loss = sf.simnpo_loss(h.double(), W.double(), labels, beta=1e-300)  # the smallest usable betas stay finite
    assert torch.isfinite(loss)


@pytest.mark.parametrize("gamma", [float("inf"), float("-inf"), float("nan")])
def test_gamma_must_be_finite(gamma):
    h, W, b, labels, _ = make(2, 10, 37, 1000)
    with pytest.raises(ValueError, match=r"^gamma must be finite, got"):
        sf.simnpo_loss(h, W, labels, gamma=gamma)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_bias_dtype_is_checked_with_the_other_inputs(backend):
    """A bias of another dtype than hidden / weight: ValueError naming both dtypes, on every backend (the
    reference backend used to raise a raw RuntimeError from F.linear)."""
    h, W, b, labels, _ = make(2, 10, 37, 1000)
    for fn in (lambda: sf.simnpo_loss(h, W, labels, bias=b.double(), backend=backend),
               lambda: sf.sequence_logprob(h, W, labels, bias=b.bfloat16(), backend=backend),
               lambda: sf.kl_loss(h, W, labels, h, W, bias=b.half())):
        with pytest.raises(ValueError, match=r"dtype mismatch: bias .*torch\.(float64|bfloat16|float16).* vs weight "
                                             r".*torch\.float32"):
            fn()


def test_backend_env_var_forces_backend(monkeypatch):
    from simnpo_fast.backends import get_backend

    monkeypatch.setenv("SIMNPO_FAST_BACKEND", "reference")
    assert get_backend(None, torch.device("cpu")).name == "reference"
    monkeypatch.delenv("SIMNPO_FAST_BACKEND")
    assert get_backend(None, torch.device("cpu")).name == "chunked"


def test_gradient_accumulation_with_global_normalizer_equals_full_batch():
    """Two micro-batches with reduction='sum', normalizer=<global #sequences> sum to the full-batch grads."""
    h, W, b, labels, _ = make(6, 16, 37, 1000, empty_rows=(4,))
    full = sf.simnpo_loss(h, W, labels, bias=b)
    g_full = grads(full, [W, b])
    n_valid = int(((labels[:, 1:] != -100).sum(1) > 0).sum())
    parts = [sf.simnpo_loss(h[sl], W, labels[sl], bias=b, reduction="sum", normalizer=n_valid)
             for sl in (slice(0, 3), slice(3, 6))]
    g_acc = [a + c for a, c in zip(grads(parts[0], [W, b]), grads(parts[1], [W, b]))]
    for a, c in zip(g_acc, g_full):
        assert relerr(a, c) <= 1e-5


def test_no_grad_forward_and_frozen_weight():
    h, W, b, labels, _ = make(3, 12, 37, 1000)
    with torch.no_grad():
        v = sf.simnpo_loss(h, W, labels, bias=b)
    assert not v.requires_grad
    W2 = W.detach()
    loss = sf.simnpo_loss(h, W2, labels)
    (gh,) = torch.autograd.grad(loss, [h])
    want = oracle_loss("simnpo", h, W2, labels)
    (gw,) = torch.autograd.grad(want, [h])
    assert relerr(gh, gw) <= 1e-5


def test_upstream_scalar_gradient_scales():
    h, W, b, labels, _ = make(3, 12, 37, 1000)
    loss = sf.simnpo_loss(h, W, labels, bias=b)
    (g3,) = torch.autograd.grad(3.0 * loss, [W])
    loss = sf.simnpo_loss(h, W, labels, bias=b)
    (g1,) = torch.autograd.grad(loss, [W])
    assert torch.allclose(g3, 3 * g1, rtol=1e-6, atol=1e-9)


def test_reference_backend_fp64_agrees_with_oracle():
    h, W, b, labels, ref = make(4, 20, 37, 1000)
    got = sf.npo_loss(h, W, labels, ref, bias=b, backend=ReferenceBackend(torch.float64))
    want = oracle_loss("npo", h, W, labels, b, ref=ref)
    assert got.dtype == torch.float64 and abs(float(got - want)) < 1e-12
