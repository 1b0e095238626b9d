"""The benchmark harness: the one home of what every script in bench/ shares.

    library   the simnpo_fast names the loss benchmarks call (the loss, its backends, the synthetic batch)
    machine   machine facts (CPU model + SIMD flags, GPU, versions, commit) and result files
    measure   fresh-process workers (exact-RSS or default allocator), memory, timing, the GEMM floor
    oracle    the loss and both gradients of a method vs the fp64 oracle

Scripts import from here (``from bench.harness import ...``); the method table is bench/methods.py.
"""
from .library import (BETA, DTYPES, GAMMA, IGNORE, chunked_backend, lm_inputs, lowp_gemm_report, oracle,
                      reference_backend, simnpo, tile_gemm_report, valid_rows)
from .machine import (RESULTS, ROOT, cpu_model_and_flags, fresh_path, machine_info, machine_tag, result_header,
                      write_result)
from .measure import (PeakRSS, alternate, cuda_median_s, cuda_peak_mib, emit, fwd_bwd_memory, fwd_bwd_step,
                      gemm_floor, median_time, mem_available_mib, reset_hwm, rss_kib, run_script, run_worker, spread)
from .oracle import TOL, check_method, check_methods, fwd_bwd, rel_err, rel_norm_err

__all__ = [
    "BETA", "DTYPES", "GAMMA", "IGNORE", "chunked_backend", "lm_inputs", "lowp_gemm_report", "oracle",
    "reference_backend", "simnpo", "tile_gemm_report", "valid_rows",
    "RESULTS", "ROOT", "cpu_model_and_flags", "fresh_path", "machine_info", "machine_tag", "result_header",
    "write_result", "PeakRSS", "alternate", "cuda_median_s", "cuda_peak_mib", "emit", "fwd_bwd_memory",
    "fwd_bwd_step", "gemm_floor", "median_time", "mem_available_mib", "reset_hwm", "rss_kib", "run_script",
    "run_worker", "spread", "TOL", "check_method", "check_methods", "fwd_bwd", "rel_err", "rel_norm_err",
]
