"""``hpsv2`` / ``hpsv21``: Human Preference Score v2 and v2.1 (Wu et al., 2023): open_clip ViT-H-14 fine-tuned
on HPD v2, published as ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (``{"state_dict": ...}``).

Score, as HPS v2's own ``img_score``: the cosine of the normalised image and prompt embeddings (the diagonal
of ``image_features @ text_features.T``, no logit scale). Images through HPS's own eval transform (not
open_clip's): to a tensor, the longest side resized to 224 px (bicubic, antialiased), zero-padded to a square,
then CLIP mean/std; prompts through the ViT-H-14 tokenizer (77 tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sr_ray.eval.scorers.base import (
    autocast,
    device_of,
    fetch_weights,
    in_batches,
    load_state,
    random_weights_warning,
    rgb,
    seeded,
)

VERSIONS = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HUB_REPO = "xswu/HPSv2"


@dataclass
class HPSConfig:
    version: str = "2.0"
    """2.0 (hpsv2) or 2.1 (hpsv21)."""
    weights: str | None = None
    """The published checkpoint (local, s3://, URL, or hub file xswu/HPSv2/HPS_v2.1_compressed.pt); none: random
    weights of ``tiny_model`` (demo only)."""
    model: str = "ViT-H-14"
    """open_clip architecture of the published weights."""
    tiny_model: str = "sr-tiny-77"
    """Architecture of the random-weight variant (HPS tokenises at 77 tokens, whatever the model)."""

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"hps version={self.version!r}: one of {sorted(VERSIONS)}")


def longest_side_transform(size: int):
    """HPS v2's eval transform: PIL -> tensor, longest side to ``size`` (bicubic with antialiasing, on the
    tensor, sides rounded), zero padding split evenly (the odd pixel right/bottom), CLIP normalisation.

    HPS leaves an image whose longest side already is ``size`` unpadded (not square); it scores one image at a
    time, so that works there. Batches need one shape, so such an image is padded here too: its score is the
    one HPS would give it, were its ViT able to take a non-square input (ViT-H-14's cannot)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    def apply(img) -> torch.Tensor:
        x = F.to_tensor(img)
        h, w = x.shape[1:]
        scale = size / float(max(h, w))
        if scale != 1.0:
            h, w = round(h * scale), round(w * scale)
            x = F.resize(x, [h, w], InterpolationMode.BICUBIC)
        ph, pw = size - h, size - w
        x = F.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        return F.normalize(x, CLIP_MEAN, CLIP_STD)
    return apply


def checkpoint_state(blob: dict, key: str) -> dict:
    """The model's state dict inside an HPS checkpoint (``state_dict``, DDP ``module.`` prefix removed)."""
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{key}: no state_dict in the checkpoint (not an HPS v2 checkpoint)")
    return {k.removeprefix("module."): v for k, v in state.items()}


class HPS:
    name = "hpsv2"

    def __init__(self, cfg: HPSConfig, device: str | None = None, batch_size: int = 32, bf16: bool = True):
        from sr_ray.reward.model import ModelConfig, build_clip, preprocess_cfg, tokenizer

        self.device, self.bf16, self.batch_size = device_of(device), bf16, batch_size
        key = "hpsv21.weights" if cfg.version == "2.1" else "hpsv2.weights"
        mcfg = ModelConfig(name=cfg.model if cfg.weights else cfg.tiny_model, pretrained=None)
        with seeded(1 if cfg.version == "2.0" else 2):  # random variants: not the same model as ``clip``'s
            self.clip = build_clip(mcfg)
        if cfg.weights is None:
            random_weights_warning(f"hps v{cfg.version}")
        else:
            state = checkpoint_state(load_state(fetch_weights(cfg.weights, key), key), key)
            try:
                missing, unexpected = self.clip.load_state_dict(state, strict=False)
            except RuntimeError as e:  # shapes differ
                missing, unexpected = [str(e).splitlines()[-1].strip()[:200]], []
            if missing or unexpected:
                raise ValueError(f"{key}={cfg.weights}: does not fit open_clip {mcfg.name} (missing "
                                 f"{missing[:3]}, unexpected {unexpected[:3]})")
        self.clip.eval().to(self.device)
        self.transform = longest_side_transform(int(preprocess_cfg(mcfg)["size"]))
        self.tokenizer = tokenizer(mcfg)

    @torch.no_grad()
    def _batch(self, prompts: list[str], images: list) -> torch.Tensor:
        uniq = sorted(set(prompts))
        pix = torch.stack([self.transform(x) for x in rgb(images)]).to(self.device)
        with autocast(self.device, self.bf16):
            im = self.clip.encode_image(pix, normalize=True).float()
            t = self.clip.encode_text(self.tokenizer(uniq).to(self.device), normalize=True).float()
        idx = torch.tensor([uniq.index(p) for p in prompts], device=self.device)
        return (im * t[idx]).sum(-1).cpu()

    def score(self, prompts: Sequence[str], images: Sequence) -> np.ndarray:
        return in_batches(self._batch, prompts, images, self.batch_size)


def build(cfg: HPSConfig, device: str | None = None, batch_size: int = 32, bf16: bool = True):
    return HPS(cfg, device, batch_size, bf16)
