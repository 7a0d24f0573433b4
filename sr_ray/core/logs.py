"""Logging as the jobs and their Ray workers use it."""

from __future__ import annotations

import logging
import sys


def setup_logging() -> None:
    """sr_ray's progress at INFO on stderr; other libraries (open_clip logs to root) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("sr_ray").setLevel(logging.INFO)
