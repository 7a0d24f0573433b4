"""Train the Social Reward model on Ray (Ray Data -> Ray Train), to a validated checkpoint.

    python jobs/train_reward.py                                   # embedded default: demo data, tiny CLIP
    python jobs/train_reward.py --config jobs/configs/train_reward/paper.yaml data.train=s3://b/triplets/train ...

The last stdout line is the JSON summary (also written to <run dir>/summary.json).
"""

from pathlib import Path

from sr_ray.app.cli import run_job
from sr_ray.reward.train import TrainRewardConfig, train_reward

DEFAULT = Path(__file__).parent / "configs" / "train_reward" / "demo.yaml"


def main(argv=None) -> dict:
    return run_job(TrainRewardConfig, train_reward, argv, DEFAULT, __doc__)


if __name__ == "__main__":
    main()
