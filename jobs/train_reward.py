"""Train the Social Reward model on Ray (Ray Data -> Ray Train), to a validated checkpoint.

    python jobs/train_reward.py                                   # embedded default: demo data, tiny CLIP
    python jobs/train_reward.py --config jobs/configs/train_reward/paper.yaml data.train=s3://b/triplets/train ...

The last stdout line is the JSON summary (also written to <run dir>/summary.json).
"""

import sys
from pathlib import Path

from sr_ray.cli import parse_job_args, print_summary, setup_logging
from sr_ray.data import DataError
from sr_ray.train import TrainRewardConfig, train_reward

DEFAULT = Path(__file__).parent / "configs" / "train_reward" / "demo.yaml"


def main(argv=None) -> dict:
    setup_logging()
    cfg = parse_job_args(TrainRewardConfig, argv, DEFAULT, __doc__)
    try:
        summary = train_reward(cfg)
    except DataError as e:
        sys.exit(f"data error: {e}")
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
