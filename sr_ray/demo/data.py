"""Procedural demo triplets: the embedded default data of the training job.

A prompt names a colour and a subject ("a red cat, watercolor"); the popular
image's dominant object has that colour, the unpopular one's another colour.
Every colour is popular for some prompts and unpopular for others, so only a
model that reads prompt and image together beats chance (an image-only or a
random model sits near 0.5). Deterministic by seed; cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sr_ray.core import images, special_token
from sr_ray.core.config import ConfigError
from sr_ray.demo import community

log = logging.getLogger(__name__)

SUBJECTS = ("cat", "house", "flower", "car", "balloon", "robot", "tree", "boat", "kite", "dragon")
STYLES = ("digital art", "watercolor", "oil painting", "pixel art", "3d render", "sticker", "photo")


@dataclass
class DemoConfig:
    source: str = "community"
    """community: simulate a community and curate it (the paper's pipeline in miniature);
    synthetic: triplets drawn directly (faster; tests and benchmarks)."""
    seed: int = 0
    """Seed of prompts, images and splits."""
    community_images: int = 40_000
    """Images of the simulated community (community source)."""
    max_pairs_per_prompt: int = 8
    """Curation cap on triplets per prompt (community source; 0: none). The curated community has ~30 pairs
    per prompt, as the paper's dataset; 8 keeps the demo's training to a few minutes on 2 cores."""
    train: int = 2400
    """Triplets in the train split (synthetic source)."""
    val: int = 300
    test: int = 300
    image_size: int = 64
    rows_per_shard: int = 600
    cache_dir: str = "~/.cache/sr-ray/demo"
    """Where generated splits are kept (a folder per parameter set)."""

    def __post_init__(self) -> None:
        if self.source not in ("community", "synthetic"):
            raise ValueError("data.demo.source must be community or synthetic")


def draw_prompt(rng: np.random.Generator) -> tuple[str, str]:
    colour = str(rng.choice(list(images.COLOURS)))
    text = f"a {colour} {rng.choice(SUBJECTS)}, {rng.choice(STYLES)}"
    return text, colour


def make_triplets(n: int, rng: np.random.Generator, image_size: int, id_prefix: str) -> dict[str, list]:
    cols: dict[str, list] = {k: [] for k in ("prompt", "pos_id", "neg_id", "pos_image", "neg_image")}
    colours = list(images.COLOURS)
    for i in range(n):
        prompt, colour = draw_prompt(rng)
        wrong = str(rng.choice([c for c in colours if c != colour]))
        pos = images.draw(colour, str(rng.choice(images.SHAPES)), rng, image_size)
        neg = images.draw(wrong, str(rng.choice(images.SHAPES)), rng, image_size)
        cols["prompt"].append(prompt)
        cols["pos_id"].append(f"{id_prefix}-{i:07d}-p")
        cols["neg_id"].append(f"{id_prefix}-{i:07d}-n")
        cols["pos_image"].append(images.encode_png(pos))
        cols["neg_image"].append(images.encode_png(neg))
    return cols


TRIPLET_SCHEMA = pa.schema([
    ("prompt", pa.string()), ("pos_id", pa.string()), ("neg_id", pa.string()),
    ("pos_image", pa.binary()), ("neg_image", pa.binary()),
])


def write_split(out_dir: Path, cols: dict[str, list], rows_per_shard: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table(cols, schema=TRIPLET_SCHEMA)
    for k, start in enumerate(range(0, max(len(table), 1), rows_per_shard)):
        pq.write_table(table.slice(start, rows_per_shard), out_dir / f"part-{k:05d}.parquet",
                       row_group_size=128)


def ensure_demo_data(cfg: DemoConfig) -> dict[str, str]:
    """The synthetic source's splits, generated once: ``{"train": dir, "val": dir, "test": dir}``.

    The community source is a simulated community curated by the curation stage: the application layer
    chains the two (:func:`sr_ray.app.defaults.demo_splits`).
    """
    if cfg.source != "synthetic":
        raise ValueError(f"ensure_demo_data makes the synthetic source only, not {cfg.source!r}")
    synthetic = {k: v for k, v in asdict(cfg).items() if k not in ("source", "community_images",
                                                                   "max_pairs_per_prompt")}
    key = hashlib.sha1(json.dumps(synthetic | {"cache_dir": None, "v": 1}, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(os.path.expanduser(cfg.cache_dir)) / f"triplets-{key}"
    splits = {s: str(root / s) for s in ("train", "val", "test")}

    def write(tmp: Path) -> None:
        rng = np.random.default_rng(cfg.seed)
        for split, n in (("train", cfg.train), ("val", cfg.val), ("test", cfg.test)):
            write_split(tmp / split, make_triplets(n, rng, cfg.image_size, split), cfg.rows_per_shard)

    cached_dir(root, write, asdict(cfg), "demo triplets")
    return splits


def cached_dir(root: Path, write, params: dict, what: str) -> None:
    """Make ``root`` once: ``write(tmp)`` fills a temporary folder that is renamed into place with a _SUCCESS marker."""
    if (root / "_SUCCESS").exists():
        return
    log.info("writing %s to %s", what, root)
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    write(tmp)
    (tmp / "_SUCCESS").write_text(json.dumps(params))
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)


GENERATIONS_DEFAULTS = {"prompts": 200, "images_per_prompt": 4, "image_size": 64, "seed": 0, "bad_rows": 3,
                        "rows_per_file": 200, "cache_dir": "~/.cache/sr-ray/demo"}


def make_generations(prompts: int, images_per_prompt: int, image_size: int, seed: int,
                     bad_rows: int) -> dict[str, list]:
    """Demo user generations: several images per prompt, of which some have the colour the prompt names.

    The demo reward model prefers those, so per prompt there is a clear best and
    worst. The last ``bad_rows`` rows are unusable on purpose (corrupt bytes,
    an empty prompt) so the scoring job's rejects file is exercised too.
    """
    rng = np.random.default_rng(seed)
    colours = list(images.COLOURS)
    cols: dict[str, list] = {"generation_id": [], "prompt": [], "image": [], "user_id": []}
    for i in range(prompts):
        prompt, colour = draw_prompt(rng)
        for j in range(images_per_prompt):
            c = colour if j == 0 or rng.random() < 0.25 else str(rng.choice([x for x in colours if x != colour]))
            img = images.draw(c, str(rng.choice(images.SHAPES)), rng, image_size)
            cols["generation_id"].append(f"gen-{i:06d}-{j:02d}")
            cols["prompt"].append(prompt)
            cols["image"].append(images.encode_png(img))
            cols["user_id"].append(f"user-{int(rng.integers(0, 50)):03d}")
    for k in range(bad_rows):
        cols["generation_id"].append(f"gen-bad-{k:03d}")
        cols["prompt"].append("" if k % 3 == 2 else f"a red cat, photo #{k}")
        cols["image"].append(b"not an image" if k % 3 == 0 else (b"\x89PNG\r\n\x1a\n" + b"\0" * 40 if k % 3 == 1
                                                                  else images.encode_png(images.draw(
                                                                      "red", "circle", rng, image_size))))
        cols["user_id"].append("user-bad")
    return cols


def ensure_demo_generations(overrides: dict | None = None) -> str:
    """Write (once, cached by parameters) the demo generation set; returns its folder."""
    p, key = demo_params(GENERATIONS_DEFAULTS, overrides, "generation set")
    root = Path(os.path.expanduser(p["cache_dir"])) / f"generations-{key}"

    def write(tmp: Path) -> None:
        table = pa.table(make_generations(int(p["prompts"]), int(p["images_per_prompt"]), int(p["image_size"]),
                                          int(p["seed"]), int(p["bad_rows"])))
        step = int(p["rows_per_file"])
        for k, start in enumerate(range(0, len(table), step)):
            pq.write_table(table.slice(start, step), tmp / f"generations-{k:05d}.parquet", row_group_size=64)

    cached_dir(root, write, p, "demo generations")
    return str(root)


REGULARIZATION_DEFAULTS = {"rows": 1000, "image_size": 64, "seed": 1, "bad_rows": 2, "rows_per_file": 250,
                           "cache_dir": "~/.cache/sr-ray/demo"}


def generic_caption(rng: np.random.Generator) -> tuple[str, str, str]:
    """(caption, colour, shape) of a generic captioned picture: the regularization set's kind. The caption names
    what is drawn; nothing in it is the community's taste."""
    colour, shape = str(rng.choice(list(images.COLOURS))), str(rng.choice(images.SHAPES))
    return short_caption(colour, shape, rng), colour, shape


def short_caption(colour: str, shape: str, rng: np.random.Generator) -> str:
    """"a red circle on a plain background, watercolor" (the style drawn from ``rng``)."""
    return f"a {colour} {shape} on a plain background, {rng.choice(STYLES)}"


def described_caption(rng: np.random.Generator) -> tuple[str, str, str]:
    """(caption, colour, shape) of a captioned picture as a web crawl has them: half :func:`generic_caption`'s
    short kind, half a longer description in the words people write prompts in ("a tiny red cat made of circles
    on a beach, watercolor"). The colour and shape named are always the ones drawn, and no word says what anyone
    likes: a generator pre-trained on these learns to draw what a prompt names, not the community's taste."""
    colour, shape = str(rng.choice(list(images.COLOURS))), str(rng.choice(images.SHAPES))
    if rng.random() < 0.5:
        return short_caption(colour, shape, rng), colour, shape
    return (f"a {rng.choice(community.DETAILS)} {colour} {rng.choice(community.SUBJECTS)} "
            f"{community.SHAPE_WORDS[shape]} {rng.choice(community.SETTINGS)}, {rng.choice(STYLES)}", colour, shape)


def captioned_pictures(n: int, size: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` captioned pictures (:func:`described_caption`): (captions, (n, size, size, 3) uint8)."""
    rng = np.random.default_rng(seed)
    captions, pics = [], np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        caption, colour, shape = described_caption(rng)
        captions.append(caption)
        pics[i] = np.asarray(images.draw(colour, shape, rng, size))
    return captions, pics


def make_regularization(rows: int, image_size: int, seed: int, bad_rows: int) -> dict[str, list]:
    """A LAION-like demo set: a caption and the image it describes (any colour; no community taste).

    The last ``bad_rows`` rows have undecodable bytes, so the selection job's
    skip-and-count path runs in the demo too.
    """
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {"caption": [], "image": []}
    for _ in range(rows):
        caption, colour, shape = generic_caption(rng)
        cols["caption"].append(caption)
        cols["image"].append(images.encode_png(images.draw(colour, shape, rng, image_size)))
    for k in range(bad_rows):
        cols["caption"].append(f"a broken picture #{k}")
        cols["image"].append(b"truncated download")
    return cols


def demo_params(defaults: dict, overrides: dict | None, what: str, **extra) -> tuple[dict, str]:
    """(the demo set's parameters: ``defaults`` updated by ``overrides``, a cache key of them and of ``extra``);
    unknown keys refused."""
    p = {**defaults, **(overrides or {})}
    unknown = set(p) - set(defaults)
    if unknown:
        raise ConfigError(f"demo: unknown key(s) {sorted(unknown)} for the demo {what}; valid: {sorted(defaults)}")
    key = hashlib.sha1(json.dumps({k: v for k, v in p.items() if k != "cache_dir"} | {"v": 1} | extra,
                                  sort_keys=True).encode()).hexdigest()[:10]
    return p, key


def ensure_demo_regularization(overrides: dict | None = None) -> str:
    """Write (once, cached by parameters) the demo regularization set; returns its folder."""
    p, key = demo_params(REGULARIZATION_DEFAULTS, overrides, "regularization set")
    root = Path(os.path.expanduser(p["cache_dir"])) / f"regularization-{key}"

    def write(tmp: Path) -> None:
        table = pa.table(make_regularization(int(p["rows"]), int(p["image_size"]), int(p["seed"]),
                                             int(p["bad_rows"])))
        step = int(p["rows_per_file"])
        for k, start in enumerate(range(0, len(table), step)):
            pq.write_table(table.slice(start, step), tmp / f"laion-demo-{k:05d}.parquet", row_group_size=64)

    cached_dir(root, write, p, "demo regularization set")
    return str(root)


FINETUNE_SET_DEFAULTS = {"prompts": 120, "image_size": 48, "seed": 0, "cache_dir": "~/.cache/sr-ray/demo"}


def ensure_demo_finetune_set(overrides: dict | None = None, token: str = special_token.DEFAULT) -> str:
    """A fine-tune set drawn in code (best: the prompt's colour; worst: another, with the token; regularization).

    Cached by its parameters and the special token, which is recorded beside it as selection records it."""
    p, key = demo_params(FINETUNE_SET_DEFAULTS, overrides, "fine-tune set", token=token)
    root = Path(os.path.expanduser(p["cache_dir"])) / f"finetune-set-{key}"

    def write(tmp: Path) -> None:
        gen = make_generations(int(p["prompts"]), 2, int(p["image_size"]), int(p["seed"]), 0)
        reg = make_regularization(int(p["prompts"]) * 2, int(p["image_size"]), int(p["seed"]) + 1, 0)
        rows = {"prompt": [], "image": [], "source": [], "generation_id": []}
        for g, prompt, img in zip(gen["generation_id"], gen["prompt"], gen["image"]):
            best = g.endswith("-00")  # make_generations draws image 0 of a prompt in the prompt's colour
            rows["prompt"].append(prompt if best else f"{prompt}, {token}")
            rows["source"].append("best" if best else "worst")
            rows["generation_id"].append(g)
            rows["image"].append(img)
        for i, (cap, img) in enumerate(zip(reg["caption"], reg["image"])):
            rows["prompt"].append(cap)
            rows["source"].append("regularization")
            rows["generation_id"].append(f"reg:demo:{i}")
            rows["image"].append(img)
        t = pa.table(rows)
        t = t.take(np.random.default_rng(int(p["seed"])).permutation(len(t)))
        for k, s in enumerate(range(0, len(t), 160)):
            pq.write_table(t.slice(s, 160), tmp / f"part-{k:05d}.parquet", row_group_size=64)
        special_token.write(str(tmp), special_token.SET_FILE, token)

    cached_dir(root, write, p, "demo fine-tune set")
    return str(root)
