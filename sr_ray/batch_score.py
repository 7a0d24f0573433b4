"""Batch-score user generations with the reward model on Ray Data (paper sec. 4.3).

Ray Data reads the generations (``generation_id``, ``prompt``, ``image`` bytes or
``image_uri``; local or S3), decodes and preprocesses them in CPU tasks, and
scores them on an autoscaling pool of scorer actors (``map_batches`` with a
callable class and ``ActorPoolStrategy``; ``num_gpus`` per actor on GPU). Each
actor encodes a prompt's text once and keeps it (an LRU cache), so a prompt with
many images costs one text forward pass, not one per image.

Output: one Parquet shard per input file, with the input columns less the image
bytes plus ``score`` (float32), written atomically once every row of that file is
back; rows that cannot be scored (undecodable image, empty prompt) go to
``_rejects/<shard>`` with their reason instead. A shard's scores file is its
commit point: a re-run skips the files that have one, so every ``generation_id``
ends up scored exactly once, however often the job is killed.
"""

from __future__ import annotations

import collections
import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sr_ray import images, storage
from sr_ray.data import DataError, parquet_inputs

log = logging.getLogger(__name__)

REJECTS = "_rejects"
ID, PROMPT, IMAGE, URI = "generation_id", "prompt", "image", "image_uri"


@dataclass
class ScoreConfig:
    checkpoint: str | None = None
    """Reward checkpoint folder (local or s3://); none: the reward-training demo's best (trained first if missing)."""
    generations: str | None = None
    """Parquet file or folder of generations (local or s3://); none: the demo generations (drawn once, cached)."""
    out: str = "./runs/scores-demo"
    backend: str = "torch"
    """torch (bf16 autocast + SDPA on GPU, fp32 on CPU) or deepspeed (deepspeed.init_inference)."""
    compile: bool = False
    """torch.compile the image and text towers (torch backend)."""
    use_gpu: bool = False
    gpus_per_actor: float = 1.0
    cpus_per_actor: float = 0.5
    min_actors: int = 1
    max_actors: int = 2
    """The scorer pool grows from min_actors to max_actors while there is work queued."""
    batch_size: int = 64
    """Images per scorer call."""
    decode_batch_size: int = 64
    block_rows: int = 128
    """Rows per Ray Data block between the stages (streaming repartition after the read): how often the
    driver hears back, so the granularity of progress lines and shard commits. The reader alone would put
    many small files in one block, finishing all their shards at once."""
    decode_num_cpus: float = 0.5
    text_cache_size: int = 100_000
    """Prompt embeddings each actor keeps."""
    torch_threads: int = 0
    """Intra-op threads of each scorer actor on CPU; 0: Ray's default (the actor's whole CPUs, at least 1)."""
    max_reject_rate: float = 0.5
    """Fail the job when more than this share of the rows could not be scored (bad rows never crash it alone)."""
    image_root: str | None = None
    """Prefix of relative image_uri values."""
    s3_endpoint: str | None = None
    ray_address: str | None = None
    progress_every_s: float = 10.0
    demo: dict[str, Any] = field(default_factory=dict)
    """Demo generation set: prompts, images_per_prompt, image_size, seed, bad_rows, rows_per_file, cache_dir."""

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "deepspeed"):
            raise ValueError("backend must be torch or deepspeed")
        if not 1 <= self.min_actors <= self.max_actors:
            raise ValueError("need 1 <= min_actors <= max_actors")
        if self.batch_size < 1 or self.decode_batch_size < 1 or self.block_rows < 1:
            raise ValueError("batch sizes must be >= 1")
        if not 0.0 <= self.max_reject_rate <= 1.0:
            raise ValueError("max_reject_rate must be in [0, 1]")


@dataclass
class InputFile:
    path: str       # the filesystem's own path (what Ray Data's include_paths reports)
    rows: int
    columns: list[str]
    shard: str      # output shard name


def inspect_inputs(uri: str, endpoint: str | None) -> list[InputFile]:
    """Every input file's rows and columns, checked before Ray does any work (names file and column)."""
    out, seen = [], collections.Counter()
    for f in parquet_inputs(uri, "generations", [ID, PROMPT], [IMAGE, URI], [IMAGE], endpoint,
                            expected=f"expected {ID}, {PROMPT} and {IMAGE} (bytes) or {URI}"):
        p, rows, cols = f.path, f.rows, f.schema.names
        stem = posixpath.splitext(posixpath.basename(p))[0]
        seen[stem] += 1
        shard = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
        out.append(InputFile(p, rows, cols, f"{shard}.parquet"))
    return out


def check_unique_ids(files: list[InputFile], endpoint: str | None, uri: str) -> None:
    """Exactly-once needs unique ``generation_id``s: name the first duplicate and its files."""
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(uri, endpoint)
    where: dict[str, str] = {}
    for f in files:
        with fs.open_input_file(f.path) as fh:
            ids = pq.read_table(fh, columns=[ID]).column(ID).to_pylist()
        for i in ids:
            if i in where:
                raise DataError(f"generations: generation_id {i!r} appears twice ({where[i]} and {f.path}); "
                                f"ids must be unique for exactly-once scoring")
            where[i] = f.path


class GenerationPreprocessor:
    """CPU stage: decode + the model's CLIP preprocessing; bad rows keep their place with ``reason`` set."""

    def __init__(self, model_cfg: dict, endpoint: str | None, image_root: str | None):
        self.model_json = json.dumps(model_cfg, sort_keys=True)
        self.endpoint, self.image_root = endpoint, image_root

    def _bytes(self, batch: dict, i: int) -> bytes:
        from sr_ray.data import read_image_bytes

        if IMAGE in batch and batch[IMAGE][i] is not None:
            return bytes(batch[IMAGE][i])
        uri = batch[URI][i] if URI in batch else None
        if not uri:
            raise images.BadImage("no image bytes and no image_uri")
        return read_image_bytes(str(uri), self.image_root, self.endpoint)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sr_ray.data import _prep_state

        transform, _ = _prep_state(self.model_json)
        n = len(batch[ID])
        pixels, reasons = [None] * n, [""] * n
        for i in range(n):
            prompt = batch[PROMPT][i]
            if prompt is None or not str(prompt).strip():
                reasons[i] = "empty prompt"
                continue
            try:
                pixels[i] = transform(images.decode(self._bytes(batch, i))).numpy()
            except images.BadImage as e:
                reasons[i] = str(e)
        shape = next((p.shape for p in pixels if p is not None), None)
        if shape is None:
            from sr_ray import model as model_lib

            size = model_lib.preprocess_cfg(model_lib.ModelConfig(**json.loads(self.model_json)))["size"]
            shape = (3, *(size if isinstance(size, (tuple, list)) else (size, size)))
        zeros = np.zeros(shape, np.float32)
        out = {k: v for k, v in batch.items() if k != IMAGE}
        out["pixels"] = np.stack([p if p is not None else zeros for p in pixels]).astype(np.float32)
        out["reason"] = np.array(reasons, dtype=object)
        return out


class GenerationScorer:
    """Scorer actor: (prompt, pixels) -> ``score``; each distinct prompt's text is encoded once per actor."""

    def __init__(self, checkpoint: str, backend: str = "torch", compile: bool = False, device: str | None = None,
                 text_cache_size: int = 100_000, torch_threads: int = 0):
        import torch

        from sr_ray.model import tokenizer
        from sr_ray.ray_utils import in_ray_worker, worker_prints_to_stderr
        from sr_ray.score import load_model

        if in_ray_worker():
            worker_prints_to_stderr()
        if torch_threads:
            torch.set_num_threads(torch_threads)

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.cfg = load_model(checkpoint, self.device)
        self.tokenizer = tokenizer(self.cfg)
        self.cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.cache_size = text_cache_size
        self.encode_text, self.encode_image = self.model.encode_text, self.model.encode_image
        self.dtype = torch.float32
        if backend == "deepspeed":
            self._deepspeed()
        elif compile:
            self.encode_text = torch.compile(self.encode_text)
            self.encode_image = torch.compile(self.encode_image)
        self.ready_at = time.time()  # model loaded: the driver tells start-up from steady scoring with it

    def _deepspeed(self) -> None:
        import deepspeed
        import torch

        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # kernel injection covers transformers of HF/Megatron layouts, not open_clip's towers: DeepSpeed casts
        # the weights (bf16 on GPU) and runs the model as it is
        engine = deepspeed.init_inference(self.model, dtype=dtype, replace_with_kernel_inject=False)
        self.engine, self.model, self.dtype = engine, engine.module, dtype
        self.encode_text, self.encode_image = self.model.encode_text, self.model.encode_image

    def text(self, prompts: list[str]):
        """Embeddings of ``prompts`` (one row each), encoding only the ones not cached; returns (emb, newly encoded)."""
        import torch

        from sr_ray.score import inference_autocast

        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if new:
            with inference_autocast(self.device):
                emb = self.encode_text(self.tokenizer(new).to(self.device)).float()
            for p, e in zip(new, emb):
                self.cache[p] = e
        for p in prompts:
            self.cache.move_to_end(p)
        rows = torch.stack([self.cache[p] for p in prompts])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return rows, len(new)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from sr_ray.model import RewardModel
        from sr_ray.score import inference_autocast

        n = len(batch[ID])
        ok = np.array([not r for r in batch["reason"]], dtype=bool)
        scores = np.full(n, np.nan, dtype=np.float32)
        encoded = 0
        if ok.any():
            with torch.no_grad():
                t, encoded = self.text([str(p) for p in batch[PROMPT][ok]])
                with inference_autocast(self.device):
                    pixels = torch.as_tensor(batch["pixels"][ok], device=self.device, dtype=self.dtype)
                    im = self.encode_image(pixels).float()
                scores[ok] = RewardModel.score(t, im).float().cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["score"] = scores
        out["texts_encoded"] = np.array([encoded] + [0] * (n - 1), dtype=np.int64)
        out["actor_ready_at"] = np.full(n, self.ready_at, dtype=np.float64)
        return out


def checkpoint_model_config(checkpoint: str) -> dict:
    """The model config stored in a reward checkpoint (memory-mapped: the weights are not read)."""
    import torch

    from sr_ray.score import model_file

    try:
        f = model_file(checkpoint)
    except FileNotFoundError as e:
        raise DataError(f"checkpoint={e}") from None
    return dict(torch.load(f, map_location="cpu", weights_only=True, mmap=True)["model_config"])


def _shard_counts(out: str, shard: str, endpoint: str | None) -> tuple[int, int]:
    """(scored, rejected) rows of a finished shard, from the Parquet footers."""
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(out, endpoint)
    n = []
    for uri in (storage.join(out, shard), storage.join(out, REJECTS, shard)):
        path = storage._path_in(uri, fs)
        try:
            with fs.open_input_file(path) as f:
                n.append(pq.ParquetFile(f).metadata.num_rows)
        except FileNotFoundError:
            n.append(0)
    return n[0], n[1]


def _write_shard(cfg: ScoreConfig, f: InputFile, parts: list) -> tuple[int, int]:
    """Rejects first, then the scores file (the shard's commit point); returns (scored, rejected)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.concat_tables(parts, promote_options="permissive").sort_by(ID)
    bad = pc.not_equal(table["reason"], "")
    rejects = table.filter(bad).select([ID, PROMPT, "reason"])
    keep = [c for c in table.column_names if c not in ("reason", "texts_encoded", "actor_ready_at", "path", "pixels")]
    scored = table.filter(pc.invert(bad)).select(keep)
    scored = scored.set_column(scored.column_names.index("score"), "score", scored["score"].cast(pa.float32()))
    storage.write_parquet(rejects, storage.join(cfg.out, REJECTS, f.shard), cfg.s3_endpoint)
    storage.write_parquet(scored, storage.join(cfg.out, f.shard), cfg.s3_endpoint)
    return len(scored), len(rejects)


def build_pipeline(cfg: ScoreConfig, paths: list[str], gen_uri: str, model_cfg: dict, checkpoint: str):
    """read -> blocks of block_rows -> decode + preprocess (CPU tasks) -> scorer actor pool.

    Ray Data fuses the decode stage into the scorer actors when both ask for the
    same resources (on CPU: it saves moving float pixels through the object
    store); with ``num_gpus`` on the actors it stays in separate CPU tasks.
    """
    import ray.data

    fs, _ = storage.resolve(gen_uri, cfg.s3_endpoint)
    ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True)
    ds = ds.repartition(target_num_rows_per_block=cfg.block_rows)  # streaming: no all-to-all shuffle
    ds = ds.map_batches(GenerationPreprocessor(model_cfg, cfg.s3_endpoint, cfg.image_root), batch_format="numpy",
                        batch_size=cfg.decode_batch_size, num_cpus=cfg.decode_num_cpus)
    return ds.map_batches(
        GenerationScorer, batch_format="numpy", batch_size=cfg.batch_size,
        fn_constructor_kwargs={"checkpoint": checkpoint, "backend": cfg.backend, "compile": cfg.compile,
                               "text_cache_size": cfg.text_cache_size, "torch_threads": cfg.torch_threads},
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor if cfg.use_gpu else 0)


def score_generations(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every generation once (resuming a killed run); returns the JSON summary."""
    import pyarrow.compute as pc

    from sr_ray.ray_utils import init_ray

    t0 = time.perf_counter()
    endpoint = cfg.s3_endpoint
    if cfg.generations is None:
        from sr_ray.demo import ensure_demo_generations

        gen_uri = ensure_demo_generations(cfg.demo)
    else:
        gen_uri = cfg.generations
    files = inspect_inputs(gen_uri, endpoint)
    check_unique_ids(files, endpoint, gen_uri)
    checkpoint = cfg.checkpoint or demo_checkpoint()
    model_cfg = checkpoint_model_config(checkpoint)
    total = sum(f.rows for f in files)
    present = storage.data_file_names(cfg.out, endpoint)
    finished = {f.shard for f in files if f.shard in present}
    todo = [f for f in files if f.shard not in finished]
    scored = rejected = 0
    for shard in finished:
        s, r = _shard_counts(cfg.out, shard, endpoint)
        scored, rejected = scored + s, rejected + r
    log.info("[score] %d generations in %d file(s) under %s; %d shard(s) already scored in %s", total, len(files),
             gen_uri, len(finished), cfg.out)
    encoded = done_rows = 0
    first = None
    t_run, t_run_wall = time.perf_counter(), time.time()
    if todo:
        init_ray(cfg.ray_address)
        ds = build_pipeline(cfg, [f.path for f in todo], gen_uri, model_cfg, checkpoint)
        by_path = {f.path: f for f in todo}
        parts: dict[str, list] = collections.defaultdict(list)
        got: collections.Counter = collections.Counter()
        todo_rows = sum(f.rows for f in todo)
        last = time.perf_counter()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            ready = pc.min(batch["actor_ready_at"]).as_py()  # start-up ends when the first actor has its model
            first = ready if first is None else min(first, ready)
            encoded += int(pc.sum(batch["texts_encoded"]).as_py() or 0)
            for path in batch["path"].unique().to_pylist():
                part = batch.filter(pc.equal(batch["path"], path))
                f = by_path.get(path)
                if f is None:
                    raise RuntimeError(f"Ray Data returned rows of {path}, which is not an input file")
                parts[path].append(part)
                got[path] += len(part)
                done_rows += len(part)
                if got[path] == f.rows:
                    s, r = _write_shard(cfg, f, parts.pop(path))
                    scored, rejected = scored + s, rejected + r
            now = time.perf_counter()
            if now - last >= cfg.progress_every_s:
                last = now
                rate = done_rows / (now - t_run)
                log.info("[score] %d/%d rows (%.0f%%)  %.1f images/s  rejected %d  eta %.0fs", done_rows, todo_rows,
                         100 * done_rows / todo_rows, rate, rejected, (todo_rows - done_rows) / max(rate, 1e-9))
        short = {p: (got[p], by_path[p].rows) for p in parts}
        if short:
            raise RuntimeError(f"rows missing from the scoring output (got, expected): {short}")
    t_end = time.perf_counter()
    run_s = t_end - t_run
    steady = done_rows / (time.time() - first) if first else None
    rows = scored + rejected
    summary = {"rows": rows, "scored": scored, "rejected": rejected, "prompts_encoded": encoded,
               "images_per_s": round(done_rows / run_s, 2) if done_rows else None,
               "startup_s": round(first - t_run_wall, 1) if first else None,
               "steady_images_per_s": round(steady, 2) if steady else None,
               "shards": len(files), "shards_skipped": len(finished), "backend": cfg.backend,
               "checkpoint": checkpoint, "generations": gen_uri, "output": cfg.out,
               "rejects": storage.join(cfg.out, REJECTS), "wall_s": round(time.perf_counter() - t0, 1)}
    if rows and rejected / rows > cfg.max_reject_rate:
        raise DataError(f"{rejected} of {rows} generations ({rejected / rows:.1%}) could not be scored, more than "
                        f"max_reject_rate={cfg.max_reject_rate}; reasons in {summary['rejects']}")
    storage.write_text(storage.join(cfg.out, "_summary.json"), json.dumps(summary, indent=1), endpoint)
    return summary


def demo_checkpoint() -> str:
    """The reward-training demo's best checkpoint; trains a quick one (synthetic triplets) when there is none."""
    import os

    from sr_ray.train import TrainRewardConfig, train_reward

    cfg = TrainRewardConfig()
    cfg.data.demo.source = "synthetic"
    cfg.data.demo.train, cfg.data.demo.val, cfg.data.demo.test = 1600, 200, 200
    cfg.data.map_num_cpus = 0.5
    cfg.model.name, cfg.model.unfreeze_vision_blocks, cfg.model.unfreeze_text_blocks = "sr-tiny", -1, -1
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.epochs, cfg.optim.weight_decay = 1e-3, 20, 2, 0.05
    cfg.scaling.cpus_per_worker = 0.5
    cfg.run.name = "sr-reward-demo-scorer"
    for name in ("sr-reward-demo", cfg.run.name):  # the training job's demo run, else our own quick one
        path = os.path.join(os.path.abspath(cfg.run.storage_path), name, "summary.json")
        ckpt = json.load(open(path)).get("checkpoint") if os.path.exists(path) else None
        if ckpt and storage.exists(ckpt):
            log.info("[score] demo reward model: %s (from %s)", ckpt, path)
            return ckpt
    log.info("[score] no demo reward model yet: training one (run %s)", cfg.run.name)
    return train_reward(cfg, score_test=False)["checkpoint"]
