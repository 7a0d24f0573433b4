"""The feature cache on the training job itself: the same run without and with ``data.feature_cache``.

Both runs are the reward-training job (Ray Train, Ray Data) on the same demo
triplets, model, seed and schedule. Reported: seconds per epoch of each (rows /
the job's own training rate, data wait included), the one-off cache build, the
epochs after which the cache has paid for itself, the bytes per cached triplet,
and the validation accuracy of each with its 95% interval (the cached model
computes the same function on bf16-stored tokens, so the two should agree
within noise).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

from sr_ray.core.config import from_dict, to_dict
from sr_ray.core.ray_utils import init_ray
from sr_ray.demo.data import DemoConfig, ensure_demo_data
from sr_ray.reward.export import wilson
from sr_ray.reward.model import ModelConfig
from sr_ray.reward.train import TrainRewardConfig, train_reward


@dataclass
class BenchFeatureCacheConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        name="ViT-B-32", pretrained=None, unfreeze_vision_blocks=3, unfreeze_text_blocks=2))
    """The paper's cut (3 vision, 2 text blocks trainable) on ViT-B-32 (random weights: speed, not accuracy)."""
    train: int = 320
    val: int = 160
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-4
    cpus_per_worker: float = 1.0
    map_num_cpus: float = 0.5
    num_cpus: int | None = None
    """CPUs of the local Ray cluster (default: all)."""
    cache_dir: str = "~/.cache/sr-ray/bench"
    work_dir: str = "/tmp/sr-ray-bench-feature-cache"


def _config(cfg: BenchFeatureCacheConfig, splits: dict, name: str, cache: str | None) -> TrainRewardConfig:
    return from_dict(TrainRewardConfig, {
        "data": {"train": splits["train"], "val": splits["val"], "map_num_cpus": cfg.map_num_cpus,
                 "feature_cache": cache, "shuffle_buffer": 0},
        "model": to_dict(cfg.model),
        "optim": {"lr": cfg.lr, "batch_size": cfg.batch_size, "epochs": cfg.epochs, "warmup_steps": 5},
        "scaling": {"num_workers": 1, "cpus_per_worker": cfg.cpus_per_worker, "max_failures": 0},
        "run": {"name": name, "storage_path": os.path.join(cfg.work_dir, "runs"), "overwrite": True,
                "log_every_steps": 10}})


def bench_feature_cache(cfg: BenchFeatureCacheConfig) -> dict:
    shutil.rmtree(cfg.work_dir, ignore_errors=True)
    splits = ensure_demo_data(DemoConfig(source="synthetic", train=cfg.train, val=cfg.val, test=8,
                                         cache_dir=cfg.cache_dir, rows_per_shard=max(64, cfg.train // 8)))
    init_ray(None, num_cpus=cfg.num_cpus)
    runs = {}
    for name, cache in (("pixels", None), ("feature-cache", os.path.join(cfg.work_dir, "cache"))):
        t = time.perf_counter()
        s = train_reward(_config(cfg, splits, name, cache), score_test=False)
        rows = s["steps"] // cfg.epochs * cfg.batch_size
        runs[name] = {"wall_s": round(time.perf_counter() - t, 1), "triplets_per_s": round(s["triplets_per_s"], 2),
                      "epoch_s": round(rows / s["triplets_per_s"], 1), "val_accuracy": s["val_pairwise_accuracy"],
                      "val_ci95": tuple(round(x, 3) for x in wilson(s["val_pairwise_accuracy"], cfg.val)),
                      **s.get("feature_cache", {})}
        print(f"[bench] {name}: {runs[name]}", flush=True)
    plain, cached = runs["pixels"], runs["feature-cache"]
    saved = plain["epoch_s"] - cached["epoch_s"]
    return {"model": cfg.model.name, "unfrozen": [cfg.model.unfreeze_vision_blocks, cfg.model.unfreeze_text_blocks],
            "train_triplets": cfg.train, "val_triplets": cfg.val, "epochs": cfg.epochs, "runs": runs,
            "epoch_speedup": round(plain["epoch_s"] / cached["epoch_s"], 2),
            "cache_build_s": cached["built_s"],
            "break_even_epochs": round(cached["built_s"] / saved, 2) if saved > 0 else None,
            "bytes_per_triplet": cached["bytes_per_triplet"]}


def format_table(r: dict) -> str:
    p, c = r["runs"]["pixels"], r["runs"]["feature-cache"]
    lines = [f"{r['model']}, last {r['unfrozen'][0]} vision / {r['unfrozen'][1]} text blocks trainable, "
             f"{r['train_triplets']} train / {r['val_triplets']} val triplets, {r['epochs']} epochs",
             f"{'':24s} {'s/epoch':>8s} {'triplets/s':>11s} {'val acc':>8s} {'95% CI':>14s}"]
    for name, x in (("pixels (no cache)", p), ("feature cache", c)):
        lines.append(f"{name:24s} {x['epoch_s']:8.1f} {x['triplets_per_s']:11.2f} {x['val_accuracy']:8.3f} "
                     f"{str(x['val_ci95']):>14s}")
    be = r["break_even_epochs"]
    lines.append(f"epoch {r['epoch_speedup']}x faster; one-off cache build {r['cache_build_s']:.1f} s "
                 f"(vision blocks 0..{c['image_depth'] - 1} once per image), "
                 f"{'pays for itself after ' + str(be) + ' epochs' if be is not None else 'never pays off here'}; "
                 f"{r['bytes_per_triplet'] / 2**10:.0f} KiB per cached triplet (bf16)")
    return "\n".join(lines)
