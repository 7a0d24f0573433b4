"""``python -m sr_ray score --checkpoint C --prompt "..." a.jpg b.png``: one score per image, one per line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sr_ray", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sc = sub.add_parser("score", help="score images for a prompt with a reward checkpoint")
    sc.add_argument("--checkpoint", required=True, help="checkpoint folder (local or s3://), e.g. summary.json's 'checkpoint'")
    sc.add_argument("--prompt", required=True, help="the prompt every image is scored against")
    sc.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    sc.add_argument("images", nargs="+", help="image files (local or s3://)")
    args = parser.parse_args(argv)

    from sr_ray.core.errors import DataError
    from sr_ray.core.images import BadImage
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


if __name__ == "__main__":
    sys.exit(main())
