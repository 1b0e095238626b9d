"""Gradient filtering (backends/filter.py) against an fp64 oracle written here: the filtered gradients stay within
the documented per-element bounds of the terms they drop, on inputs that exercise both filters (peaked and flat
softmaxes, saturated and unsaturated SimNPO sequences, targets of probability < eps inside dropped blocks,
tiles whose every sequence is dropped), and the unfiltered path is unchanged."""
import os

import pytest
import torch

import simnpo_fast as sf
from simnpo_fast.backends import ChunkedBackend
from simnpo_fast.backends.filter import ON, GradFilter, resolve

BACKENDS = ["chunked", "chunked16"]
TRITON = ["triton-gemm", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []
#: the Triton backends run in the interpreter (slow): SimNPO only; the fused kernels both row references
CASES = [(n, o, f) for n in BACKENDS for o in ("simnpo", "nll") for f in ("on", "batch", "coarse")] + \
    [(n, "simnpo", "on") for n in TRITON] + [("triton", "simnpo", "batch") for _ in TRITON[:1]]
OBJECTIVES = {"simnpo": sf.objectives.SimNPO(2.5, 0.0), "nll": sf.objectives.NLL()}
FILTERS = {"on": GradFilter(rows=1e-3, probs=2.0 ** -12, block_rows=16),
           "batch": GradFilter(rows=0.2, probs=1e-2, rows_ref="batch", block_rows=4),
           "coarse": GradFilter(probs=0.3, block_rows=64)}


def _batch(seed=0, B=6, T=20, d=32, V=300):
    """Sequences 0, 1: memorised (peaked rows, p_t ~ 1); 2, 3: flat rows with unlikely targets (SimNPO weight
    saturated); 4, 5: moderately peaked, half the targets drawn from the tail (p_t < 2^-12)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, d, generator=g) / d ** 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    h = torch.randn(B, T, d, generator=g) * 0.3
    nxt = labels[:, 1:]
    h[:2, :-1] += 9.0 * w[nxt[:2]]  # memorised: z_target >> the rest
    h[2:4] *= 4.0  # flat-ish but wide logits: targets unlikely (lp ~ -8 per token)
    h[4:, :-1] += 2.5 * w[torch.randint(0, 20, (2, T - 1), generator=g)]  # peaked on a few columns
    labels[:, :3] = -100  # prompt
    return h, w, labels


def _oracle(h, w, labels, objective):
    """fp64: per packed row (HF shift) its probabilities, weight g, and the exact gradients."""
    hh, ww = h.double().requires_grad_(), w.double().requires_grad_()
    loss = sf.fused_sequence_loss(hh, ww, labels, objective, backend=sf.backends.ReferenceBackend(torch.float64),
                                  grad_filter=None)
    dh, dw = torch.autograd.grad(loss, (hh, ww))
    x = h[:, :-1].reshape(-1, h.shape[-1]).double()
    tgt = labels[:, 1:].reshape(-1)
    valid = tgt != -100
    seq = torch.arange(h.shape[0]).repeat_interleave(h.shape[1] - 1)
    p = torch.softmax(x @ w.double().t(), -1)
    lp = torch.log(p.gather(1, tgt.clamp(min=0)[:, None])[:, 0])
    n = torch.zeros(h.shape[0], dtype=torch.int64).index_add_(0, seq[valid], torch.ones_like(seq[valid]))
    lps = torch.zeros(h.shape[0], dtype=torch.float64).index_add_(0, seq[valid], lp[valid])
    s = lps.detach().requires_grad_()
    (gs,) = torch.autograd.grad(objective(s, n).sum(), s)
    denom = objective.denominator(n)
    return dict(loss=loss.detach(), dh=dh, dw=dw, x=x, p=p, tgt=tgt, valid=valid, seq=seq, g=gs / denom,
                bound=objective.weight_bound(n).double() / denom if objective.weight_bound(n) is not None else None)


def _bounds(o, w, flt):
    """Per-element bounds (module docstring of backends/filter.py) of what the filter may drop: ``[M, d]`` for the
    packed dX rows, ``[V, d]`` for dW."""
    x, p, tgt, valid, seq = o["x"], o["p"], o["tgt"], o["valid"], o["seq"]
    g = o["g"][seq] * valid
    G = o["bound"][seq] if flt.rows_ref == "bound" else torch.full_like(g, o["g"].abs().max().item())
    dropped = valid & (g.abs() < flt.rows * G)
    onehot = torch.zeros_like(p).scatter_(1, tgt.clamp(min=0)[:, None], 1.0)
    wmax = w.double().abs().amax(0)
    small = (p < flt.probs) & (onehot == 0)
    mass = (p * small).sum(1)
    bx = torch.where(dropped[:, None], 2 * flt.rows * G[:, None] * wmax, g.abs()[:, None] * mass[:, None] * wmax)
    bw = flt.probs * (g.abs()[:, None] * x.abs()).sum(0)[None, :].expand(p.shape[1], -1).clone()
    rowpart = (flt.rows * G * dropped)[:, None] * (onehot + p)
    bw += rowpart.t() @ x.abs()
    return bx, bw, dropped


def _run(name, h, w, labels, objective, flt, monkeypatch):
    dtype = torch.float32
    if name == "chunked16":  # bf16 inputs, fp32 tile products (the AVX2 path) and native bf16 tiles
        monkeypatch.setenv("SIMNPO_FAST_LOWP_GEMM", "fp32")
        dtype, name = torch.bfloat16, "chunked"
    hh, ww = h.detach().to(dtype).clone().requires_grad_(), w.detach().to(dtype).clone().requires_grad_()
    loss = sf.fused_sequence_loss(hh, ww, labels, objective, backend=name, grad_filter=flt)
    loss.backward()
    return loss.detach().double(), hh.grad.double(), ww.grad.double(), dtype


@pytest.mark.parametrize("name,objective,flt", CASES)
def test_filtered_gradients_within_the_documented_bounds(name, objective, flt, monkeypatch):
    objective, flt = OBJECTIVES[objective], FILTERS[flt]
    h, w, labels = _batch()
    if name == "chunked16":  # the oracle on the rounded inputs
        h, w = h.bfloat16().float(), w.bfloat16().float()
    o = _oracle(h, w, labels, objective)
    loss, dh, dw, dtype = _run(name, h, w, labels, objective, flt, monkeypatch)
    bx, bw, dropped = _bounds(o, w, flt)
    # the rounding of a 16-bit result (bf16: the returned gradients) on top of the bound
    slack = 1e-5 if dtype == torch.float32 else 2.0 ** -8
    assert abs(loss - o["loss"]) <= 1e-5 * abs(o["loss"]) + 1e-6  # the forward is never filtered
    ex = (dh[:, :-1].reshape(-1, h.shape[-1]) - o["dh"][:, :-1].reshape(-1, h.shape[-1])).abs()
    assert bool((ex <= bx + slack * o["dh"].abs().max() + 1e-9).all()), (ex - bx).max()
    ew = (dw - o["dw"]).abs()
    assert bool((ew <= bw + slack * o["dw"].abs().max() + 1e-9).all()), (ew - bw).max()
    if isinstance(objective, sf.objectives.SimNPO) and flt.rows > 0:
        assert bool(dropped.any())  # the inputs do exercise the row filter ...
        rows = dh[:, :-1].reshape(-1, h.shape[-1])
        assert float(rows[dropped].abs().max()) == 0.0  # ... and dropped rows get no gradient at all
    if name == "triton":  # the kernels' own counters: both filters skipped part of the backward
        st = sf.backends.get_backend("triton", torch.device("cpu")).last_filter_stats
        assert 0 < st["rows_kept"] < 1 and 0 < st["tiles_kept"] < 1, st


@pytest.mark.parametrize("name", BACKENDS + TRITON)
def test_every_sequence_filtered_gives_zero_gradients_and_the_exact_loss(name, monkeypatch):
    h, w, labels = _batch()
    h, labels = h[2:4], labels[2:4]  # only saturated sequences: every tile's backward is skipped
    if name == "chunked16":
        h, w = h.bfloat16().float(), w.bfloat16().float()
    o = _oracle(h, w, labels, sf.objectives.SimNPO(2.5, 0.0))
    loss, dh, dw, _ = _run(name, h, w, labels, sf.objectives.SimNPO(2.5, 0.0), GradFilter(rows=1e-3), monkeypatch)
    assert float(o["g"].abs().max() / o["bound"].max()) < 1e-3
    assert abs(loss - o["loss"]) <= 1e-3 * abs(o["loss"])  # ~1e-7: logsigmoid of sums of fp32 lp ~ -170
    assert float(dh.abs().max()) == 0.0 and float(dw.abs().max()) == 0.0


@pytest.mark.parametrize("name", BACKENDS + TRITON[:1])
def test_no_filter_is_the_unfiltered_path(name, monkeypatch):
    h, w, labels = _batch(seed=3)
    ob = sf.objectives.SimNPO(2.5, 0.0)
    a = _run(name, h, w, labels, ob, None, monkeypatch)
    b = _run(name, h, w, labels, ob, GradFilter(), monkeypatch)  # all thresholds 0: not active
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)


def test_softmax_filter_keeps_few_entries_on_peaked_rows():
    h, w, labels = _batch()
    be = ChunkedBackend()
    hh, ww = h.requires_grad_(), w.requires_grad_()
    sf.fused_sequence_loss(hh, ww, labels, sf.objectives.NLL(), backend=be, grad_filter=GradFilter(probs=1e-2,
                                                                                                   block_rows=4))
    assert 0 < be.last_filter_stats["entries_kept"] < 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("thresholds", ["uniform", "per_row", "with_inf"])
def test_fast_column_rule_is_the_per_entry_rule(dtype, thresholds):
    """The softmax filter's column selection on factorised tiles (one max pass) keeps exactly the columns of the
    per-entry rule ``any_r |p_rv| >= thr_r`` (written here), on softmax rows with negative target entries."""
    from simnpo_fast.backends.grads import _column_rule

    g = torch.Generator().manual_seed(1)
    R, V, B = 40, 257, 16
    p = (torch.randn(R, V, generator=g, dtype=torch.float64) * 3).softmax(1)
    tgt = torch.randint(0, V, (R,), generator=g)
    p[torch.arange(R), tgt] -= 1.0  # factorised tile: target entries p_t - 1 <= 0
    p = p.to(dtype)
    thr = {"uniform": torch.full((R,), 2.0 ** -9, dtype=torch.float64),
           "per_row": 2.0 ** -9 * torch.rand(R, generator=g, dtype=torch.float64).add(0.5),
           "with_inf": torch.where(torch.arange(R) % 3 == 0, float("inf"), 2.0 ** -8).double()}[thresholds].to(dtype)
    needed = _column_rule(p, thr, factorised=True, block_rows=B)
    for b0 in range(0, R, B):
        b1 = min(R, b0 + B)
        ref = (p[b0:b1].abs() >= thr[b0:b1].unsqueeze(1)).any(0)
        ref[tgt[b0:b1]] = True
        got = needed(p[b0:b1], b0, b1)
        got[tgt[b0:b1]] = True
        assert torch.equal(got, ref), (b0, int((got != ref).sum()))
        assert 0 < int(ref.sum()) < V  # the case selects some columns and drops others


def test_resolve_and_bad_values():
    assert resolve("auto", torch.float32) is None and resolve(None, torch.bfloat16) is None
    assert resolve("on", torch.float32) == ON and resolve(True, torch.float32) == ON
    assert resolve({"rows": 0.01}, torch.float32) == GradFilter(rows=0.01)
    for bad, key in (({"rows": 1.5}, "rows"), ({"probs": -1}, "probs"), ({"rows_ref": "x"}, "rows_ref"),
                     ({"eps": 1}, "unknown key"), ("fast", "grad_filter")):
        with pytest.raises(ValueError, match=key):
            resolve(bad, torch.float32)


def test_kl_softmax_filter_within_bound():
    h, w, labels = _batch()
    hr, wr = h * 1.1, w * 0.9
    outs = []
    for flt in (None, GradFilter(probs=1e-3, block_rows=8)):
        hh, ww = h.double().requires_grad_(), w.double().requires_grad_()
        sf.kl_loss(hh, ww, labels, hr.double(), wr.double(), backend="chunked", grad_filter=flt).backward()
        outs.append((hh.grad, ww.grad))
    M = int((labels[:, 1:] != -100).sum())
    x = h[:, :-1].reshape(-1, h.shape[-1]).double()[(labels[:, 1:] != -100).reshape(-1)]
    bw = 1e-3 / M * x.abs().sum(0)
    assert bool(((outs[1][1] - outs[0][1]).abs() <= bw[None, :] + 1e-12).all())
    assert float((outs[1][1] - outs[0][1]).abs().max()) > 0  # something was dropped
    with pytest.raises(ValueError, match="rows"):
        sf.kl_loss(h, w, labels, hr, wr, grad_filter=GradFilter(rows=0.1))
