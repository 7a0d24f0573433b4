"""A scorer that knows nothing: a seeded hash of the prompt and the image's pixels, uniform in [0, 1).

The chance line of every comparison (pairwise accuracy 0.5 up to sampling noise) and the ablation of the
closed loop: selection by a random score picks a random "best" and "worst" image per prompt, so a
fine-tune on them shows what fine-tuning on the generator's own images does without a reward. The same
(prompt, pixels) always get the same score, in any process, batch or order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sr_ray.eval.scorers.base import check_batch, rgb


@dataclass
class RandomScorerConfig:
    seed: int = 0
    """Another seed, another random ranking."""


class RandomScorer:
    name = "random"

    def __init__(self, cfg: RandomScorerConfig):
        self.seed = int(cfg.seed)

    def score(self, prompts: Sequence[str], images: Sequence) -> np.ndarray:
        check_batch(prompts, images)
        out = np.empty(len(images), np.float32)
        for i, (p, im) in enumerate(zip(prompts, rgb(images))):
            h = hashlib.blake2b(f"{self.seed}\0{p}\0".encode() + im.tobytes(), digest_size=8).digest()
            out[i] = (int.from_bytes(h, "little") >> 11) / float(1 << 53)
        return out


def build(cfg: RandomScorerConfig, device: str | None = None, batch_size: int = 32, bf16: bool = True) -> RandomScorer:
    return RandomScorer(cfg)
