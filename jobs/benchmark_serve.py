"""Load test of the reward Serve app on loopback: closed-loop clients at 1, 8 and 32 concurrent -> requests/s,
p50/p95/p99 latency, mean batch formed, against RewardScorer offline in one process (the ceiling).

    python jobs/benchmark_serve.py
    python jobs/benchmark_serve.py concurrency=[1,8,32,64] duration_s=20 model=ViT-B-32 use_gpu=true image_size=224
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("benchmark_serve", argv, __doc__)


if __name__ == "__main__":
    main()
