"""The reward model over HTTP: a Ray Serve app with dynamic batching across requests (POST /score, POST /rank,
GET /healthz, GET /stats, OpenAPI docs at /docs). Stays up until Ctrl-C.

    sr-ray serve checkpoint=runs/sr-reward-demo                     # = python jobs/serve.py checkpoint=...
    sr-ray serve checkpoint=exported/sr-reward port=8000 host=0.0.0.0 max_batch_size=64 use_gpu=true max_replicas=4
    serve deploy cluster/serve_config.yaml                           # the same app on a running cluster
"""

from sr_ray.app.registry import run


def main(argv=None) -> dict:
    return run("serve", argv, __doc__)


if __name__ == "__main__":
    main()
