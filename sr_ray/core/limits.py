"""What an input may be before a job refuses it: image pixels, bytes and shape, prompt length.

Every job that reads images or prompts has a ``limits`` section with these keys (training: ``data.limits``).
A row beyond a limit is a *bad row*: skipped, counted and named with its reason, never a crash and never
silently dropped; the job fails only when too many rows are bad (each job's ``max_*_rate``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class InputLimits:
    max_pixels: int = 50_000_000
    """Largest width x height decoded (a 48 MP photo fits); checked from the header, before any pixel is decoded,
    so a decompression bomb (a tiny PNG declaring 50000x50000) costs nothing."""
    max_image_bytes: int = 50_000_000
    """Largest encoded image, in bytes."""
    max_aspect_ratio: float = 20.0
    """Longest side / shortest side: a 65000x8 strip would cost seconds and ~1 GB to resize to CLIP's input."""
    min_image_side: int = 8
    """Shortest side in pixels (a 1x1 image carries nothing to score)."""
    max_prompt_chars: int = 10_000
    """Longest prompt in characters (CLIP reads the first 77 tokens; real prompts are well under 2,000)."""

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_image_bytes < 1 or self.min_image_side < 1 or self.max_prompt_chars < 1:
            raise ValueError("limits.max_pixels, max_image_bytes, min_image_side and max_prompt_chars must be >= 1")
        if self.max_aspect_ratio < 1:
            raise ValueError("limits.max_aspect_ratio must be >= 1")


DEFAULT_LIMITS = InputLimits()

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def prompt_problem(prompt, limits: InputLimits = DEFAULT_LIMITS) -> str | None:
    """Why ``prompt`` cannot be used (a reason for the bad-row count), or None when it can."""
    if prompt is None:
        return "null prompt"
    if not isinstance(prompt, str):
        return f"prompt is {type(prompt).__name__}, not text"
    if len(prompt) > limits.max_prompt_chars:
        return f"prompt of {len(prompt)} characters exceeds limits.max_prompt_chars={limits.max_prompt_chars}"
    if not clean_prompt(prompt).strip():
        return "empty prompt"
    return None


def clean_prompt(prompt: str) -> str:
    """Control characters (NUL, escape, ...) read as spaces: ``"a\\x00cat"`` is ``"a cat"``, not ``"acat"``."""
    return _CONTROL.sub(" ", prompt)
