"""Generate images for prompt sets with one or more Stable Diffusion models on Ray Data (paper sec. 4.3).

``generate(cfg)`` draws ``images_per_prompt`` images per prompt for every model
with DDIM (the paper: 4 images, 30 steps). Image ``i`` of a prompt starts from
the noise of seed ``image_seed(seed, prompt, i)``, drawn on the CPU, so every
model, prompt set, batch size and device sees the same noise and a baseline and
its fine-tuned model differ only by their weights. A model named in
``negative_for`` (default: ``finetuned``) gets the special token as its negative
prompt (as recorded in its pipeline by the fine-tuning job: ``sr_ray.core.special_token``);
the others get none.

Models: ``tiny`` (built in code, as the fine-tune demo starts from), a diffusers
model directory (local or ``s3://``), a fine-tuning run directory (its
``pipeline/``), or a hub id (``stabilityai/stable-diffusion-2-1-base``).

Prompt sets: files, one set per file named by its stem: ``.txt`` (a prompt per
line; blank lines and ``#`` comments skipped), ``.csv``/``.tsv``/``.parquet``/
``.jsonl`` with a ``prompt`` column (any case). None (the job, not this module): two demo sets drawn in code.

Ray Data: a row per (prompt set, prompt) -> ``map_batches`` over an actor pool of
``ImageGenerator`` (each holds one model's pipeline; a GPU each with
``use_gpu``) -> the driver writes a shard per ``prompts_per_shard`` prompts,
atomically, to ``<out>/<model>/<set>-NNNNN.parquet`` in the generations contract
(``generation_id``, ``prompt``, ``image`` PNG bytes, plus ``model``,
``prompt_set``, ``prompt_index``, ``image_index``, ``seed``, ``negative_prompt``).
A re-run skips finished shards; ``_generate.json`` records the settings and each
model's source and weights fingerprint, and a re-run with other settings, or with
a model whose weights changed (a re-trained run dir), into the same ``out`` is
refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sr_ray.core import identity, images, special_token, storage
from sr_ray.core.config import ConfigError, to_dict
from sr_ray.core.prompt_files import read_prompt_file
from sr_ray.core.ray_utils import ActorPoolConfig, init_ray, worker_prints_to_stderr
from sr_ray.core.shards import ShardCollector

log = logging.getLogger(__name__)

GENERATIONS_SCHEMA = pa.schema([
    ("generation_id", pa.string()), ("model", pa.string()), ("prompt_set", pa.string()),
    ("prompt_index", pa.int64()), ("image_index", pa.int64()), ("prompt", pa.string()),
    ("negative_prompt", pa.string()), ("seed", pa.int64()), ("image", pa.binary())])
SETTINGS_FILE = "_generate.json"


@dataclass
class SamplingConfig:
    images_per_prompt: int = 4
    """The paper: 4."""
    steps: int = 30
    """DDIM steps (the paper: 30)."""
    guidance_scale: float = 7.5
    resolution: int = 0
    """Image side in pixels; 0: the model's own (512 for SD 2.1-base, 32 for tiny)."""
    seed: int = 0
    """Base seed: image i of prompt p starts from the noise of hash(seed, p, i), the same for every model."""
    negative_prompt: str | None = None
    """The negative prompt of the models in ``negative_for``; default: the special token recorded in the
    model's pipeline (``sr_ray.json``, written by finetune_sd from the fine-tune set), else ``t@y quality``."""
    negative_for: list[str] = field(default_factory=lambda: ["finetuned"])
    """Models that get ``negative_prompt`` as their negative prompt; the others get none."""

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1 or self.steps < 1 or self.resolution < 0:
            raise ValueError("images_per_prompt and steps must be >= 1, resolution >= 0")
        if self.resolution % 8:
            raise ValueError(f"resolution={self.resolution} is not a multiple of 8")


@dataclass
class GenComputeConfig(ActorPoolConfig):
    prompts_per_shard: int = 16
    precision: str = "auto"
    """auto: bf16 on GPU, fp32 on CPU; bf16; fp16; fp32."""
    torch_threads: int = 0
    """torch intra-op threads per actor on CPU (0: torch's default)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompts_per_shard < 1:
            raise ValueError("prompts_per_shard must be >= 1")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError("precision must be auto, bf16, fp16 or fp32")


@dataclass
class GenerateConfig:
    models: dict[str, str] = field(default_factory=lambda: {"baseline": "tiny"})
    """name -> tiny | diffusers model dir (local or s3://) | fine-tuning run dir | hub id."""
    prompts: list[str] = field(default_factory=list)
    """Prompt-set files (one set per file, named by its stem); empty (the job): the demo sets."""
    max_prompts: int = 0
    """Use the first N prompts of each set (0: all)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    compute: GenComputeConfig = field(default_factory=GenComputeConfig)
    out: str = "./runs/t2i-demo/generations"
    s3_endpoint: str | None = None
    ray_address: str | None = None
    progress_every_s: float = 20.0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: name at least one model")
        bad = [m for m in self.models if not m or "/" in m or m.startswith((".", "_"))]
        if bad:
            raise ValueError(f"models: {bad} cannot name a folder (no '/', no leading '.' or '_')")
        if self.max_prompts < 0:
            raise ValueError("max_prompts must be >= 0")


# ---------------------------------------------------------------- prompts

def load_prompt_sets(files: list[str], max_prompts: int = 0, endpoint: str | None = None) -> dict[str, list[str]]:
    """{set name: prompts} from files (each set's duplicates dropped, order kept)."""
    if not files:
        raise ConfigError("prompts: no prompt file given (one set per file: .txt, .csv, .tsv, .parquet, .jsonl); "
                          "the jobs (sr-ray generate, sr-ray evaluate_t2i) use the demo sets when none is given")
    sets = {}
    for f in files:
        name = Path(f).stem
        if name in sets:
            raise ConfigError(f"prompts: two files make the prompt set {name!r}; rename one")
        if name.startswith((".", "_")):
            raise ConfigError(f"prompts: {f}: a set name cannot start with '.' or '_'")
        if not storage.is_s3(f) and not os.path.exists(os.path.expanduser(f)):
            raise ConfigError(f"prompts: {f} does not exist")
        sets[name] = list(dict.fromkeys(read_prompt_file(f, endpoint)))
    if max_prompts:
        sets = {k: v[:max_prompts] for k, v in sets.items()}
    return sets


# ---------------------------------------------------------------- models

def resolve_model(uri: str) -> str:
    """A built-in name or hub id as is; a fine-tuning run dir -> its ``pipeline``; a model dir as is."""
    from sr_ray.diffusion.components import BUILT_IN

    if uri in BUILT_IN:
        return uri
    if storage.is_s3(uri):
        run_pipe = storage.join(uri, "pipeline")
        return run_pipe if storage.exists(storage.join(run_pipe, "model_index.json")) else uri
    path = Path(os.path.expanduser(uri))
    if (path / "pipeline" / "model_index.json").exists():
        return str((path / "pipeline").resolve())
    if path.exists():
        return str(path.resolve())
    return uri  # a hub id


def check_models(models: dict[str, str]) -> dict[str, str]:
    """{name: resolved uri}; ConfigError naming the model when a local path is not a diffusers pipeline.

    Built-in models are prepared here, in the driver (the tiny VAE fitted once), before any actor loads them.
    """
    from sr_ray.diffusion.components import prepare_model

    out = {}
    for name, uri in models.items():
        if not uri:
            raise ConfigError(f"models.{name}: empty")
        r = resolve_model(uri)
        local = not storage.is_s3(r) and (os.path.exists(os.path.expanduser(r)) or r.startswith((".", "/", "~")))
        if local and not os.path.exists(os.path.join(os.path.expanduser(r), "model_index.json")):
            raise ConfigError(f"models.{name}={uri}: no diffusers pipeline there (no model_index.json, "
                              f"nor pipeline/model_index.json of a finished fine-tuning run)")
        out[name] = r
    for r in set(out.values()):
        prepare_model(r)
    return out


def load_pipeline(uri: str):
    """A ``StableDiffusionPipeline`` with a DDIM sampler, no safety checker, on the CPU in fp32."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sr_ray.diffusion.components import BUILT_IN, SDModelConfig, load_components, pipeline

    if uri in BUILT_IN:
        return pipeline(load_components(SDModelConfig(name=uri)))
    src = storage.local_copy(uri, "sr-ray-sd-") if storage.is_s3(uri) else uri
    pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def image_seed(seed: int, prompt: str, index: int) -> int:
    """The noise seed of image ``index`` of ``prompt``: the same for every model, set and batch."""
    h = hashlib.sha256(f"{seed}\0{prompt}\0{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") % (2**63 - 1)


def _dtype(precision: str, device):
    import torch

    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


class ImageGenerator:
    """Callable class for ``map_batches``: rows of (prompt_set, prompt_index, prompt, shard) -> image rows."""

    def __init__(self, model: str, uri: str, sampling: dict, precision: str = "auto", torch_threads: int = 0,
                 batch_size: int = 8, device: str | None = None, negative: str = ""):
        import torch

        worker_prints_to_stderr()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.s = model, SamplingConfig(**sampling)
        self.pipe = load_pipeline(uri).to(self.device, _dtype(precision, self.device))
        self.pipe.set_progress_bar_config(disable=True)
        self.negative = negative
        unet = self.pipe.unet.config
        self.resolution = self.s.resolution or unet.sample_size * self.pipe.vae_scale_factor
        self.batch_size = batch_size

    def images(self, prompts: list[str], seeds: list[int]) -> list[bytes]:
        """PNG bytes of one image per (prompt, seed)."""
        import torch
        from PIL import Image

        out = []
        for s in range(0, len(prompts), self.batch_size):
            ps, ss = prompts[s:s + self.batch_size], seeds[s:s + self.batch_size]
            gens = [torch.Generator("cpu").manual_seed(x) for x in ss]  # noise drawn on the CPU: any device agrees
            arr = self.pipe(ps, negative_prompt=[self.negative] * len(ps) if self.negative else None,
                            num_inference_steps=self.s.steps, guidance_scale=self.s.guidance_scale,
                            height=self.resolution, width=self.resolution, generator=gens,
                            output_type="np").images
            out += [images.encode_png(Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)))
                    for a in arr]
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = self.s.images_per_prompt
        rows = [(str(st), int(pi), str(p), str(sh))
                for st, pi, p, sh in zip(batch["prompt_set"], batch["prompt_index"], batch["prompt"], batch["shard"])]
        flat = [(r, i) for r in rows for i in range(n)]
        seeds = [image_seed(self.s.seed, r[2], i) for r, i in flat]
        pngs = self.images([r[2] for r, _ in flat], seeds)
        return {
            "generation_id": np.array([f"{self.model}/{r[0]}/{r[1]:05d}/{i}" for r, i in flat], dtype=object),
            "model": np.array([self.model] * len(flat), dtype=object),
            "prompt_set": np.array([r[0] for r, _ in flat], dtype=object),
            "prompt_index": np.array([r[1] for r, _ in flat], dtype=np.int64),
            "image_index": np.array([i for _, i in flat], dtype=np.int64),
            "prompt": np.array([r[2] for r, _ in flat], dtype=object),
            "negative_prompt": np.array([self.negative] * len(flat), dtype=object),
            "seed": np.array(seeds, dtype=np.int64),
            "image": np.array(pngs, dtype=object),
            "shard": np.array([r[3] for r, _ in flat], dtype=object),
        }


# ---------------------------------------------------------------- the job

def shard_uri(out: str, model: str, prompt_set: str, chunk: int) -> str:
    return storage.join(out, model, f"{prompt_set}-{chunk:05d}.parquet")


def negative_prompts(cfg: GenerateConfig, models: dict[str, str]) -> dict[str, str]:
    """{model: its negative prompt}: for the models in ``sampling.negative_for`` the special token (explicit, or
    as recorded in the model's pipeline), "" for the others."""
    out = {}
    for name, uri in models.items():
        if name in cfg.sampling.negative_for:
            recorded = special_token.read(uri, special_token.PIPELINE_FILE, cfg.s3_endpoint)
            out[name] = special_token.resolve(cfg.sampling.negative_prompt, recorded, "sampling.negative_prompt",
                                              f"models.{name} ({storage.redact(uri)})")
        else:
            out[name] = ""
    return out


def _settings(cfg: GenerateConfig, sets: dict[str, list[str]]) -> dict[str, Any]:
    digest = {k: hashlib.sha256("\n".join(v).encode()).hexdigest()[:16] for k, v in sets.items()}
    return {"sampling": to_dict(cfg.sampling), "prompts_per_shard": cfg.compute.prompts_per_shard,
            "prompt_sets": digest}


def model_fingerprint(uri: str, endpoint: str | None = None) -> str:
    """What identifies a model's weights: a built-in name or hub id as is; for a folder (local or s3://) a hash of
    its files' names, sizes and modification times (a re-trained run dir gets a new one)."""
    from sr_ray.diffusion.components import BUILT_IN

    if uri in BUILT_IN or not (storage.is_s3(uri) or os.path.isdir(os.path.expanduser(uri))):
        return uri
    return identity.folder_fingerprint(uri, endpoint)


def _check_out(cfg: GenerateConfig, settings: dict[str, Any], models: dict[str, str]) -> None:
    """One folder, one set of settings: a model added later is fine; other sampling or prompts, or a model whose
    source or weights changed since its images were made, is refused (naming it)."""
    before = identity.same_settings(cfg.out, SETTINGS_FILE, settings, "generations", cfg.s3_endpoint, write=False)
    now = {m: {"uri": u, "fingerprint": model_fingerprint(u, cfg.s3_endpoint)} for m, u in models.items()}
    if before is not None:
        for m, v in now.items():
            old = before.get("models", {}).get(m)
            if old is not None and old != v:
                what = "another source" if old["uri"] != v["uri"] else "weights that have changed since"
                raise ConfigError(f"out={cfg.out}: the images of models.{m} were generated from {what} "
                                  f"({old['uri']} -> {v['uri']}); choose another out, or delete "
                                  f"{storage.join(cfg.out, m)} to generate them again")
    stored = {**(before or {}), **settings, "models": {**((before or {}).get("models", {})), **now}}
    identity.write_record(storage.join(cfg.out, SETTINGS_FILE), stored, cfg.s3_endpoint)


def plan(cfg: GenerateConfig, sets: dict[str, list[str]]) -> dict[str, list[dict]]:
    """{shard name: its rows}: prompts of each set in chunks of prompts_per_shard (the same for every model)."""
    k = cfg.compute.prompts_per_shard
    out: dict[str, list[dict]] = {}
    for name, prompts in sets.items():
        for i, p in enumerate(prompts):
            shard = f"{name}-{i // k:05d}"
            out.setdefault(shard, []).append({"prompt_set": name, "prompt_index": i, "prompt": p, "shard": shard})
    return out


def _write(cfg: GenerateConfig, model: str, shard: str, parts: list[pa.Table]) -> None:
    t = pa.concat_tables(parts).select(GENERATIONS_SCHEMA.names).cast(GENERATIONS_SCHEMA)
    t = t.sort_by([("prompt_index", "ascending"), ("image_index", "ascending")])
    storage.write_parquet(t, storage.join(cfg.out, model, f"{shard}.parquet"), cfg.s3_endpoint)


def generate(cfg: GenerateConfig, sets: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Generate every (model, prompt, image) once (a re-run skips finished shards); returns the JSON summary.

    ``sets``: the prompt sets of ``cfg`` when the caller has read them already (:func:`load_prompt_sets`).
    """
    import ray.data

    t0 = time.perf_counter()
    if sets is None:
        sets = load_prompt_sets(cfg.prompts, cfg.max_prompts, cfg.s3_endpoint)
    models = check_models(cfg.models)
    negatives = negative_prompts(cfg, models)
    _check_out(cfg, _settings(cfg, sets), models)
    shards = plan(cfg, sets)
    n_img = cfg.sampling.images_per_prompt
    made = skipped = 0
    per_model = {}
    for model, uri in models.items():
        present = storage.data_file_names(storage.join(cfg.out, model), cfg.s3_endpoint)
        todo = {s: rows for s, rows in shards.items() if f"{s}.parquet" not in present}
        skipped += len(shards) - len(todo)
        log.info("[generate] %s (%s): %d prompt(s) in %d shard(s) to do, %d done", model, uri,
                 sum(map(len, todo.values())), len(todo), len(shards) - len(todo))
        if not todo:
            continue
        init_ray(cfg.ray_address)
        c = cfg.compute
        ds = ray.data.from_items([r for rows in todo.values() for r in rows])
        ds = ds.map_batches(
            ImageGenerator, batch_format="numpy", batch_size=max(1, c.batch_size // n_img),
            fn_constructor_kwargs={"model": model, "uri": uri, "sampling": to_dict(cfg.sampling),
                                   "precision": c.precision, "torch_threads": c.torch_threads,
                                   "batch_size": c.batch_size, "negative": negatives[model]},
            **c.map_kwargs())
        shards_out = ShardCollector({s: len(rows) * n_img for s, rows in todo.items()},
                                    lambda shard, parts, m=model: _write(cfg, m, shard, parts), "shard",
                                    f"generate {model}", "images", cfg.progress_every_s)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            shards_out.add(batch)
        shards_out.check_complete(f"the generation output of {model}")
        made += shards_out.committed
        per_model[model] = round(shards_out.rate(), 3)
    images = len(models) * sum(map(len, sets.values())) * n_img
    summary = {"out": cfg.out, "models": models, "negative_prompts": negatives,
               "prompt_sets": {k: len(v) for k, v in sets.items()},
               "images": images, "shards_written": made, "shards_skipped": skipped,
               "images_per_s": per_model, "wall_s": round(time.perf_counter() - t0, 1)}
    storage.write_text(storage.join(cfg.out, "_summary.json"), json.dumps(summary, indent=1), cfg.s3_endpoint)
    return summary
