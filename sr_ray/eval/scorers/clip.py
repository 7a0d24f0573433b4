"""``clip``: prompt-image alignment of an original open_clip model (paper: ViT-L/14, OpenAI weights).

The score is the cosine of the normalised prompt and image embeddings (CLIP score / 100), computed exactly
like Social Reward's, so the two columns differ only by fine-tuning on community feedback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sr_ray.eval.scorers.base import check_batch, device_of, fetch_weights, random_weights_warning, rgb, seeded


@dataclass
class ClipConfig:
    model: str = "sr-tiny"
    """open_clip architecture (paper: ViT-L-14-quickgelu)."""
    pretrained: str | None = None
    """open_clip pretrained tag (openai, laion2b_s32b_b79k) or weights file (local, s3://, URL, hub file);
    none: random weights (demo only)."""

    def __post_init__(self) -> None:
        from sr_ray.reward.model import activation_problem

        problem = activation_problem(self.model, self.pretrained)
        if problem:  # OpenAI weights need the -quickgelu architecture
            raise ValueError(problem.replace("model.name", "clip.model"))


def open_clip_pretrained(pretrained: str | None, key: str) -> str | None:
    """An open_clip tag as it is; a weights file fetched to local disk (a tag is a bare word)."""
    if pretrained is None or "/" not in pretrained and not pretrained.endswith((".pt", ".pth", ".bin",
                                                                               ".safetensors")):
        return pretrained
    return fetch_weights(pretrained, key)


class ClipAlignment:
    name = "clip"

    def __init__(self, cfg: ClipConfig, device: str | None = None, batch_size: int = 32):
        from sr_ray.reward.model import ModelConfig, RewardModel, build_clip
        from sr_ray.reward.score import RewardScorer

        mcfg = ModelConfig(name=cfg.model, pretrained=open_clip_pretrained(cfg.pretrained, "clip.pretrained"))
        if mcfg.pretrained is None:
            random_weights_warning(self.name)
        with seeded(0):
            model = RewardModel(build_clip(mcfg))
        self.scorer = RewardScorer.from_model(model, mcfg, str(device_of(device)), batch_size)

    def score(self, prompts: Sequence[str], images: Sequence) -> np.ndarray:
        check_batch(prompts, images)
        return self.scorer.score(list(prompts), rgb(images))


def build(cfg: ClipConfig, device: str | None = None, batch_size: int = 32, bf16: bool = True):
    return ClipAlignment(cfg, device, batch_size)
