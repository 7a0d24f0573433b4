"""Training throughput: sr-ray's step against the authors' approach, in one run.

Reference ("authors"): the same model and loss, their freezing (``model.requires_grad
= False`` sets an attribute, so every parameter still computes a gradient; the
optimiser updates only the intended blocks), fed by a plain PyTorch DataLoader
that decodes and preprocesses in its worker processes.
Ours: :func:`sr_ray.reward.model.freeze` (no gradient for frozen parameters), fed by the
Ray Data pipeline of the training job (``iter_torch_batches``), with the very
``train_step`` the Ray Train loop runs. Both on the same Parquet triplets.
Ours + feature cache (``feature_cache=true``): the frozen trunk run once (its
rate reported as the one-off cost), then the steps of the trainable blocks alone
on the cached tokens (:mod:`sr_ray.reward.feature_cache`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch

from sr_ray.core.config import to_dict
from sr_ray.demo.data import DemoConfig, ensure_demo_data
from sr_ray.reward import feature_cache
from sr_ray.reward.data import DataConfig, TripletPreprocessor, split_info, triplet_dataset
from sr_ray.reward.features import HeadRewardModel
from sr_ray.reward.losses import LossConfig
from sr_ray.reward.model import ModelConfig, RewardModel, build_clip, count_params
from sr_ray.reward.train import train_step


@dataclass
class BenchTrainConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        name="ViT-B-32", pretrained=None, unfreeze_vision_blocks=3, unfreeze_text_blocks=2))
    """Model of both sides (random weights are fine for speed)."""
    rows: int = 640
    """Demo triplets generated for the run."""
    batch_size: int = 32
    steps: int = 8
    """Timed steps per side, after ``warmup_steps`` untimed ones."""
    warmup_steps: int = 2
    device: str = "auto"
    """auto: cuda when available, else cpu."""
    precision: str = "auto"
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    loader_workers: int = 1
    """DataLoader worker processes of the reference."""
    num_cpus: int | None = None
    """CPUs of the local Ray cluster (default: all)."""
    cache_dir: str = "~/.cache/sr-ray/bench"
    feature_cache: bool = True
    """Also time sr-ray on the frozen trunk's cached output (:mod:`sr_ray.reward.feature_cache`)."""
    data_source: str = "pipelines"
    """pipelines: authors' DataLoader vs our Ray Data; memory: both fed the same preprocessed
    batches from memory (isolates the model step, e.g. on a GPU machine; no Ray needed)."""

    def __post_init__(self) -> None:
        if self.data_source not in ("pipelines", "memory"):
            raise ValueError("data_source must be pipelines or memory")


class _AuthorsDataset(torch.utils.data.Dataset):
    """Rows of packed triplet shards, decoded per item (as a plain PyTorch pipeline does)."""

    def __init__(self, files: list[str], model_cfg: dict):
        self.rows = pq.read_table(files, columns=["prompt", "pos_image", "neg_image"]).to_pylist()
        self.prep = TripletPreprocessor(model_cfg, to_dict(DataConfig()))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        out = self.prep({k: np.array([r[k]], dtype=object) for k in r})
        return {k: torch.as_tensor(v[0]) for k, v in out.items()}


def _timed_steps(model, batches, cfg: BenchTrainConfig, params, device, autocast) -> tuple[float, float]:
    """(triplets/s over the timed steps, share of that time spent waiting for data)."""
    optim = torch.optim.AdamW(params, lr=1e-5)
    it = iter(batches)
    wait = 0.0
    t0 = None
    for i in range(cfg.warmup_steps + cfg.steps):
        if i == cfg.warmup_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, wait = time.perf_counter(), 0.0
        w0 = time.perf_counter()
        b = next(it)
        tokens = b["tokens"].to(device)
        batch = ((tokens, b["text"].to(device)) if "text" in b else tokens,) + tuple(
            b[k].to(device) for k in ("pos", "neg", "prompt_id")) + (b["valid"].to(device=device, dtype=torch.bool),)
        wait += time.perf_counter() - w0
        train_step(model, batch, LossConfig(), optim, params, 1.0, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return cfg.steps * cfg.batch_size / dt, wait / dt


def _trunk_batches(memory: list[dict], model: HeadRewardModel, device, autocast) -> tuple[list[dict], float]:
    """The feature cache in memory: every batch's pixels (and tokens) through the frozen trunk once, kept as bf16
    bits as the cache stores them. Returns (cached batches, seconds it took)."""
    t0 = time.perf_counter()
    out = []
    with autocast():
        for b in memory:
            out.append({**{k: b[k] for k in ("tokens", "prompt_id", "valid")},
                        **feature_cache.trunk_states(model.clip, model.image_depth, model.text_depth,
                                                     *(b[k].to(device) for k in ("pos", "neg", "tokens")))})
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _cached_side(cfg: BenchTrainConfig, info, memory, device, autocast) -> dict:
    """sr-ray + feature cache: the trunk once (timed: the one-off cost), then steps of the trainable head only.
    Memory-fed: cached batches in memory; pipelines: the real cache (:mod:`sr_ray.reward.feature_cache`) streamed
    by Ray Data from a fresh folder."""
    import tempfile

    cut = feature_cache.plan(cfg.model)
    model = HeadRewardModel(feature_cache.build_model(cfg.model, 0), cut.image_depth, cut.text_depth).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = cfg.batch_size * (cfg.warmup_steps + cfg.steps)
    if memory is not None:
        batches, one_off = _trunk_batches(memory, model, device, autocast)
        tps, wait = _timed_steps(model, batches, cfg, params, device, autocast)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            data = DataConfig(feature_cache=tmp)
            m = feature_cache.ensure(tmp, {"train": info}, cfg.model, 0, data)
            one_off, rows = m["built_s"], info.rows
            batches = feature_cache.cached_dataset(tmp, "train", m, cfg.model, data).iter_torch_batches(
                batch_size=cfg.batch_size, drop_last=True, prefetch_batches=2)
            tps, wait = _timed_steps(model, batches, cfg, params, device, autocast)
    return {"cached_triplets_per_s": round(tps, 2), "cached_data_wait": round(wait, 3),
            "cache_build_triplets_per_s": round(rows / one_off, 2), "cache_image_depth": cut.image_depth,
            "cache_text_depth": cut.text_depth}


def _ingest_rate(info, model_cfg: dict) -> tuple[float, float]:
    """(images/s, cluster CPUs) of Ray Data ingest alone: decode + CLIP preprocessing."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    t0 = time.perf_counter()
    rows = sum(len(b["valid"]) for b in triplet_dataset(info, model_cfg, DataConfig()).iter_batches(
        batch_size=256, batch_format="numpy"))
    return 2 * rows / (time.perf_counter() - t0), cpus


def bench_train(cfg: BenchTrainConfig) -> dict:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          (cfg.device if cfg.device != "auto" else "cpu"))
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    need = cfg.batch_size * (cfg.warmup_steps + cfg.steps)
    if cfg.rows < need:
        raise ValueError(f"rows={cfg.rows} < batch_size * (warmup_steps + steps) = {need}")
    splits = ensure_demo_data(DemoConfig(source="synthetic", train=cfg.rows, val=8, test=8, cache_dir=cfg.cache_dir,
                                         rows_per_shard=max(64, cfg.rows // 8)))
    model_cfg = to_dict(cfg.model)
    info = split_info("train", splits["train"], DataConfig())
    memory = None
    if cfg.data_source == "memory":
        table = pq.read_table(info.files).slice(0, need).to_pydict()
        out = TripletPreprocessor(model_cfg, to_dict(DataConfig()))(
            {k: np.array(v, dtype=object) for k, v in table.items()})
        memory = [{k: torch.as_tensor(v[s:s + cfg.batch_size]) for k, v in out.items()}
                  for s in range(0, need, cfg.batch_size)]
    else:
        import ray

        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, num_cpus=cfg.num_cpus)

    # Reference: the authors' freezing (a no-op) + a plain DataLoader.
    torch.manual_seed(0)
    ref = RewardModel(build_clip(cfg.model)).to(device)
    intended = [p for p in ref.parameters() if p.requires_grad]
    ref.clip.requires_grad = False  # what their code does: sets an attribute, freezes nothing
    for p in ref.parameters():
        p.requires_grad_(True)  # as in a fresh open_clip model: every parameter requires grad
    ref_grads = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    if memory is None:
        loader = torch.utils.data.DataLoader(_AuthorsDataset(info.files, model_cfg), batch_size=cfg.batch_size,
                                             shuffle=True, num_workers=cfg.loader_workers, drop_last=True,
                                             persistent_workers=cfg.loader_workers > 0)
    else:
        loader = memory
    # the optimiser holds only the intended blocks (the same update as ours); backward computes every grad
    ref_tps, ref_wait = _timed_steps(ref, loader, cfg, intended, device, autocast)
    del ref, loader

    # Ours: explicit freezing + Ray Data streaming.
    torch.manual_seed(0)
    ours = RewardModel(build_clip(cfg.model)).to(device)
    params = [p for p in ours.parameters() if p.requires_grad]
    trainable, total = count_params(ours)
    if memory is None:
        batches = triplet_dataset(info, model_cfg, DataConfig()).iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=True, prefetch_batches=2)
    else:
        batches = memory
    our_tps, our_wait = _timed_steps(ours, batches, cfg, params, device, autocast)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del ours
    cached = _cached_side(cfg, info, memory, device, autocast) if cfg.feature_cache else {}

    ingest, cpus = _ingest_rate(info, model_cfg) if memory is None else (None, None)

    return {
        "model": cfg.model.name, "device": str(device), "bf16": bf16, "batch_size": cfg.batch_size,
        "timed_steps": cfg.steps, "trainable_params": trainable, "total_params": total,
        "authors_params_with_grad": ref_grads,
        "authors_triplets_per_s": round(ref_tps, 2), "authors_data_wait": round(ref_wait, 3),
        "ours_triplets_per_s": round(our_tps, 2), "ours_data_wait": round(our_wait, 3),
        "speedup": round(our_tps / ref_tps, 3),
        "data_source": cfg.data_source, "peak_gpu_mem_gb": peak_gb and round(peak_gb, 2),
        "ingest_images_per_s": ingest and round(ingest, 1), "ray_cpus": cpus,
        "ingest_images_per_s_per_cpu": ingest and round(ingest / cpus, 1),
        **cached, **({"cached_speedup": round(cached["cached_triplets_per_s"] / our_tps, 3),
                      "cached_speedup_vs_authors": round(cached["cached_triplets_per_s"] / ref_tps, 3)}
                     if cached else {}),
    }


def format_table(r: dict) -> str:
    rows = [
        ("authors (no-op freeze" + (", DataLoader)" if r["data_source"] == "pipelines" else ")"),
         r["authors_triplets_per_s"], r["authors_data_wait"]),
        ("sr-ray (freeze" + (", Ray Data)" if r["data_source"] == "pipelines" else ")"),
         r["ours_triplets_per_s"], r["ours_data_wait"]),
    ]
    lines = [f"model {r['model']} on {r['device']} (bf16={r['bf16']}), batch {r['batch_size']}, "
             f"{r['timed_steps']} timed steps; params with grad: authors {r['authors_params_with_grad']:,}, "
             f"sr-ray {r['trainable_params']:,} of {r['total_params']:,}",
             f"{'':38s} {'triplets/s':>11s} {'data wait':>10s}"]
    if "cached_triplets_per_s" in r:
        rows.append((f"sr-ray + feature cache (from block {r['cache_image_depth']})", r["cached_triplets_per_s"],
                     r["cached_data_wait"]))
    lines += [f"{name:38s} {tps:11.2f} {wait:10.1%}" for name, tps, wait in rows]
    lines.append(f"speedup sr-ray / authors: {r['speedup']:.2f}x")
    if "cached_triplets_per_s" in r:
        lines.append(f"feature cache: {r['cached_speedup']:.2f}x sr-ray's step, {r['cached_speedup_vs_authors']:.2f}x "
                     f"the authors'; building it (the trunk once): {r['cache_build_triplets_per_s']:.2f} triplets/s")
    if r["ingest_images_per_s"]:
        lines.append(f"Ray Data ingest (decode + CLIP preprocessing): {r['ingest_images_per_s']:.0f} images/s on "
                     f"{r['ray_cpus']:.0f} CPUs = {r['ingest_images_per_s_per_cpu']:.0f} images/s per CPU")
    if r["peak_gpu_mem_gb"]:
        lines.append(f"peak GPU memory: {r['peak_gpu_mem_gb']:.1f} GiB")
    return "\n".join(lines)

