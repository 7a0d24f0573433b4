"""What a resumable output was made from, so that a re-run resumes only the same work.

Every job that resumes (a training run, a scores folder, a curated folder) writes a small JSON record of
its identity (the settings that decide its content and the identity of its inputs: URI, size and
modification time of every file, or a content hash of a checkpoint) beside its output. A re-run compares
the record with what it was asked to do: the same -> resume; anything else -> a :class:`ConfigError` naming
the keys that differ, unless the job's ``overwrite`` is set (then the old output is deleted first).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import pyarrow.fs as pafs

from sr_ray.core import storage
from sr_ray.core.errors import ConfigError


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two nested records (missing on one side counts)."""
    a, b = flatten(json.loads(json.dumps(old, default=str))), flatten(json.loads(json.dumps(new, default=str)))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def config_identity(cfg_dict: Mapping[str, Any], operational) -> dict[str, Any]:
    """A job config as dotted keys, less the ``operational`` ones (where and how fast it runs, how it reports):
    what a resumed run must have unchanged. ``run.name`` and ``run.storage_path`` name the run itself."""
    drop = set(operational) | {"run.name", "run.storage_path"}
    return {k: v for k, v in flatten(cfg_dict).items() if k not in drop}


def describe(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def read_record(uri: str, endpoint: str | None = None) -> dict[str, Any] | None:
    if not storage.exists(uri, endpoint):
        return None
    try:
        return json.loads(storage.read_bytes(uri, endpoint))
    except (ValueError, OSError):
        return {}  # unreadable: differs from anything, so the caller refuses rather than guesses


def write_record(uri: str, record: Mapping[str, Any], endpoint: str | None = None) -> None:
    storage.write_text(uri, json.dumps(record, indent=1, sort_keys=True, default=str), endpoint)


def same_settings(folder: str, record_name: str, settings: Mapping[str, Any], what: str,
                  endpoint: str | None = None, write: bool = True) -> dict[str, Any] | None:
    """One folder, one set of settings (a fine-tune set's, a generations folder's): ``settings`` are recorded in
    ``<folder>/<record_name>`` the first time (``write``); a later run into the folder whose settings differ is
    refused, naming the keys. Returns the earlier record (None for a new folder); its other keys are the
    caller's (generation keeps per-model fingerprints there)."""
    marker = storage.join(folder, record_name)
    before = read_record(marker, endpoint)
    if before is not None:
        diff = differing_keys({k: before.get(k) for k in settings}, settings)
        if diff:
            raise ConfigError(f"out={storage.redact(folder)} holds {what} made with other settings or inputs "
                              f"({describe(diff)} differ); choose another out or delete it")
    elif write:
        write_record(marker, settings, endpoint)
    return before


def content_hash(path: str) -> str:
    """sha256 of a local file's bytes (a checkpoint: a re-trained one at the same path hashes differently)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_fingerprint(uri: str, endpoint: str | None = None) -> str:
    """A hash of the names, sizes and modification times of the files under ``uri`` (local or s3://)."""
    fs, path = storage.resolve(uri, endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        infos = [("", info.size, info.mtime_ns or 0)]
    else:
        infos = sorted((i.path[len(path):], i.size, i.mtime_ns or 0) for i in fs.get_file_info(
            pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File)
    return "files:" + hashlib.sha256(json.dumps(infos).encode()).hexdigest()[:16]


def delete_tree(uri: str, endpoint: str | None = None) -> None:
    """Remove a folder (local or s3://) and everything under it; nothing when it does not exist."""
    fs, path = storage.resolve(uri, endpoint)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def has_files(uri: str, endpoint: str | None = None, ignore: Iterable[str] = ()) -> bool:
    """Whether ``uri`` is a folder holding any file (other than the names in ``ignore``)."""
    fs, path = storage.resolve(uri, endpoint)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    skip = set(ignore)
    return any(i.type == pafs.FileType.File and i.path[len(path):].lstrip("/") not in skip
               for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)))


def claim(folder: str, record_name: str, identity: Mapping[str, Any], key: str, override: str, overwrite: bool,
          endpoint: str | None = None, fresh_ok: Iterable[str] = ()) -> bool:
    """Tie ``folder`` to ``identity``; returns True when it resumes earlier work of the same identity.

    - no record and nothing in the folder (but the names in ``fresh_ok``): a new output, record written;
    - the same record: resume;
    - another record, or files without one (an older sr-ray, or someone else's folder): ConfigError naming
      what differs, unless ``overwrite`` -> the folder is deleted and started afresh.
    ``key`` names the config key that chose the folder (``run.name=r1``, ``out=s3://b/scores``), ``override``
    the setting that allows starting again (``run.overwrite=true``); the refusal names both.
    """
    marker = storage.join(folder, record_name)
    old = read_record(marker, endpoint)
    if old is not None and not differing_keys(old, identity):
        return True
    if old is None and not has_files(folder, endpoint, ignore=fresh_ok):
        write_record(marker, identity, endpoint)
        return False
    if not overwrite:
        if old is None:
            why = "files that no sr-ray record describes"
        else:
            why = f"work made from other settings or inputs ({describe(differing_keys(old, identity))} differ)"
        raise ConfigError(f"{key}: {storage.redact(folder)} holds {why}; re-run with the same settings and "
                          f"inputs to resume it, choose another {key.split('=')[0]}, or set {override} to delete "
                          f"it and start again")
    delete_tree(folder, endpoint)
    write_record(marker, identity, endpoint)
    return False
