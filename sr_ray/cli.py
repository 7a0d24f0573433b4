"""Shared command-line handling of the jobs: ``--config FILE`` plus ``key=value`` overrides."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence, TypeVar

from sr_ray.config import ConfigError, load_config

T = TypeVar("T")


def parse_job_args(cls: type[T], argv: Sequence[str] | None, default_config: Path | None, doc: str) -> T:
    """``[--config FILE] [key=value ...]`` -> config; exits with status 2 and the key named on a bad one."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(default_config) if default_config else None,
                        help=f"YAML config (default: {default_config})")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4 data.train=s3://b/t")
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"config error: {e}\n")


def setup_logging() -> None:
    """sr_ray's progress at INFO on stderr; other libraries (open_clip logs to root) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("sr_ray").setLevel(logging.INFO)


def print_summary(summary: dict[str, Any]) -> None:
    """The job's last stdout line: one JSON object."""
    sys.stdout.flush()
    print(json.dumps(summary, default=str), flush=True)


def run_job(cls: type[T], fn, argv: Sequence[str] | None, default_config: Path | None, doc: str,
            table=None) -> dict[str, Any]:
    """The whole life of a job script: logging, config, ``fn(cfg)``, the JSON summary as the last line.

    ``table``: a benchmark's ``format_table(result)``, printed before the summary.

    A :class:`~sr_ray.data.DataError` (bad input) ends the job with its message and status 1;
    a :class:`ConfigError` found by the job's own checks, with status 2 as a bad key on the command line.
    """
    from sr_ray.data import DataError

    setup_logging()
    cfg = parse_job_args(cls, argv, default_config, doc)
    try:
        summary = fn(cfg)
    except DataError as e:
        sys.exit(f"data error: {e}")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    if table is not None:
        print(table(summary), flush=True)
    print_summary(summary)
    return summary
