"""Batch-score user generations with the reward model on Ray Data (torch or DeepSpeed backend).

    python jobs/score_generations.py                                       # embedded default: demo generations
    python jobs/score_generations.py checkpoint=<reward ckpt> generations=s3://b/generations/ out=s3://b/scores/

One output shard per input file (input columns less image bytes, plus ``score``), rejects with
their reason under <out>/_rejects/; a re-run skips finished shards. The last stdout line is JSON.
"""

from pathlib import Path

from sr_ray.app.cli import run_job
from sr_ray.generations.score import ScoreConfig, score_generations

DEFAULT = Path(__file__).parent / "configs" / "score_generations" / "demo.yaml"


def main(argv=None) -> dict:
    return run_job(ScoreConfig, score_generations, argv, DEFAULT, __doc__)


if __name__ == "__main__":
    main()
