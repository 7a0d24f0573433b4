"""Benchmark: sr-ray's training step (explicit freezing, Ray Data) vs the authors' approach
(no-op freezing, plain DataLoader), same model and data, one run; prints a ratio.

    python jobs/benchmark_train.py                              # ViT-B-32 (random weights) on this machine
    python jobs/benchmark_train.py model.name=ViT-L-14 steps=20 # e.g. on a GPU machine (bf16 autocast)
"""

from sr_ray.benchmark import BenchTrainConfig, bench_train, format_table
from sr_ray.cli import parse_job_args, print_summary, setup_logging


def main(argv=None) -> dict:
    setup_logging()
    cfg = parse_job_args(BenchTrainConfig, argv, None, __doc__)
    result = bench_train(cfg)
    print(format_table(result), flush=True)
    print_summary(result)
    return result


if __name__ == "__main__":
    main()
