"""Benchmark: the curation job (Ray Data) vs a single-process pandas implementation of the
same rules, on simulated logs of growing size; rows/s, time growth and peak memory, in one run.

    python jobs/benchmark_curate.py                         # 100K, 300K, 1M rows
    python jobs/benchmark_curate.py sizes=[20000,50000]     # quick
"""

from sr_ray.app.cli import run_job
from sr_ray.bench.curate import BenchCurateConfig, bench_curate, format_table


def main(argv=None) -> dict:
    return run_job(BenchCurateConfig, bench_curate, argv, None, __doc__, table=format_table)


if __name__ == "__main__":
    main()
