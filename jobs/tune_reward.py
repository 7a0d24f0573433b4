"""Sweep the reward model with Ray Tune (Ray Train inside each trial), to a ranked table and the best checkpoint.

    python jobs/tune_reward.py                                              # embedded default: small sweep, demo data
    python jobs/tune_reward.py --config jobs/configs/tune_reward/paper.yaml train.data.train=s3://b/triplets/train ...

Overrides: sweep keys (num_samples=8, scheduler.name=fifo, name=...) and training keys under train.*.
The last stdout line is the JSON summary (also <sweep dir>/summary.json, with results.csv/.md and sweep.png).
"""

import sys
from pathlib import Path

from sr_ray.cli import parse_job_args, print_summary, setup_logging
from sr_ray.data import DataError
from sr_ray.tune import TuneRewardConfig, tune_reward

DEFAULT = Path(__file__).parent / "configs" / "tune_reward" / "demo.yaml"


def main(argv=None) -> dict:
    setup_logging()
    cfg = parse_job_args(TuneRewardConfig, argv, DEFAULT, __doc__)
    try:
        summary = tune_reward(cfg)
    except DataError as e:
        sys.exit(f"data error: {e}")
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
