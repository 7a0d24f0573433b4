"""Curate a platform log into triplet shards (paper appendix A.2) on Ray Data.

    python jobs/curate_dataset.py                                    # embedded default: simulate a community, curate it
    python jobs/curate_dataset.py log=s3://bucket/platform_log/ out=s3://bucket/triplets/
    python jobs/curate_dataset.py log=./log out=./triplets max_pairs_per_prompt=50 pack=false

The last stdout line is the JSON summary (also in <out>/datacard.json, with REPORT.md and distributions.png).
"""

import sys

from sr_ray.cli import parse_job_args, print_summary, setup_logging
from sr_ray.curate import CurateConfig, curate
from sr_ray.data import DataError


def main(argv=None) -> dict:
    setup_logging()
    cfg = parse_job_args(CurateConfig, argv, None, __doc__)
    try:
        summary = curate(cfg)
    except DataError as e:
        sys.exit(f"data error: {e}")
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
