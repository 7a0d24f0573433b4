"""sr-ray's command line (``sr-ray`` or ``python -m sr_ray``).

    sr-ray jobs                                        # every job, what it does, its presets
    sr-ray train_reward [--config paper|FILE] key=value ...   # any job, as jobs/<job>.py runs it
    sr-ray score --checkpoint C --prompt "..." a.jpg b.png    # one score per image, one per line
"""

from __future__ import annotations

import argparse
import sys

from sr_ray.app.registry import JOBS, listing, run
from sr_ray.core.errors import DataError
from sr_ray.core.images import BadImage


def score(argv) -> int:
    parser = argparse.ArgumentParser(prog="sr-ray score", description="score images for a prompt with a reward "
                                                                      "checkpoint")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (local or s3://), e.g. summary.json's 'checkpoint'")
    parser.add_argument("--prompt", required=True, help="the prompt every image is scored against")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("images", nargs="+", help="image files (local or s3://)")
    args = parser.parse_args(argv)

    from sr_ray.reward.score import RewardScorer

    try:
        scorer = RewardScorer(args.checkpoint, device=args.device)
        scores = scorer.score(args.prompt, args.images)
    except (FileNotFoundError, BadImage, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, s in zip(args.images, scores):
        print(f"{s:.6f}\t{path}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + listing())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "jobs":
        print(listing())
        return 0
    if cmd == "score":
        return score(rest)
    if cmd not in JOBS:
        print(f"sr-ray: no job {cmd!r}; `sr-ray jobs` lists them", file=sys.stderr)
        return 2
    run(cmd, rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
