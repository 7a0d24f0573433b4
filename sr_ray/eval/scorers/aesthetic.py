"""``laion_aesthetic``: the LAION aesthetic predictor, a head on normalised CLIP ViT-L/14 image embeddings.

Two published heads, both fed the L2-normalised image embedding (the prompt is ignored):

- ``linear``: LAION-5B's ``sa_0_4_vit_l_14_linear.pth``, ``Linear(768, 1)`` (keys ``weight``, ``bias``);
- ``mlp``: the improved predictor's ``sac+logos+ava1-l14-linearMSE.pth``, ``768-1024-128-64-16-1`` with
  dropout between the first four layers (keys ``layers.{0,2,4,6,7}.{weight,bias}``), trained with MSE on
  1-10 ratings.

Both were trained on OpenAI's ViT-L/14 embeddings: pair them with ``clip_model=ViT-L-14-quickgelu`` and
``clip_pretrained=openai``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

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
from sr_ray.eval.scorers.clip import open_clip_pretrained

HEADS = ("linear", "mlp")


@dataclass
class AestheticConfig:
    head: str = "linear"
    """linear (sa_0_4_vit_l_14_linear.pth) or mlp (the improved predictor, sac+logos+ava1-l14-linearMSE.pth)."""
    weights: str | None = None
    """The head's weights (local, s3://, URL, hub file); none: random (demo only)."""
    clip_model: str = "sr-tiny"
    """open_clip architecture of the image tower (the heads were trained on ViT-L-14-quickgelu)."""
    clip_pretrained: str | None = None
    """Its weights (openai for the published heads); none: random (demo only)."""

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"laion_aesthetic.head={self.head!r}: one of {HEADS}")
        from sr_ray.reward.model import activation_problem

        problem = activation_problem(self.clip_model, self.clip_pretrained)
        if problem:
            raise ValueError(problem.replace("model.name", "laion_aesthetic.clip_model"))


class MLPHead(nn.Module):
    """The improved predictor's MLP; attribute names match its state dict (``layers.N``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def make_head(kind: str, dim: int) -> nn.Module:
    """The head's modules, laid out so the published state dicts load as they are."""
    return nn.Linear(dim, 1) if kind == "linear" else MLPHead(dim)


class LaionAesthetic:
    name = "laion_aesthetic"

    def __init__(self, cfg: AestheticConfig, device: str | None = None, batch_size: int = 32, bf16: bool = True):
        from sr_ray.reward.model import ModelConfig, build_clip, image_transform, preprocess_cfg

        self.device, self.bf16, self.batch_size = device_of(device), bf16, batch_size
        mcfg = ModelConfig(name=cfg.clip_model,
                           pretrained=open_clip_pretrained(cfg.clip_pretrained, "laion_aesthetic.clip_pretrained"))
        with seeded(0):
            self.clip = build_clip(mcfg).eval().to(self.device)
            dim = self.clip.visual.output_dim
            self.head = make_head(cfg.head, dim)
        if cfg.weights is None:
            random_weights_warning(self.name)
        else:
            path = fetch_weights(cfg.weights, "laion_aesthetic.weights")
            state = load_state(path, "laion_aesthetic.weights")
            try:
                self.head.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"laion_aesthetic.weights={cfg.weights}: not a {cfg.head} head on {dim}-d "
                                 f"embeddings ({str(e).splitlines()[0]})") from None
        self.head.eval().to(self.device)
        self.transform = image_transform(preprocess_cfg(mcfg))

    @torch.no_grad()
    def embed(self, images: Sequence) -> torch.Tensor:
        """L2-normalised image embeddings, (N, D) float32."""
        pix = torch.stack([self.transform(x) for x in rgb(images)]).to(self.device)
        with autocast(self.device, self.bf16):
            e = self.clip.encode_image(pix).float()
        return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], images: Sequence) -> np.ndarray:
        return in_batches(lambda _, ims: self.head(self.embed(ims)).float().squeeze(-1).cpu(), prompts, images,
                          self.batch_size)


def build(cfg: AestheticConfig, device: str | None = None, batch_size: int = 32, bf16: bool = True):
    return LaionAesthetic(cfg, device, batch_size, bf16)
