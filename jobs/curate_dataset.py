"""Curate a platform log into triplet shards (paper appendix A.2) on Ray Data.

    python jobs/curate_dataset.py                                    # embedded default: simulate a community, curate it
    python jobs/curate_dataset.py log=s3://bucket/platform_log/ out=s3://bucket/triplets/
    python jobs/curate_dataset.py log=./log out=./triplets max_pairs_per_prompt=50 pack=false

The last stdout line is the JSON summary (also in <out>/datacard.json, with REPORT.md and distributions.png).
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("curate_dataset", argv, __doc__)


if __name__ == "__main__":
    main()
