"""Images/s of every scorer on the same images: sr-ray batched vs one image per call (the peers' own loops).

    python jobs/benchmark_scorers.py                        # small random variants, CPU
    python jobs/benchmark_scorers.py full_size=true images=256 batch_size=64   # published shapes (a GPU)
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("benchmark_scorers", argv, __doc__)


if __name__ == "__main__":
    main()
