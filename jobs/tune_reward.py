"""Sweep the reward model with Ray Tune (Ray Train inside each trial), to a ranked table and the best checkpoint.

    python jobs/tune_reward.py                                              # embedded default: small sweep, demo data
    python jobs/tune_reward.py --config jobs/configs/tune_reward/paper.yaml train.data.train=s3://b/triplets/train ...

Overrides: sweep keys (num_samples=8, scheduler.name=fifo, name=...) and training keys under train.*.
The last stdout line is the JSON summary (also <sweep dir>/summary.json, with results.csv/.md and sweep.png).
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("tune_reward", argv, __doc__)


if __name__ == "__main__":
    main()
