"""Throughput of every scorer on the same images: sr-ray's batched ``score`` against the peers' own calling
pattern measured in the same run (one image per call, as ``hpsv2.score``, ``ImageReward.score`` and PickScore's
README code score), and the load time. Small random variants by default (CPU); ``full_size=true`` builds the
published architectures with random weights (ViT-L/14, ViT-H/14, BLIP ViT-L + BERT-base): what a GPU is for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sr_ray.eval.scorers import ScorerSettings, make_scorer
from sr_ray.eval.scorers.aesthetic import AestheticConfig
from sr_ray.eval.scorers.clip import ClipConfig
from sr_ray.eval.scorers.hps import HPSConfig
from sr_ray.eval.scorers.imagereward import ImageRewardConfig
from sr_ray.eval.scorers.pickscore import PickScoreConfig


@dataclass
class BenchScorersConfig:
    scorers: list[str] = field(default_factory=lambda: ["clip", "laion_aesthetic", "hpsv2", "imagereward",
                                                        "pickscore"])
    images: int = 64
    """Images scored by each scorer (sr-ray, batched)."""
    one_by_one: int = 16
    """Of them, scored one per call (the peers' pattern)."""
    image_size: int = 256
    batch_size: int = 32
    full_size: bool = False
    """Published architectures with random weights instead of the small variants."""
    use_gpu: bool = True
    """Use a GPU when there is one (bf16)."""
    threads: int = 0
    """torch threads on CPU (0: torch's default)."""
    seed: int = 0


def settings(full: bool) -> ScorerSettings:
    if not full:
        return ScorerSettings()
    return ScorerSettings(clip=ClipConfig(model="ViT-L-14-quickgelu"),
                          laion_aesthetic=AestheticConfig(clip_model="ViT-L-14-quickgelu"),
                          hpsv2=HPSConfig(tiny_model="ViT-H-14"), hpsv21=HPSConfig(version="2.1", tiny_model="ViT-H-14"),
                          pickscore=PickScoreConfig(random_size="full"),
                          imagereward=ImageRewardConfig(random_size="full"))


def _rate(fn, n: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def bench_one(name: str, cfg: BenchScorersConfig, imgs: list, prompts: list[str], device: str) -> dict[str, Any]:
    t = time.perf_counter()
    scorer = make_scorer(name, settings(cfg.full_size), device, cfg.batch_size)
    load_s = time.perf_counter() - t
    scorer.score(prompts[:2], imgs[:2])  # warm-up
    batched = _rate(lambda: scorer.score(prompts, imgs), len(imgs), device)
    k = min(cfg.one_by_one, len(imgs))
    single = _rate(lambda: [scorer.score([p], [im]) for p, im in zip(prompts[:k], imgs[:k])], k, device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    params = sum(p.numel() for m in vars(scorer).values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    if hasattr(scorer, "scorer"):  # social_reward / clip wrap a RewardScorer
        params = sum(p.numel() for p in scorer.scorer.model.parameters())
    return {"scorer": name, "params_m": round(params / 1e6, 1), "load_s": round(load_s, 2),
            "images_per_s": round(batched, 2), "one_per_call_images_per_s": round(single, 2),
            "speedup": round(batched / single, 2), "gpu_mem_gib": round(mem, 2) if mem else None}


def bench_scorers(cfg: BenchScorersConfig) -> dict[str, Any]:
    from PIL import Image

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    rng = np.random.RandomState(cfg.seed)
    s = cfg.image_size
    imgs = [Image.fromarray(rng.randint(0, 256, (s, s + 16 * (i % 3), 3), dtype=np.uint8)) for i in range(cfg.images)]
    prompts = [f"prompt {i % 9}: a picture of thing {i % 5}" for i in range(cfg.images)]
    rows = [bench_one(n, cfg, imgs, prompts, device) for n in cfg.scorers]
    return {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "full_size": cfg.full_size, "images": cfg.images, "batch_size": cfg.batch_size, "results": rows}


def format_table(r: dict) -> str:
    lines = [f"scorers on {r['device']}, {'published' if r['full_size'] else 'small'} architectures (random "
             f"weights), {r['images']} images, batch {r['batch_size']}",
             f"{'scorer':16s} {'params M':>9s} {'load s':>7s} {'img/s':>8s} {'1/call':>8s} {'ratio':>6s} {'GiB':>6s}"]
    for x in r["results"]:
        lines.append(f"{x['scorer']:16s} {x['params_m']:9.1f} {x['load_s']:7.2f} {x['images_per_s']:8.2f} "
                     f"{x['one_per_call_images_per_s']:8.2f} {x['speedup']:6.2f} {x['gpu_mem_gib'] or '':>6}")
    lines.append("img/s: sr-ray batched; 1/call: one image per call (the peers' own scoring loops); ratio = the two")
    return "\n".join(lines)
