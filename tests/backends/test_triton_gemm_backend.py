"""The public losses with backend="triton-gemm" (chunked 6NdV schedule, torch GEMMs, Triton tile epilogue;
TRITON_INTERPRET=1) against the fp64 reference oracle and against backend="chunked": values and gradients
w.r.t. hidden, weight and bias, the long-sequence (two-pass) path, 16-bit tiles, the fp32-result GEMM
plumbing, dispatch.

Inputs are scaled so that every objective has O(1) values and gradients, hence relative tolerances.
16-bit inputs: the logits tile is the 16-bit GEMM output (rounded once, as the model's own LM head would),
d_logits is rounded to 16 bits for the gradient GEMMs and the gradients are returned in the input dtype:
the bound is 2 ulps (2 eps) of the largest value, as for backend="triton".
"""
import os

import pytest
import torch

import simnpo_fast as sf
import simnpo_fast.backends.triton as TB
from simnpo_fast.backends import ReferenceBackend, get_backend
from simnpo_fast.backends.triton import TritonGemmBackend

from tests.backends.triton_common import LOSSES, batch, check_all_ignored, rel_err, run  # noqa: F401
ORACLE = ReferenceBackend(torch.float64)
# chunk_rows=6 with sequences of up to 10 answer tokens: several whole-sequence tiles *and* the two-pass
# path of a sequence longer than a tile; block_v=32 so V = 150 spans 5 column blocks (ragged tail).
SMALL_TILES = TritonGemmBackend(chunk_rows=6, block_v=32)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton needs TRITON_INTERPRET=1 (conftest sets it) or a GPU")


def assert_matches(got, ref, tol_out, tol_grad, n_grads):
    out, grads = got
    r_out, r_grads = ref
    assert out.shape == r_out.shape
    assert rel_err(out, r_out) < tol_out
    assert len(grads) == n_grads
    for g, r, name in zip(grads, r_grads, ("hidden", "weight", "bias")):
        assert rel_err(g, r) < tol_grad, name


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_fp64_oracle(loss, bias):
    h, w, b, lab = batch(bias=bias)
    ref = run(loss, h, w, b, lab, ORACLE)
    assert ref[0].abs().max() > 1e-2, "test inputs must give an O(1) loss"
    for be in ("triton-gemm", SMALL_TILES):
        got = run(loss, h, w, b, lab, be)
        assert all(g.dtype == torch.float32 for g in got[1])
        assert_matches(got, ref, 1e-5, 2e-5, 3 if bias else 2)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
    h, w, b, lab = batch(seed=1)
    kw = {"reduction": reduction}
    if reduction == "sum":
        kw["normalizer"] = 7.0
    for loss in ("simnpo", "nll"):
        got = run(loss, h, w, b, lab, SMALL_TILES, **kw)
        assert_matches(got, run(loss, h, w, b, lab, ORACLE, **kw), 1e-5, 2e-5, 3)
    if reduction == "none":
        assert got[0][2] == 0, "a sequence without answer tokens contributes 0"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["simnpo", "logp"])
def test_low_precision_vs_fp64_truth(dtype, loss):
    h, w, b, lab = batch(dtype=dtype, seed=2)
    ref = run(loss, h, w, b, lab, ORACLE)
    eps = torch.finfo(dtype).eps
    for be in ("triton-gemm", SMALL_TILES):
        got = run(loss, h, w, b, lab, be)
        assert all(g.dtype == dtype for g in got[1])
        assert_matches(got, ref, 2 * eps, 2 * eps, 3)


def test_low_precision_agrees_with_chunked():
    h, w, b, lab = batch(dtype=torch.bfloat16, seed=3)
    eps = torch.finfo(torch.bfloat16).eps
    assert_matches(run("simnpo", h, w, b, lab, "triton-gemm"), run("simnpo", h, w, b, lab, "chunked"),
                   2 * eps, 2 * eps, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_result_gemm_path(monkeypatch, dtype):
    """The CUDA path (torch.mm/addmm(out_dtype=float32), absent from CPU torch) with the two native calls
    replaced by fp32 emulations: checks the plumbing (dx row slices, the fp32 row scale, dW first write then
    accumulation, fp16's power-of-two ``alpha``) and that it is at least as accurate as the 16-bit-product
    fallback."""
    calls = {"mm": 0, "addmm": 0}

    def mm(a, b, out=None):
        calls["mm"] += 1
        r = a.float() @ b.float()
        return r if out is None else out.copy_(r)

    def addmm(acc, a, b, alpha=1.0):
        calls["addmm"] += 1
        return acc.add_(a.float() @ b.float(), alpha=alpha)

    h, w, b, lab = batch(dtype=dtype, seed=4, B=4)
    ref = run("simnpo", h, w, b, lab, ORACLE)
    fallback = run("simnpo", h, w, b, lab, SMALL_TILES)
    assert calls == {"mm": 0, "addmm": 0}
    monkeypatch.setattr(TB, "_mm_f32_native", mm)
    monkeypatch.setattr(TB, "_addmm_f32_native", addmm)
    monkeypatch.setitem(TB._F32_GEMM_OK, ("cpu", dtype), True)
    native = run("simnpo", h, w, b, lab, SMALL_TILES)
    assert calls["mm"] >= 3 and calls["addmm"] >= 2, calls  # several tiles: dx per tile, dW first + adds
    eps = torch.finfo(dtype).eps
    assert_matches(native, ref, 2 * eps, 2 * eps, 3)
    assert rel_err(native[1][1], ref[1][1]) <= rel_err(fallback[1][1], ref[1][1]) + eps / 4


def test_f32_gemm_probe_on_cpu():
    # the CPU build of torch has no out_dtype GEMM: the probe must say so (and not touch the global RNG)
    state = torch.random.get_rng_state()
    assert TB.f32_gemm_available("cpu", torch.bfloat16) is False
    assert torch.equal(state, torch.random.get_rng_state())


def test_single_token_and_2d_hidden_no_shift():
    h, w, b, lab = batch(single=True, seed=5)
    assert_matches(run("simnpo", h, w, b, lab, SMALL_TILES), run("simnpo", h, w, b, lab, ORACLE),
                   1e-5, 2e-5, 3)
    h2, lab2 = h[0], lab[0]  # [N, d] hidden with labels [N], no shift: one sequence
    assert_matches(run("nll", h2, w, b, lab2, "triton-gemm", shift=False),
                   run("nll", h2, w, b, lab2, ORACLE, shift=False), 1e-5, 2e-5, 3)


def test_all_ignored_gives_zero_loss_and_grads():
    check_all_ignored("triton-gemm", seed=6)


@pytest.mark.parametrize("loss", ["simnpo", "npo", "logp"])
def test_agrees_with_chunked(loss):
    h, w, b, lab = batch(B=3, T=13, D=36, V=97, seed=7)
    assert_matches(run(loss, h, w, b, lab, SMALL_TILES), run(loss, h, w, b, lab, "chunked"), 1e-5, 2e-5, 3)


def test_dispatch_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("SIMNPO_FAST_BACKEND", raising=False)
    assert "triton-gemm" in sf.available_backends()
    assert get_backend(None, cpu).name == "chunked"               # CPU default unchanged
    assert get_backend("triton-gemm", cpu).name == "triton-gemm"  # allowed under the interpreter
    monkeypatch.setenv("SIMNPO_FAST_BACKEND", "triton-gemm")
    assert get_backend(None, cpu).name == "triton-gemm"
    assert TritonGemmBackend().supports(torch.device("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not TritonGemmBackend().supports(cpu)
    with pytest.raises(ValueError, match="triton-gemm"):
        get_backend("triton-gemm", cpu)


def test_fp64_inputs_keep_the_chunked_fp64_path():
    h, w, b, lab = batch(dtype=torch.float64, seed=8)
    assert_matches(run("simnpo", h, w, b, lab, SMALL_TILES), run("simnpo", h, w, b, lab, ORACLE),
                   1e-12, 1e-10, 3)


def test_passes_the_bench_gpu_correctness_gate():
    """bench/gpu.py times "triton-gemm" only if it passes this gate (bf16 and fp32 vs the fp64 oracle)."""
    from bench import gpu

    methods, _ = gpu.make_methods("cpu")
    chk = gpu.check({"triton-gemm": methods["triton-gemm"]}, "cpu", small=True)["results"]
    for dt in ("bfloat16", "float32"):
        assert chk[f"triton-gemm/{dt}"]["ok"], chk
    assert chk["triton-gemm/float32"]["dweight"] < 1e-5
    assert gpu.DESIGN_NDV["triton-gemm"] == 6 and gpu.DESIGN_NDV["triton"] == 10
