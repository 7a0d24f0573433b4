"""Fine-tune Stable Diffusion on the selected best/worst pairs (+ regularization) with Ray Train and DeepSpeed.

    python jobs/finetune_sd.py                      # embedded default: tiny SD built in code, demo fine-tune set, CPU
    ray job submit --working-dir . -- python jobs/finetune_sd.py --config jobs/configs/finetune_sd/paper.yaml \\
        data.train=s3://bucket/sd_finetune/ run.storage_path=s3://bucket/runs

Checkpoints through Ray Train (a DeepSpeed shard per worker; re-run the same name to resume), TensorBoard
under <run>/tensorboard (loss, lr, samples/s, samples with the special token as negative prompt), and a
diffusers pipeline in <run>/pipeline. The last stdout line is JSON.
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("finetune_sd", argv, __doc__)


if __name__ == "__main__":
    main()
