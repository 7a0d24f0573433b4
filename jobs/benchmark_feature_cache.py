"""Benchmark: the reward-training job without and with ``data.feature_cache`` (the frozen trunk run once),
same data, model and seed, one run: seconds per epoch, the one-off build, break-even epochs, bytes per
cached triplet, and validation accuracy of both with 95% intervals.

    python jobs/benchmark_feature_cache.py                         # ViT-B-32, 3 vision / 2 text blocks trainable
    python jobs/benchmark_feature_cache.py train=160 val=64 epochs=1 model.name=sr-tiny   # seconds
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("benchmark_feature_cache", argv, __doc__)


if __name__ == "__main__":
    main()
