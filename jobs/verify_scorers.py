"""Check every peer scorer of sr-ray against the peer's own code (hpsv2, image-reward, the LAION aesthetic
predictor's recipe, PickScore's README code) on the same random weights, in the peers' published formats.

    python jobs/verify_scorers.py                       # makes ~/.cache/sr-ray/refvenv first when absent
    python jobs/verify_scorers.py ref_venv=/path/to/venv create=false

Prints a table (max |score difference| per scorer) and, last, the JSON summary; exits 1 when one differs by
more than ``tolerance``.
"""

import sys

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    summary = run("verify_scorers", argv, __doc__)
    if not summary["all_equal"]:
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
