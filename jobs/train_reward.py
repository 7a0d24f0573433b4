"""Train the Social Reward model on Ray (Ray Data -> Ray Train), to a validated checkpoint.

    python jobs/train_reward.py                                   # embedded default: demo data, tiny CLIP
    python jobs/train_reward.py --config jobs/configs/train_reward/paper.yaml data.train=s3://b/triplets/train ...

The last stdout line is the JSON summary (also written to <run dir>/summary.json).
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("train_reward", argv, __doc__)


if __name__ == "__main__":
    main()
