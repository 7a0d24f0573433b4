"""Benchmark: the curation job (Ray Data) vs a single-process pandas implementation of the
same rules, on simulated logs of growing size; rows/s, time growth and peak memory, in one run.

    python jobs/benchmark_curate.py                         # 100K, 300K, 1M rows
    python jobs/benchmark_curate.py sizes=[20000,50000]     # quick
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("benchmark_curate", argv, __doc__)


if __name__ == "__main__":
    main()
