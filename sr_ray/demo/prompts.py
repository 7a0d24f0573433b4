"""The demo's two small prompt sets for generation and T2I evaluation: "internal" (phrased like the demo
community's prompts) and "general" (another phrasing)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sr_ray.core import images
from sr_ray.core.config import to_dict
from sr_ray.demo.community import CommunityConfig, config_hash, simulate
from sr_ray.demo.data import SUBJECTS, cached_dir, draw_prompt

DEMO_SETS = {
    # like the demo community's prompts ("internal") and a different phrasing ("general")
    "internal": lambda rng: _demo_internal(rng),
    "general": lambda rng: _demo_general(rng),
}


def _demo_internal(rng: np.random.Generator) -> str:
    return draw_prompt(rng)[0]


def _demo_general(rng: np.random.Generator) -> str:
    return (f"a photo of a {rng.choice(list(images.COLOURS))} {rng.choice(SUBJECTS)} "
            f"on a {rng.choice(['white', 'grey', 'black'])} background")


def demo_prompt_sets(n: int = 12, seed: int = 0) -> dict[str, list[str]]:
    """Two small demo prompt sets (distinct prompts, fixed order)."""
    out = {}
    for k, (name, draw) in enumerate(DEMO_SETS.items()):
        rng, seen = np.random.default_rng(seed + k), []
        while len(seen) < n:
            p = draw(rng)
            if p not in seen:
                seen.append(p)
        out[name] = seen
    return out


def ensure_demo_prompt_files(cache_dir: str = "~/.cache/sr-ray/demo", n: int = 12, seed: int = 0) -> dict[str, str]:
    """The demo prompt sets written (once) as ``<set>.txt`` files, one prompt per line: {set name: file}.

    The jobs that read prompt files (generate, evaluate_t2i) are given these when no file is named."""
    root = Path(os.path.expanduser(cache_dir)) / f"prompts-n{n}-s{seed}"
    sets = demo_prompt_sets(n, seed)

    def write(tmp: Path) -> None:
        for name, prompts in sets.items():
            (tmp / f"{name}.txt").write_text("\n".join(prompts) + "\n")

    cached_dir(root, write, {"n": n, "seed": seed}, "demo prompt sets")
    return {name: str(root / f"{name}.txt") for name in sets}


COMMUNITY_PROMPT_IMAGES = 80_000
"""Platform-log rows of the community whose prompts the prompt analysis compares (~6.6K distinct prompts:
more than the paper's 6,000 per dataset)."""


def ensure_community_log(cache_dir: str = "~/.cache/sr-ray/demo", images_n: int = COMMUNITY_PROMPT_IMAGES,
                         seed: int = 0) -> str:
    """The simulated community's platform log (log only, no images), written once: its ``log/`` folder."""
    cfg = CommunityConfig(seed=seed, images=images_n, write_images=False)
    root = Path(os.path.expanduser(cache_dir)) / f"community-log-{config_hash(to_dict(cfg))}"
    return simulate(cfg, str(root))
