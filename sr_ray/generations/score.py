"""Batch-score user generations with the reward model on Ray Data (paper sec. 4.3).

Ray Data reads the generations (``generation_id``, ``prompt``, ``image`` bytes or
``image_uri``; local or S3), decodes, resizes and crops them in CPU tasks (uint8
pixels cross the object store: 4x fewer bytes than float32; the scorer normalizes
on its device, the same arithmetic as the model's transform), and
scores them on an autoscaling pool of scorer actors (``map_batches`` with a
callable class and ``ActorPoolStrategy``; ``num_gpus`` per actor on GPU). Each
actor encodes a prompt's text once and keeps it (an LRU cache), so a prompt with
many images costs one text forward pass, not one per image. With ``scorer=<name>`` any other scorer of
:mod:`sr_ray.eval.scorers` (PickScore, HPS v2, ImageReward, a plugin) scores instead: the CPU tasks then only
decode, and its actors apply its own preprocessing.

Output: one Parquet shard per input file (same relative path), with the input
file's own columns and types less the image bytes plus ``score`` (float32), written
atomically once every row of that file is back; rows that cannot be scored
(undecodable or oversized image, unreadable URI, empty or oversized prompt, a
corrupt Parquet page) go to ``_rejects/<shard>`` with their reason instead.

What a re-run resumes: the folder's ``_scoring.json`` records the checkpoint (a
content hash of its weights) and the settings that decide a score; another
checkpoint or settings into the same ``out`` is refused (``overwrite=true``
scores again). Each shard's record ``_shards/<shard>.json``, written last, is its
commit point and records its input file's URI, size and modification time: a
re-run skips a shard only when that record matches the input file as it is now,
so every ``generation_id`` is scored exactly once, by the checkpoint the folder
names, however often the job is killed.
"""

from __future__ import annotations

import collections
import json
import logging
import posixpath
import time
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from sr_ray.core import identity, images, parquet, storage
from sr_ray.core.config import ConfigError, from_dict, to_dict
from sr_ray.core.errors import DataError
from sr_ray.core.limits import InputLimits, clean_prompt, prompt_problem
from sr_ray.core.ray_utils import (
    DecodedPoolConfig,
    check_resources,
    in_ray_worker,
    init_ray,
    require_shared_storage,
    worker_prints_to_stderr,
)
from sr_ray.core.shards import ShardCollector
from sr_ray.eval.scorers import ScorerSettings, check_names, make_scorer, weights_fingerprint
from sr_ray.reward.data import read_image_bytes, uint8_preprocessing

log = logging.getLogger(__name__)

REJECTS, SHARDS, MANIFEST = "_rejects", "_shards", "_scoring.json"
ID, PROMPT, IMAGE, URI = "generation_id", "prompt", "image", "image_uri"
READ = (ID, PROMPT, IMAGE, URI)  # the only input columns that go through Ray; the others are joined back


@dataclass
class ScoringPoolConfig(DecodedPoolConfig):
    num_actors: int = 1
    max_actors: int = 2
    cpus_per_actor: float = 0.5
    batch_size: int = 64
    """Images per scorer call."""
    decode_num_cpus: float = 0.5


@dataclass
class ScoreConfig(ScorerSettings):
    """The scorers' own sections (``pickscore.model``, ``hpsv2.weights``, ...) are top-level, as in
    compare_rewards; ``checkpoint`` is Social Reward's. The pool's settings are under ``compute`` (the shape of
    every actor pool); the flat keys of earlier versions still work (``ALIASES``)."""

    ALIASES: ClassVar[dict[str, str]] = {
        "min_actors": "compute.num_actors", "max_actors": "compute.max_actors", "use_gpu": "compute.use_gpu",
        "gpus_per_actor": "compute.gpus_per_actor", "cpus_per_actor": "compute.cpus_per_actor",
        "batch_size": "compute.batch_size", "decode_num_cpus": "compute.decode_num_cpus",
        "resource_wait_s": "compute.resource_wait_s"}

    scorer: str = "social_reward"
    """Which scorer scores the generations: social_reward (an sr-ray checkpoint, with the stages below), any other
    built-in scorer (pickscore, hpsv21, imagereward, ...) or a ``module:factory`` import path."""
    checkpoint: str | None = None
    """Reward checkpoint folder (local or s3://); none: the reward-training demo's best (trained first if missing)."""
    generations: str | None = None
    """Parquet file or folder of generations (local or s3://); none: the demo generations (drawn once, cached)."""
    out: str = "./runs/scores-demo"
    overwrite: bool = False
    """Score again into an out folder that holds another checkpoint's or other settings' scores (they are
    deleted), or whose shard records name other input files."""
    backend: str = "torch"
    """torch (bf16 autocast + SDPA on GPU, fp32 on CPU) or deepspeed (deepspeed.init_inference)."""
    compile: bool = False
    """torch.compile the image and text towers (torch backend)."""
    compute: ScoringPoolConfig = field(default_factory=ScoringPoolConfig)
    """The scorer actors and the decode tasks feeding them (the pool grows from num_actors to max_actors while
    there is work queued)."""
    decode_batch_size: int = 64
    block_rows: int = 128
    """Rows per Ray Data block between the stages: how often the driver hears back, so the granularity of
    progress lines and shard commits."""
    text_cache_size: int = 100_000
    """Prompt embeddings each actor keeps."""
    torch_threads: int = 0
    """Intra-op threads of each scorer actor on CPU; 0: Ray's default (the actor's whole CPUs, at least 1)."""
    max_reject_rate: float = 0.5
    """Fail the job when more than this share of the rows could not be scored (bad rows never crash it alone)."""
    limits: InputLimits = field(default_factory=InputLimits)
    """Largest image (pixels, bytes, aspect ratio), smallest side, longest prompt: beyond them a row is rejected."""
    image_root: str | None = None
    """Prefix of relative image_uri values."""
    s3_endpoint: str | None = None
    ray_address: str | None = None
    progress_every_s: float = 10.0
    kill_after_shards: int = 0
    """Fault injection for resume tests: the driver SIGKILLs itself right after committing this many shards in
    this run (0: never)."""
    demo: dict[str, Any] = field(default_factory=dict)
    """Demo generation set: prompts, images_per_prompt, image_size, seed, bad_rows, rows_per_file, cache_dir."""

    def __post_init__(self) -> None:
        check_names([self.scorer], "scorer")
        if self.scorer != "social_reward" and (self.backend != "torch" or self.compile):
            raise ValueError(f"backend={self.backend} / compile: only the social_reward scorer has them")
        if self.backend not in ("torch", "deepspeed"):
            raise ValueError("backend must be torch or deepspeed")
        if self.decode_batch_size < 1 or self.block_rows < 1:
            raise ValueError("batch sizes must be >= 1")
        if not 0.0 <= self.max_reject_rate <= 1.0:
            raise ValueError("max_reject_rate must be in [0, 1]")
        if self.kill_after_shards < 0:
            raise ValueError("kill_after_shards must be >= 0 (0: never)")


@dataclass
class InputFile:
    file: parquet.ParquetFile
    shard: str      # output shard name: the file's path relative to the generations root

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def rows(self) -> int:
        return self.file.rows


def inspect_inputs(uri: str, endpoint: str | None) -> list[InputFile]:
    """Every input file's rows, columns and types, checked before Ray does any work (names file and column)."""
    files = parquet.inputs(uri, "generations", [ID, PROMPT], [IMAGE, URI],
                           {IMAGE: "binary", URI: "string", PROMPT: "string", ID: "id"}, endpoint,
                           expected=f"expected {ID}, {PROMPT} and {IMAGE} (bytes) or {URI}")
    _, root = storage.resolve(uri, endpoint)
    root = root.rstrip("/")
    out = []
    for f in files:
        rel = posixpath.basename(f.path) if f.path == root else f.path[len(root):].lstrip("/")
        out.append(InputFile(f, rel))
    return out


def check_rows(files: list[InputFile], endpoint: str | None, uri: str) -> None:
    """Read every column but the image bytes of every file (a corrupt page there is named now, not after the
    scoring); ``generation_id`` must be non-null and unique (exactly-once needs it): name file and row."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(uri, endpoint)
    where: dict[Any, str] = {}
    for f in files:
        cols = [c for c in f.file.schema.names if c != IMAGE]
        try:
            with fs.open_input_file(f.path) as fh:
                ids = pq.read_table(fh, columns=cols).column(ID)
        except Exception as e:
            raise DataError(f"generations: {f.file.uri} cannot be read (corrupt Parquet data outside the image "
                            f"column: {type(e).__name__}: {e})") from None
        if ids.null_count:
            row = pc.index(pc.is_null(ids), True).as_py()
            raise DataError(f"generations: {f.file.uri} row {row} has a null {ID} ({ids.null_count} such rows); "
                            f"every generation needs an id for exactly-once scoring")
        for i in ids.to_pylist():
            if i in where:
                raise DataError(f"generations: {ID} {i!r} appears twice ({where[i]} and {f.file.uri}); "
                                f"ids must be unique for exactly-once scoring")
            where[i] = f.file.uri


class GenerationPreprocessor:
    """CPU stage: decode + the model's CLIP preprocessing; bad rows keep their place with ``reason`` set.

    ``model_cfg`` None (a scorer with its own preprocessing): decode only, ``image`` as HxWx3 uint8 arrays."""

    def __init__(self, model_cfg: dict | None, endpoint: str | None, image_root: str | None,
                 limits: dict | None = None):
        self.model_cfg = dict(model_cfg) if model_cfg is not None else None
        self.endpoint, self.image_root = endpoint, image_root
        self.limits = InputLimits(**(limits or {}))

    def _bytes(self, batch: dict, i: int) -> bytes:
        if IMAGE in batch and batch[IMAGE][i] is not None:
            return bytes(batch[IMAGE][i])
        uri = batch[URI][i] if URI in batch else None
        if not uri:
            raise images.BadImage("no image bytes and no image_uri")
        return read_image_bytes(uri, self.image_root, self.endpoint, self.limits)

    def _reason(self, batch: dict, i: int) -> str:
        unread = batch.get(parquet.ERROR_COL)
        if unread is not None and unread[i]:
            return str(unread[i])
        return prompt_problem(batch[PROMPT][i], self.limits) or ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.model_cfg is None:
            transform, shape = np.asarray, (0, 0, 3)
        else:  # uint8 through the object store; the scorer normalizes on its device
            transform, shape, _, _ = uint8_preprocessing(self.model_cfg)
        n = len(batch[ID])
        pixels, reasons = [None] * n, [self._reason(batch, i) for i in range(n)]
        for i in range(n):
            if reasons[i]:
                continue
            try:
                pixels[i] = np.asarray(transform(images.decode(self._bytes(batch, i), self.limits)))
            except images.BadImage as e:
                reasons[i] = str(e)
        out = {**{k: batch[k] for k in (ID, parquet.FILE_COL) if k in batch},
               PROMPT: np.array([clean_prompt(p) if not r else "" for p, r in zip(batch[PROMPT], reasons)],
                                dtype=object), "reason": np.array(reasons, dtype=object)}
        if self.model_cfg is None:  # decoded images of any size: an object column
            out[IMAGE] = np.empty(n, dtype=object)
            out[IMAGE][:] = [p if p is not None else np.zeros(shape, np.uint8) for p in pixels]
        else:
            zeros = np.zeros(shape, np.uint8)
            out["pixels"] = np.stack([p if p is not None else zeros for p in pixels]) if n else \
                np.zeros((0, *shape), np.uint8)
        return out


class GenerationScorer:
    """Scorer actor: (prompt, pixels) -> ``score``; each distinct prompt's text is encoded once per actor."""

    def __init__(self, checkpoint: str, backend: str = "torch", compile: bool = False, device: str | None = None,
                 text_cache_size: int = 100_000, torch_threads: int = 0):
        import torch

        from sr_ray.reward.model import preprocess_cfg, tokenizer
        from sr_ray.reward.score import load_model

        if in_ray_worker():
            worker_prints_to_stderr()
        if torch_threads:
            torch.set_num_threads(torch_threads)

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.cfg = load_model(checkpoint, self.device)
        self.tokenizer = tokenizer(self.cfg)
        pcfg = preprocess_cfg(self.cfg)
        self.mean_std = (tuple(pcfg["mean"]), tuple(pcfg["std"]))
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

        from sr_ray.reward.score import inference_autocast

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

        from sr_ray.reward.model import RewardModel, normalize_pixels
        from sr_ray.reward.score import inference_autocast

        n = len(batch[ID])
        ok = np.array([not r for r in batch["reason"]], dtype=bool)
        scores = np.full(n, np.nan, dtype=np.float32)
        encoded = 0
        if ok.any():
            with torch.no_grad():
                t, encoded = self.text([str(p) for p in batch[PROMPT][ok]])
                with inference_autocast(self.device):
                    pixels = torch.as_tensor(batch["pixels"][ok], device=self.device)  # (B, H, W, 3) uint8
                    pixels = normalize_pixels(pixels, *self.mean_std).to(self.dtype)
                    im = self.encode_image(pixels).float()
                scores[ok] = RewardModel.score(t, im).float().cpu().numpy()
        out = {k: v for k, v in batch.items() if k not in ("pixels", PROMPT)}
        out["score"] = scores
        out["texts_encoded"] = np.array([encoded] + [0] * (n - 1), dtype=np.int64)
        out["actor_ready_at"] = np.full(n, self.ready_at, dtype=np.float64)
        return out


class AnyScorer:
    """Scorer actor for every scorer but social_reward: decoded images -> ``score`` with the scorer's own
    preprocessing (:mod:`sr_ray.eval.scorers`), built once per actor."""

    def __init__(self, name: str, settings: dict, batch_size: int, torch_threads: int = 0):
        import torch

        if in_ray_worker():
            worker_prints_to_stderr()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.scorer = make_scorer(name, from_dict(ScorerSettings, settings), None, batch_size)
        self.ready_at = time.time()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[ID])
        ok = [i for i in range(n) if not batch["reason"][i]]
        scores = np.full(n, np.nan, dtype=np.float32)
        if ok:
            scores[ok] = self.scorer.score([str(batch[PROMPT][i]) for i in ok], [batch[IMAGE][i] for i in ok])
        out = {k: v for k, v in batch.items() if k not in (IMAGE, PROMPT)}
        out["score"] = scores
        out["texts_encoded"] = np.zeros(n, dtype=np.int64)
        out["actor_ready_at"] = np.full(n, self.ready_at, dtype=np.float64)
        return out


def checkpoint_model_config(checkpoint: str) -> dict:
    """The model config stored in a reward checkpoint (memory-mapped: the weights are not read)."""
    from sr_ray.reward.score import read_checkpoint

    return dict(read_checkpoint(checkpoint, mmap=True)["model_config"])


def scoring_identity(cfg: ScoreConfig, checkpoint: str | None) -> dict[str, Any]:
    """What decides a score: the checkpoint's weights (content hash) and the backend, or another scorer's name
    and settings; the limits, the image root."""
    from sr_ray.reward.score import model_file

    common = {"limits": to_dict(cfg.limits), "image_root": cfg.image_root}
    if cfg.scorer != "social_reward":
        settings = to_dict(cfg.scorer_settings())
        own = settings.get(cfg.scorer, settings["plugins"].get(cfg.scorer)) or {}
        return {"scorer": cfg.scorer, "settings": own, "weights": weights_fingerprint(own, cfg.s3_endpoint),
                **common}
    return {"checkpoint_sha256": identity.content_hash(str(model_file(checkpoint))), "backend": cfg.backend,
            **common}


def check_out(cfg: ScoreConfig, gen_uri: str) -> None:
    """``out`` is a folder (or new) and neither inside the generations nor holding them (its shards would be
    read as generations, or the generations as scores)."""
    storage.check_output_dir(cfg.out, "out", cfg.s3_endpoint)
    _, out_path = storage.resolve(cfg.out, cfg.s3_endpoint)
    _, gen_path = storage.resolve(gen_uri, cfg.s3_endpoint)
    a, b = out_path.rstrip("/") + "/", gen_path.rstrip("/") + "/"
    if storage.is_s3(cfg.out) == storage.is_s3(gen_uri) and (a.startswith(b) or b.startswith(a)):
        raise ConfigError(f"out={storage.redact(cfg.out)} overlaps generations={storage.redact(gen_uri)}: "
                          f"write the scores to a folder of their own")


def shard_record(cfg: ScoreConfig, f: InputFile) -> str:
    return storage.join(cfg.out, SHARDS, f.shard + ".json")


def finished_shards(cfg: ScoreConfig, files: list[InputFile]) -> dict[str, dict]:
    """{shard: its record} of the shards done from these very input files; a record naming another input (other
    file, size or mtime) is refused unless ``overwrite`` (then that shard is scored again)."""
    done = {}
    for f in files:
        rec = identity.read_record(shard_record(cfg, f), cfg.s3_endpoint)
        if rec is None:
            continue
        if rec.get("input") == f.file.identity():
            done[f.shard] = rec
        elif not cfg.overwrite:
            raise ConfigError(f"out={storage.redact(cfg.out)}: shard {f.shard} was scored from "
                              f"{rec.get('input')} but the input now is {f.file.identity()}; choose another out, "
                              f"or set overwrite=true to score it again")
    return done


def write_shard(cfg: ScoreConfig, f: InputFile, parts: list) -> dict[str, Any]:
    """Join the scores back onto the input file's own rows and columns (less the image) and commit: rejects,
    then scores, then the shard record (the commit point). Returns the record."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(f.file.uri, cfg.s3_endpoint)
    with fs.open_input_file(f.path) as fh:
        table = pq.read_table(fh, columns=[c for c in f.file.schema.names if c != IMAGE])
    ids = table.column(ID)
    got = pa.concat_tables(parts) if parts else pa.table({ID: pa.array([], ids.type), "score": pa.array([], pa.float32()),
                                                          "reason": pa.array([], pa.string())})
    idx = pc.index_in(ids, value_set=got.column(ID).cast(ids.type))
    if idx.null_count or len(got) != len(table):
        raise RuntimeError(f"{f.file.uri}: {len(got)} rows came back for {len(table)} input rows")
    reason = got.column("reason").take(idx).cast(pa.string())
    bad = pc.not_equal(reason, "")
    rejects = pa.table({ID: ids, PROMPT: table.column(PROMPT), "reason": reason}).filter(bad)
    scored = table.append_column("score", got.column("score").take(idx).cast(pa.float32())).filter(pc.invert(bad))
    storage.write_parquet(rejects, storage.join(cfg.out, REJECTS, f.shard), cfg.s3_endpoint)
    storage.write_parquet(scored, storage.join(cfg.out, f.shard), cfg.s3_endpoint)
    record = {"input": f.file.identity(), "rows": len(table), "scored": len(scored), "rejected": len(rejects)}
    identity.write_record(shard_record(cfg, f), record, cfg.s3_endpoint)
    return record


def build_pipeline(cfg: ScoreConfig, files: list[InputFile], model_cfg: dict | None, checkpoint: str | None):
    """row groups (blocks of block_rows) -> decode + preprocess (CPU tasks) -> scorer actor pool.

    Ray Data fuses the decode stage into the scorer actors when both ask for the
    same resources (on CPU: it saves moving float pixels through the object
    store); with ``num_gpus`` on the actors it stays in separate CPU tasks.
    """

    ds = parquet.read([f.file for f in files], READ, "generations", cfg.s3_endpoint, key_columns=[ID, PROMPT],
                      max_rows_per_block=cfg.block_rows, num_cpus=cfg.compute.decode_num_cpus)
    ds = ds.map_batches(GenerationPreprocessor(model_cfg, cfg.s3_endpoint, cfg.image_root, to_dict(cfg.limits)),
                        batch_format="numpy", batch_size=cfg.decode_batch_size, num_cpus=cfg.compute.decode_num_cpus)
    if cfg.scorer == "social_reward":
        actor, kwargs = GenerationScorer, {"checkpoint": checkpoint, "backend": cfg.backend, "compile": cfg.compile,
                                           "text_cache_size": cfg.text_cache_size, "torch_threads": cfg.torch_threads}
    else:
        actor, kwargs = AnyScorer, {"name": cfg.scorer, "settings": to_dict(cfg.scorer_settings()),
                                    "batch_size": cfg.compute.batch_size, "torch_threads": cfg.torch_threads}
    return ds.map_batches(
        actor, batch_format="numpy", batch_size=cfg.compute.batch_size, fn_constructor_kwargs=kwargs,
        **cfg.compute.map_kwargs())


class ScoringProgress(ShardCollector):
    """Rows back per input file (a shard): a file's scores are committed when its last row is back; also the
    time the first actor had its model (start-up) and how many prompts were encoded."""

    def __init__(self, cfg: ScoreConfig, todo: list[InputFile]):
        self.cfg, self.by_uri = cfg, {f.file.uri: f for f in todo}
        self.records: dict[str, dict] = {}
        self.rejected, self.encoded, self.first_ready = 0, 0, None
        super().__init__({f.file.uri: f.rows for f in todo}, self._commit, parquet.FILE_COL, "score", "images",
                         cfg.progress_every_s, columns=[ID, "score", "reason"],
                         extra=lambda: f"rejected {self.rejected}", kill_after=cfg.kill_after_shards)

    def _commit(self, uri: str, parts: list) -> None:
        f = self.by_uri[uri]
        rec = write_shard(self.cfg, f, parts)
        self.records[f.shard] = rec
        self.rejected += rec["rejected"]

    def add(self, batch) -> None:
        import pyarrow.compute as pc

        ready = pc.min(batch["actor_ready_at"]).as_py()  # start-up ends when the first actor has its model
        self.first_ready = ready if self.first_ready is None else min(self.first_ready, ready)
        self.encoded += int(pc.sum(batch["texts_encoded"]).as_py() or 0)
        super().add(batch)


def _run(cfg: ScoreConfig, todo: list[InputFile], model_cfg: dict | None, checkpoint: str | None) -> ScoringProgress:
    """Score the files in ``todo`` on Ray; empty files are committed without it."""
    empty = {f.shard: write_shard(cfg, f, []) for f in todo if f.rows == 0}  # committed without Ray
    todo = [f for f in todo if f.rows]
    prog = ScoringProgress(cfg, todo)
    prog.records.update(empty)
    if not todo:
        return prog
    started = init_ray(cfg.ray_address)
    check_resources(replace(cfg.compute, num_actors=1).bundles(), "one scorer actor (compute.cpus_per_actor, "
                    "compute.gpus_per_actor) and a decode task (compute.decode_num_cpus)", fixed=started,
                    wait_s=cfg.compute.resource_wait_s)
    require_shared_storage(cfg.generations or todo[0].file.uri, "generations", "Ray Data's tasks read them")
    if checkpoint:
        require_shared_storage(checkpoint, "checkpoint", "the scorer actors load it")
    ds = build_pipeline(cfg, todo, model_cfg, checkpoint)
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            prog.add(batch)
    except Exception as e:
        err = parquet.data_error_of(e)
        if err is not None:
            raise err from None
        raise
    prog.check_complete("the scoring output")
    return prog


def required_inputs(cfg: ScoreConfig) -> str:
    """The generations' URI; with the reward model's checkpoint when it scores. The job (sr_ray.app.defaults)
    fills in the demo's generations and reward model when none is given."""
    if cfg.generations is None:
        raise ConfigError("generations= is required: a folder or file of Parquet with generation_id, prompt and "
                          "image or image_uri; the job (sr-ray score_generations) scores a demo set when none is given")
    if cfg.scorer == "social_reward" and not (cfg.checkpoint or cfg.social_reward.checkpoint):
        raise ConfigError("checkpoint= is required with scorer=social_reward: a reward run's checkpoint folder "
                          "(local or s3://); the job uses the reward demo's when none is given")
    return cfg.generations


def score_generations(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every generation once (resuming a killed run); returns the JSON summary."""
    t0 = time.perf_counter()
    gen_uri = required_inputs(cfg)
    check_out(cfg, gen_uri)
    files = inspect_inputs(gen_uri, cfg.s3_endpoint)
    check_rows(files, cfg.s3_endpoint, gen_uri)
    checkpoint = model_cfg = None
    if cfg.scorer == "social_reward":
        checkpoint = cfg.checkpoint or cfg.social_reward.checkpoint
        model_cfg = checkpoint_model_config(checkpoint)
    identity.claim(cfg.out, MANIFEST, scoring_identity(cfg, checkpoint), f"out={storage.redact(cfg.out)}",
                   "overwrite=true", cfg.overwrite, cfg.s3_endpoint)
    done = finished_shards(cfg, files)
    todo = [f for f in files if f.shard not in done]
    log.info("[score] %d generations in %d file(s) under %s; %d shard(s) already scored in %s",
             sum(f.rows for f in files), len(files), storage.redact(gen_uri), len(done), storage.redact(cfg.out))
    t_run, t_run_wall = time.perf_counter(), time.time()
    prog = _run(cfg, todo, model_cfg, checkpoint)
    records = {**done, **prog.records}
    scored = sum(r["scored"] for r in records.values())
    rejected = sum(r["rejected"] for r in records.values())
    run_s = time.perf_counter() - t_run
    first = prog.first_ready
    steady = prog.rows / (time.time() - first) if first else None
    rows = scored + rejected
    summary = {"rows": rows, "scored": scored, "rejected": rejected, "prompts_encoded": prog.encoded,
               "images_per_s": round(prog.rows / run_s, 2) if prog.rows else None,
               "startup_s": round(first - t_run_wall, 1) if first else None,
               "steady_images_per_s": round(steady, 2) if steady else None,
               "shards": len(files), "shards_skipped": len(done), "backend": cfg.backend, "scorer": cfg.scorer,
               "checkpoint": storage.redact(checkpoint) if checkpoint else None, "generations": storage.redact(gen_uri),
               "output": storage.redact(cfg.out), "rejects": storage.redact(storage.join(cfg.out, REJECTS)),
               "wall_s": round(time.perf_counter() - t0, 1)}
    if rows and rejected / rows > cfg.max_reject_rate:
        raise DataError(f"{rejected} of {rows} generations ({rejected / rows:.1%}) could not be scored, more than "
                        f"max_reject_rate={cfg.max_reject_rate}; reasons in {summary['rejects']}")
    storage.write_text(storage.join(cfg.out, "_summary.json"), json.dumps(summary, indent=1), cfg.s3_endpoint)
    return summary
