"""Suite bookkeeping on synthetic results: target ratios, plots and README section, result files (fast, no timing)."""
import json

import pytest

pytest.importorskip("matplotlib")
from bench import harness, report, suite  # noqa: E402


def _r(method, t, mem):
    return {"method": method, "median_s": t, "min_s": t, "max_s": t * 1.1, "spread": 0.1, "n": 2,
            "peak_extra_mib": mem, "gflops": 1.0, "times_s": [t]}


def _point(N, d, V, dt="fp32", scale=1.0):
    ms = {"naive": _r("naive", 2.0 * scale, 1000.0), "chunked": _r("chunked", 1.0 * scale, 50.0),
          "torch_lce": _r("torch_lce", 1.5 * scale, 80.0), "cce": {"method": "cce", "skipped": "memory"}}
    return {"N": N, "d": d, "V": V, "dtype": dt, "gemm": {"floor_s": 0.95 * scale, "gemm_gflops": 10.0}, "methods": ms}


def test_targets():
    t = suite.targets(_point(2048, 512, 32000), "chunked")
    assert t["time_vs_naive"] == pytest.approx(0.5)
    assert t["memory_vs_naive"] == pytest.approx(0.05)
    assert t["time_vs_floor"] == pytest.approx(1 / 0.95)
    assert t["best_peer"] == "torch_lce" and t["time_vs_best_peer"] == pytest.approx(1 / 1.5)
    assert t["met"] == {"time_vs_naive": True, "memory_vs_naive": True, "time_vs_floor": True,
                        "time_vs_best_peer": True}


def test_plots_and_readme(tmp_path):
    head = _point(2048, 512, 32000)
    head["targets"] = suite.targets(head, "chunked")
    data = {"benchmark": "suite", "command": "python -m bench.suite --quick", "quick": True, "seconds": 60,
            "machine": {"cpu": "Test CPU", "cores": 2, "date": "2026-01-01T00:00:00Z", "torch": "x", "triton": "y",
                        "versions": {"liger-kernel": "1", "cut-cross-entropy": "2"}},
            "targets_max": suite.TARGETS,
            "check": {"runs": [{"dtype": "fp32", "N": 64, "M": 60, "d": 48, "V": 300, "interpreter": False,
                                "results": {"naive": {"ok": True, "loss": 1e-7, "dhidden": 1e-6, "dweight": 1e-6,
                                                      "tol": 1e-4}},
                                "unavailable": {"triton": "CUDA only"}}], "passed": {"fp32": ["naive"]}},
            "headline": [head],
            "sweeps": [{"axis": "N", "dtype": "fp32", "base": {"N": 512, "d": 256, "V": 8192},
                        "points": [_point(n, 256, 8192, scale=n / 512) for n in (512, 1024, 2048)]}],
            "step": {"command": "python -m bench.step", "returncode": 1, "stdout_tail": ""},
            "plan": {"rows": [{"name": "m", "params": 1e6, "loss": "fused", "seq": 8, "batch": 2,
                               "predicted_mib": 10.0, "measured_mib": 11.0, "error": -1 / 11}]}}
    path = tmp_path / "cpu2-2026-01-01-quick.json"
    path.write_text(json.dumps(data))
    written = report.report(path, tmp_path)
    md = (tmp_path / "README_section.md").read_text()
    assert (tmp_path / "cpu2-2026-01-01-quick-N-fp32.png").stat().st_size > 1000
    assert "| chunked |" in md and "0.50x" in md and "quick mode" in md and "-9.1%" in md
    assert "time vs naive 0.50 (target <= 0.9: met)" in md
    assert "`python -m bench.step` (exit 1)" in md
    assert len(written) == 2
    assert report.latest_result(tmp_path) == path


def test_scaling_stage_report(tmp_path):
    """The scaling stage gets its own plot and a table where a method that could not hold a point says so."""
    pts = [_point(n, 512, 128256, scale=n / 2048) for n in (2048, 4096)]
    pts[1]["methods"]["naive"] = {"method": "naive", "skipped": "estimated peak 20000 MiB > budget 11000 MiB"}
    data = {"benchmark": "suite", "command": "python -m bench.suite --stages scaling", "quick": False,
            "seconds": 1, "machine": {"cpu": "Test CPU", "cores": 2, "date": "2026-01-01T00:00:00Z"},
            "scaling": [{"axis": "N", "dtype": "fp32", "base": {"d": 512, "V": 128256}, "points": pts}]}
    path = tmp_path / "cpu2-2026-01-02.json"
    path.write_text(json.dumps(data))
    report.report(path, tmp_path)
    md = (tmp_path / "README_section.md").read_text()
    assert (tmp_path / "cpu2-2026-01-02-scaling-N-fp32.png").stat().st_size > 1000
    assert "| 2048 | 0.95 s | 2.00 s / 1000 MiB | 1.00 s / 50 MiB |" in md
    row = next(line for line in md.splitlines() if line.startswith("| 4096 |"))
    assert row.split(" | ")[2] == "out of memory" and "naive at N=4096 d=512 V=128256 fp32" in md


def test_machine_family():
    assert harness.machine.cpu_family("AuthenticAMD", ["avx2", "avx512_bf16", "avx512f"]) == "amd-avx512-bf16"
    assert harness.machine.cpu_family("AuthenticAMD", ["avx2", "fma"]) == "amd-avx2"
    assert harness.machine.cpu_family("GenuineIntel", ["amx_bf16", "avx512f"]) == "intel-avx512-amx"
    assert harness.machine.cpu_family("GenuineIntel", ["avx2", "avx512f"]) == "intel-avx512"
    assert harness.machine.cpu_family("", ["asimd"]) == "arm"
    info = harness.machine_info()
    assert info["cpu_family"] == harness.machine.cpu_family(info["cpu_vendor"], info["cpu_flags"])


def test_results_are_never_overwritten(tmp_path):
    first = harness.write_result("loss", {"n": 1}, tmp_path)
    second = harness.write_result("loss", {"n": 2}, tmp_path)
    assert first != second and second.name == first.stem + "-2.json"
    assert json.loads(first.read_text()) == {"n": 1} and json.loads(second.read_text()) == {"n": 2}


def test_machine_info_records_cpu_model_and_simd_flags():
    info = harness.machine_info()
    model, flags = harness.cpu_model_and_flags()
    assert info["cpu"] == model and info["cpu_flags"] == flags
    with open("/proc/cpuinfo") as fh:
        text = fh.read()
    for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"):
        assert (flag in flags) == (f" {flag} " in text.replace("\n", " ") + " "), flag


def test_scaling_stage_drops_a_method_whose_next_point_would_exceed_the_cap(monkeypatch):
    """A method timed at 60 s for N=2048 would take ~120 s at 4096 (> 90 s cap): it is not run from then on."""
    asked = []

    def fake_point(methods, N, d, V, dt, cfg, budget, cache):
        asked.append((N, tuple(methods)))
        ms = {m: _r(m, (60.0 if m == "torch_lce" else 1.0) * N / 2048, 10.0) for m in methods}
        return {"N": N, "d": d, "V": V, "dtype": dt, "gemm": {"floor_s": N / 2048}, "methods": ms}

    monkeypatch.setattr(suite, "_point", fake_point)
    cfg = {"scaling": dict(suite.SCALING, N=[2048, 4096, 8192])}
    (sw,) = suite.stage_scaling(cfg, {"fp32": ["chunked", "torch_lce"]}, False, 1e9, {})
    assert asked == [(2048, ("chunked", "torch_lce")), (4096, ("chunked",)), (8192, ("chunked",))]
    assert sw["points"][1]["methods"]["torch_lce"]["skipped"].startswith("time: 60 s at N=2048")
    assert "median_s" in sw["points"][2]["methods"]["chunked"]
