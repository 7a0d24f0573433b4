"""The two errors a job ends with instead of a traceback (``run_job`` turns them into a message and a status).

Both carry a message that names what is wrong (the config key, or the file / row / column) and never a
credential: URIs in messages go through :func:`sr_ray.core.storage.redact`.
"""

from __future__ import annotations


class _JobError(ValueError):
    def __init__(self, message: str):
        super().__init__(message)
        # Ray's task retry wrapper appends its own advice to args[0]; the message a user reads is this one
        self.message = str(message)

    def __str__(self) -> str:
        return self.message


class ConfigError(_JobError):
    """A config key or value is wrong; the message names the dotted key. Exit status 2."""


class DataError(_JobError):
    """Bad input data; the message names the split, file, column or row. Exit status 1."""
