"""Scorers named by import path (``plugin_scorers:redness``), as a user's own would be: loaded by sr-ray
inside Ray actors, which never saw this module imported by the driver. Values are easy to work out by hand."""

from __future__ import annotations

import numpy as np


class ChannelScore:
    def __init__(self, plus: int, minus: int, scale: float):
        self.name, self.plus, self.minus, self.scale = "channel", plus, minus, scale

    def score(self, prompts, images) -> np.ndarray:
        assert len(prompts) == len(images)
        out = []
        for im in images:
            a = np.asarray(im, dtype=np.float64) / 255.0
            out.append(self.scale * (a[..., self.plus].mean() - a[..., self.minus].mean()))
        return np.array(out, dtype=np.float32)


def redness(options: dict, device=None) -> ChannelScore:
    """mean(R) - mean(G), times ``options["scale"]`` (default 1)."""
    return ChannelScore(0, 1, float(options.get("scale", 1.0)))


def greenness(options: dict, device=None) -> ChannelScore:
    return ChannelScore(1, 0, float(options.get("scale", 1.0)))
