"""``social_reward``: an sr-ray reward checkpoint; score = cosine of its prompt and image embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sr_ray.eval.scorers.base import check_batch, device_of, rgb


@dataclass
class SocialRewardConfig:
    checkpoint: str | None = None
    """An sr-ray reward checkpoint folder (local or s3://); none: the reward demo's (demo only)."""


class SocialReward:
    name = "social_reward"

    def __init__(self, checkpoint: str, device: str | None = None, batch_size: int = 32):
        from sr_ray.reward.score import RewardScorer

        self.scorer = RewardScorer(checkpoint, device=str(device_of(device)), batch_size=batch_size)

    def score(self, prompts: Sequence[str], images: Sequence) -> np.ndarray:
        check_batch(prompts, images)
        return self.scorer.score(list(prompts), rgb(images))


def build(cfg: SocialRewardConfig, device: str | None = None, batch_size: int = 32, bf16: bool = True):
    if not cfg.checkpoint:
        raise ValueError("social_reward.checkpoint is not set (the job fills in the demo's when none is given)")
    return SocialReward(cfg.checkpoint, device, batch_size)
