"""The paper's pictures that come from scoring (Figs. 6/9): one prompt's images ranked by each scorer, best on
the left, each with its score.

``rank_images(cfg)`` reads images from a folder (png/jpg/jpeg/webp) or from generations Parquet (``prompt``,
``image`` bytes; the rows of ``prompt`` when given, else of the first prompt), scores them with every scorer in
``scorers`` (in this process: a handful of images), and writes ``<out>.png`` (a row per scorer) and
``<out>.json`` (every image's scores and rank per scorer).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sr_ray.core import images, storage
from sr_ray.core.errors import ConfigError, DataError
from sr_ray.eval.scorers import ScorerSettings, check_names, make_scorer

log = logging.getLogger(__name__)

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class RankImagesConfig(ScorerSettings):
    """The scorers' own sections (``pickscore.model``, ...) are top-level, as in compare_rewards."""

    images: str = ""
    """A folder of pictures, or a generations Parquet file/folder (prompt, image bytes), local or s3://."""
    prompt: str | None = None
    """The prompt the images were made for (a folder needs it; Parquet: its rows of this prompt, default the
    first prompt)."""
    scorers: list[str] = field(default_factory=lambda: ["social_reward"])
    max_images: int = 8
    cell: int = 160
    """Pixels per image in the picture."""
    out: str = "./runs/rank-images/ranked"
    """Path without suffix: <out>.png and <out>.json."""
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        check_names(self.scorers, "scorers")
        if self.max_images < 1 or self.cell < 32:
            raise ValueError("max_images must be >= 1 and cell >= 32")


def load_images(cfg: RankImagesConfig) -> tuple[str, list[str], list]:
    """(prompt, names, PIL images) of a folder or of one prompt's generation rows."""
    import pyarrow.dataset as pads

    uri = cfg.images
    fs, _ = storage.resolve(uri, cfg.s3_endpoint)
    try:
        files = [f for f in storage.list_files(uri, SUFFIXES, cfg.s3_endpoint) if f.lower().endswith(SUFFIXES)]
        parts = storage.list_files(uri, endpoint=cfg.s3_endpoint) if not files else []
    except FileNotFoundError as e:
        raise DataError(f"images={storage.redact(uri)}: {e}") from None
    if files:
        if not cfg.prompt:
            raise DataError(f"images={uri} is a folder of pictures: give prompt=... (what they were made for)")
        files = sorted(files)[:cfg.max_images]
        pics = []
        for f in files:
            with fs.open_input_stream(f) as fh:
                pics.append(images.decode(fh.read()))
        return cfg.prompt, [Path(f).name for f in files], pics
    if not parts:
        raise DataError(f"images={uri}: no pictures ({', '.join(SUFFIXES)}) and no Parquet files")
    ds = pads.dataset(parts, filesystem=fs, format="parquet")
    for col in ("prompt", "image"):
        if col not in ds.schema.names:
            raise DataError(f"images={uri}: Parquet without a {col!r} column (has {ds.schema.names})")
    prompt = cfg.prompt or ds.head(1, columns=["prompt"]).column("prompt")[0].as_py()
    t = ds.to_table(columns=["prompt", "image"] + [c for c in ("generation_id",) if c in ds.schema.names],
                    filter=pads.field("prompt") == prompt).slice(0, cfg.max_images).to_pydict()
    if not t["prompt"]:
        raise DataError(f"images={uri}: no rows with prompt={prompt!r}")
    names = t.get("generation_id") or [f"row {i}" for i in range(len(t["prompt"]))]
    return prompt, [str(n) for n in names], [images.decode(b) for b in t["image"]]


def ranked_strip(prompt: str, names: list[str], pics: list, scores: dict[str, np.ndarray], cell: int) -> bytes:
    """PNG: the prompt on top; a row per scorer, its images sorted best first, each captioned rank and score."""
    from PIL import Image, ImageDraw

    label_w, title_h, cap_h = 120, 22, 28
    n = len(pics)
    canvas = Image.new("RGB", (label_w + n * (cell + 4), title_h + len(scores) * (cell + cap_h + 6)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"prompt: {prompt}"[:int(canvas.width / 6)], fill="black")
    for r, (name, s) in enumerate(scores.items()):
        y = title_h + r * (cell + cap_h + 6)
        draw.text((4, y + cell // 2), name[:18], fill="black")
        for k, i in enumerate(np.argsort(-s, kind="stable")):
            x = label_w + k * (cell + 4)
            canvas.paste(images.to_rgb(pics[i]).resize((cell, cell), Image.BICUBIC), (x, y))
            draw.text((x + 2, y + cell + 2), f"#{k + 1}  {s[i]:.4f}", fill="black")
            draw.text((x + 2, y + cell + 14), names[i][-int(cell / 6):], fill="grey")  # ids differ at the end
    return images.encode_png(canvas)


def rank_images(cfg: RankImagesConfig) -> dict[str, Any]:
    if not cfg.images:
        raise ConfigError("images: give a folder of pictures or generations Parquet")
    prompt, names, pics = load_images(cfg)
    settings = cfg.scorer_settings()
    if "social_reward" in cfg.scorers and not settings.social_reward.checkpoint:
        raise DataError("social_reward.checkpoint: give the reward checkpoint to rank with (or other scorers=)")
    scores = {name: np.asarray(make_scorer(name, settings, None, 32).score([prompt] * len(pics), pics), np.float64)
              for name in cfg.scorers}
    png = ranked_strip(prompt, names, pics, scores, cfg.cell)
    storage.write_bytes(cfg.out + ".png", png, cfg.s3_endpoint)
    ranks = {s: {names[i]: {"score": float(v[i]), "rank": int(k + 1)} for k, i in enumerate(np.argsort(-v, kind="stable"))}
             for s, v in scores.items()}
    summary = {"prompt": prompt, "images": len(pics), "scorers": cfg.scorers, "ranks": ranks,
               "png": cfg.out + ".png"}
    storage.write_bytes(cfg.out + ".json", json.dumps(summary, indent=1).encode(), cfg.s3_endpoint)
    return summary
