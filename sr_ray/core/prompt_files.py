"""Prompts from the files users have: one prompt file (``.txt``: a prompt per line, blank lines and ``#``
comments skipped; ``.csv``/``.tsv``/``.parquet``/``.jsonl`` with a prompt column), or a folder of Parquet
files with a ``prompt`` column (a triplet split, a platform log), local or ``s3://``.

Only the prompt column of a Parquet folder is read, so a triplet split's image bytes never leave the disk.
A file or folder without a prompt column, or with no prompt at all, is a ConfigError naming it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sr_ray.core import storage
from sr_ray.core.errors import ConfigError

PROMPT_COLUMNS = ("prompt", "Prompt", "PROMPT", "caption", "text")
"""The columns taken as the prompt, first match wins."""
FILE_FORMATS = (".txt", ".csv", ".tsv", ".parquet", ".jsonl")


def _prompt_column(columns, uri: str, what: str) -> str:
    col = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if col is None:
        raise ConfigError(f"{what}: {storage.redact(uri)} has no prompt column (one of {PROMPT_COLUMNS}); "
                          f"columns: {list(columns)}")
    return col


def _clean(values, uri: str, what: str) -> list[str]:
    prompts = [str(p).strip() for p in values if p is not None and str(p).strip()]
    if not prompts:
        raise ConfigError(f"{what}: {storage.redact(uri)} holds no prompts")
    return prompts


def read_prompt_file(uri: str, endpoint: str | None = None, what: str = "prompts") -> list[str]:
    """The prompts of one file, in file order (duplicates kept); ConfigError naming the file when it has none
    or no prompt column. ``what`` names the config key in the error."""
    data = storage.read_bytes(uri, endpoint)
    suffix = Path(uri).suffix.lower()
    if suffix in (".txt", ""):
        lines = (s.strip() for s in data.decode("utf-8").splitlines())
        return _clean([s for s in lines if not s.startswith("#")], uri, what)
    import pandas as pd

    if suffix in (".csv", ".tsv"):
        text = io.StringIO(data.decode("utf-8"))
        df = pd.DataFrame(list(csv.DictReader(text, delimiter="\t" if suffix == ".tsv" else ",")))
    elif suffix == ".parquet":
        df = pd.read_parquet(io.BytesIO(data))
    elif suffix == ".jsonl":
        df = pd.read_json(io.BytesIO(data), lines=True)
    else:
        raise ConfigError(f"{what}: {storage.redact(uri)}: unknown format {suffix} ({', '.join(FILE_FORMATS)}, "
                          f"or a folder of Parquet files)")
    return _clean(df[_prompt_column(df.columns, uri, what)].dropna(), uri, what)


def read_prompts(uri: str, endpoint: str | None = None, what: str = "prompts") -> list[str]:
    """The prompts of a prompt file or a Parquet folder (a triplet split, a platform log), in storage order."""
    fs, path = storage.resolve(uri, endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{what}: {storage.redact(uri)} does not exist")
    if info.type == pafs.FileType.File:
        return read_prompt_file(uri, endpoint, what)
    files = storage.list_files(uri, endpoint=endpoint)
    if not files:
        raise ConfigError(f"{what}: {storage.redact(uri)} is a folder with no Parquet file (a triplet split or "
                          f"platform log has part-*.parquet files)")
    prompts: list[str] = []
    for f in files:
        shown = storage.to_uri(f, storage.is_s3(uri))
        with fs.open_input_file(f) as fh:
            pf = pq.ParquetFile(fh)
            col = _prompt_column(pf.schema_arrow.names, shown, what)
            prompts += pf.read(columns=[col]).column(col).to_pylist()
    return _clean(prompts, uri, what)
