"""Former home of the shared benchmark plumbing, kept as an alias of :mod:`bench.harness` for scripts written
against it; new code imports from ``bench.harness``."""
from bench.harness import (RESULTS, machine_info, machine_tag, median_time, mem_available_mib, reset_hwm, rss_kib,
                           run_worker, spread, write_result)

__all__ = ["RESULTS", "machine_info", "machine_tag", "median_time", "mem_available_mib", "reset_hwm", "rss_kib",
           "run_worker", "spread", "write_result"]
