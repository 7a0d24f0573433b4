"""Benchmark: the batch-scoring job (Ray Data + scorer actors, text once per prompt) vs the authors'
validation loop (one DataLoader, one model, text encoded per image), same model and images, one run.

    python jobs/benchmark_score.py                                  # ViT-B-32 (random weights), 400 images, CPU
    python jobs/benchmark_score.py checkpoint=<ViT-L-14 reward ckpt> use_gpu=true backends=[torch,deepspeed] \\
        actors=[1] prompts=2000                                     # on a GPU machine: images/s per GPU, 1M projection
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("benchmark_score", argv, __doc__)


if __name__ == "__main__":
    main()
