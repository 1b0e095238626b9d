"""The chunked backend's tile epilogue against fp64 maths: ``tile_forward`` (lse, target log-probability) and
``tile_dlogits`` (the ``(tile, row_scale)`` factorisation of ``g * (onehot - softmax)``), including the rows
where a 16-bit tile needs care (a target probability below the smallest normal bf16, ``p_t -> 1`` where every
row entry is ~1e-4 of its weight and must keep its *relative* accuracy), the in-place softmax it relies on,
and ``_Grads.add_tile`` with a row scale against explicit d_logits.
"""
import math

import pytest
import torch

from simnpo_fast.backends import ChunkedBackend
from simnpo_fast.backends.grads import TileGrads as _Grads
from simnpo_fast.backends.tiles import softmax_ as _softmax_

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# fp32 / fp64: lse to a few ulps (cascade row sums); 16-bit: the target probability or row sum rounded once
LSE_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
# relative error of 1 - p_t and of each d_logits row against its own largest entry: 16-bit tiles round every
# entry once (2^-9 bf16, 2^-11 fp16) and sums of them; fp32 / fp64 to a few ulps
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -8}
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [17, 2048, 32001])
def test_softmax_in_place_equals_the_out_of_place_op(dtype, V):
    torch.manual_seed(V)
    z = (torch.randn(5, V) * 4).to(dtype)
    want = torch.softmax(z, dim=1)
    assert _softmax_(z) is z
    assert torch.equal(z, want)


def _tile(dtype, R=12, V=1000, seed=0):
    """Logits (exactly representable in ``dtype``) with hard rows: row 0 puts p_t below 1e-40 (logp_t ~ -120),
    row 1 has p_t ~ 1 (1 - p_t ~ 1e-4), row 2 is flat, rows 3-5 are memorised (1 - p_t ~ 1e-3, 1e-5, 1e-7)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(R, V, generator=g) * 3).to(dtype).double()
    tgt = torch.randint(0, V, (R,), generator=g)
    z[0] = 0.0
    z[0, tgt[0]] = -120.0
    z[1] = 0.0
    z[1, tgt[1]] = 16.0
    z[2] = 1.0
    for r, margin in ((3, 14.0), (4, 18.0), (5, 22.0)):  # 1 - p_t ~ V exp(-margin) (spread logits around 0)
        z[r] = (torch.randn(V, generator=g) * 0.5).to(dtype).double()
        z[r, tgt[r]] = margin
    return z, tgt, torch.randn(R, generator=g, dtype=torch.float64)


def _want(z64, tgt, g):
    """fp64 ``g (onehot - softmax)``, ``lse``, ``lp`` and ``1 - p_t`` (from the other entries: no cancellation)."""
    lse = torch.logsumexp(z64, dim=1)
    other = z64.scatter(1, tgt[:, None], float("-inf"))
    omp = torch.exp(torch.logsumexp(other, dim=1) - lse)
    want = -g[:, None] * torch.softmax(z64, dim=1)
    want.scatter_(1, tgt[:, None], (g * omp)[:, None])
    lp = torch.where(omp < 0.5, torch.log1p(-omp), z64.gather(1, tgt[:, None]).squeeze(1) - lse)
    return want, lse, lp, omp


def _check_rows(got, want, g, dtype):
    # every row to its own scale |g_i| (so a small row is not hidden by a large one), target entries included
    assert ((got - want).abs().amax(dim=1) / g.abs()).max() <= GRAD_TOL[dtype]
    # and to its own largest entry: a memorised row (entries ~1e-7 |g|) keeps its relative accuracy
    rel = (got - want).abs().amax(dim=1) / want.abs().amax(dim=1)
    assert rel.max() <= REL_TOL[dtype], rel


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_forward_and_dlogits_against_fp64(dtype):
    z64, tgt, g = _tile(dtype)
    want, lse64, lp64, omp64 = _want(z64, tgt, g)
    assert omp64[5] < 1e-6 and omp64[3] > 1e-4

    be = ChunkedBackend()
    z = z64.to(dtype, copy=True)
    calls = []

    def relogits(idx):  # the tile's rows afresh, as the backend's GEMM would give them
        calls.append(idx.tolist())
        return z64[idx].to(dtype)

    lse, lp, state = be.tile_forward(z, tgt, relogits)
    # only fp32 / bf16 (softmax) tiles recompute, and only the row whose p_t is below the smallest normal number
    assert calls == ([[0]] if dtype in (torch.float32, torch.bfloat16) else [])
    assert lse.dtype == lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ((lse.double() - lse64).abs() / lse64.abs().clamp_min(1)).max() <= LSE_TOL[dtype]
    assert abs(lp[0].item() - lp64[0].item()) <= LSE_TOL[dtype] * 120  # ~ -120
    # 1 - p_t (and lp_t ~ -(1 - p_t)) to a relative accuracy, however close p_t is to 1
    omp = -torch.expm1(lp.double())
    assert ((omp - omp64).abs() / omp64).max() <= REL_TOL[dtype]

    tile, scale = be.tile_dlogits(z, state, tgt, g.to(lse.dtype))
    assert tile is z  # in place, no second [R, V] buffer
    got = tile.double() if scale is None else scale.double()[:, None] * tile.double()
    _check_rows(got, want, g, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dlogits_from_raw_logits_and_saved_lse_against_fp64(dtype):
    """The generic / long-sequence path: the same ``(tile, row_scale)`` factorisation from a fresh logits tile
    and the forward's ``lse`` and ``lp``."""
    z64, tgt, g = _tile(dtype)
    want, lse64, lp64, _ = _want(z64, tgt, g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = z64.to(dtype, copy=True)
    tile, scale = ChunkedBackend().tile_dlogits_from_logits(z, lse64.to(acc), lp64.to(acc), tgt, g.to(acc),
                                                            lambda idx: z64[idx].to(dtype))
    assert tile is z
    _check_rows(scale.double()[:, None] * tile.double(), want, g, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_rows", [False, True])
def test_add_tile_with_row_scale_equals_explicit_dlogits(dtype, with_rows):
    """``add_tile(tile, scale=s)`` == ``add_tile(diag(s) tile)``: dX, dW (over two tiles) and db."""
    torch.manual_seed(1)
    M, d, V = 24, 32, 300
    x = torch.randn(M, d).to(dtype)
    w = torch.randn(V, d).to(dtype)
    b = torch.randn(V).to(dtype)
    rows = torch.randperm(M)[:16] if with_rows else None
    n = 16 if with_rows else M
    tiles = [torch.randn(n // 2, V).to(dtype) for _ in range(2)]
    scales = [torch.randn(n // 2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
              for _ in range(2)]

    def run(fold):
        acc = _Grads(x, w, b, True, True, True)
        for i, (t, s) in enumerate(zip(tiles, scales)):
            r0, r1 = i * (n // 2), (i + 1) * (n // 2)
            xc = x[r0:r1] if rows is None else x[rows[r0:r1]]
            if fold:
                acc.add_tile(t.clone(), xc, w, r0, r1, rows, scale=s)
            else:
                acc.add_tile((s[:, None] * t.to(s.dtype)).to(dtype), xc, w, r0, r1, rows)
        return acc.finish()

    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -8}[dtype]
    for got, want in zip(run(True), run(False)):
        got, want = got.double(), want.double()
        assert (got - want).abs().max() <= tol * want.abs().max()
    dx = run(True)[0]
    if rows is not None:  # rows outside the packed set keep a zero gradient
        untouched = torch.ones(M, dtype=torch.bool)
        untouched[rows] = False
        assert dx[untouched].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_flat_rows_beyond_65504_columns_stay_finite(dtype):
    """A flat 16-bit row over V = 70000 columns: its row sum (70000) exceeds the largest fp16, so it must never
    be held as one fp16 number; lse = log V."""
    V = 70000
    z = torch.zeros(3, V, dtype=dtype)
    lse, lp, _ = ChunkedBackend().tile_forward(z, torch.tensor([0, 5, V - 1]), None)
    assert torch.isfinite(lse).all() and torch.isfinite(lp).all()
    assert (lse - math.log(V)).abs().max() <= 2 ** -8 * math.log(V)
    assert (lp + math.log(V)).abs().max() <= 2 ** -8 * math.log(V)


def test_bf16_tokens_below_the_smallest_normal_probability_end_to_end():
    """bf16 inputs through the public API where some answer tokens have logp ~ -200 (their bf16 probability
    is 0): the chunked backend recomputes those rows (bias included) and stays finite and close to fp64."""
    import simnpo_fast as sf

    torch.manual_seed(3)
    B, T, d, V = 3, 9, 16, 300
    h = torch.randn(B, T, d).bfloat16()
    W = (torch.randn(V, d) * 0.3).bfloat16()
    b = torch.zeros(V).bfloat16()
    b[7] = -200.0
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = -100
    labels[0, 4] = labels[2, 6] = labels[2, 7] = 7  # three tokens at logp ~ -200
    got, n = sf.sequence_logprob(h, W, labels, bias=b, backend=ChunkedBackend())
    z = h[:, :-1].double() @ W.double().t() + b.double()
    y = labels[:, 1:]
    lp = torch.log_softmax(z, dim=-1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (y != -100)
    want = lp.sum(dim=1)
    assert want.min() < -190
    assert torch.isfinite(got).all()
    assert ((got.double() - want).abs() / want.abs()).max() <= 1e-2

    hg, Wg = h.clone().requires_grad_(), W.clone().requires_grad_()
    sf.simnpo_loss(hg, Wg, labels, bias=b, backend=ChunkedBackend()).backward()
    assert torch.isfinite(hg.grad).all() and torch.isfinite(Wg.grad).all()
