"""Benchmark: samples/s of the Stable Diffusion fine-tuning step, plain DDP vs DeepSpeed ZeRO-2 vs cached latents,
same model, data and steps, one run; prints ratios to the first variant.

    python jobs/benchmark_finetune.py                                   # tiny SD, 2 CPU workers
    python jobs/benchmark_finetune.py model.name=sd21-base-random resolution=512 workers=1 use_gpu=true \\
        batch_size=4 steps=30 variants=[ddp,zero2,zero2+latents]       # on a GPU: SD 2.1-base-sized, bf16
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("benchmark_finetune", argv, __doc__)


if __name__ == "__main__":
    main()
