"""Benchmark: the curation job (Ray Data) vs a single-process pandas implementation of the
same rules, on simulated logs of growing size; rows/s, time growth and peak memory, in one run.

    python jobs/benchmark_curate.py                         # 100K, 300K, 1M rows
    python jobs/benchmark_curate.py sizes=[20000,50000]     # quick
"""

from sr_ray.benchmark_curate import BenchCurateConfig, bench_curate, format_table
from sr_ray.cli import parse_job_args, print_summary, setup_logging


def main(argv=None) -> dict:
    setup_logging()
    cfg = parse_job_args(BenchCurateConfig, argv, None, __doc__)
    result = bench_curate(cfg)
    print(format_table(result), flush=True)
    print_summary(result)
    return result


if __name__ == "__main__":
    main()
