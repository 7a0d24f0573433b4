"""The prompt analysis's costs: Sentence-BERT prompts/s on Ray Data actor pools vs the model alone (same run),
and Ward clustering's time and memory from 6K to 60K prompts (where exact Ward stops fitting, and the sample +
nearest-centroid path the job takes past it).

    python jobs/benchmark_prompts.py
    python jobs/benchmark_prompts.py sizes=[6000,12000] actors=[1] prompts=2000
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("benchmark_prompts", argv, __doc__)


if __name__ == "__main__":
    main()
