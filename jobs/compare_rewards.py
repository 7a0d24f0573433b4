"""Compare reward models on pairwise preference test sets: accuracy with bootstrap intervals over prompts,
paired differences against the first scorer, and how often every two scorers agree (paper Tables 3-4).

    python jobs/compare_rewards.py             # embedded default: the reward demo's test split; social_reward,
                                               # clip and laion_aesthetic (small random weights: no downloads)
    python jobs/compare_rewards.py test=[s3://b/picsart/test,/data/hpdv2/test.json] \\
        scorers=[social_reward,clip,laion_aesthetic,pickscore,hpsv21,imagereward] \\
        social_reward.checkpoint=s3://b/runs/sr/checkpoint_000009 out=s3://b/compare/run1 \\
        --config jobs/configs/compare_rewards/paper.yaml

Writes <out>/table.md|csv, accuracy.png, differences.md|csv, agreement.md|csv, scores.parquet, report.md.
The last stdout line is JSON: {"results": {set: {scorer: {accuracy, ci_low, ci_high, pairs}}}, ...}.
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("compare_rewards", argv, __doc__)


if __name__ == "__main__":
    main()
