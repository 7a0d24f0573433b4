"""Pairwise preference test sets: sr-ray's triplet contract, and importers for the peers' public test sets.

A test set is Parquet in the triplet contract, either form:

- packed: ``prompt``, ``pos_image``, ``neg_image`` (encoded image bytes);
- paths (the authors' form): ``prompt``, ``pos_path``, ``neg_path`` (local or ``s3://`` URIs, or paths
  relative to ``image_root``);

optionally with ``pos_id``/``neg_id`` and ``tie`` (bool: the raters saw no difference; such pairs are kept,
marked, and left out of accuracy). Importers turn the peers' formats into it, naming the file, row and field
of anything malformed:

| kind | source | pairs |
| --- | --- | --- |
| ``pickapic`` | Pick-a-Pic v2 Parquet: ``caption``, ``jpg_0``, ``jpg_1``, ``label_0``, ``label_1`` | one per row; ``label_0 == label_1`` is a tie |
| ``hpdv2`` | HPD v2 ``test.json``: ``prompt``, ``image_path`` (list), ``rank`` (list, 1 = best) | every two images of different rank |
| ``imagereward`` | ImageReward ``test.json``: ``id``, ``prompt``, ``generations`` (list), ``ranking`` (list, 1 = best) | every two images of different rank |
| ``authors`` | the authors' CSV: ``prompt``, ``pos_path``, ``neg_path`` | one per row |

Images of the JSON and CSV sets stay where they are (paths form, resolved against ``image_root``, by
default the JSON's own folder or its ``images/`` sibling); Pick-a-Pic's bytes are packed.
"""

from __future__ import annotations

import json
import logging
from itertools import combinations
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from sr_ray.core import storage
from sr_ray.core.errors import DataError

log = logging.getLogger(__name__)

KINDS = ("triplets", "pickapic", "hpdv2", "imagereward", "authors")
PICKAPIC = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


def set_name(uri: str, with_parent: bool = False) -> str:
    """A test set's name: the folder's or file's stem (``s3://b/picsart/test`` -> ``test``); ``with_parent``
    prefixes the parent folder (``picsart_test``), for sets whose stems collide."""
    p = PurePosixPath(uri.rstrip("/").split("://")[-1])
    stem = p.stem if p.suffix in (".parquet", ".json", ".csv") else p.name
    return f"{p.parent.name}_{stem}" if with_parent and p.parent.name else stem


def set_names(uris: list[str]) -> list[str]:
    """Names of several sets: stems, parent-prefixed where two stems are equal; still equal: an error."""
    stems = [set_name(u) for u in uris]
    names = [set_name(u, stems.count(s) > 1) for u, s in zip(uris, stems)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"test: several sets would be named {twice}: give sets distinct folder or file names")
    return names


def detect(uri: str, endpoint: str | None = None) -> str:
    """The kind of a test set: by suffix and, for JSON and Parquet, by its fields."""
    if uri.endswith(".csv"):
        return "authors"
    if uri.endswith(".json"):
        items = _json_items(uri, endpoint)
        first = items[0] if items else {}
        return "imagereward" if "generations" in first else "hpdv2"
    files = storage.list_files(uri, endpoint=endpoint) if not uri.endswith(".parquet") else [uri]
    if not files:
        raise DataError(f"test set {storage.redact(uri)}: no Parquet, JSON or CSV file there")
    fs, _ = storage.resolve(files[0], endpoint)
    with fs.open_input_file(storage.resolve(files[0], endpoint)[1]) as f:
        names = set(pq.ParquetFile(f).schema_arrow.names)
    return "pickapic" if set(PICKAPIC) <= names else "triplets"


def _json_items(uri: str, endpoint: str | None) -> list[dict]:
    try:
        items = json.loads(storage.read_bytes(uri, endpoint))
    except (OSError, ValueError) as e:
        raise DataError(f"{storage.redact(uri)}: not a readable JSON file ({e})") from None
    if not isinstance(items, list):
        raise DataError(f"{storage.redact(uri)}: expected a JSON list of items, got {type(items).__name__}")
    return items


def ranked_pairs(uri: str, items: list[dict], images_key: str, rank_key: str) -> dict[str, list]:
    """Every two images of one item with different ranks -> (prompt, better, worse) columns (1 = best)."""
    cols: dict[str, list] = {"prompt": [], "pos_path": [], "neg_path": [], "pos_id": [], "neg_id": [], "tie": []}
    for i, item in enumerate(items):
        where = f"{storage.redact(uri)} item {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: not an object")
        for key in ("prompt", images_key, rank_key):
            if key not in item:
                raise DataError(f"{where}: no field {key!r} (has {sorted(item)})")
        imgs, ranks, prompt = item[images_key], item[rank_key], item["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"{where}: field 'prompt' is not a non-empty string")
        if not isinstance(imgs, list) or not isinstance(ranks, list) or len(imgs) != len(ranks):
            raise DataError(f"{where}: fields {images_key!r} and {rank_key!r} must be lists of one length")
        for j, r in enumerate(ranks):
            if isinstance(r, bool) or not isinstance(r, (int, float)):
                raise DataError(f"{where}: field {rank_key!r}[{j}] = {r!r} is not a number")
        for a, b in combinations(range(len(imgs)), 2):
            if ranks[a] == ranks[b]:
                continue  # the raters did not order them: no pair
            hi, lo = (a, b) if ranks[a] < ranks[b] else (b, a)
            cols["prompt"].append(prompt)
            cols["pos_path"].append(str(imgs[hi]))
            cols["neg_path"].append(str(imgs[lo]))
            cols["pos_id"].append(f"{item.get('id', i)}:{hi}")
            cols["neg_id"].append(f"{item.get('id', i)}:{lo}")
            cols["tie"].append(False)
    return cols


def _absolute(cols: dict[str, list], image_root: str) -> None:
    for k in ("pos_path", "neg_path"):
        cols[k] = [p if storage.is_absolute(p) else storage.join(image_root, p) for p in cols[k]]


def default_image_root(uri: str, kind: str) -> str:
    """Where a JSON set's relative image paths point by default: HPD v2's ``test/`` folder beside
    ``test.json``, ImageReward's ``test_images/`` beside ``test.json``."""
    parent = uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri else "."
    return storage.join(parent, {"hpdv2": "test", "imagereward": "test_images"}.get(kind, ""))


def import_json(uri: str, kind: str, image_root: str | None, endpoint: str | None) -> pa.Table:
    keys = {"hpdv2": ("image_path", "rank"), "imagereward": ("generations", "ranking")}[kind]
    cols = ranked_pairs(uri, _json_items(uri, endpoint), *keys)
    _absolute(cols, image_root or default_image_root(uri, kind))
    return pa.table(cols)


def import_authors_csv(uri: str, image_root: str | None, endpoint: str | None) -> pa.Table:
    import io

    import pandas as pd

    try:
        df = pd.read_csv(io.BytesIO(storage.read_bytes(uri, endpoint)), dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{storage.redact(uri)}: not a readable CSV file ({e})") from None
    lacking = [c for c in ("prompt", "pos_path", "neg_path") if c not in df.columns]
    if lacking:
        raise DataError(f"{storage.redact(uri)}: lacks column(s) {lacking}; has {list(df.columns)}")
    for c in ("prompt", "pos_path", "neg_path"):
        empty = df.index[df[c].str.len() == 0]
        if len(empty):
            raise DataError(f"{storage.redact(uri)} row {int(empty[0]) + 2}: field {c!r} is empty")
    cols = {c: list(df[c]) for c in ("prompt", "pos_path", "neg_path")}
    root = image_root or (uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri else ".")
    _absolute(cols, root)
    cols["tie"] = [False] * len(df)
    return pa.table(cols)


def import_pickapic(uri: str, endpoint: str | None) -> pa.Table:
    """Pick-a-Pic v2 rows -> packed pairs: the image with the larger label is positive; equal labels: a tie."""
    files = [uri] if uri.endswith(".parquet") else storage.list_files(uri, endpoint=endpoint)
    out = []
    for f in files:
        fs, path = storage.resolve(f, endpoint)
        with fs.open_input_file(path) as fh:
            t = pq.read_table(fh)
        lacking = [c for c in PICKAPIC if c not in t.column_names]
        if lacking:
            raise DataError(f"{storage.redact(f)}: lacks Pick-a-Pic field(s) {lacking}")
        d = t.select(list(PICKAPIC) + [c for c in ("image_0_uid", "image_1_uid", "has_label")
                                      if c in t.column_names]).to_pydict()
        out.append(_pickapic_rows(f, d))
    return pa.concat_tables(out) if out else pa.table({})


def _pickapic_rows(f: str, d: dict) -> pa.Table:
    cols: dict[str, list] = {"prompt": [], "pos_image": [], "neg_image": [], "pos_id": [], "neg_id": [], "tie": []}
    skipped = 0
    for i in range(len(d["caption"])):
        if d.get("has_label") is not None and d["has_label"][i] is False:
            skipped += 1
            continue
        l0, l1 = d["label_0"][i], d["label_1"][i]
        if l0 is None or l1 is None:
            raise DataError(f"{storage.redact(f)} row {i}: label_0/label_1 is null")
        if not d["caption"][i]:
            raise DataError(f"{storage.redact(f)} row {i}: field 'caption' is empty")
        first = l0 >= l1
        ids = (d.get("image_0_uid") or [f"{i}:0"] * (i + 1))[i], (d.get("image_1_uid") or [f"{i}:1"] * (i + 1))[i]
        cols["prompt"].append(d["caption"][i])
        cols["pos_image"].append(d["jpg_0"][i] if first else d["jpg_1"][i])
        cols["neg_image"].append(d["jpg_1"][i] if first else d["jpg_0"][i])
        cols["pos_id"].append(str(ids[0] if first else ids[1]))
        cols["neg_id"].append(str(ids[1] if first else ids[0]))
        cols["tie"].append(bool(l0 == l1))
    if skipped:
        log.info("[preference sets] %s: %d unlabelled rows skipped", storage.redact(f), skipped)
    return pa.table({k: pa.array(v, pa.binary() if k.endswith("_image") else None) for k, v in cols.items()})


def import_set(uri: str, kind: str | None = None, image_root: str | None = None,
               endpoint: str | None = None) -> pa.Table:
    """A peer's test set as a triplet-contract table (paths or packed form, with ``tie``)."""
    kind = kind or detect(uri, endpoint)
    if kind in ("hpdv2", "imagereward"):
        return import_json(uri, kind, image_root, endpoint)
    if kind == "authors":
        return import_authors_csv(uri, image_root, endpoint)
    if kind == "pickapic":
        return import_pickapic(uri, endpoint)
    raise ValueError(f"kind={kind!r}: one of {KINDS[1:]} (triplet Parquet needs no import)")
