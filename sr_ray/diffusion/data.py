"""The fine-tune set (selection output) as model inputs: Ray Data decode, resize/crop, tokenize; demo set.

Contract: ``prompt`` (worst rows carry the special token), ``image`` (encoded
bytes), ``source`` in {best, worst, regularization}, ``generation_id``.
"""

from __future__ import annotations

import functools
import json
import logging
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sr_ray.core import images, parquet, storage

log = logging.getLogger(__name__)

COLUMNS = ("prompt", "image", "source")


@dataclass
class FinetuneDataConfig:
    train: str | None = None
    """Fine-tune set (Parquet file or folder, local or s3://); none: the selection demo's output if it exists,
    else a demo set drawn in code."""
    resolution: int = 32
    """Training resolution in pixels: shorter side resized to it, then centre-cropped (the paper: 512)."""
    center_crop: bool = True
    """Centre crop after the resize; false: a random crop (seeded per row)."""
    random_flip: bool = False
    max_bad_row_rate: float = 0.05
    """Fail when more than this share of the rows seen has an unusable image (they are skipped and counted)."""
    min_rows_for_bad_rate: int = 64
    map_batch_size: int = 32
    map_num_cpus: float = 0.5
    prefetch_batches: int = 2
    cache_latents: bool = False
    """Encode every image with the VAE once (Ray Data actors, before training); epochs reuse the latents."""
    vae_actors: int = 1
    s3_endpoint: str | None = None
    demo: dict[str, Any] = field(default_factory=dict)
    """Demo set drawn in code: prompts, image_size, seed, cache_dir."""


@dataclass
class SetInfo:
    uri: str
    files: list[str]
    rows: int
    sources: dict[str, int]
    identity: list[dict[str, Any]] = field(default_factory=list)
    """Every file's URI, size and mtime: what a resumed fine-tune must find unchanged."""


def preflight(cfg: FinetuneDataConfig, uri: str) -> SetInfo:
    """Every file's columns and types, and the rows per source, before Ray does any work (names file and column)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    inputs = parquet.inputs(uri, "data.train", COLUMNS, kinds={"image": "binary", "prompt": "string"},
                            endpoint=cfg.s3_endpoint,
                            expected="a fine-tune set has prompt, image (bytes), source, generation_id "
                                     "(see jobs/select_pairs.py)")
    fs, _ = storage.resolve(uri, cfg.s3_endpoint)
    sources: dict[str, int] = {}
    for f in inputs:
        with fs.open_input_file(f.path) as fh:
            src = pq.read_table(fh, columns=["source"]).column("source")
        for v, n in zip(*[x.to_pylist() for x in pc.value_counts(src).flatten()]):
            sources[v] = sources.get(v, 0) + n
    files, rows = [f.path for f in inputs], sum(f.rows for f in inputs)
    return SetInfo(uri, files, rows, sources, [f.identity() for f in inputs])


@functools.lru_cache(maxsize=4)
def _tokenizer(model_json: str):
    from sr_ray.diffusion.components import SDModelConfig, load_tokenizer

    return load_tokenizer(SDModelConfig(**json.loads(model_json)))


def tokenize(tokenizer, prompts: list[str]) -> np.ndarray:
    """(B, model_max_length) int64 ids, padded and truncated as SD's training scripts do."""
    return np.asarray(tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True).input_ids, dtype=np.int64)


class FinetunePreprocessor:
    """Batch of fine-tune rows -> ``pixel_values`` (B, 3, R, R) in [-1, 1], ``input_ids``, ``valid``.

    A row with an unusable image keeps its place with zero pixels and ``valid=False``:
    the train loop counts it and leaves it out of the loss.
    """

    def __init__(self, model_cfg: dict, resolution: int, center_crop: bool = True, random_flip: bool = False,
                 seed: int = 0):
        self.model_json = json.dumps(model_cfg, sort_keys=True)
        self.r, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed

    def _pixels(self, data: bytes, key: str) -> np.ndarray:
        from PIL import Image

        img = images.decode(data)
        w, h = img.size
        s = self.r / min(w, h)
        img = img.resize((max(self.r, round(w * s)), max(self.r, round(h * s))), Image.BILINEAR)
        w, h = img.size
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])  # same crop per row in every run
        if self.center_crop:
            x, y = (w - self.r) // 2, (h - self.r) // 2
        else:
            x, y = int(rng.integers(0, w - self.r + 1)), int(rng.integers(0, h - self.r + 1))
        img = img.crop((x, y, x + self.r, y + self.r))
        a = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        if self.random_flip and rng.random() < 0.5:
            a = a[:, :, ::-1]
        return np.ascontiguousarray(a)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tok = _tokenizer(self.model_json)
        n = len(batch["prompt"])
        pixels = np.zeros((n, 3, self.r, self.r), np.float32)
        valid = np.ones(n, bool)
        ids = batch["generation_id"] if "generation_id" in batch else [str(i) for i in range(n)]
        for i in range(n):
            try:
                pixels[i] = self._pixels(batch["image"][i], str(ids[i]))
            except images.BadImage as e:
                valid[i] = False
                log.warning("[data] skipped fine-tune row %s: %s", ids[i], e)
        prompts = [str(p) if p is not None else "" for p in batch["prompt"]]
        return {"pixel_values": pixels, "input_ids": tokenize(tok, prompts), "valid": valid}


class LatentEncoder:
    """Ray Data actor: ``pixel_values`` -> the VAE's latent moments (mean and log-variance, (B, 2C, h, w))."""

    def __init__(self, model_cfg: dict):
        import torch

        from sr_ray.diffusion.components import SDModelConfig, load_components

        self.vae = load_components(SDModelConfig(**model_cfg))["vae"].eval().requires_grad_(False)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.vae.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            x = torch.as_tensor(batch["pixel_values"], device=self.device)
            moments = self.vae.encode(x).latent_dist.parameters.float().cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "pixel_values"}
        out["latent_moments"] = moments
        return out


def finetune_dataset(info: SetInfo, model_cfg: dict, cfg: FinetuneDataConfig, seed: int, ordered: bool = False):
    """Ray Data: read -> decode/resize/crop/tokenize (CPU tasks) [-> VAE latents, materialized once].

    ``ordered``: one read task per file, so the rows come in the same order and blocks on any cluster (a run that
    must resume exactly; see :func:`sr_ray.core.parquet.read`)."""
    import ray.data

    fs, _ = storage.resolve(info.uri, cfg.s3_endpoint)
    ds = ray.data.read_parquet(info.files, filesystem=fs, override_num_blocks=len(info.files) if ordered else None)
    ds = ds.select_columns(["prompt", "image", "generation_id"])  # pushed down into the read
    ds = ds.map_batches(FinetunePreprocessor(model_cfg, cfg.resolution, cfg.center_crop, cfg.random_flip, seed),
                        batch_format="numpy", batch_size=cfg.map_batch_size, num_cpus=cfg.map_num_cpus)
    if cfg.cache_latents:
        ds = ds.map_batches(LatentEncoder, batch_format="numpy", batch_size=cfg.map_batch_size,
                            fn_constructor_kwargs={"model_cfg": model_cfg}, num_cpus=cfg.map_num_cpus,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.vae_actors)).materialize()
    return ds
