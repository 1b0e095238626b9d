"""The account benchmarks (``bench.chunk_rows --account``, ``bench.tile_gemm --prepacked``) on tiny shapes: they
run, and their JSONs' terms are the medians they recorded (no timing is asserted: speed lives in the benchmarks)."""
import json
import statistics

import pytest
import torch

from bench import chunk_rows


def test_account_json_is_consistent(tmp_path):
    assert chunk_rows.main(["--N", "64", "--d", "16", "--V", "96", "--rows", "", "--rounds", "3", "--account",
                            "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("chunk_rows-*.json")
    d = json.loads(path.read_text())
    rounds, terms = d["account_rounds"], d["account"]
    assert d["command"].startswith("python -m bench.chunk_rows") and "cpu_flags" in d["machine"]
    assert all(len(rounds[k]) == 3 for k in ("floor_s", "profiled_s", "gemm_s", "rest_s", "top_rest_ops"))
    floor = statistics.median(rounds["floor_s"])
    assert terms["chunked_over_floor"] == statistics.median(d["times_s"]["chunked (rule)"]) / floor
    assert terms["gemm_over_floor"] == statistics.median(rounds["gemm_s"]) / floor
    gemm, rest = statistics.median(rounds["gemm_s"]), statistics.median(rounds["rest_s"])
    assert gemm > 0 and rest > 0 and terms["rest_share_of_profiled"] == rest / (gemm + rest)
    assert terms["gemm_gflops_floor"] == 6 * (64 - 1) * 16 * 96 / floor / 1e9  # one 64-token sequence: 63 rows


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_tile_gemm_prepacked_ab_json(tmp_path):
    """``bench.tile_gemm --prepacked``: oneDNN's product on the packed ``W`` equals the plain one, and the JSON's
    ratios are its medians."""
    from bench import tile_gemm

    assert tile_gemm.main(["--d", "16", "--V", "64", "--prepacked", "--rounds", "3", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("tile_gemm-*.json")
    d = json.loads(path.read_text())
    assert d["max_abs_diff_prepacked"] < 1e-4
    for k in ("whole", "tiles_mm", "tiles_prepacked", "dx_whole", "dx_tiles_mm", "dx_tiles_prepacked"):
        assert d["median_s"][k] == statistics.median(d["times_s"][k]) and len(d["times_s"][k]) == 3
        ref = "dx_whole" if k.startswith("dx_") else "whole"
        assert d["over_whole"][k] == d["median_s"][k] / d["median_s"][ref]
