"""Benchmark: every GPU figure in one command (scoring, reward training with and without the feature cache,
SD fine-tuning), one Markdown report with shares of the device's physical limit.

    python jobs/benchmark_gpu.py                      # on a GPU machine: the full report (~30 min on one H100)
    python jobs/benchmark_gpu.py size=tiny            # anywhere: the same report on tiny models (CPU, minutes)
    python jobs/benchmark_gpu.py sections=[score,train] out=./runs/gpu
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("benchmark_gpu", argv, __doc__)


if __name__ == "__main__":
    main()
