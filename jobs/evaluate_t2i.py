"""Evaluate baseline vs fine-tuned Stable Diffusion: paper Tables 5 (means) and 6 (win-rates), grids, best-of-N.

    python jobs/evaluate_t2i.py                   # embedded default: the pre-trained tiny SD vs the closed loop's fine-tune
    python jobs/evaluate_t2i.py baseline=<sd dir or hub id> finetuned=<run dir> prompts=prompts.txt
    python jobs/evaluate_t2i.py --config jobs/configs/evaluate_t2i/paper.yaml \\
        finetuned=$PWD/runs/sd21-social-reward social_reward.checkpoint=<reward checkpoint> \\
        prompts=internal.txt,general.txt

Writes <out>/table5.md|csv, table6.md|csv, win_rates.png, grid-<set>.png, scores.parquet, report.md (and
best_of_n.* with best_of_n=<metric>). The last stdout line is JSON.
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("evaluate_t2i", argv, __doc__)


if __name__ == "__main__":
    main()
