"""The prompt analysis's two costs: embedding throughput (Ray Data actor pools vs the model alone in this
process, measured in the same run) and Ward clustering's time and memory as the pooled sample grows.

Ward (scipy, exact) keeps the condensed distance matrix and a working copy: ~8 N^2 bytes, and N^2 time. Each
size runs in a fresh process so its peak memory is its own. A size whose estimate does not fit in 80% of the
available memory is not run exactly; the job's path past ``max_ward_points`` is run instead (Ward on a sample,
the rest assigned to the nearest centroid), and its time and memory are reported beside it.
"""

from __future__ import annotations

import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from typing import Any

import numpy as np
import psutil

from sr_ray.analysis import cluster
from sr_ray.analysis.embed import EmbedConfig, embed_texts, resolve_model
from sr_ray.analysis.prompts import first_words
from sr_ray.core.prompt_files import read_prompts
from sr_ray.core.ray_utils import init_ray
from sr_ray.demo.prompts import ensure_community_log


@dataclass
class BenchPromptsConfig:
    prompts: int = 6000
    """Prompts embedded per variant (the simulated community's, first 5 words)."""
    actors: list[int] = field(default_factory=lambda: [1, 2])
    """Ray Data actor pools to measure (actors of cpus_per_actor each)."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    sizes: list[int] = field(default_factory=lambda: [6000, 12000, 24000, 60000])
    """Pooled sample sizes to cluster."""
    clusters: int = 173
    dim: int = 384
    """Embedding width of the synthetic points (all-MiniLM-L6-v2: 384)."""
    max_ward_points: int = 20000
    """The sample Ward runs on past what fits (the job's key of the same name)."""
    memory_fraction: float = 0.8
    """Exact Ward runs only when 8 N^2 bytes fit in this share of the available memory."""
    seed: int = 0
    ray_address: str | None = None


def embedding_rates(cfg: BenchPromptsConfig) -> list[dict[str, Any]]:
    """prompts/s of the model alone in this process (all its threads) and of each actor pool (start included)."""
    import torch
    from sentence_transformers import SentenceTransformer

    texts = [first_words(p, 5) for p in dict.fromkeys(read_prompts(ensure_community_log()))][:cfg.prompts]
    t = time.perf_counter()
    model = SentenceTransformer(resolve_model(cfg.embed.model), device="cpu")
    load = time.perf_counter() - t
    t = time.perf_counter()
    model.encode(texts, batch_size=cfg.embed.batch_size, show_progress_bar=False)
    alone = len(texts) / (time.perf_counter() - t)
    rows = [{"variant": f"model alone ({torch.get_num_threads()} threads)", "prompts": len(texts),
             "prompts_per_s": alone, "load_s": load, "ratio": 1.0, "steady_per_s": alone}]
    started = init_ray(cfg.ray_address)
    for n in cfg.actors:
        pool = replace(cfg.embed, num_actors=n)
        t, timing = time.perf_counter(), {}
        embed_texts(texts, pool, fixed_cluster=started, progress_every_s=1e9, timing=timing)
        rate = len(texts) / (time.perf_counter() - t)
        rows.append({"variant": f"Ray Data, {n} actor(s) x {pool.cpus_per_actor:g} CPU", "prompts": len(texts),
                     "prompts_per_s": rate, "load_s": timing["first_s"], "ratio": rate / alone,
                     "steady_per_s": timing["steady_per_s"]})
    return rows


def _points(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 300 topics, like sentence embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(300, dim))
    x = centres[rng.integers(0, 300, n)] + rng.normal(size=(n, dim)) * 1.5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _cluster_once(n: int, dim: int, k: int, max_ward_points: int, seed: int) -> dict[str, Any]:
    """In a fresh process: time and peak memory above the points themselves."""
    x = _points(n, dim, seed)
    base = psutil.Process().memory_info().rss
    t = time.perf_counter()
    groups = np.arange(n) % 3
    labels, how = cluster.cluster_points(x, k, groups, max_ward_points, seed)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"points": n, "method": how["method"], "ward_points": how["ward_points"], "seconds": seconds,
            "peak_gib": max(peak - base, 0) / 2 ** 30, "clusters_found": int(labels.max() + 1)}


def clustering_costs(cfg: BenchPromptsConfig) -> list[dict[str, Any]]:
    """Ward's time and memory per size; the sample path where exact Ward would not fit."""
    budget = psutil.virtual_memory().available * cfg.memory_fraction
    rows = []
    ctx = get_context("spawn")
    for n in cfg.sizes:
        need = 8 * n * n
        fits = need <= budget
        limit = n if fits else cfg.max_ward_points
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            r = pool.submit(_cluster_once, n, cfg.dim, cfg.clusters, limit, cfg.seed).result()
        r.update(exact_estimate_gib=need / 2 ** 30, fits=fits, budget_gib=budget / 2 ** 30)
        rows.append(r)
    return rows


def bench_prompts(cfg: BenchPromptsConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    clustering = clustering_costs(cfg)  # before Ray: its processes would share the memory
    embedding = embedding_rates(cfg)
    return {"embedding": embedding, "clustering": clustering, "wall_s": round(time.perf_counter() - t0, 1)}


def format_table(r: dict) -> str:
    lines = ["embedding (all-MiniLM-L6-v2, first 5 words of the community's prompts, CPU)",
             f"{'variant':36s} {'prompts':>8s} {'prompts/s':>10s} {'ratio':>6s} {'start s':>8s} {'steady/s':>9s}"]
    for x in r["embedding"]:
        steady = f"{x['steady_per_s']:9.1f}" if x["steady_per_s"] else f"{'-':>9s}"
        lines.append(f"{x['variant']:36s} {x['prompts']:8d} {x['prompts_per_s']:10.1f} {x['ratio']:6.2f} "
                     f"{x['load_s']:8.1f} {steady}")
    lines += ["ratio: prompts/s against the model alone in this process, same run; Ray's include starting the actors",
              "start s: model load (alone) or until the first batch came back (Ray); steady/s: prompts/s after it",
              "", "Ward clustering (scipy; 384-d unit vectors, 173 clusters; each size in a fresh process)",
              f"{'points':>7s} {'method':36s} {'tree pts':>8s} {'seconds':>8s} {'peak GiB':>9s} {'8N^2 GiB':>9s} fits"]
    for x in r["clustering"]:
        lines.append(f"{x['points']:7d} {x['method']:36s} {x['ward_points']:8d} {x['seconds']:8.1f} "
                     f"{x['peak_gib']:9.2f} {x['exact_estimate_gib']:9.2f} {'yes' if x['fits'] else 'no'}")
    budget = r["clustering"][0]["budget_gib"] if r["clustering"] else 0
    lines.append(f"fits: 8 N^2 bytes within {budget:.1f} GiB (80% of the memory available); otherwise the job's "
                 "path: Ward on max_ward_points, the rest to the nearest centroid")
    return "\n".join(lines)
