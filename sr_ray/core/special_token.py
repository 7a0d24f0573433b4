"""The special token that marks the worst image of a prompt in the fine-tune set (the paper's "t@y quality"),
and the one place it is recorded.

``select_pairs`` writes the token beside the fine-tune set (``finetune_set.json``). ``finetune_sd`` reads it
from there (its samples' negative prompt) and writes it into the pipeline it saves (``<pipeline>/sr_ray.json``).
``generate`` and ``evaluate_t2i`` read it from that pipeline and use it as the negative prompt. An explicit
setting that disagrees with the record is refused; nothing else keeps a default of its own.
"""

from __future__ import annotations

import json

from sr_ray.core import storage
from sr_ray.core.errors import ConfigError

DEFAULT = "t@y quality"
SET_FILE = "finetune_set.json"
"""Beside a fine-tune set's shards: {"special_token": ...}."""
PIPELINE_FILE = "sr_ray.json"
"""Inside a fine-tuned diffusers pipeline folder: {"special_token": ...}."""
HELD_OUT_FILE = "internal.jsonl"
"""Beside a fine-tune set's shards: the prompts selection held out of it (``{"prompt": ...}`` lines), which
``evaluate_t2i`` uses as the internal prompt set of a run trained on that set (the other side file)."""


def write(folder: str, name: str, token: str, endpoint: str | None = None) -> None:
    storage.write_text(storage.join(folder, name), json.dumps({"special_token": token}) + "\n", endpoint)


def read(folder: str, name: str, endpoint: str | None = None) -> str | None:
    """The token recorded in ``<folder>/<name>``; None when there is no record (a hub id, a built-in model, a
    fine-tune set made elsewhere)."""
    uri = storage.join(folder, name)
    try:
        if not storage.exists(uri, endpoint):
            return None
        return json.loads(storage.read_bytes(uri, endpoint))["special_token"]
    except (OSError, ValueError, KeyError):
        return None


def resolve(explicit: str | None, recorded: str | None, key: str, where: str) -> str:
    """The token to use: the record's, unless ``explicit`` is set; an explicit one that differs from the
    record is a ConfigError naming both."""
    if explicit is None:
        return recorded or DEFAULT
    if recorded is not None and explicit != recorded:
        raise ConfigError(f"{key}={explicit!r} but {where} records the special token {recorded!r}; leave {key} "
                          f"unset to use it")
    return explicit
