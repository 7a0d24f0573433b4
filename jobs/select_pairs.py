"""Select the Stable Diffusion fine-tuning set: best and worst image per prompt (+ regularization rows).

    python jobs/select_pairs.py                  # embedded default: the scoring demo's output + demo regularization
    python jobs/select_pairs.py scores=s3://b/scores/ regularization=s3://b/laion_subset/ out=s3://b/sd_finetune/

Writes shuffled shards (prompt, image, source in {best, worst, regularization}, generation_id, score) and
report.md / report.json / score_distribution.png beside them; the worst prompts carry the special token
(default "t@y quality"), which is the negative prompt at inference. The last stdout line is JSON.
"""

from pathlib import Path

from sr_ray.app.cli import run_job
from sr_ray.generations.select import SelectConfig, select_pairs

DEFAULT = Path(__file__).parent / "configs" / "select_pairs" / "demo.yaml"


def main(argv=None) -> dict:
    return run_job(SelectConfig, select_pairs, argv, DEFAULT, __doc__)


if __name__ == "__main__":
    main()
