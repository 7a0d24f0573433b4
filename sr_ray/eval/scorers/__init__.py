"""Scorers: everything that scores (prompt, image) pairs, behind one interface (see ``base``).

Built in, one module per model:

| name | module | score |
| --- | --- | --- |
| ``social_reward`` | ``social_reward`` | an sr-ray checkpoint: cosine of prompt and image embeddings |
| ``clip`` | ``clip`` | an original open_clip model: the same cosine |
| ``laion_aesthetic`` | ``aesthetic`` | LAION aesthetic head on normalised CLIP ViT-L/14 image embeddings |
| ``pickscore`` | ``pickscore`` | PickScore_v1 (transformers CLIP ViT-H/14): logit_scale * cosine |
| ``hpsv2``, ``hpsv21`` | ``hps`` | open_clip ViT-H-14 + HPS v2 / v2.1 weights: cosine, as HPS's code |
| ``imagereward`` | ``imagereward`` | ImageReward-v1.0 (BLIP + MLP head): normalised reward |
| ``random`` | ``random_scorer`` | a seeded hash of prompt and pixels: the chance line, and the closed loop's ablation |

A scorer of your own joins by import path: ``scorers=[my_pkg.my_module:make]``, where
``make(options: dict, device: str | None) -> Scorer`` and ``options`` come from ``plugins`` in the config
(``plugins={"my_pkg.my_module:make": {...}}``). Lookup is by import path, not by a registry filled at import
time, so it works inside Ray actors, which import nothing of the driver's.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass, field
from typing import Any

from sr_ray.core import identity, storage
from sr_ray.core.config import to_dict
from sr_ray.eval.scorers.aesthetic import AestheticConfig
from sr_ray.eval.scorers.base import Scorer
from sr_ray.eval.scorers.clip import ClipConfig
from sr_ray.eval.scorers.hps import HPSConfig
from sr_ray.eval.scorers.imagereward import ImageRewardConfig
from sr_ray.eval.scorers.pickscore import PickScoreConfig
from sr_ray.eval.scorers.random_scorer import RandomScorerConfig
from sr_ray.eval.scorers.social_reward import SocialRewardConfig

BUILTIN: dict[str, str] = {
    "social_reward": "sr_ray.eval.scorers.social_reward:build",
    "clip": "sr_ray.eval.scorers.clip:build",
    "laion_aesthetic": "sr_ray.eval.scorers.aesthetic:build",
    "pickscore": "sr_ray.eval.scorers.pickscore:build",
    "hpsv2": "sr_ray.eval.scorers.hps:build",
    "hpsv21": "sr_ray.eval.scorers.hps:build",
    "imagereward": "sr_ray.eval.scorers.imagereward:build",
    "random": "sr_ray.eval.scorers.random_scorer:build",
}

PAPER_METRICS = ["social_reward", "clip", "laion_aesthetic", "hpsv2", "imagereward", "pickscore"]
"""The six metric columns of the paper's Tables 5-6, in its order."""


@dataclass
class ScorerSettings:
    """Every built-in scorer's settings (a section each), shared by the comparison and the T2I evaluation."""

    social_reward: SocialRewardConfig = field(default_factory=SocialRewardConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    laion_aesthetic: AestheticConfig = field(default_factory=AestheticConfig)
    pickscore: PickScoreConfig = field(default_factory=PickScoreConfig)
    hpsv2: HPSConfig = field(default_factory=lambda: HPSConfig(version="2.0"))
    hpsv21: HPSConfig = field(default_factory=lambda: HPSConfig(version="2.1"))
    imagereward: ImageRewardConfig = field(default_factory=ImageRewardConfig)
    random: RandomScorerConfig = field(default_factory=RandomScorerConfig)
    plugins: dict[str, dict] = field(default_factory=dict)
    """Options of scorers named by import path: {"pkg.module:factory": {...}}."""
    bf16: bool = True
    """bf16 autocast on GPUs."""

    def scorer_settings(self) -> ScorerSettings:
        """Just these sections, from a job config that extends this class (what crosses into actors)."""
        return ScorerSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ScorerSettings)})


def check_names(names: list[str], key: str) -> None:
    """Each name built in or an importable ``module:factory`` (checked before Ray starts), named once."""
    if not names:
        raise ValueError(f"{key}: name at least one scorer")
    if len(set(names)) != len(names):
        raise ValueError(f"{key}: {names} names a scorer twice")
    for n in names:
        if n not in BUILTIN:
            if ":" not in n:
                raise ValueError(f"{key}: unknown scorer {n!r}; built in: {sorted(BUILTIN)}, or a "
                                 f"'package.module:factory' import path")
            factory(n)


def factory(name: str):
    """The factory of a built-in name or an import path ``module:attr``."""
    path = BUILTIN.get(name, name)
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"scorer {name!r}: cannot import {path} ({type(e).__name__}: {e})") from None


def make_scorer(name: str, settings: ScorerSettings, device: str | None = None, batch_size: int = 32) -> Scorer:
    """Build one scorer (once per process: call it in an actor's constructor)."""
    make = factory(name)
    if name in BUILTIN:
        scorer = make(getattr(settings, name), device, batch_size, settings.bf16)
    else:
        scorer = make(dict(settings.plugins.get(name, {})), device)
    scorer.name = name
    return scorer


def scorer_kwargs(settings: ScorerSettings) -> dict[str, Any]:
    """The settings as a plain dict (what crosses into Ray actors)."""
    return to_dict(settings)


def weights_fingerprint(section: dict[str, Any], endpoint: str | None = None) -> dict[str, str]:
    """For every setting of a scorer's section that names a local path or an ``s3://`` object: a fingerprint of
    its files (names, sizes, modification times). A result recorded with it is not reused once the weights at
    that path change (a re-trained checkpoint, a replaced file)."""
    out = {}
    for key, value in section.items():
        if not isinstance(value, str):
            continue
        local = os.path.expanduser(value)
        if storage.is_s3(value) or os.path.exists(local):
            try:
                out[key] = identity.folder_fingerprint(value if storage.is_s3(value) else local, endpoint)
            except (OSError, ValueError) as e:  # unreadable now: the scorer will say so when it loads
                out[key] = f"unreadable: {type(e).__name__}"
    return out
