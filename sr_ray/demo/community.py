"""A simulated creative community: prompts, generations drawn in code, and the
platform log that the curation job turns into triplets.

Each prompt names a colour and a shape ("a tiny red cat made of circles on a beach,
watercolor"). A prompt has several generations (heavy-tailed: lognormal); each shows
one object whose colour and shape may or may not match the prompt. A *hidden taste*
decides how much users like a generation for its prompt (the match, plus noise), so
popularity depends on the prompt and the image together. From taste and exposure
the log is drawn:

- ``views``: lognormal per image, times a per-prompt exposure factor;
- ``remix_count``: Poisson with mean rate · novelty · (1 − exp(−views / novelty)):
  remix intent fades as an image ages (the rate per view decays as
  exp(−v / novelty)), the rate grows exponentially with taste and carries a
  Pareto virality factor, so the counts are heavy-tailed (most images are never
  remixed, a few are remixed a lot);
- ``views_before_first_remix``: the view of the first remix of that faded process,
  null when never remixed; remixes come early, so most never-remixed images have
  been seen more often than the 99th percentile of it (they become negatives);
- ``influencer_remix``: a few influencer accounts remix tasteful images;
- ``nsfw_score``: near 0, except a small flagged share near 1.

The defaults are calibrated so that the paper's curation rules give a dataset
shaped like its Table 1 at any scale: ~16 images and ~30 pairs per kept prompt,
positives ~8% of the dataset's images, the creator signal ~40% of positives.

Everything is deterministic by seed; the log is written in chunks so 1M rows need
no more memory than one chunk. Output (platform-log contract of ARCHITECTURE.md):
``<out>/log/part-*.parquet`` and, when ``write_images``, ``<out>/images/*/<id>.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from sr_ray.core import images, storage
from sr_ray.core.config import to_dict

log = logging.getLogger(__name__)

SUBJECTS = ("cat", "house", "flower", "car", "balloon", "robot", "tree", "boat", "kite", "dragon",
            "castle", "owl", "teapot", "lighthouse", "fox", "cactus")
STYLES = ("digital art", "watercolor", "oil painting", "pixel art", "3d render", "sticker", "photo",
          "ink sketch", "anime", "low poly")
DETAILS = ("tiny", "giant", "glowing", "ancient", "happy", "sleepy", "shiny", "fluffy", "wooden", "crystal",
           "floating", "mechanical", "paper", "neon", "golden", "frozen", "smiling", "cosmic", "vintage", "baby")
SETTINGS = ("on a beach", "in space", "in a forest", "at night", "in the rain", "on the moon", "in a city",
            "under water", "in the desert", "on a mountain", "in a garden", "in the snow", "at sunset",
            "in a castle", "on a rooftop", "in a library", "in the clouds", "on a boat", "in a cave", "at a party")
SHAPE_WORDS = {"circle": "made of circles", "square": "made of squares", "triangle": "made of triangles",
               "diamond": "made of diamonds", "stripes": "in stripes"}

LOG_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("prompt", pa.string()), ("image_uri", pa.string()),
    ("remix_count", pa.int64()), ("views_before_first_remix", pa.int64()), ("views", pa.int64()),
    ("influencer_remix", pa.bool_()), ("nsfw_score", pa.float32()),
])


@dataclass
class CommunityConfig:
    seed: int = 0
    images: int = 40_000
    """Rows of the platform log (generated images); 1_000_000 for the paper's scale."""
    images_per_prompt: float = 12.0
    """Mean generations per prompt (lognormal, at least 2)."""
    prompt_size_sigma: float = 1.1
    """Std of log(generations) per prompt: a few prompts are generated far more often than most."""
    image_size: int = 64
    write_images: bool = True
    """Draw and store every image (PNG); off for log-only benchmarks (URIs then dangle)."""
    colour_match: float = 0.35
    """Chance that a generation shows the colour its prompt names."""
    shape_match: float = 0.4
    taste_colour: float = 2.0
    """Weight of a colour match in the hidden taste (the learnable signal)."""
    taste_shape: float = 0.7
    taste_noise: float = 0.6
    """Std of the per-image taste noise."""
    median_views: float = 1500.0
    views_sigma: float = 1.5
    """Std of log(views) per image."""
    exposure_sigma: float = 1.0
    """Std of log(exposure) per prompt (the feed shows some prompts far more)."""
    remix_rate: float = 3e-5
    """Remixes per view of a new image of average taste."""
    novelty_views: float = 150.0
    """Remix intent fades with an image's age: the rate per view decays as exp(-views / novelty_views)."""
    taste_slope: float = 8.0
    """log(remix rate) grows by this per unit of taste."""
    pareto_shape: float = 1.5
    """Shape of the Pareto virality factor (smaller: heavier tail)."""
    influencer_rate: float = 0.03
    """Chance that an influencer remixes an image of top taste (less for lower taste): the creator signal
    gives ~40% of the positives, the content signal (top 1% by remixes) the rest."""
    nsfw_rate: float = 0.003
    """Share of images flagged NSFW (score in [0.85, 1])."""
    chunk_images: int = 10_000
    """Images per generation chunk (and per log shard)."""

    def __post_init__(self) -> None:
        if self.images < 1 or self.images_per_prompt < 2:
            raise ValueError("community.images must be >= 1 and community.images_per_prompt >= 2")


def _chunk_rng(cfg: CommunityConfig, chunk: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, chunk, 0x5EED])


def community_prompt(detail: int, colour: int, subject: int, shape: int, setting: int, style: int) -> str:
    """The community's phrasing, from indices into its word lists: "a tiny red cat made of circles on a beach,
    watercolor"."""
    return (f"a {DETAILS[detail]} {list(images.COLOURS)[colour]} {SUBJECTS[subject]} "
            f"{SHAPE_WORDS[images.SHAPES[shape]]} {SETTINGS[setting]}, {STYLES[style]}")


def draw_prompts(seed: int):
    """An endless stream of new prompts as the community writes them (the same words and distribution as its
    log's, seeded apart from it): the prompts a generator is fine-tuned and evaluated on in the closed loop."""
    rng = np.random.default_rng([seed, 0x9E0])
    sizes = (len(DETAILS), len(images.COLOURS), len(SUBJECTS), len(images.SHAPES), len(SETTINGS), len(STYLES))
    while True:
        yield community_prompt(*(int(rng.integers(0, k)) for k in sizes))


def _chunk_log(cfg: CommunityConfig, chunk: int, n: int, image_root: str, first_id: int) -> dict[str, np.ndarray]:
    """The log rows of one chunk of ``n`` images, plus the (colour, shape) drawn for each."""
    rng = _chunk_rng(cfg, chunk)
    colours, shapes = list(images.COLOURS), list(images.SHAPES)
    # prompts of this chunk (a prompt never spans two chunks); sizes are heavy-tailed: a few prompts are
    # generated far more often than most (and get more of everything: images, positives, negatives)
    per = []
    mu = math.log(cfg.images_per_prompt) - cfg.prompt_size_sigma ** 2 / 2  # lognormal with that mean
    while sum(per) < n:
        per.append(max(2, int(round(rng.lognormal(mu, cfg.prompt_size_sigma)))))
    per[-1] -= sum(per) - n  # >= 1: the sum was below n before the last prompt
    n_prompts = len(per)
    p_colour = rng.integers(0, len(colours), n_prompts)
    p_shape = rng.integers(0, len(shapes), n_prompts)
    p_subject = rng.integers(0, len(SUBJECTS), n_prompts)
    p_style = rng.integers(0, len(STYLES), n_prompts)
    p_detail = rng.integers(0, len(DETAILS), n_prompts)
    p_setting = rng.integers(0, len(SETTINGS), n_prompts)
    p_exposure = np.exp(rng.normal(0.0, cfg.exposure_sigma, n_prompts))
    p_mood = rng.normal(0.0, 0.3, n_prompts)  # some prompts are liked more overall
    # 2.56M distinct prompts (20 x 8 x 16 x 5 x 20 x 10), so even at the paper's scale few repeat by chance
    prompts = np.array([community_prompt(*ix) for ix in zip(p_detail, p_colour, p_subject, p_shape, p_setting,
                                                             p_style)], dtype=object)
    idx = np.repeat(np.arange(n_prompts), per)

    cmatch = rng.random(n) < cfg.colour_match
    smatch = rng.random(n) < cfg.shape_match
    # a mismatch draws one of the *other* colours/shapes
    colour = np.where(cmatch, p_colour[idx], (p_colour[idx] + rng.integers(1, len(colours), n)) % len(colours))
    shape = np.where(smatch, p_shape[idx], (p_shape[idx] + rng.integers(1, len(shapes), n)) % len(shapes))
    taste = (cfg.taste_colour * cmatch + cfg.taste_shape * smatch + p_mood[idx]
             + rng.normal(0.0, cfg.taste_noise, n))
    taste = taste - (cfg.taste_colour * cfg.colour_match + cfg.taste_shape * cfg.shape_match)

    views = np.maximum(1, np.round(cfg.median_views * p_exposure[idx]
                                   * np.exp(rng.normal(0.0, cfg.views_sigma, n)))).astype(np.int64)
    virality = 1.0 + rng.pareto(cfg.pareto_shape, n)
    # remix intent fades as an image ages: the hazard per view is rate * exp(-v / novelty_views), so an image
    # that will be remixed usually is early, and the expected count over V views saturates at rate * novelty
    tau = cfg.novelty_views
    rate = cfg.remix_rate * np.exp(cfg.taste_slope * taste) * virality
    fade = -np.expm1(-views / tau)
    expected = np.minimum(rate * tau * fade, 0.5 * views)
    remix = rng.poisson(expected).astype(np.int64)
    p_infl = cfg.influencer_rate / (1.0 + np.exp(-3.0 * (taste - 1.0)))  # influencers pick tasteful images
    influencer = rng.random(n) < p_infl
    remix = np.where(influencer & (remix == 0), 1, remix)
    # the first remix, given at least one: the first arrival of the faded process, inverted in closed form
    u = rng.random(n)
    total = np.maximum(expected, 1e-12)
    share = -np.log1p(-u * -np.expm1(-total)) / total  # share of the expected count reached by the first remix
    first = np.ceil(-tau * np.log1p(-share * fade))
    first = np.clip(first, 1, views).astype(np.int64)
    nsfw = rng.beta(1.0, 40.0, n).astype(np.float32)
    flagged = rng.random(n) < cfg.nsfw_rate
    nsfw[flagged] = rng.uniform(0.85, 1.0, int(flagged.sum())).astype(np.float32)

    ids = np.array([f"img-{first_id + i:09d}" for i in range(n)], dtype=object)
    uris = np.array([storage.join(image_root, f"{(first_id + i) // 10_000:05d}", f"{ids[i]}.png")
                     for i in range(n)], dtype=object)
    return {
        "image_id": ids, "prompt": prompts[idx], "image_uri": uris, "remix_count": remix,
        "views_before_first_remix": np.where(remix > 0, first, -1), "views": views,
        "influencer_remix": influencer, "nsfw_score": nsfw,
        "_colour": colour, "_shape": shape, "_taste": taste,
    }


def _write_chunk(cfg_dict: dict, chunk: int, n: int, first_id: int, out: str, s3_endpoint: str | None) -> int:
    """Generate chunk ``chunk`` and write its log shard (and its images). Returns rows written."""
    cfg = CommunityConfig(**cfg_dict)
    image_root = storage.join(out, "images")
    cols = _chunk_log(cfg, chunk, n, image_root, first_id)
    if cfg.write_images:
        rng = np.random.default_rng([cfg.seed, chunk, 0x1A6E])
        colours, shapes = list(images.COLOURS), list(images.SHAPES)
        fs, _ = storage.resolve(image_root, s3_endpoint)
        for uri, c, s in zip(cols["image_uri"], cols["_colour"], cols["_shape"]):
            png = images.encode_png(images.draw(colours[c], shapes[s], rng, cfg.image_size))
            storage.write_bytes(uri, png, fs=fs)
    vbfr = cols["views_before_first_remix"]
    table = pa.table({
        **{k: cols[k] for k in ("image_id", "prompt", "image_uri", "remix_count", "views",
                                "influencer_remix", "nsfw_score")},
        "views_before_first_remix": pa.array(vbfr, mask=vbfr < 0, type=pa.int64()),
    }).select(LOG_SCHEMA.names).cast(LOG_SCHEMA)
    storage.write_parquet(table, storage.join(out, "log", f"part-{chunk:05d}.parquet"), s3_endpoint)
    return n


def simulate(cfg: CommunityConfig, out: str, s3_endpoint: str | None = None) -> str:
    """Write the community's platform log (and images) under ``out``; returns the log URI.

    Chunks run as Ray tasks when Ray is initialised (images are the slow part),
    else in this process. Finished chunks are not redone on a re-run.
    """
    n_chunks = math.ceil(cfg.images / cfg.chunk_images)
    jobs = []
    for k in range(n_chunks):
        n = min(cfg.chunk_images, cfg.images - k * cfg.chunk_images)
        if not storage.exists(storage.join(out, "log", f"part-{k:05d}.parquet"), s3_endpoint):
            jobs.append((k, n, k * cfg.chunk_images))
    cfg_dict = to_dict(cfg)
    try:
        import ray

        use_ray = ray.is_initialized() and len(jobs) > 1
    except ImportError:
        use_ray = False
    if use_ray:
        task = ray.remote(num_cpus=1)(_write_chunk)
        ray.get([task.remote(cfg_dict, k, n, f, out, s3_endpoint) for k, n, f in jobs])
    else:
        for k, n, f in jobs:
            _write_chunk(cfg_dict, k, n, f, out, s3_endpoint)
    storage.write_bytes(storage.join(out, "community.json"),
                        json.dumps(cfg_dict, indent=1).encode(), s3_endpoint)
    return storage.join(out, "log")


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
