"""Benchmark: sr-ray's training step (explicit freezing, Ray Data) vs the authors' approach
(no-op freezing, plain DataLoader), same model and data, one run; prints a ratio.

    python jobs/benchmark_train.py                              # ViT-B-32 (random weights) on this machine
    python jobs/benchmark_train.py model.name=ViT-L-14 steps=20 # e.g. on a GPU machine (bf16 autocast)
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("benchmark_train", argv, __doc__)


if __name__ == "__main__":
    main()
