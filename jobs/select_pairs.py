"""Select the Stable Diffusion fine-tuning set: best and worst image per prompt (+ regularization rows).

    python jobs/select_pairs.py                  # embedded default: the scoring demo's output + demo regularization
    python jobs/select_pairs.py scores=s3://b/scores/ regularization=s3://b/laion_subset/ out=s3://b/sd_finetune/

Writes shuffled shards (prompt, image, source in {best, worst, regularization}, generation_id, score) and
report.md / report.json / score_distribution.png beside them; the worst prompts carry the special token
(default "t@y quality"), which is the negative prompt at inference. The last stdout line is JSON.
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("select_pairs", argv, __doc__)


if __name__ == "__main__":
    main()
