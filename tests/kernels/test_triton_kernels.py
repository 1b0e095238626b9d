"""Kernel-level tests of kernels/seq_logprob.py under TRITON_INTERPRET=1 against an fp64 torch oracle.

Shapes are small (the interpreter is ~1000x slower than torch) but never multiples of the tiles, so every
mask edge is crossed: partial row / vocabulary / hidden tiles, a single token, ignored rows, empty sequences,
the split-V (online-lse partials + combine) path and the atomic split paths of both backward kernels.
16-bit inputs: the kernels upcast on load and accumulate in fp32, so they are judged against the fp64
oracle evaluated on the *same* rounded inputs, at fp32 tolerance.
"""
import importlib
import math
import os
import time

import pytest
import torch

from simnpo_fast.kernels import seq_logprob as K

IGN = -100
pytestmark = pytest.mark.skipif(not K.INTERPRET and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set in conftest) or a GPU")


def _device():
    return "cuda" if (torch.cuda.is_available() and not K.INTERPRET) else "cpu"


def make(M, V, D, dtype, bias=True, n_ignored=0, scale=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=gen).to(dtype)
    w = (torch.randn(V, D, generator=gen) * scale / D ** 0.25).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, V, (M,), generator=gen)
    if n_ignored:
        t[torch.randperm(M, generator=gen)[:n_ignored]] = IGN
    g = torch.randn(M, generator=gen)
    dev = _device()
    return [None if a is None else a.to(dev) for a in (x, w, b, t, g)]


def oracle(x, w, b, t, g):
    """fp64 naive maths on the (already rounded) inputs."""
    xd, wd = x.double().cpu(), w.double().cpu()
    z = xd @ wd.T + (b.double().cpu() if b is not None else 0.0)
    t = t.cpu()
    valid = t != IGN
    lse = torch.logsumexp(z, dim=1)
    lp = torch.where(valid, z.gather(1, t.clamp(min=0)[:, None])[:, 0] - lse, torch.zeros_like(lse))
    onehot = torch.nn.functional.one_hot(t.clamp(min=0), w.shape[0]).double()
    dz = (g.double().cpu() * valid)[:, None] * (onehot - torch.softmax(z, dim=1))
    return lp, lse, valid, dz @ wd, dz.T @ xd, dz.sum(0)


def close(a, ref, tol, what):
    a = a.double().cpu()
    err = (a - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:.1e} * {scale:.3e}"


FP32_TOL = 2e-5  # fp32 accumulation over d <= 128 and V <= 2048 terms, relative to max(|ref|, 1)

CASES = [
    # M, V, D, dtype, bias, n_ignored, blocks, split
    (1, 33, 17, torch.float32, True, 0, None, None),            # a single token, partial tiles everywhere
    (37, 101, 45, torch.float32, True, 5, None, 1),            # no split: owner-only, plain RMW
    (37, 101, 45, torch.float32, False, 5, None, 3),           # split: partial lse combine + atomics
    (53, 130, 70, torch.float16, True, 7, None, None),         # fp16 in, in-kernel casts
    (53, 130, 70, torch.bfloat16, True, 7, None, 2),           # bf16 in, in-kernel casts
    (19, 257, 33, torch.bfloat16, False, 0, (16, 64, 32), None),  # other tile shapes
    (64, 96, 32, torch.float32, True, 0, (32, 32, 16), 2),     # exact multiples of the tiles
    (40, 50, 20, torch.float32, True, 40, None, None),         # every row ignored
]


@pytest.mark.parametrize("M,V,D,dtype,bias,n_ign,blocks,split", CASES)
def test_forward_backward_vs_fp64(M, V, D, dtype, bias, n_ign, blocks, split):
    x, w, b, t, g = make(M, V, D, dtype, bias, n_ign)
    lp_r, lse_r, valid, dx_r, dw_r, db_r = oracle(x, w, b, t, g)
    lp, lse = K.lse_target_fwd(x, w, b, t, IGN, blocks=blocks, split_v=split)
    assert lp.dtype == torch.float32 and lse.dtype == torch.float32
    close(lp, lp_r, FP32_TOL, "lp")
    assert torch.all(lp.cpu()[~valid] == 0), "ignored rows must have lp == 0 exactly"
    close(lse[valid], lse_r[valid], FP32_TOL, "lse")
    dx, dw, db = K.logits_grad_bwd(x, w, b, t, lse, g, IGN, lp=lp, blocks=blocks, split_v=split, split_m=split)
    close(dx, dx_r, FP32_TOL, "dx")
    close(dw, dw_r, FP32_TOL, "dw")
    assert torch.all(dx.cpu()[~valid] == 0), "ignored rows must get exactly zero dx"
    if bias:
        close(db, db_r, FP32_TOL, "db")
    else:
        assert db is None


def test_forward_agrees_across_splits_and_tiles():
    x, w, b, t, _ = make(45, 200, 40, torch.float32, True, 3)
    ref = K.lse_target_fwd(x, w, b, t, IGN, blocks=(16, 32, 16), split_v=1)
    for blocks, split in (((16, 32, 16), 7), ((32, 64, 32), 2), ((16, 128, 16), 1)):
        lp, lse = K.lse_target_fwd(x, w, b, t, IGN, blocks=blocks, split_v=split)
        torch.testing.assert_close(lp, ref[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(lse, ref[1], rtol=0, atol=1e-5)


def test_large_logits_are_stable():
    """Online logsumexp: logits around 1e3 must not overflow (a naive exp would give inf)."""
    x, w, b, t, g = make(20, 90, 24, torch.float32, True, 2, scale=1.0)
    b = b + 1000.0
    lp_r, lse_r, valid, dx_r, dw_r, db_r = oracle(x, w, b, t, g)
    lp, lse = K.lse_target_fwd(x, w, b, t, IGN, split_v=2)
    assert torch.isfinite(lp).all() and torch.isfinite(lse).all()
    close(lp, lp_r, 1e-5, "lp")
    dx, dw, db = K.logits_grad_bwd(x, w, b, t, lse, g, IGN, lp=lp)
    close(dx, dx_r, 1e-4, "dx")
    close(dw, dw_r, 1e-4, "dw")
    close(db, db_r, 1e-4, "db")


def test_memorised_rows_keep_relative_accuracy():
    """Rows whose target probability is 1 - 1e-2 ... 1 - 1e-7 (a memorised forget set): lp and 1 - p_t to fp32
    *relative* accuracy (the forward's log-sum-exp runs over the other columns; ``z_t - lse`` in fp32 would lose
    1 - p_t ~ 1e-7 to the rounding of lse ~ 20), and dx / dw to fp32 accuracy relative to their own size (the
    backward's q - onehot tile with the fp32 row factor -g (1 - p_t))."""
    M, V, D = 24, 96, 24
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(V, D, generator=gen, dtype=torch.float64) / D ** 0.5
    t = torch.randint(0, V, (M,), generator=gen)
    margin = torch.linspace(8.0, 40.0, M, dtype=torch.float64)  # 1 - p_t from ~1e-1 down to ~1e-9
    u = w[t] / (w[t] ** 2).sum(1, keepdim=True)
    x = margin[:, None] * u + torch.randn(M, D, generator=gen, dtype=torch.float64) * 0.05
    g = torch.randn(M, generator=gen, dtype=torch.float64)
    dev = _device()
    x, w, t, g = x.float().to(dev), w.float().to(dev), t.to(dev), g.float().to(dev)
    lp, lse = K.lse_target_fwd(x, w, None, t, IGN, split_v=2)
    z = x.double().cpu() @ w.double().cpu().T
    tc = t.cpu()
    lo = torch.logsumexp(z.scatter(1, tc[:, None], float("-inf")), 1)
    zt = z.gather(1, tc[:, None])[:, 0]
    omp = torch.sigmoid(lo - zt)
    assert omp.min() < 1e-6 and omp.max() > 1e-3
    assert ((-torch.expm1(lp.double().cpu()) - omp) / omp).abs().max() <= 1e-4
    dx, dw, _ = K.logits_grad_bwd(x, w, None, t, lse, g, IGN, lp=lp)
    p = torch.softmax(z, 1)
    dz = -g.double().cpu()[:, None] * p
    dz[torch.arange(M), tc] = g.double().cpu() * omp
    dx_r, dw_r = dz @ w.double().cpu(), dz.T @ x.double().cpu()
    err = (dx.double().cpu() - dx_r).norm(dim=1) / dx_r.norm(dim=1)  # every row to its own size
    assert err.max() <= 1e-4, err
    assert (dw.double().cpu() - dw_r).norm() / dw_r.norm() <= 1e-4


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True)])
def test_backward_need_flags(need):
    need_dx, need_dw, need_db = need
    x, w, b, t, g = make(21, 70, 19, torch.float32, True, 2)
    _, _, _, dx_r, dw_r, db_r = oracle(x, w, b, t, g)
    lp, lse = K.lse_target_fwd(x, w, b, t, IGN)
    dx, dw, db = K.logits_grad_bwd(x, w, b, t, lse, g, IGN, lp=lp, need_dx=need_dx, need_dw=need_dw,
                                   need_db=need_db)
    for got, ref, want, name in ((dx, dx_r, need_dx, "dx"), (dw, dw_r, need_dw, "dw"), (db, db_r, need_db, "db")):
        if want:
            close(got, ref, FP32_TOL, name)
        else:
            assert got is None, name


def test_strided_input_rows():
    """x may be a non-contiguous view (e.g. every other row of a bigger buffer)."""
    x, w, b, t, g = make(30, 60, 20, torch.float32, True, 1)
    big = torch.zeros(60, 20, device=x.device)
    big[::2] = x
    xv = big[::2]
    assert not xv.is_contiguous()
    lp_r, _, _, dx_r, dw_r, _ = oracle(x, w, b, t, g)
    lp, lse = K.lse_target_fwd(xv, w, b, t, IGN)
    close(lp, lp_r, FP32_TOL, "lp")
    dx, dw, _ = K.logits_grad_bwd(xv, w, b, t, lse, g, IGN, lp=lp)
    close(dx, dx_r, FP32_TOL, "dx")
    close(dw, dw_r, FP32_TOL, "dw")


def test_seq_reduce_with_empty_and_ignored_sequences():
    x, w, b, t, _ = make(23, 40, 16, torch.float32, False, 0)
    t[5:9] = IGN  # sequence 1 (rows 5..10) partly ignored
    offsets = [0, 5, 11, 11, 12, 12, 23]  # sequences 2 and 4 empty, sequence 3 a single token
    logp_sum, n_tok, lp, _ = K.seq_logprob_fwd(x, w, b, t, offsets, IGN)
    lp_r = oracle(x, w, b, t, torch.zeros(23))[0]
    ref = torch.stack([lp_r[offsets[i]:offsets[i + 1]].sum() for i in range(6)])
    close(logp_sum, ref, FP32_TOL, "logp_sum")
    tc = t.cpu()
    n_ref = torch.tensor([int((tc[offsets[i]:offsets[i + 1]] != IGN).sum()) for i in range(6)])
    assert n_tok.cpu().tolist() == n_ref.tolist() == [5, 2, 0, 1, 0, 11]
    assert logp_sum.cpu()[2] == 0 and logp_sum.cpu()[4] == 0


def test_no_rows():
    x, w, b, t, g = make(0, 40, 16, torch.float32, True, 0)
    lp, lse = K.lse_target_fwd(x, w, b, t, IGN)
    assert lp.shape == (0,) and lse.shape == (0,)
    dx, dw, db = K.logits_grad_bwd(x, w, b, t, lse, g, IGN, lp=lp)
    assert dx.shape == (0, 16) and torch.all(dw == 0) and torch.all(db == 0)
    s, n = K.seq_reduce(lp, t, [0, 0, 0], IGN)
    assert s.tolist() == [0.0, 0.0] and n.tolist() == [0, 0]


def test_input_validation():
    x, w, b, t, _ = make(4, 40, 16, torch.float32, True, 0)
    with pytest.raises(ValueError, match="dtype"):
        K.lse_target_fwd(x.double(), w.double(), None, t)
    with pytest.raises(ValueError, match=r"\[V, d\]"):
        K.lse_target_fwd(x, w[:, :8], None, t)
    with pytest.raises(ValueError, match="targets"):
        K.lse_target_fwd(x, w, None, t[:3])


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(K, "INTERPRET", False)
    x, w, b, t, _ = make(4, 40, 16, torch.float32, True, 0)
    if x.device.type == "cuda":
        pytest.skip("CPU-only check")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.lse_target_fwd(x, w, b, t)


_AOT_SCRIPT = r"""
import inspect, sys
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from simnpo_fast.kernels import seq_logprob as K
assert not K.INTERPRET
target = GPUTarget("cuda", 90, 32)

def build(fn, ptr_types, consts, num_warps, num_stages):
    names = list(inspect.signature(fn.fn).parameters)
    sig, cst = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"; cst[(i,)] = consts[n]
        elif n in ptr_types:
            sig[n] = ptr_types[n]
        else:
            sig[n] = "*fp32" if n.endswith("_ptr") else "i32"
    out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst), target=target,
                         options={"num_warps": num_warps, "num_stages": num_stages})
    assert out.metadata.shared <= 227 * 1024, (fn.__name__, out.metadata.shared)
    print("built", fn.__name__, out.metadata.shared)

for tdt, name, dt in ((tl.bfloat16, "bf16", torch.bfloat16), (tl.float32, "fp32", torch.float32)):
    bm, bv, bd, nw, ns = K._gpu_blocks(dt)
    ptr = {"x_ptr": "*" + name, "w_ptr": "*" + name, "b_ptr": "*" + name, "tgt_ptr": "*i64"}
    base = dict(HAS_BIAS=True, DOT_DTYPE=tdt, IEEE=name == "fp32", BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=bd)
    build(K._fwd_kernel, ptr, base, nw, ns)
    build(K._bwd_dx_kernel, ptr, dict(base, ATOMIC=False), nw, ns)
    build(K._bwd_dw_kernel, ptr, dict(base, ATOMIC=True, NEED_DW=True, NEED_DB=True), nw, ns)
build(K._combine_kernel, {"tgt_ptr": "*i64"}, {"N_SPLIT": 2, "BLOCK": 1024}, 4, 1)
build(K._seq_sum_kernel, {"tgt_ptr": "*i64", "off_ptr": "*i64", "cnt_ptr": "*i64"}, {"BLOCK": 256}, 4, 1)
from simnpo_fast.kernels import epilogue as E
for name in ("bf16", "fp16", "fp32"):
    bv = 2048 if name == "fp32" else 4096
    build(E._other_lse_kernel, {"z_ptr": "*" + name, "tgt_ptr": "*i64"}, {"BLOCK_V": bv}, 8, 1)
    build(E._qtile_kernel, {"z_ptr": "*" + name, "out_ptr": "*" + name, "tgt_ptr": "*i64"}, {"BLOCK_V": bv}, 8, 1)
print("AOT-OK")
"""


def _nvidia_backend():
    try:
        importlib.import_module("triton.backends.nvidia.compiler")
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _nvidia_backend(), reason="triton without its NVIDIA backend")
def test_kernels_compile_for_sm90():
    """Ahead-of-time compile (TTIR -> TTGIR -> PTX -> cubin with ptxas) of every kernel (seq_logprob and the
    tile epilogue) at the GPU tile sizes, no GPU needed: what passes in the interpreter must also build for an
    H100 (tl.dot shapes, layouts, shared memory). Runs in a subprocess because the jit functions are bound to
    the interpreter here."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "AOT-OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
    assert time.time() - t0 < 240
