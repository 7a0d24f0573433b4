"""Shared command-line handling of the jobs: ``--config FILE`` plus ``key=value`` overrides."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence, TypeVar

from sr_ray.core.config import ConfigError, load_config, preset_path
from sr_ray.core.logs import setup_logging
from sr_ray.core.parquet import data_error_of

T = TypeVar("T")


def parse_job_args(cls: type[T], argv: Sequence[str] | None, default_config: Path | None, doc: str,
                   job: str | None = None) -> T:
    """``[--config PRESET|FILE] [key=value ...]`` -> config (a bare name is one of ``job``'s presets); exits with
    status 2 and the key named on a bad one."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(default_config) if default_config else None,
                        help=f"a preset's name (e.g. paper) or a YAML file (default: {default_config})")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4 data.train=s3://b/t")
    args = parser.parse_args(argv)
    config = args.config
    if config and job and not Path(config).is_file() and "/" not in config and "." not in config:
        try:  # a preset's name: one of this job's presets
            config = preset_path(job, config)
        except ConfigError as e:
            parser.exit(2, f"config error: --config {args.config}: no such file, and {e}\n")
    try:
        return load_config(cls, config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"config error: {e}\n")


def print_summary(summary: dict[str, Any], stream=None) -> None:
    """The job's last stdout line: one JSON object."""
    sys.stdout.flush()
    print(json.dumps(summary, default=str), file=stream or sys.stdout, flush=True)


def reserve_stdout():
    """Keep the real stdout for the job's results and send everything else written to fd 1 to stderr.

    Ray prints worker output and its own warnings to the driver's stdout from background threads, at any
    time, even after the job's summary (seen: a raylet warning after a killed driver's summary). With fd 1
    pointing at stderr from the start, the stream returned here (the original stdout) carries only what the
    job prints on purpose, so its last line is always the JSON summary. (When sys.stdout is not the
    process's own, e.g. a test capturing it, it is left as it is.)
    """
    if sys.stdout is not sys.__stdout__:
        return sys.stdout
    sys.stdout.flush()
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return results


def run_job(cls: type[T], fn, argv: Sequence[str] | None, default_config: Path | None, doc: str,
            table=None, job: str | None = None) -> dict[str, Any]:
    """The whole life of a job script: logging, config, ``fn(cfg)``, the JSON summary as the last line.

    ``table``: a benchmark's ``format_table(result)``, printed before the summary. ``job``: the job's name, so
    ``--config`` can name one of its presets.

    A :class:`~sr_ray.reward.data.DataError` (bad input) ends the job with its message and status 1;
    a :class:`ConfigError` found by the job's own checks, with status 2 as a bad key on the command line.
    """
    setup_logging()
    cfg = parse_job_args(cls, argv, default_config, doc, job)
    results = reserve_stdout()
    try:
        summary = fn(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # bad data, possibly raised in a Ray task and wrapped: its message, not a traceback
        err = data_error_of(e)
        if err is None:
            raise
        sys.exit(f"data error: {err}")  # to stderr, status 1
    if table is not None:
        print(table(summary), file=results, flush=True)
    print_summary(summary, results)
    return summary
