"""The NSFW hook of the curation job.

``curate(nsfw_classifier="package.module:Class")`` loads ``Class(**nsfw_kwargs)``
once per actor and calls it on batches of decoded RGB PIL images; it returns one
score in [0, 1] per image (1 = unsafe). Rows whose score reaches ``nsfw_max`` are
removed before anything else, as with a precomputed ``nsfw_score`` column.
Images that cannot be read get a score of 0 here; packing counts them later.
"""

from __future__ import annotations

import importlib
from typing import Protocol, Sequence

import numpy as np
import pyarrow as pa

from sr_ray.core import images, storage


class NSFWClassifier(Protocol):
    def __call__(self, imgs: Sequence) -> np.ndarray: ...


def load_classifier(spec: str):
    mod, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"nsfw_classifier {spec!r}: expected 'module:Class'")
    return getattr(importlib.import_module(mod), name)


class ClipZeroShotNSFW:
    """Zero-shot NSFW score with an open_clip model: softmax over "unsafe" vs "safe" captions.

    With real weights (e.g. ``ViT-L-14-quickgelu``/``openai``) this is the common CLIP-based
    filter; any open_clip name/pretrained pair works.
    """

    def __init__(self, model_name: str = "ViT-L-14-quickgelu", pretrained: str | None = "openai",
                 unsafe: str = "an explicit nsfw image", safe: str = "a safe for work image"):
        import torch

        from sr_ray.reward.model import ModelConfig, build_clip, image_transform, preprocess_cfg, tokenizer

        cfg = ModelConfig(name=model_name, pretrained=pretrained)
        self.torch = torch
        self.model = build_clip(cfg).eval()
        self.transform, tok = image_transform(preprocess_cfg(cfg)), tokenizer(cfg)
        with torch.no_grad():
            t = self.model.encode_text(tok([unsafe, safe]))
            self.text = t / t.norm(dim=-1, keepdim=True)

    def __call__(self, imgs):
        with self.torch.no_grad():
            x = self.torch.stack([self.transform(i) for i in imgs])
            f = self.model.encode_image(x)
            f = f / f.norm(dim=-1, keepdim=True)
            return (100.0 * f @ self.text.T).softmax(-1)[:, 0].numpy()


class ColourShareNSFW:
    """A stand-in classifier for tests and the demo: the share of pixels near ``rgb``."""

    def __init__(self, rgb=(250, 120, 190), tol: int = 40):
        self.rgb, self.tol = np.array(rgb), tol

    def __call__(self, imgs):
        return np.array([float((np.abs(np.asarray(i, np.int32) - self.rgb).max(-1) <= self.tol).mean())
                         for i in imgs], dtype=np.float32)


class NSFWScorer:
    """``map_batches`` callable class: log rows -> the same rows with ``nsfw_score`` from the classifier."""

    def __init__(self, spec: str, endpoint: str | None = None, kwargs: dict | None = None):
        self.clf = load_classifier(spec)(**(kwargs or {}))
        self.endpoint = endpoint

    def __call__(self, t: pa.Table) -> pa.Table:
        imgs, idx = [], []
        uris = t.column("image_uri").to_pylist()
        fs = storage.resolve(uris[0], self.endpoint)[0] if uris else None  # one filesystem per batch
        for i, u in enumerate(uris):
            try:
                imgs.append(images.decode(storage.read_bytes(u, fs=fs)))
                idx.append(i)
            except (images.BadImage, OSError):
                pass
        scores = np.zeros(t.num_rows, np.float32)
        if imgs:
            scores[idx] = np.asarray(self.clf(imgs), np.float32)
        if "nsfw_score" in t.column_names:
            t = t.drop_columns(["nsfw_score"])
        return t.append_column("nsfw_score", pa.array(scores))
