"""Benchmarks of simnpo-fast: short scripts on one harness; numbers go to bench/results/ and the README.

    harness/         workers, memory, timing, GEMM floor, oracle checks, machine facts, result files
    methods.py       the one method table: ours and the peers', CPU and GPU
    loss.py          python -m bench.loss            chunked vs naive fwd+bwd, GEMM floor (the README's time reference)
    suite.py         python -m bench.suite [--quick]  every method: check, headline, sweeps, step, plan (+ report.py)
    sweep.py         the suite's worker (one method at one shape, the GEMM floor, the oracle check)
    gpu.py           python -m bench.gpu             every method on CUDA (or a CPU smoke run)
    step.py          python -m bench.step            one trainer step vs an HF Trainer step
    plan_validate.py python -m bench.plan_validate   planner prediction vs measured peak
    data_throughput.py, tile_gemm.py, chunk_rows.py  loader throughput, tile GEMM rates, tile-height A/B
    test_bench_*.py  pytest-benchmark forms (``pytest bench/ --benchmark-only``; conftest.py)
"""
