"""``data.feature_cache``: the frozen trunk run once over every split, its output kept for every epoch.

With the last k of N vision blocks trainable (and the paper's deterministic
preprocessing), the tokens entering block N-k are the same every epoch. A Ray
Data job (the training pipeline's own decode + CLIP preprocessing in CPU tasks,
then an actor pool running the trunk: GPU with bf16 autocast when the run uses
GPUs) writes them, with the text states entering the first trainable text block,
as Parquet shards under ``<cache>/<split>/``: one row per triplet (``row``: its
place in the split's files, ``prompt``,
``prompt_id``, ``valid``, ``pos``, ``neg`` and, when the text tower is partly
frozen, ``text``: bf16 bits as bytes). Training then reads the shards instead of
pixels and runs only the trainable blocks (:class:`sr_ray.reward.features.HeadRewardModel`).

``<cache>/_feature_cache.json`` records what the cache was built for: the
architecture and weights (a hash of the trunk's parameters, so random-init and
pretrained models alike are told apart), the preprocessing, the depths, the
dtype and every split file's identity. Any other model, weights, preprocessing
or data is refused with the key that differs; a cache built at depth N-6 serves
any run that trains k <= 6 blocks (the frozen blocks above the cache's depth run
forward only). A split is written whole or not at all (a ``_SUCCESS`` marker), so
a killed build resumes from the splits it finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from sr_ray.core import parquet, storage
from sr_ray.core.config import to_dict
from sr_ray.core.errors import ConfigError
from sr_ray.core.limits import clean_prompt
from sr_ray.reward import features
from sr_ray.reward.data import DataConfig, SplitInfo, TripletPreprocessor, preprocessing
from sr_ray.reward.model import ModelConfig, build_clip, preprocess_cfg

log = logging.getLogger(__name__)

MANIFEST = "_feature_cache.json"
DTYPE = "bfloat16"
COLUMNS = ("row", "prompt", "prompt_id", "valid", "pos", "neg", "text")


@dataclass
class CachePlan:
    """Where the towers are cut and what a row holds."""

    image_depth: int
    """Vision blocks in the trunk: the cached tokens enter block ``image_depth``."""
    text_depth: int | None
    """Text blocks in the trunk; None: the whole text tower trains, so no text is cached."""
    image_shape: tuple[int, int]
    text_shape: tuple[int, int] | None


def plan(model: ModelConfig, max_vision_k: int | None = None, max_text_k: int | None = None,
         clip: torch.nn.Module | None = None) -> CachePlan:
    """The cut for training ``model`` (or, for a sweep, for the most blocks any trial trains); ``clip``: the model
    when it is built already (else its architecture is built, without weights)."""
    kv = model.unfreeze_vision_blocks if max_vision_k is None else max_vision_k
    kt = model.unfreeze_text_blocks if max_text_k is None else max_text_k
    if kv == -1:
        raise ConfigError("data.feature_cache needs a frozen part of the image tower: model.unfreeze_vision_blocks "
                          "is -1 (the whole tower trains), so there is nothing to cache")
    clip = clip if clip is not None else build_clip(model, load_weights=False)
    nv, nt = features.vision_blocks(clip), features.text_blocks(clip)
    if kv > nv or kt > nt:
        raise ConfigError(f"data.feature_cache: {kv} vision / {kt} text blocks to train, but {model.name} has "
                          f"{nv} / {nt}")
    with torch.no_grad():
        size = preprocess_cfg(model)["size"]
        h, w = (size, size) if isinstance(size, int) else size
        img = features.image_trunk(clip, torch.zeros(1, 3, h, w), 0).shape[1:]
        txt = clip.positional_embedding.shape[0], clip.transformer.width
    text_depth = None if kt == -1 else nt - kt
    return CachePlan(nv - kv, text_depth, tuple(img), tuple(txt) if text_depth is not None else None)


def trunk_hash(clip: torch.nn.Module, p: CachePlan) -> str:
    """sha256 over the trunk's parameters and buffers (names and values): what decides the cached numbers."""
    visual = clip.visual
    parts = {"visual.conv1": visual.conv1, "visual.ln_pre": visual.ln_pre}
    parts |= {f"visual.block{i}": b for i, b in enumerate(list(visual.transformer.resblocks)[:p.image_depth])}
    tensors = {"visual.class_embedding": visual.class_embedding,
               "visual.positional_embedding": visual.positional_embedding}
    if p.text_depth is not None:
        parts |= {"token_embedding": clip.token_embedding}
        parts |= {f"text.block{i}": b for i, b in enumerate(list(clip.transformer.resblocks)[:p.text_depth])}
        tensors |= {"positional_embedding": clip.positional_embedding}
    h = hashlib.sha256()
    named = [(f"{k}.{n}", t) for k, m in parts.items() for n, t in m.state_dict().items()] + list(tensors.items())
    for name, t in sorted(named, key=lambda x: x[0]):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def build_model(model: ModelConfig, seed: int) -> torch.nn.Module:
    """The model as a training worker builds it (same seed: the same random init when there are no weights)."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return build_clip(model)


def identity(model: ModelConfig, seed: int, p: CachePlan, infos: dict[str, SplitInfo],
             clip: torch.nn.Module | None = None) -> dict[str, Any]:
    """What a cache is: architecture, trunk weights, preprocessing, cut, dtype and data (``clip``: the model as
    :func:`build_model` builds it, when built already)."""
    clip = clip if clip is not None else build_model(model, seed)
    return json.loads(json.dumps({  # as it reads back from the manifest (lists, not tuples)
        "model": model.name, "trunk_sha256": trunk_hash(clip, p),
        "preprocess": preprocess_cfg(model), "plan": asdict(p), "dtype": DTYPE,
        "splits": identity_splits(infos)}))


def identity_splits(infos: dict[str, SplitInfo]) -> dict[str, Any]:
    return json.loads(json.dumps({k: v.identity() for k, v in sorted(infos.items())}))


def check_serves(found: dict[str, Any], want: dict[str, Any], need: CachePlan, uri: str) -> None:
    """ConfigError unless a cache built as ``found`` serves a run of identity ``want`` (its trunk hashed at the
    cache's cut) that trains from the cut ``need`` (names the key that differs)."""
    where = f"data.feature_cache={storage.redact(uri)}"
    for key in ("model", "trunk_sha256", "preprocess", "dtype"):
        if found.get(key) != want[key]:
            raise ConfigError(f"{where} was built for another {key} ({found.get(key)!r}, this run: {want[key]!r}); "
                              f"use another data.feature_cache folder")
    fp = found["plan"]
    if fp["image_depth"] > need.image_depth:
        raise ConfigError(f"{where} holds the tokens entering vision block {fp['image_depth']}, but this run trains "
                          f"from block {need.image_depth}: build a deeper cache (another folder)")
    if need.text_depth is not None and fp["text_depth"] is not None and fp["text_depth"] > need.text_depth:
        raise ConfigError(f"{where} holds text states entering block {fp['text_depth']}, but this run trains "
                          f"from text block {need.text_depth}: build a deeper cache (another folder)")
    if need.text_depth is None and fp["text_depth"] is not None:
        log.info("[feature-cache] the whole text tower trains: the cached text states are not used")
    for split, files in want["splits"].items():
        if found["splits"].get(split) not in (None, files):
            raise ConfigError(f"{where} was built from other data.{split} files; use another folder")


def _plan_of(d: dict[str, Any]) -> CachePlan:
    return CachePlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@torch.no_grad()
def trunk_states(clip: torch.nn.Module, image_depth: int, text_depth: int | None, pos: torch.Tensor,
                 neg: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The trunk's output for a batch as the cache stores it: ``pos``/``neg`` (and ``text`` when the text trunk is
    cut) as bf16 bits in int16 tensors, on the inputs' device."""
    out = {col: features.image_trunk(clip, x, image_depth).to(torch.bfloat16).view(torch.int16)
           for col, x in (("pos", pos), ("neg", neg))}
    if text_depth is not None:
        out["text"] = features.text_trunk(clip, tokens, text_depth).to(torch.bfloat16).view(torch.int16)
    return out


class TrunkEncoder:
    """Actor: preprocessed triplet batches -> the trunk's output as bf16 bytes (``map_batches`` callable class)."""

    def __init__(self, model_cfg: dict, seed: int, plan_d: dict):
        self.plan = CachePlan(**plan_d)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.clip = build_model(ModelConfig(**model_cfg), seed).eval().to(self.device)

    @staticmethod
    def _bytes(bits: torch.Tensor) -> np.ndarray:
        rows = bits.contiguous().cpu().numpy()
        out = np.empty(len(rows), dtype=object)
        out[:] = [row.tobytes() for row in rows]
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p, dev = self.plan, self.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            states = trunk_states(self.clip, p.image_depth, p.text_depth, *(torch.as_tensor(batch[k]).to(dev)
                                                                            for k in ("pos", "neg", "tokens")))
        return {**{k: batch[k] for k in ("row", "prompt", "prompt_id", "valid")},
                **{k: self._bytes(v) for k, v in states.items()}}


class _WithPrompt:
    """TripletPreprocessor's batch plus the cleaned prompt text the cache keeps (to tokenize on read)."""

    def __init__(self, model_cfg: dict, data_cfg: dict):
        self.prep = TripletPreprocessor(model_cfg, data_cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.prep(batch)
        out["prompt"] = np.array([clean_prompt(p) if ok else "" for p, ok in zip(batch["prompt"], out["valid"])],
                                 dtype=object)
        out["row"] = batch[parquet.ROW_COL]  # the triplet's place in the split's files: its key
        return out


def split_uri(uri: str, split: str) -> str:
    return storage.join(uri, split)


def _build_split(uri: str, split: str, info: SplitInfo, model: ModelConfig, seed: int, p: CachePlan,
                 data_cfg: DataConfig, actors: int, use_gpu: bool) -> None:
    """One split: decode + preprocess (CPU tasks) -> trunk (actor pool) -> Parquet shards, then ``_SUCCESS``."""
    import ray.data

    model_d = to_dict(model)
    ds = parquet.read(info.parquet, info.columns, f"data split {storage.redact(info.uri)}", data_cfg.s3_endpoint,
                      ordered=True, row_index=True, num_cpus=data_cfg.map_num_cpus)
    ds = ds.map_batches(_WithPrompt(model_d, to_dict(data_cfg)), batch_size=data_cfg.map_batch_size,
                        num_cpus=data_cfg.map_num_cpus)
    ds = ds.map_batches(TrunkEncoder, fn_constructor_kwargs={"model_cfg": model_d, "seed": seed, "plan_d": asdict(p)},
                        batch_size=data_cfg.map_batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else data_cfg.map_num_cpus)
    target = split_uri(uri, split)
    storage.remove_tree(target, data_cfg.s3_endpoint)  # a split left half-written by a killed build
    fs, path = storage.resolve(target, data_cfg.s3_endpoint)
    ds.write_parquet(path if storage.is_s3(target) else target, filesystem=fs if storage.is_s3(target) else None,
                     min_rows_per_file=data_cfg.map_batch_size * 4)
    storage.write_text(storage.join(target, "_SUCCESS"), "", data_cfg.s3_endpoint)


def ensure(uri: str, infos: dict[str, SplitInfo], model: ModelConfig, seed: int, data_cfg: DataConfig,
           actors: int = 1, use_gpu: bool = False, max_vision_k: int | None = None,
           max_text_k: int | None = None) -> dict[str, Any]:
    """The cache at ``uri`` for these splits and this model, built where missing (a split at a time) and checked
    where present; returns its manifest with ``built_s`` (seconds spent building now, 0 when all was there)."""
    clip = build_model(model, seed)  # once: the cut, the trunk's hash
    need = plan(model, clip=clip)
    path = storage.join(uri, MANIFEST)
    if storage.exists(path, data_cfg.s3_endpoint):
        found = json.loads(storage.read_bytes(path, data_cfg.s3_endpoint))
        build_plan = _plan_of(found["plan"])
        check_serves(found, identity(model, seed, build_plan, infos, clip), need, uri)
        manifest = {**found, "splits": {**found["splits"], **identity_splits(infos)}}
    else:
        build_plan = plan(model, max_vision_k, max_text_k, clip)
        manifest = identity(model, seed, build_plan, infos, clip)
    storage.write_text(path, json.dumps(manifest, indent=1), data_cfg.s3_endpoint)
    t0 = time.perf_counter()
    for split, info in sorted(infos.items()):
        if storage.exists(storage.join(split_uri(uri, split), "_SUCCESS"), data_cfg.s3_endpoint):
            continue
        t = time.perf_counter()
        _build_split(uri, split, info, model, seed, build_plan, data_cfg, actors, use_gpu)
        log.info("[feature-cache] %s: %d triplets through the frozen trunk (vision blocks 0..%d%s) in %.1fs -> %s",
                 split, info.rows, build_plan.image_depth - 1,
                 f", text blocks 0..{build_plan.text_depth - 1}" if build_plan.text_depth is not None else "",
                 time.perf_counter() - t, storage.redact(split_uri(uri, split)))
    return {**manifest, "built_s": round(time.perf_counter() - t0, 2)}


def row_bytes(manifest: dict[str, Any]) -> int:
    """Bytes a cached triplet row takes (features only, bf16)."""
    p = manifest["plan"]
    n = 2 * int(np.prod(p["image_shape"]))
    return 2 * (n + (int(np.prod(p["text_shape"])) if p["text_depth"] is not None else 0))


class CachedBatch:
    """Cached rows -> the training batch: ``tokens`` (B, L) ids, ``pos``/``neg`` (B, T, W) and ``text`` (B, L, W)
    as int16 bf16 bits, ``prompt_id``, ``valid`` (the ``map_batches`` function of the cached pipeline)."""

    def __init__(self, model_cfg: dict, plan_d: dict):
        self.model_cfg, self.plan = dict(model_cfg), dict(plan_d)

    def _features(self, col: np.ndarray, shape) -> np.ndarray:
        return np.frombuffer(b"".join(col), dtype=np.int16).reshape(len(col), *shape)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _, tok, _ = preprocessing(self.model_cfg)
        bad = batch.get(parquet.ERROR_COL)
        valid = batch["valid"].astype(bool) & (np.array([not e for e in bad]) if bad is not None else True)
        with torch.no_grad():
            out = {"tokens": tok([str(p) for p in batch["prompt"]]).numpy().astype(np.int64),
                   "pos": self._features(batch["pos"], self.plan["image_shape"]),
                   "neg": self._features(batch["neg"], self.plan["image_shape"]),
                   "prompt_id": batch["prompt_id"].astype(np.int64), "valid": valid,
                   "row": batch["row"].astype(np.int64)}
        if self.plan["text_depth"] is not None and "text" in batch:
            out["text"] = self._features(batch["text"], self.plan["text_shape"])
        return out


def cached_dataset(uri: str, split: str, manifest: dict[str, Any], model: ModelConfig, data_cfg: DataConfig,
                   ordered: bool = False):
    """Lazy Ray Dataset of one split's cached rows as training batches (see :class:`CachedBatch`)."""
    files = parquet.inspect_files(split_uri(uri, split), f"data.feature_cache {split}", data_cfg.s3_endpoint)
    cols = [c for c in COLUMNS if c in files[0].schema.names]
    ds = parquet.read(files, cols, f"feature cache {storage.redact(split_uri(uri, split))}", data_cfg.s3_endpoint,
                      ordered=ordered, num_cpus=data_cfg.map_num_cpus)
    return ds.map_batches(CachedBatch(to_dict(model), manifest["plan"]), batch_format="numpy",
                          batch_size=data_cfg.map_batch_size, num_cpus=data_cfg.map_num_cpus)
