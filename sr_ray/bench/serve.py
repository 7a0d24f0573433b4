"""Load test of the Serve app on loopback: closed-loop clients (each sends its next request when the last one is
answered) at several concurrencies, bounded in time, against the same model scored offline by RewardScorer in
one process (images/s) as the ceiling. Reports requests/s, images/s, p50/p95/p99 latency and the mean batch the
replica formed (from its /stats)."""

import base64
import json
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sr_ray.core import images
from sr_ray.core.ray_utils import free_port
from sr_ray.reward.model import ModelConfig, RewardModel, build_clip
from sr_ray.reward.score import RewardScorer, save_model
from sr_ray.serve import ServeConfig, start


@dataclass
class BenchServeConfig:
    model: str = "sr-tiny"
    """open_clip architecture, random weights built in code (sr-tiny; ViT-B-32 for a realistic model on a GPU)."""
    image_size: int = 64
    images_per_request: int = 1
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    duration_s: float = 8.0
    """Per concurrency level (after a warm-up)."""
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    num_cpus: float = 1.0
    use_gpu: bool = False
    offline_images: int = 512
    seed: int = 0


def _payloads(cfg: BenchServeConfig, n: int = 64) -> list[bytes]:
    rng = np.random.default_rng(cfg.seed)
    pics = [images.encode_png(images.draw(str(rng.choice(list(images.COLOURS))), str(rng.choice(images.SHAPES)), rng,
                                          cfg.image_size)) for _ in range(n)]
    return [json.dumps({"prompt": f"a picture number {i % 16}",
                        "images": [base64.b64encode(pics[(i + k) % n]).decode() for k in range(cfg.images_per_request)]
                        }).encode() for i in range(n)]


def _post(url: str, body: bytes) -> None:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()


def _closed_loop(url: str, bodies: list[bytes], clients: int, duration_s: float) -> list[float]:
    """Latencies (s) of every request answered while ``clients`` threads loop for ``duration_s``."""
    lat: list[float] = []
    lock, stop = threading.Lock(), time.perf_counter() + duration_s

    def client(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            _post(url, bodies[i % len(bodies)])
            with lock:
                lat.append(time.perf_counter() - t)
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat


def _stats(url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/stats") as r:
        return {int(k): v for k, v in json.loads(r.read())["batch_sizes"].items()}


def offline_rate(checkpoint: str, cfg: BenchServeConfig) -> float:
    """images/s of RewardScorer in this process, batched as the replica batches."""
    scorer = RewardScorer(checkpoint, device="cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu",
                          batch_size=cfg.max_batch_size)
    rng = np.random.default_rng(cfg.seed)
    pics = [images.draw("red", "circle", rng, cfg.image_size) for _ in range(cfg.offline_images)]
    prompts = [f"a picture number {i % 16}" for i in range(len(pics))]
    scorer.score(prompts[:cfg.max_batch_size], pics[:cfg.max_batch_size])  # warm-up
    t = time.perf_counter()
    scorer.score(prompts, pics)
    return len(pics) / (time.perf_counter() - t)


def bench_serve(cfg: BenchServeConfig) -> dict[str, Any]:
    from ray import serve

    t0 = time.perf_counter()
    ckpt = tempfile.mkdtemp(prefix="sr-ray-bench-serve-")
    torch.manual_seed(cfg.seed)
    mcfg = ModelConfig(name=cfg.model)
    save_model(ckpt, RewardModel(build_clip(mcfg, load_weights=False)), mcfg, full=True)
    ceiling = offline_rate(ckpt, cfg)
    url = start(ServeConfig(checkpoint=ckpt, port=free_port(), max_batch_size=cfg.max_batch_size,
                            batch_wait_timeout_s=cfg.batch_wait_timeout_s, num_cpus=cfg.num_cpus,
                            use_gpu=cfg.use_gpu), blocking=False)
    bodies = _payloads(cfg)
    try:
        _closed_loop(f"{url}/score", bodies, 2, 2.0)  # warm-up
        rows = []
        for c in cfg.concurrency:
            before = _stats(url)
            lat = np.array(_closed_loop(f"{url}/score", bodies, c, cfg.duration_s))
            after = _stats(url)
            formed = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            batches = sum(formed.values())
            rps = len(lat) / cfg.duration_s
            rows.append({"clients": c, "requests": len(lat), "requests_per_s": rps,
                         "images_per_s": rps * cfg.images_per_request,
                         "p50_ms": float(np.percentile(lat, 50) * 1e3), "p95_ms": float(np.percentile(lat, 95) * 1e3),
                         "p99_ms": float(np.percentile(lat, 99) * 1e3),
                         "mean_batch": sum(k * v for k, v in formed.items()) / batches if batches else 0.0,
                         "vs_offline": rps * cfg.images_per_request / ceiling})
    finally:
        serve.shutdown()
    return {"model": cfg.model, "images_per_request": cfg.images_per_request, "offline_images_per_s": ceiling,
            "levels": rows, "wall_s": round(time.perf_counter() - t0, 1)}


def format_table(r: dict) -> str:
    lines = [f"Serve load test ({r['model']}, random weights; {r['images_per_request']} image(s) per request; "
             f"loopback, closed-loop clients); offline RewardScorer: {r['offline_images_per_s']:.1f} images/s",
             f"{'clients':>7s} {'requests':>8s} {'req/s':>8s} {'img/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} "
             f"{'p99 ms':>8s} {'batch':>6s} {'vs offline':>10s}"]
    for x in r["levels"]:
        lines.append(f"{x['clients']:7d} {x['requests']:8d} {x['requests_per_s']:8.1f} {x['images_per_s']:8.1f} "
                     f"{x['p50_ms']:8.1f} {x['p95_ms']:8.1f} {x['p99_ms']:8.1f} {x['mean_batch']:6.1f} "
                     f"{x['vs_offline']:10.2f}")
    lines.append("batch: mean images per model call the replica formed; vs offline: served images/s over the ceiling")
    return "\n".join(lines)
