"""The fused backward kernels' gradient filter (kernels/seq_logprob_kernels.py, FILTER) under TRITON_INTERPRET=1:
the result equals, to fp32 accuracy, an fp64 oracle that drops exactly the (token block x vocabulary block) tiles
the rule allows (every live entry p < eps and no target) and the rows of zero weight -- so the kernels skip those
tiles and only those: owner programs and the atomic split paths, fp32 and bf16 inputs, a partial token / vocabulary /
d block, an ignored row, a row with 1 - p_t = 0 in fp32, a target of tiny probability alone in its tile."""
import pytest
import torch

from simnpo_fast.kernels import seq_logprob as K

pytestmark = pytest.mark.skipif(not K.INTERPRET, reason="needs TRITON_INTERPRET=1 (set in conftest)")
BM, BV, BD = 16, 32, 16


def _inputs(seed=0, M=40, V=150, D=24):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g) / D ** 0.5
    t = torch.randint(0, V, (M,), generator=g)
    x = torch.randn(M, D, generator=g) * 0.2
    x[: M // 2] += 6.0 * w[torch.randint(0, 40, (M // 2,), generator=g)]  # peaked on the first columns
    t[5] = V - 1  # a target far from every peak: its tile must be kept for its row
    t[7] = -100
    x[9] = 400.0 * w[t[9]]  # memorised beyond fp32: p_t = 1, 1 - p_t = 0, r = 0
    gs = torch.randn(M, generator=g)
    gs[16:32] = 0.0  # one whole token block dropped by the row filter
    gs[3] = 0.0
    return x, w, t, gs


def _oracle(x, w, t, gs, eps):
    x, w = x.double(), w.double()
    M, V = x.shape[0], w.shape[0]
    p = torch.softmax(x @ w.t(), -1)
    valid = t != -100
    onehot = torch.zeros_like(p)
    onehot[valid] = torch.nn.functional.one_hot(t[valid], V).double()
    d = (gs.double() * valid)[:, None] * (onehot - p)
    live = valid & (gs != 0)
    kept = 0
    for m0 in range(0, M, BM):
        for v0 in range(0, V, BV):
            blk = (slice(m0, m0 + BM), slice(v0, v0 + BV))
            need = live[blk[0], None] & ((p[blk] >= eps) | (onehot[blk] > 0))
            if not bool(need.any()):
                d[blk] = 0.0
            kept += bool(need.any())
    return d @ w, d.t() @ x, d.sum(0), kept


@pytest.mark.parametrize("eps,split,dtype", [(0.0, 1, torch.float32), (0.02, 1, torch.float32),
                                             (0.02, 2, torch.float32), (0.02, 1, torch.bfloat16)])
def test_kernels_skip_exactly_the_tiles_of_the_rule(eps, split, dtype):
    x, w, t, gs = _inputs()
    x, w = x.to(dtype), w.to(dtype)
    b = torch.zeros(w.shape[0], dtype=dtype)
    lp, lse = K.lse_target_fwd(x, w, b, t, blocks=(BM, BV, BD))
    counts = {}
    dx, dw, db = K.logits_grad_bwd(x, w, b, t, lse, gs, lp=lp, blocks=(BM, BV, BD), eps=eps, split_v=split,
                                   split_m=split, counts=counts)
    assert float(lp[9]) == 0.0  # the row of 1 - p_t = 0 is there
    ox, ow, ob, kept = _oracle(x.float(), w.float(), t, gs, eps)  # the oracle on the (rounded) inputs
    tiles = -(-x.shape[0] // BM) * -(-w.shape[0] // BV)
    for key in ("dx", "dw"):  # the kernels' own count of the tiles whose product ran
        assert (int(counts[key][0].sum()), counts[key][1]) == (kept, tiles)
    assert kept < tiles
    for got, want in ((dx, ox), (dw, ow), (db, ob)):
        assert (got.double() - want).abs().max().item() <= 2e-5 * want.abs().max().item()
    full = K.logits_grad_bwd(x, w, b, t, lse, gs, lp=lp, blocks=(BM, BV, BD), split_v=split, split_m=split)
    if eps > 0:  # the rule did drop tiles here (else this test would not test the skip)
        assert (full[1] - dw).abs().max().item() > 1e-4 * full[1].abs().max().item()
    else:  # rows of zero weight contribute nothing anyway: eps = 0 is exact
        for a, c in zip(full, (dx, dw, db)):
            assert (a - c).abs().max().item() <= 1e-6 * a.abs().max().item()
