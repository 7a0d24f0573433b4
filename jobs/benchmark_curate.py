"""Benchmark: the curation job (Ray) vs two single-machine implementations of the same rules,
pandas and DuckDB, on simulated logs (log only); per side wall time, rows/s and peak memory at
each size, and the fixed cost and marginal rows/s fitted through the smallest and largest size.

    python jobs/benchmark_curate.py                                  # 1M and 10M rows (simulated once, cached)
    python jobs/benchmark_curate.py sizes=[20000,200000]             # quick
    python jobs/benchmark_curate.py sides=[duckdb,ray] num_cpus=2    # leave pandas out
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("benchmark_curate", argv, __doc__)


if __name__ == "__main__":
    main()
