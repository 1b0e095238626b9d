"""kernels/epilogue.py (logits-tile epilogue of the triton-gemm backend) under TRITON_INTERPRET=1 against
fp64 torch maths on the same (already rounded) tile.

Shapes cross every mask edge: non-power-of-two R and V, V smaller than / equal to / a multiple of / not a
multiple of the column block, a single row, a single column, ignored rows, a strided (non-contiguous)
tile, fp32 / fp16 / bf16 tiles and outputs, in place and out of place.

Tolerances: the kernels read the tile exactly (upcast on load) and compute in fp32, so ``lo`` and an fp32
``q - onehot`` tile are judged at fp32 level (a few 1e-7 relative). A 16-bit output carries one final rounding:
<= 1 ulp relative to each element (bf16: the interpreter truncates where a GPU rounds to nearest, see the
module docstring), plus an fp32-level absolute term for tiny / subnormal values.
"""
import pytest
import torch

from simnpo_fast.kernels import epilogue as E

IGN = -100
pytestmark = pytest.mark.skipif(not E.INTERPRET and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set in conftest) or a GPU")
DEV = "cuda" if (torch.cuda.is_available() and not E.INTERPRET) else "cpu"


def make(R, V, dtype, n_ignored=0, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(R, V, generator=gen) * scale).to(dtype)
    t = torch.randint(0, V, (R,), generator=gen)
    if n_ignored:
        t[torch.randperm(R, generator=gen)[:n_ignored]] = IGN
    g = torch.randn(R, generator=gen)
    return z.to(DEV), t.to(DEV), g.to(DEV)


def oracle(z, t, g=None):
    """fp64 ``lo`` (log-sum-exp of the non-target columns; the whole row for ignored rows), target logit,
    validity and the ``q - onehot`` tile (``q = exp(z - lo)``; 0 rows where ignored)."""
    zd = z.double().cpu()
    t = t.cpu()
    valid = t != IGN
    tc = t.clamp(min=0)
    other = torch.where(valid[:, None], zd.scatter(1, tc[:, None], float("-inf")), zd)
    lo = torch.logsumexp(other, dim=1)
    zt = torch.where(valid, zd.gather(1, tc[:, None])[:, 0], torch.zeros_like(lo))
    onehot = torch.nn.functional.one_hot(tc, z.shape[1]).double()
    q = torch.where(torch.isfinite(lo)[:, None], torch.exp(other - lo[:, None]), 0.0)  # V = 1: no other column
    tile = valid.double()[:, None] * (q - onehot)
    return lo, zt, valid, tile


def assert_dz_close(out, ref, g, out_dtype, lse_max=1.0):
    """fp32 level: a few ulps of q plus the fp32 rounding of lo itself (2^-24 |lo|, which moves q by as
    much relative), then <= 1 ulp of a 16-bit output. Entries are O(1) (q <= 1, -1 at the target)."""
    out = out.double().cpu()
    atol = 2e-6 + 2.0 ** -23 * max(1.0, lse_max)
    if out_dtype == torch.float32:
        assert (out - ref).abs().max().item() <= atol
    else:
        eps = torch.finfo(out_dtype).eps
        bound = eps * ref.abs() + atol
        assert bool(((out - ref).abs() <= bound).all()), (out - ref).abs().max().item()


# (R, V, block_v): V < block, V == block, V a multiple of block, ragged V, single row, single column
SHAPES = [(1, 1, 16), (1, 17, 16), (3, 16, 16), (7, 48, 16), (13, 150, 32), (6, 97, None)]


@pytest.mark.parametrize("R,V,bv", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_target_stats_vs_fp64(R, V, bv, dtype):
    z, t, g = make(R, V, dtype, n_ignored=R // 3, seed=R * 1000 + V)
    z0 = z.clone()
    lo, zt = E.tile_target_stats(z, t, IGN, block_v=bv)
    ref_lo, ref_zt, valid, _ = oracle(z, t, g)
    assert lo.dtype == zt.dtype == torch.float32 and lo.shape == zt.shape == (R,)
    assert torch.equal(z, z0), "the forward pass must not write the tile"
    fin = torch.isfinite(ref_lo)  # V = 1: no other column, lo = -inf
    assert torch.equal(torch.isfinite(lo.cpu()), fin) and bool((lo.cpu()[~fin] == float("-inf")).all())
    if fin.any():
        err = (lo.double().cpu()[fin] - ref_lo[fin]).abs().max().item()
        assert err <= 2e-6 * max(1.0, ref_lo[fin].abs().max().item())
    assert torch.equal(zt.double().cpu(), ref_zt), "target logit is a plain load: exact"
    assert torch.all(zt.cpu()[~valid] == 0)


@pytest.mark.parametrize("R,V,bv", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dlogits_in_place_vs_fp64(R, V, bv, dtype):
    z, t, g = make(R, V, dtype, n_ignored=R // 3, seed=R * 1000 + V + 1)
    ref_lo, _, valid, ref = oracle(z, t, g)
    lo = ref_lo.float().to(DEV)  # exact lo (to fp32): judges this kernel alone
    lo = torch.where(torch.isfinite(lo), lo, torch.full_like(lo, float("inf")))  # as the backend passes it
    out = E.tile_dlogits_(z, lo, t, block_v=bv)
    assert out is z and out.dtype == dtype
    assert_dz_close(out, ref, g, dtype)
    assert torch.count_nonzero(out.cpu()[~valid]) == 0, "ignored rows give exactly 0"


@pytest.mark.parametrize("zdt,odt", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                     (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_dlogits_into_out_of_other_dtype(zdt, odt):
    R, V = 9, 70
    z, t, g = make(R, V, zdt, n_ignored=2, seed=11)
    z0 = z.clone()
    out = torch.full((R, V), float("nan"), dtype=odt, device=DEV)
    lo, _ = E.tile_target_stats(z, t, IGN, block_v=32)
    ret = E.tile_dlogits_(z, lo, t, out=out, block_v=32)
    assert ret is out and torch.equal(z, z0), "out of place: z is untouched"
    _, _, valid, ref = oracle(z, t, g)
    assert not torch.isnan(out).any(), "every element of out (ragged last block included) is written"
    assert_dz_close(out, ref, g, odt)
    # each row sums to sum(q) - 1 = 0; every element is off by <= eps |ref| and sum |ref| = 2
    bound = 2 * (2 * torch.finfo(odt).eps + 1e-5)
    assert out.double().cpu().sum(1).abs().max().item() <= bound


def test_memorised_rows_keep_relative_accuracy():
    """Rows with 1 - p_t from 1e-2 down to 1e-7 (a memorised forget set): lo and zt give lp and 1 - p_t to
    fp32 *relative* accuracy (``zt - lse`` in fp32 would lose them to the rounding of lse), and the q tile
    holds O(1) numbers however small 1 - p_t is."""
    from simnpo_fast.backends.base import target_terms

    R, V = 6, 300
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(R, V, generator=gen) * 0.5
    t = torch.randint(0, V, (R,), generator=gen)
    for r, margin in enumerate((10.0, 13.0, 16.0, 19.0, 22.0, 25.0)):
        z[r, t[r]] = margin
    z, t = z.to(DEV), t.to(DEV)
    lo, zt = E.tile_target_stats(z, t, IGN, block_v=64)
    lp, lse, omp = target_terms(lo, zt)
    ref_lo, _, _, ref = oracle(z, t)
    ref_omp = torch.exp(ref_lo - torch.logaddexp(ref_lo, z.double().cpu().gather(1, t.cpu()[:, None])[:, 0]))
    assert ref_omp.min() < 1e-7 and ref_omp.max() > 1e-3
    assert ((omp.double().cpu() - ref_omp) / ref_omp).abs().max() <= 1e-5
    assert ((-torch.expm1(lp.double().cpu()) - ref_omp) / ref_omp).abs().max() <= 1e-5
    out = E.tile_dlogits_(z, lo, t, out=torch.empty(R, V, dtype=torch.bfloat16, device=DEV), block_v=64)
    assert_dz_close(out, ref, None, torch.bfloat16, lse_max=ref_lo.abs().max().item())


def test_strided_tile_and_pipeline():
    """A column slice of a wider buffer (row stride != V) and a transposed-stride output; the two kernels
    chained as the backend does (lse from the first kernel)."""
    R, V = 11, 83
    full, t, g = make(R, V + 29, torch.float32, n_ignored=3, seed=5)
    z = full[:, 7:7 + V]
    assert not z.is_contiguous()
    t = t.clamp(max=V - 1).where(t != IGN, t)
    lo, zt = E.tile_target_stats(z, t, IGN, block_v=16)
    ref_lo, ref_zt, valid, ref = oracle(z, t, g)
    assert (lo.double().cpu() - ref_lo).abs().max().item() <= 2e-6 * ref_lo.abs().max().item()
    assert torch.equal(zt.double().cpu(), ref_zt)
    out_t = torch.empty(V, R, device=DEV).t()  # column-major out
    E.tile_dlogits_(z, lo, t, out=out_t, block_v=16)
    assert_dz_close(out_t, ref, g, torch.float32)
    before = full.clone()
    E.tile_dlogits_(z, lo, t, block_v=16)  # in place into the view
    assert_dz_close(z, ref, g, torch.float32)
    assert torch.equal(full[:, :7], before[:, :7]) and torch.equal(full[:, 7 + V:], before[:, 7 + V:])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN/inf row, on purpose
def test_extreme_logits_and_all_ignored():
    R, V = 4, 40
    z, t, g = make(R, V, torch.float32, scale=60.0, seed=7)  # exp would overflow without the running max
    z[1, 5] = 500.0
    lo, zt = E.tile_target_stats(z, t, IGN, block_v=16)
    ref_lo, ref_zt, _, ref = oracle(z, t, g)
    assert torch.isfinite(lo).all()
    assert (lo.double().cpu() - ref_lo).abs().max().item() <= 2e-6 * ref_lo.abs().max().item()
    out = E.tile_dlogits_(z.clone(), lo, t, block_v=16)
    assert torch.isfinite(out).all()
    assert_dz_close(out, ref, g, torch.float32, lse_max=ref_lo.abs().max().item())
    # every row ignored, with garbage lo: all zeros, no NaN
    t_ign = torch.full((R,), IGN, device=DEV)
    lo_i, zt_i = E.tile_target_stats(z, t_ign, IGN)
    assert torch.all(zt_i == 0)
    out = E.tile_dlogits_(z.clone(), torch.full((R,), float("-inf")), t_ign)
    assert torch.count_nonzero(out) == 0 and not torch.isnan(out).any()


def test_custom_ignore_index_and_empty_and_errors():
    R, V = 5, 20
    z, t, g = make(R, V, torch.float32, seed=9)
    t[2] = -1
    lo, zt = E.tile_target_stats(z, t, -1, block_v=16)
    assert zt[2] == 0 and zt[0] == z[0, t[0]]
    out = E.tile_dlogits_(z.clone(), lo, t, ignore_index=-1, block_v=16)
    assert torch.count_nonzero(out[2]) == 0 and torch.count_nonzero(out[0]) == V
    lo0, zt0 = E.tile_target_stats(z[:0], t[:0])
    assert lo0.shape == (0,)
    with pytest.raises(ValueError, match="power of two"):
        E.tile_target_stats(z, t, block_v=24)
    with pytest.raises(ValueError, match="tgt"):
        E.tile_target_stats(z, t[:3])
    with pytest.raises(ValueError, match="out"):
        E.tile_dlogits_(z, lo, t, out=torch.empty(R, V + 1))
    with pytest.raises(ValueError):
        E.tile_target_stats(z.double(), t)
