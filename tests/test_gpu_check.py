"""``make gpu-check``: its device test (stage 1 runs it on CUDA with TRITON_INTERPRET=0; here it runs on CPU under
the interpreter), its dry run (every stage on CPU, the package run from the bare source tree with ``datasets`` made
absent, as on the device image), and the rule that picks the CUDA default backend, on hand-made results."""
import json
import os
import subprocess
import sys

import pytest
import torch

import simnpo_fast as sf
from simnpo_fast.backends import ReferenceBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON_DEVICE = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEV = "cuda" if ON_DEVICE else "cpu"
IGN = -100
#: relative max error vs the fp64 oracle on the same rounded inputs: fp32 kernels accumulate in fp32; 16-bit
#: results are rounded once to their dtype (and triton-gemm / chunked hold 16-bit logits tiles)
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _batch(dtype):
    """Prompt, padding and an empty sequence; shapes that are no multiple of any tile (bigger on a GPU)."""
    B, T, D, V = (4, 67, 264, 5003) if ON_DEVICE else (3, 11, 40, 150)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 2 / D ** 0.5).to(dtype)
    lab = torch.randint(0, V, (B, T), generator=g)
    lab[0, :4] = IGN
    lab[1, -3:] = IGN
    lab[2, :] = IGN
    return h, w, lab


def _gamma(h, w, lab, beta=2.5):
    """The SimNPO margin that puts the mean sequence at weight 1/2 (random models are otherwise saturated)."""
    lp, n = sf.sequence_logprob(h.double(), w.double(), lab, backend=ReferenceBackend(torch.float64))
    return float((-(beta / n.clamp_min(1)) * lp)[n > 0].mean())


def _loss_grads(objective, h, w, lab, backend, device, gamma):
    h = h.detach().to(device).requires_grad_(True)
    w = w.detach().to(device).requires_grad_(True)
    lab = lab.to(device)
    fn = {"simnpo": lambda: sf.simnpo_loss(h, w, lab, beta=2.5, gamma=gamma, backend=backend),
          "npo": lambda: sf.npo_loss(h, w, lab, torch.full((h.shape[0],), -40.0, device=device), beta=0.1,
                                     backend=backend),
          "nll": lambda: sf.nll_loss(h, w, lab, backend=backend)}[objective]
    out = fn()
    gh, gw = torch.autograd.grad(out, [h, w])
    return [t.detach().double().cpu() for t in (out, gh, gw)]


def _rel(a, ref):
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("objective", ["simnpo", "npo", "nll"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "triton-gemm", "chunked"])
def test_device_backend_matches_fp64(backend, dtype, objective):
    """Loss and both gradients of each backend on this device against the fp64 oracle of the same inputs."""
    h, w, lab = _batch(dtype)
    gamma = _gamma(h, w, lab)
    got = _loss_grads(objective, h, w, lab, backend, DEV, gamma)
    ref = _loss_grads(objective, h.double(), w.double(), lab, ReferenceBackend(torch.float64), "cpu", gamma)
    assert ref[0].abs() > 1e-2 and ref[2].abs().max() > 0
    for name, a, r in zip(("loss", "dhidden", "dweight"), got, ref):
        assert torch.isfinite(a).all(), (name, backend)
        assert _rel(a, r) < TOL[dtype], (name, backend, dtype, _rel(a, r))


# ---------------------------------------------------------------------------------------------------------------
# the script: dry run, stage budgets and partial results, the backend rule
# ---------------------------------------------------------------------------------------------------------------
def test_dry_run_every_stage_from_source_tree_without_datasets(tmp_path):
    """`make gpu-check DRY_RUN=1`: every stage on CPU, with the editable install ignored, so ``simnpo_fast.kernels``
    must import from the bare source tree (the device image has no install), and with `datasets` absent (the
    device image lacks it)."""
    args = f"--as-uninstalled --hide datasets --out {tmp_path} --budget 900 --stage-budget-scale 4"  # shared CPU
    proc = subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1", f"GPU_PY={sys.executable}",
                           f"GPU_CHECK_ARGS={args}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("gpu-*.json")
    data = json.loads(path.read_text())
    stages = data["stages"]
    assert list(stages) == ["kernels", "bench-70", "bench-90", "unlearn-hf", "unlearn-ours"]
    assert all(s["status"] == "ok" for s in stages.values()), {k: s["status"] for k, s in stages.items()}
    notes = data["notes"]
    assert "datasets" in notes["hidden"] and "editable install ignored" in notes["hidden"]
    assert notes["source"].endswith(os.path.join(ROOT, "simnpo_fast", "kernels")), notes["source"]
    k = stages["kernels"]["result"]
    assert k["passed"] == 3 and k["failures"] == k["errors"] == 0
    chk = stages["bench-70"]["result"]["correctness"]["results"]
    assert all(chk[f"{m}/{dt}"]["ok"] for m in ("triton", "triton-gemm") for dt in ("bfloat16", "float32"))
    assert {V for s in ("bench-70", "bench-90") for V in stages[s]["result"]["timing"]} == {"70", "90"}
    ours, hf = data["unlearn"]["ours"], data["unlearn"]["hf"]
    assert len(ours["times_s"]) == len(hf["times_s"]) == 3 and ours["tokens_per_step"] == hf["tokens_per_step"]
    # the same objective on the same initial weights (bf16 compute in both): an independent check of stage 3
    assert data["unlearn"]["summary"]["loss_step1_rel_diff"] < 2e-3, (ours["losses"], hf["losses"])
    assert data["backend_rule"]["backend"] in ("triton", "triton-gemm")
    md = path.with_suffix(".md").read_text()
    assert "DRY RUN" in md and "CUDA default backend" in md and data["rule"] in md


def _ctx(tmp_path):
    from bench.gpu_check import Context

    return Context(sys.executable, tmp_path, {}, tmp_path, True, False)


def test_stage_budget_kills_and_keeps_output(tmp_path):
    from bench.gpu_check import Stage, run_stage

    slow = Stage("slow", "tests", 2, [sys.executable, "-c", "import time; print('started', flush=True); "
                                                           "time.sleep(60)"])
    rec = run_stage(slow, _ctx(tmp_path), 2.0)
    assert rec["status"] == "timeout" and rec["returncode"] is None and rec["seconds"] < 15
    assert "started" in rec["output_tail"]
    bad = Stage("bad", "tests", 30, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    rec = run_stage(bad, _ctx(tmp_path), 30.0)
    assert (rec["status"], rec["returncode"]) == ("failed", 3) and "boom" in rec["output_tail"]
    # pytest killed half-way: its -v lines still count (no JUnit XML is written)
    from bench.gpu_check import _parse_junit

    lines = "tests/k.py::test_a[x] PASSED [ 33%]\ntests/k.py::test_b FAILED [ 66%]\ntests/k.py::test_c SKIPPED"
    part = Stage("part", "tests", 2, [sys.executable, "-c", f"print({lines!r}, flush=True); import time; "
                                                            "time.sleep(60)"], parse=_parse_junit)
    (tmp_path / "part").mkdir()
    rec = run_stage(part, _ctx(tmp_path), 2.0)
    assert rec["status"] == "timeout"
    assert rec["result"] == {"tests": 3, "passed": 1, "failures": 1, "errors": 0, "skipped": 1,
                             "failed": ["tests/k.py::test_b"], "partial": True}


def test_partial_results_are_written(tmp_path):
    from bench.gpu_check_report import RULE, finish

    payload = {"machine": {"cpu": "x", "versions": {}}, "dry_run": True, "rule": RULE, "path": "p", "stages": {
        "kernels": {"kind": "tests", "status": "timeout", "seconds": 90, "budget_s": 90, "output_tail": "..."},
        "bench-32000": {"kind": "bench", "status": "skipped", "why": "no time left"}}}
    path = tmp_path / "gpu-x.json"
    finish(payload, path)
    data = json.loads(path.read_text())
    assert data["stages"]["kernels"]["status"] == "timeout" and data["backend_rule"]["backend"] is None
    assert data["rates"] is None and data["unlearn"] is None
    assert "| kernels | timeout |" in path.with_suffix(".md").read_text()


def _bench(ms, extra=None, ok=None, V=("32000", "128256")):
    """A bench.gpu result: ``ms[name]`` per vocabulary (a list), ``extra[name]`` extra memory vs naive."""
    ok = ok or {}
    timing = {v: {"methods": {n: {"ms": t[i], "extra_vs_naive": (extra or {}).get(n, 0.1)} for n, t in ms.items()}}
              for i, v in enumerate(V)}
    checks = {f"{n}/bfloat16": {"ok": ok.get(n, True)} for n in ms}
    return {"kind": "bench", "status": "ok", "result": {"correctness": {"results": checks}, "timing": timing}}


@pytest.mark.parametrize("case, want", [
    (dict(ms={"triton": [10, 40], "triton-gemm": [9, 36], "chunked": [20, 80]}), "triton-gemm"),
    (dict(ms={"triton": [10, 40], "triton-gemm": [9.9, 39.5], "chunked": [20, 80]}), "triton"),  # within 3%
    (dict(ms={"triton": [10, 40], "triton-gemm": [5, 20], "chunked": [20, 80]}, ok={"triton-gemm": False}),
     "triton"),
    (dict(ms={"triton": [5, 20], "triton-gemm": [9, 36], "chunked": [20, 80]}, extra={"triton": 0.4}),
     "triton-gemm"),
    (dict(ms={"triton": [5, 20], "triton-gemm": [9, 36], "chunked": [20, 80]},
          ok={"triton": False, "triton-gemm": False}), "chunked"),
])
def test_backend_rule(case, want):
    from bench.gpu_check_report import backend_rule

    rule = backend_rule({"stages": {"bench": _bench(**case)}})
    assert rule["backend"] == want, rule
    assert rule["change_default"] == (want != "triton")
