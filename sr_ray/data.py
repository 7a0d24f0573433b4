"""Triplet data in: checks before the cluster works, and the Ray Data pipeline.

Two forms are read (column names are the interface, see ARCHITECTURE.md):
packed ``prompt, pos_image, neg_image`` (encoded image bytes) and the authors'
``prompt, pos_path, neg_path`` (image URIs: local, s3://, or relative to
``data.image_root``). :func:`preflight` checks every configured split on the
driver (files exist, columns, row count, a decode sample) so bad input fails
with a message naming the file, column or row before any training starts.
:func:`triplet_dataset` is the lazy, streaming Ray Dataset that decodes and
applies the model's own CLIP preprocessing in ``map_batches`` on CPU workers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq

from sr_ray import images, storage
from sr_ray.demo import DemoConfig

log = logging.getLogger(__name__)

PACKED = ("pos_image", "neg_image")
PATHS = ("pos_path", "neg_path")


class DataError(ValueError):
    """Bad input data; the message names the split, file, column or row."""


@dataclass
class ParquetInput:
    path: str     # the filesystem's own path
    rows: int
    schema: Any   # pyarrow.Schema


def parquet_inputs(uri: str, what: str, need: Sequence[str], one_of: Sequence[str] = (),
                   binary: Sequence[str] = (), endpoint: str | None = None, expected: str = "") -> list[ParquetInput]:
    """The Parquet files under ``uri`` with their rows and schema, from the footers, each checked before Ray
    starts: ``need`` columns present, at least one of ``one_of``, ``binary`` columns (where present) bytes.
    Errors name ``what``, the file and the column; ``expected`` describes the contract in them."""
    try:
        paths = storage.list_files(uri, endpoint=endpoint)
    except FileNotFoundError:
        raise DataError(f"{what}={uri}: no such file or folder") from None
    if not paths:
        raise DataError(f"{what}={uri}: no .parquet files there")
    fs, _ = storage.resolve(uri, endpoint)
    out = []
    for p in paths:
        try:
            with fs.open_input_file(p) as f:
                meta = pq.ParquetFile(f)
                schema, rows = meta.schema_arrow, meta.metadata.num_rows
        except Exception as e:
            raise DataError(f"{what}: {p} is not a readable Parquet file ({e})") from None
        cols = schema.names
        lacking = [c for c in need if c not in cols]
        if one_of and not any(c in cols for c in one_of):
            lacking.append(" or ".join(one_of))
        if lacking:
            raise DataError(f"{what}: {p} lacks column(s) {lacking}; {expected + '; ' if expected else ''}has {cols}")
        for c in binary:
            if c in cols and not str(schema.field(c).type).startswith(("binary", "large_binary")):
                raise DataError(f"{what}: {p} column {c} is {schema.field(c).type}, expected binary")
        out.append(ParquetInput(p, rows, schema))
    return out


@dataclass
class DataConfig:
    train: str | None = None
    """Train split: a folder or file of Parquet shards, local or s3://. Null: the demo data."""
    val: str | None = None
    """Validation split (pairwise accuracy every epoch). Null with the demo: the demo's val split."""
    test: str | None = None
    """Test split, scored once with the best checkpoint at the end (optional)."""
    image_root: str | None = None
    """Base URI for relative ``pos_path``/``neg_path`` values of the authors' form."""
    s3_endpoint: str | None = None
    """S3 endpoint URL (an S3-compatible server); default: AWS_ENDPOINT_URL, else AWS."""
    max_bad_row_rate: float = 0.05
    """Fail the job when more than this share of rows in an epoch has an unusable image."""
    min_rows_for_bad_rate: int = 200
    """The bad-row rate is only judged once this many rows were seen."""
    preflight_rows: int = 32
    """Rows per split decoded on the driver before training starts."""
    map_batch_size: int = 64
    """Rows per map_batches call (decode + CLIP preprocessing)."""
    map_num_cpus: float = 0.5
    """CPUs per preprocessing task."""
    prefetch_batches: int = 2
    """Batches prefetched by each train worker's iterator."""
    shuffle_buffer: int = 256
    """Rows in each train worker's local shuffle buffer (0: no shuffle)."""
    demo: DemoConfig = field(default_factory=DemoConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.max_bad_row_rate <= 1:
            raise ValueError("data.max_bad_row_rate must be in [0, 1]")
        if self.map_batch_size < 1:
            raise ValueError("data.map_batch_size must be >= 1")


@dataclass
class SplitInfo:
    uri: str
    files: list[str]
    rows: int
    form: str  # "packed" | "paths"


def _fmt(uri: str, path: str) -> str:
    return f"s3://{path}" if storage.is_s3(uri) else path


def _image_uri(value: str, image_root: str | None) -> str:
    if storage.is_s3(value) or value.startswith("/") or not image_root:
        return value
    return storage.join(image_root, value)


def split_info(split: str, uri: str, cfg: DataConfig) -> SplitInfo:
    """Files, form and row count of one split; raises :class:`DataError` naming what is wrong."""
    try:
        files = storage.list_files(uri, endpoint=cfg.s3_endpoint)
    except FileNotFoundError:
        raise DataError(f"data.{split}={uri}: no such file or folder") from None
    except OSError as e:
        raise DataError(f"data.{split}={uri}: cannot list it ({e})") from None
    if not files:
        raise DataError(f"data.{split}={uri}: no .parquet files there")
    fs, _ = storage.resolve(uri, cfg.s3_endpoint)
    rows, form = 0, None
    for path in files:
        try:
            meta = pq.ParquetFile(fs.open_input_file(path)).metadata
        except Exception as e:
            raise DataError(f"data.{split}: {_fmt(uri, path)} is not a readable Parquet file ({e})") from None
        names = set(meta.schema.names)
        this = "packed" if set(PACKED) <= names else "paths" if set(PATHS) <= names else None
        missing = [c for c in ("prompt",) if c not in names]
        if this is None or missing:
            want = "prompt + pos_image, neg_image (packed) or prompt + pos_path, neg_path (authors' form)"
            lacking = sorted(set(("prompt",) + (PACKED if "pos_image" in names or "neg_image" in names else PATHS)) - names)
            raise DataError(f"data.{split}: {_fmt(uri, path)} lacks column(s) {lacking}; expected {want}; "
                            f"has {sorted(names)}")
        if form is not None and this != form:
            raise DataError(f"data.{split}: {_fmt(uri, path)} is in the {this} form but earlier files are {form}")
        form = this
        rows += meta.num_rows
    if rows == 0:
        raise DataError(f"data.{split}={uri}: the dataset is empty (0 rows in {len(files)} file(s))")
    return SplitInfo(uri=uri, files=files, rows=rows, form=form)


def _sample_check(split: str, info: SplitInfo, cfg: DataConfig) -> None:
    fs, _ = storage.resolve(info.uri, cfg.s3_endpoint)
    path = info.files[0]
    cols = ["prompt", *(PACKED if info.form == "packed" else PATHS)]
    pf = pq.ParquetFile(fs.open_input_file(path))
    table = next(pf.iter_batches(batch_size=max(cfg.preflight_rows, 1), columns=cols))
    batch = {c: table.column(c).to_pylist() for c in cols}
    bad = []
    for i in range(len(batch["prompt"])):
        for col in cols[1:]:
            try:
                data = batch[col][i] if info.form == "packed" else read_image_bytes(batch[col][i], cfg.image_root, cfg.s3_endpoint)
                images.decode(data)
            except (images.BadImage, OSError, ValueError) as e:
                bad.append(f"row {i} {col}: {e}")
    n = len(batch["prompt"])
    if n and len(bad) > cfg.max_bad_row_rate * n * 2:
        shown = "; ".join(bad[:3])
        raise DataError(f"data.{split}: {len(bad)} of {2 * n} images in the first {n} rows of "
                        f"{_fmt(info.uri, path)} are unusable (more than data.max_bad_row_rate="
                        f"{cfg.max_bad_row_rate}): {shown}")


def preflight(cfg: DataConfig) -> dict[str, SplitInfo]:
    """Check every configured split on the driver; returns their :class:`SplitInfo`."""
    out = {}
    for split in ("train", "val", "test"):
        uri = getattr(cfg, split)
        if uri:
            out[split] = split_info(split, uri, cfg)
            _sample_check(split, out[split], cfg)
    if "train" not in out:
        raise DataError("data.train is not set")
    return out


def read_image_bytes(uri: str | None, image_root: str | None, endpoint: str | None) -> bytes:
    """Bytes of an image URI (relative ones under ``image_root``); unreadable -> :class:`images.BadImage`."""
    if not uri:
        raise images.BadImage("empty image path")
    full = _image_uri(uri, image_root)
    try:
        return storage.read_bytes(full, endpoint=endpoint)
    except (OSError, FileNotFoundError) as e:
        raise images.BadImage(f"unreadable image URI {full}: {e}") from None


def prompt_id(prompt: str) -> int:
    """A stable 63-bit id of the normalised prompt (same prompt -> same id, in every process)."""
    norm = " ".join(str(prompt).lower().split())
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little") >> 1


@functools.lru_cache(maxsize=4)
def _prep_state(model_json: str) -> tuple[Any, Any]:
    """(image transform, tokenizer), built once per worker process and model config.

    Threads are left alone: Ray gives a task or actor as many intra-op threads as its CPUs (1 for
    fractional ones), and a process that also runs a model (a scorer actor into which Ray Data
    fused this stage, a driver scoring in-process) keeps its own setting.
    """
    from sr_ray import model as model_lib

    mcfg = model_lib.ModelConfig(**json.loads(model_json))
    return model_lib.image_transform(model_lib.preprocess_cfg(mcfg)), model_lib.tokenizer(mcfg)


class TripletPreprocessor:
    """Batch of triplet rows -> model inputs; the map_batches function of the pipeline.

    In: ``prompt`` and ``pos_image``/``neg_image`` bytes or ``pos_path``/``neg_path`` URIs.
    Out (numpy): ``tokens`` (B, L) int64, ``pos``/``neg`` (B, 3, H, W) float32,
    ``prompt_id`` (B,) int64 and ``valid`` (B,) bool. A row with an unusable
    image keeps its place with zero pixels and ``valid=False``, so the train
    loop counts it exactly and drops it; it is never silently lost.
    """

    def __init__(self, model_cfg: dict, data_cfg: dict):
        self.model_json = json.dumps(model_cfg, sort_keys=True)
        self.data_cfg = DataConfig(**{k: v for k, v in data_cfg.items() if k != "demo"})

    def _load(self, batch: dict[str, np.ndarray], col: str, form_cols: tuple[str, str]) -> list:
        if col in batch:
            return list(batch[col])
        path_col = PATHS[PACKED.index(col)]
        paths = list(batch[path_col])

        def fetch(uri):
            try:
                return read_image_bytes(uri, self.data_cfg.image_root, self.data_cfg.s3_endpoint)
            except images.BadImage as e:
                return e

        with ThreadPoolExecutor(max_workers=min(16, max(1, len(paths)))) as ex:
            return list(ex.map(fetch, paths))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        transform, tok = _prep_state(self.model_json)
        prompts = [str(p) if p is not None else "" for p in batch["prompt"]]
        valid = np.array([bool(p.strip()) for p in prompts])
        size = None
        out_imgs: dict[str, list] = {}
        for col in PACKED:
            raw = self._load(batch, col, PACKED)
            arrs = []
            for i, data in enumerate(raw):
                try:
                    if isinstance(data, Exception):
                        raise data
                    arr = transform(images.decode(data)).numpy()
                    size = arr.shape
                except images.BadImage as e:
                    if valid[i]:
                        log.warning("skipping row (prompt %r): %s: %s", prompts[i][:60], col, e)
                    valid[i] = False
                    arr = None
                arrs.append(arr)
            out_imgs[col] = arrs
        if size is None:
            pcfg = json.loads(self.model_json)
            from sr_ray.model import ModelConfig, preprocess_cfg

            s = preprocess_cfg(ModelConfig(**pcfg))["size"]
            size = (3, *(s if isinstance(s, (list, tuple)) else (s, s)))
        zeros = np.zeros(size, dtype=np.float32)
        with torch.no_grad():
            tokens = tok(prompts).numpy().astype(np.int64)
        return {
            "tokens": tokens,
            "pos": np.stack([a if a is not None else zeros for a in out_imgs["pos_image"]]).astype(np.float32),
            "neg": np.stack([a if a is not None else zeros for a in out_imgs["neg_image"]]).astype(np.float32),
            "prompt_id": np.array([prompt_id(p) for p in prompts], dtype=np.int64),
            "valid": valid,
        }


def triplet_dataset(info: SplitInfo, model_cfg: dict, data_cfg: DataConfig):
    """Lazy streaming Ray Dataset of preprocessed triplets for one split (nothing is read yet)."""
    import ray.data

    from sr_ray.config import to_dict

    fs, _ = storage.resolve(info.uri, data_cfg.s3_endpoint)
    cols = ["prompt", *(PACKED if info.form == "packed" else PATHS)]
    ds = ray.data.read_parquet(info.files, filesystem=fs).select_columns(cols)
    return ds.map_batches(
        TripletPreprocessor(model_cfg, to_dict(data_cfg)),
        batch_format="numpy",
        batch_size=data_cfg.map_batch_size,
        num_cpus=data_cfg.map_num_cpus,
    )


def resolve_splits(cfg: DataConfig) -> DataConfig:
    """With no ``data.train``, point the splits at the (generated, cached) demo data."""
    if cfg.train:
        return cfg
    from dataclasses import replace

    from sr_ray.demo import ensure_demo_data

    demo = ensure_demo_data(cfg.demo)
    return replace(cfg, train=demo["train"], val=cfg.val or demo["val"], test=cfg.test or demo["test"])

