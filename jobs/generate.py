"""Generate N images per prompt for one or more Stable Diffusion models on Ray Data (DDIM, fixed seeds).

    python jobs/generate.py                       # embedded default: the tiny SD and the fine-tune demo's, demo prompts
    python jobs/generate.py models.baseline=stabilityai/stable-diffusion-2-1-base \\
        models.finetuned=$PWD/runs/sd21-social-reward prompts=internal.txt,general.txt \\
        compute.use_gpu=true compute.num_actors=4 out=s3://bucket/t2i/generations

Image i of a prompt starts from the same noise for every model; the models in sampling.negative_for get the
special token as negative prompt. Output: generations Parquet, a shard per model and chunk of prompts (a re-run
skips finished shards). The last stdout line is JSON.
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("generate", argv, __doc__)


if __name__ == "__main__":
    main()
