"""Image metrics behind one interface, so the T2I evaluation can add PickScore, HPSv2, ImageReward ... later.

A metric is an object with a ``name`` and ``score(prompts, images) -> (N,) float``
(one prompt per image, PIL images; higher is better). ``METRICS`` maps a metric's
config name to a factory ``factory(cfg: MetricsConfig, device) -> metric``; a new
metric joins with ``@register_metric("name")`` on its factory and is then
selectable as ``metrics.names=[..., name]``.

Built in:

- ``social_reward``: the Social Reward model (an sr-ray reward checkpoint, local
  or ``s3://``): cosine of CLIP prompt and image embeddings after fine-tuning on
  community feedback;
- ``clip``: prompt-image alignment of an open_clip model (``clip_model`` +
  ``clip_pretrained``, e.g. ``ViT-L-14-quickgelu`` + ``openai``): the same cosine with the
  original CLIP weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

METRICS: dict[str, Callable] = {}


class Metric(Protocol):
    name: str

    def score(self, prompts: Sequence[str], images: Sequence) -> np.ndarray: ...


@dataclass
class MetricsConfig:
    names: list[str] = field(default_factory=lambda: ["social_reward", "clip"])
    """Metrics to compute (keys of sr_ray.metrics.METRICS)."""
    social_reward_checkpoint: str | None = None
    """An sr-ray reward checkpoint (local or s3://); none: the reward demo's."""
    clip_model: str = "sr-tiny"
    """open_clip architecture of the CLIP alignment metric (the paper's: ViT-L-14-quickgelu with openai weights)."""
    clip_pretrained: str | None = None
    """open_clip pretrained tag (openai, laion2b_s32b_b79k) or weights file; none: random weights (demo only)."""
    batch_size: int = 64

    def __post_init__(self) -> None:
        unknown = [n for n in self.names if n not in METRICS]
        if unknown:
            raise ValueError(f"metrics.names: unknown {unknown}; known: {sorted(METRICS)}")
        if len(set(self.names)) != len(self.names) or not self.names:
            raise ValueError("metrics.names: name each metric once, at least one")
        from sr_ray.model import activation_problem

        problem = activation_problem(self.clip_model, self.clip_pretrained)
        if problem:  # OpenAI weights need the -quickgelu architecture
            raise ValueError(problem.replace("model.name", "metrics.clip_model"))


def register_metric(name: str):
    """Decorator: ``@register_metric("pickscore") def make(cfg, device): return PickScore(...)``."""
    def wrap(factory: Callable) -> Callable:
        METRICS[name] = factory
        return factory
    return wrap


class SocialReward:
    name = "social_reward"

    def __init__(self, checkpoint: str, device: str | None = None, batch_size: int = 64):
        from sr_ray.score import RewardScorer

        self.scorer = RewardScorer(checkpoint, device=device, batch_size=batch_size)

    def score(self, prompts: Sequence[str], images: Sequence) -> np.ndarray:
        return self.scorer.score(list(prompts), images)


class ClipAlignment:
    """Cosine similarity of open_clip's prompt and image embeddings (CLIP score / 100), scored like Social Reward."""

    name = "clip"

    def __init__(self, model: str, pretrained: str | None, device: str | None = None, batch_size: int = 64):
        import torch

        from sr_ray.model import ModelConfig, RewardModel, build_clip
        from sr_ray.score import RewardScorer

        cfg = ModelConfig(name=model, pretrained=pretrained)
        with torch.random.fork_rng():
            torch.manual_seed(0)  # random-weight demo models: the same in every actor
            clip = RewardModel(build_clip(cfg))
        self.scorer = RewardScorer.from_model(clip, cfg, device, batch_size)

    def score(self, prompts: Sequence[str], images: Sequence) -> np.ndarray:
        return self.scorer.score(list(prompts), images)


@register_metric("social_reward")
def _social_reward(cfg: MetricsConfig, device: str | None = None) -> Metric:
    from sr_ray.batch_score import demo_checkpoint

    return SocialReward(cfg.social_reward_checkpoint or demo_checkpoint(), device, cfg.batch_size)


@register_metric("clip")
def _clip(cfg: MetricsConfig, device: str | None = None) -> Metric:
    return ClipAlignment(cfg.clip_model, cfg.clip_pretrained, device, cfg.batch_size)


def build_metrics(cfg: MetricsConfig, device: str | None = None) -> list[Metric]:
    return [METRICS[n](cfg, device) for n in cfg.names]
