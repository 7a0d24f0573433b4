"""One prompt's images ranked by each scorer, best on the left, with their scores (paper Figs. 6 and 9).

    python jobs/rank_images.py images=<folder of pictures> prompt="a red cat" scorers=[pickscore,hpsv21] \\
        pickscore.model=yuvalkirstain/PickScore_v1 hpsv21.weights=xswu/HPSv2/HPS_v2.1_compressed.pt
    python jobs/rank_images.py images=runs/t2i-eval-demo/generations social_reward.checkpoint=<ckpt> \\
        scorers=[social_reward,clip] out=runs/ranked

Writes <out>.png (a row per scorer) and <out>.json (each image's score and rank); the last stdout line is JSON.
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("rank_images", argv, __doc__)


if __name__ == "__main__":
    main()
