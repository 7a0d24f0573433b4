"""Images/s of every scorer on the same images: sr-ray batched vs one image per call (the peers' own loops).

    python jobs/benchmark_scorers.py                        # small random variants, CPU
    python jobs/benchmark_scorers.py full_size=true images=256 batch_size=64   # published shapes (a GPU)
"""

from sr_ray.app.cli import run_job
from sr_ray.bench.scorers import BenchScorersConfig, bench_scorers, format_table


def main(argv=None) -> dict:
    return run_job(BenchScorersConfig, bench_scorers, argv, None, __doc__, table=format_table)


if __name__ == "__main__":
    main()
