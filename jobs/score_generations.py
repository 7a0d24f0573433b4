"""Batch-score user generations with the reward model on Ray Data (torch or DeepSpeed backend).

    python jobs/score_generations.py                                       # embedded default: demo generations
    python jobs/score_generations.py checkpoint=<reward ckpt> generations=s3://b/generations/ out=s3://b/scores/

One output shard per input file (input columns less image bytes, plus ``score``), rejects with
their reason under <out>/_rejects/; a re-run skips finished shards. The last stdout line is JSON.
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("score_generations", argv, __doc__)


if __name__ == "__main__":
    main()
