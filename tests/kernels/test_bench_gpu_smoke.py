"""End-to-end smoke run of `python -m bench.gpu --small --device cpu` under the interpreter (~10 s)."""
import json
import os

import pytest
import torch


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="smoke run needs the interpreter")
def test_bench_gpu_small_cpu(tmp_path, capsys):
    from bench import gpu

    report, path = gpu.run(["--small", "--device", "cpu", "--vocab", "90", "--out", str(tmp_path)])
    assert path.parent == tmp_path and path.exists()
    data = json.loads(path.read_text())
    assert data["benchmark"] == "gpu" and "cpu_flags" in data["machine"]
    res = data["correctness"]["results"]
    for name in ("triton", "triton-gemm", "chunked", "naive"):
        for dt in ("bfloat16", "float32"):
            assert res[f"{name}/{dt}"]["ok"], (name, dt, res[f"{name}/{dt}"])
    assert res["triton/float32"]["dweight"] < 1e-5  # fp32 kernels vs the fp64 oracle
    timing = data["timing"]["90"]
    assert timing["floor_6NdV_ms"] > 0
    assert timing["gemm"]["floor_s"] == pytest.approx(
        timing["gemm"]["t_logits"] + timing["gemm"]["t_dx"] + timing["gemm"]["t_dw"])
    for name in ("triton", "triton-gemm", "chunked", "naive"):
        assert timing["methods"][name]["ms"] > 0
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        assert res["torch_lce/float32"]["ok"]
    out = capsys.readouterr().out
    assert "6NdV floor" in out and "triton" in out
