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
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from sr_ray.core import images, parquet, storage
from sr_ray.core.config import from_dict, to_dict
from sr_ray.core.errors import DataError  # re-exported: stages and tests import it from here
from sr_ray.core.limits import DEFAULT_LIMITS, InputLimits, clean_prompt, prompt_problem
from sr_ray.demo.data import DemoConfig

log = logging.getLogger(__name__)

PACKED = ("pos_image", "neg_image")
PATHS = ("pos_path", "neg_path")


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
    limits: InputLimits = field(default_factory=InputLimits)
    """Largest image (pixels, bytes, aspect ratio), smallest side, longest prompt: beyond them a row is bad."""
    feature_cache: str | None = None
    """Folder (local or s3://) of the frozen trunk's output (:mod:`sr_ray.reward.feature_cache`): built once, then
    training reads it instead of pixels and runs only the trainable blocks. Null: no cache."""
    feature_cache_actors: int = 1
    """Actors (one GPU each when scaling.use_gpu) that run the trunk while the cache is built."""
    demo: DemoConfig = field(default_factory=DemoConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.max_bad_row_rate <= 1:
            raise ValueError("data.max_bad_row_rate must be in [0, 1]")
        if self.map_batch_size < 1:
            raise ValueError("data.map_batch_size must be >= 1")


@dataclass
class SplitInfo:
    uri: str
    rows: int
    form: str  # "packed" | "paths"
    parquet: list[parquet.ParquetFile] = field(default_factory=list, repr=False)

    @property
    def columns(self) -> list[str]:
        """The columns a reader takes from the split's files: the prompt and its form's two image columns."""
        return ["prompt", *(PACKED if self.form == "packed" else PATHS)]

    @property
    def files(self) -> list[str]:
        """The filesystem's own paths of the split's files."""
        return [f.path for f in self.parquet]

    def identity(self) -> list[dict[str, Any]]:
        """The identity of every file (URI, size, mtime): what a resumed run must find unchanged."""
        return [f.identity() for f in self.parquet]


def _image_uri(value: str, image_root: str | None) -> str:
    if storage.is_absolute(value) or not image_root:
        return value
    return storage.join(image_root, value)


FORMS = {"packed": {"prompt": "string", "pos_image": "binary", "neg_image": "binary"},
         "paths": {"prompt": "string", "pos_path": "string", "neg_path": "string"}}


def split_info(split: str, uri: str, cfg: DataConfig) -> SplitInfo:
    """Files, form and row count of one split; raises :class:`DataError` naming what is wrong."""
    what = f"data.{split}"
    files = parquet.inspect_files(uri, what, cfg.s3_endpoint)
    form = None
    for f in files:
        names = set(f.schema.names)
        this = "packed" if set(PACKED) <= names else "paths" if set(PATHS) <= names else None
        if this is None or "prompt" not in names:
            want = "prompt + pos_image, neg_image (packed) or prompt + pos_path, neg_path (authors' form)"
            lacking = sorted(set(("prompt",) + (PACKED if "pos_image" in names or "neg_image" in names else PATHS))
                             - names)
            raise DataError(f"{what}: {f.uri} lacks column(s) {lacking}; expected {want}; has {sorted(names)}")
        if form is not None and this != form:
            raise DataError(f"{what}: {f.uri} is in the {this} form but earlier files are {form}")
        form = this
    parquet.check_column_types(files, what, FORMS[form])
    rows = sum(f.rows for f in files)
    if rows == 0:
        raise DataError(f"{what}={storage.redact(uri)}: the dataset is empty (0 rows in {len(files)} file(s))")
    return SplitInfo(uri=uri, rows=rows, form=form, parquet=files)


def _sample_rows(split: str, info: SplitInfo, cfg: DataConfig, cols: list[str]) -> tuple[dict, str]:
    """The first ``preflight_rows`` rows of the split's first non-empty file (a corrupt page is named)."""
    fs, _ = storage.resolve(info.uri, cfg.s3_endpoint)
    f = next(f for f in info.parquet if f.rows)
    try:
        with fs.open_input_file(f.path) as fh:
            table = next(pq.ParquetFile(fh).iter_batches(batch_size=max(cfg.preflight_rows, 1), columns=cols))
    except Exception as e:
        raise DataError(f"data.{split}: {f.uri} cannot be read (corrupt Parquet data: {type(e).__name__}: {e})") \
            from None
    return {c: table.column(c).to_pylist() for c in cols}, f.uri


def _sample_check(split: str, info: SplitInfo, cfg: DataConfig) -> None:
    cols = info.columns
    batch, uri = _sample_rows(split, info, cfg, cols)
    bad = []
    for i in range(len(batch["prompt"])):
        for col in cols[1:]:
            try:
                data = batch[col][i] if info.form == "packed" else read_image_bytes(batch[col][i], cfg.image_root,
                                                                                    cfg.s3_endpoint)
                images.decode(data, cfg.limits)
            except images.BadImage as e:
                bad.append(f"row {i} {col}: {e}")
    n = len(batch["prompt"])
    if n and len(bad) > cfg.max_bad_row_rate * n * 2:
        shown = "; ".join(bad[:3])
        raise DataError(f"data.{split}: {len(bad)} of {2 * n} images in the first {n} rows of "
                        f"{uri} are unusable (more than data.max_bad_row_rate={cfg.max_bad_row_rate}): {shown}")


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


def read_image_bytes(uri: str | None, image_root: str | None, endpoint: str | None,
                     limits: InputLimits = DEFAULT_LIMITS) -> bytes:
    """Bytes of an image URI (relative ones under ``image_root``); unreadable -> :class:`images.BadImage`.

    A URI sr-ray cannot read (``https://``, ``gs://``), a relative path with no ``image_root``, a
    missing file and one beyond ``limits.max_image_bytes`` are bad rows with their reason, like an
    undecodable image.
    """
    if not uri:
        raise images.BadImage("empty image path")
    if not isinstance(uri, str):
        raise images.BadImage(f"image path is {type(uri).__name__}, not text")
    if not image_root and not storage.is_absolute(uri):
        raise images.BadImage(f"relative image path {uri!r} and no image_root to resolve it against")
    full = _image_uri(uri, image_root)
    try:
        fs, path = storage.resolve(full, endpoint)
        info = fs.get_file_info(path)
        if info.size is not None and info.size > limits.max_image_bytes:
            raise images.BadImage(f"image {storage.redact(full)} of {info.size} bytes exceeds "
                                  f"limits.max_image_bytes={limits.max_image_bytes}")
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except images.BadImage:
        raise
    except (OSError, ValueError) as e:  # missing file, no permission, unsupported scheme
        raise images.BadImage(f"unreadable image URI {storage.redact(full)}: {e}") from None


def prompt_id(prompt: str) -> int:
    """A stable 63-bit id of the normalised prompt (same prompt -> same id, in every process)."""
    norm = " ".join(str(prompt).lower().split())
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little") >> 1


@functools.lru_cache(maxsize=4)
def _prep_state(model_json: str) -> tuple[Any, Any, tuple[int, int, int]]:
    """(image transform, tokenizer, pixel shape), built once per worker process and model config.

    Threads are left alone: Ray gives a task or actor as many intra-op threads as its CPUs (1 for
    fractional ones), and a process that also runs a model (a scorer actor into which Ray Data
    fused this stage, a driver scoring in-process) keeps its own setting.
    """
    from sr_ray.reward import model as model_lib

    mcfg = model_lib.ModelConfig(**json.loads(model_json))
    pcfg = model_lib.preprocess_cfg(mcfg)
    s = pcfg["size"]
    shape = (3, *(s if isinstance(s, (list, tuple)) else (s, s)))
    return model_lib.image_transform(pcfg), model_lib.tokenizer(mcfg), shape


def preprocessing(model_cfg: dict) -> tuple[Any, Any, tuple[int, int, int]]:
    """(image transform, tokenizer, pixel shape (3, H, W)) of a model config, cached per process."""
    return _prep_state(json.dumps(model_cfg, sort_keys=True))


@functools.lru_cache(maxsize=4)
def _uint8_state(model_json: str) -> tuple[Any, tuple[int, int, int], tuple, tuple]:
    from sr_ray.reward import model as model_lib

    pcfg = model_lib.preprocess_cfg(model_lib.ModelConfig(**json.loads(model_json)))
    _, h, w = _prep_state(model_json)[2]
    return model_lib.pixel_transform(pcfg), (h, w, 3), tuple(pcfg["mean"]), tuple(pcfg["std"])


def uint8_preprocessing(model_cfg: dict) -> tuple[Any, tuple[int, int, int], tuple, tuple]:
    """(PIL image -> (H, W, 3) uint8 transform, its shape, mean, std) of a model config, cached per process:
    the CPU half of :func:`preprocessing`; :func:`sr_ray.reward.model.normalize_pixels` is the device half."""
    return _uint8_state(json.dumps(model_cfg, sort_keys=True))


class TripletPreprocessor:
    """Batch of triplet rows -> model inputs; the map_batches function of the pipeline.

    In: ``prompt`` and ``pos_image``/``neg_image`` bytes or ``pos_path``/``neg_path`` URIs (and, from the
    row-group reader, ``__error`` on the rows of an unreadable row group).
    Out (numpy): ``tokens`` (B, L) int64, ``pos``/``neg`` (B, 3, H, W) float32,
    ``prompt_id`` (B,) int64 and ``valid`` (B,) bool. A row with an unusable
    image or prompt keeps its place with zero pixels and ``valid=False``, so the train
    loop counts it exactly and drops it; it is never silently lost.
    """

    def __init__(self, model_cfg: dict, data_cfg: dict):
        self.model_cfg = dict(model_cfg)
        self.data_cfg = from_dict(DataConfig, {k: v for k, v in data_cfg.items() if k != "demo"})

    def _load(self, batch: dict[str, np.ndarray], col: str) -> list:
        if col in batch:
            return list(batch[col])
        paths = list(batch[PATHS[PACKED.index(col)]])
        d = self.data_cfg

        def fetch(uri):
            try:
                return read_image_bytes(uri, d.image_root, d.s3_endpoint, d.limits)
            except images.BadImage as e:
                return e

        with ThreadPoolExecutor(max_workers=min(16, max(1, len(paths)))) as ex:
            return list(ex.map(fetch, paths))

    def _reasons(self, batch: dict[str, np.ndarray], prompts: list) -> list[str | None]:
        errors = batch.get(parquet.ERROR_COL)
        reasons = [prompt_problem(p, self.data_cfg.limits) for p in prompts]
        if errors is not None:
            reasons = [e if e else r for e, r in zip(errors, reasons)]
        return reasons

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        transform, tok, shape = preprocessing(self.model_cfg)
        prompts = list(batch["prompt"])
        reasons = self._reasons(batch, prompts)
        out_imgs: dict[str, list] = {}
        for col in PACKED:
            raw = self._load(batch, col) if any(r is None for r in reasons) else [None] * len(prompts)
            arrs = []
            for i, data in enumerate(raw):
                arr = None
                if reasons[i] is None:
                    try:
                        if isinstance(data, Exception):
                            raise data
                        arr = transform(images.decode(data, self.data_cfg.limits)).numpy()
                    except images.BadImage as e:
                        reasons[i] = f"{col}: {e}"
                arrs.append(arr)
            out_imgs[col] = arrs
        unread = batch.get(parquet.ERROR_COL)
        for i, r in enumerate(reasons):
            if r is not None and (unread is None or not unread[i]):  # unreadable row groups are logged once
                log.warning("skipping row (prompt %r): %s", str(prompts[i])[:60], r)
        texts = [clean_prompt(p) if r is None else "" for p, r in zip(prompts, reasons)]
        zeros = np.zeros(shape, dtype=np.float32)
        with torch.no_grad():
            tokens = tok(texts).numpy().astype(np.int64)
        return {
            "tokens": tokens,
            "pos": np.stack([a if a is not None else zeros for a in out_imgs["pos_image"]]).astype(np.float32),
            "neg": np.stack([a if a is not None else zeros for a in out_imgs["neg_image"]]).astype(np.float32),
            "prompt_id": np.array([prompt_id(t) for t in texts], dtype=np.int64),
            "valid": np.array([r is None for r in reasons]),
        }


def triplet_dataset(info: SplitInfo, model_cfg: dict, data_cfg: DataConfig, ordered: bool = False):
    """Lazy streaming Ray Dataset of preprocessed triplets for one split (nothing is read yet).

    Read by row group (:mod:`sr_ray.core.parquet`): a row group that cannot be read (a corrupt data page)
    becomes bad rows named in the log, counted like undecodable images. ``ordered``: the same rows in the same
    blocks on any cluster (:func:`sr_ray.core.parquet.read`), for a training run that must resume exactly.
    """
    cols = info.columns
    ds = parquet.read(info.parquet, cols, f"data split {storage.redact(info.uri)}", data_cfg.s3_endpoint,
                      ordered=ordered, num_cpus=data_cfg.map_num_cpus)
    return ds.map_batches(
        TripletPreprocessor(model_cfg, to_dict(data_cfg)),
        batch_format="numpy",
        batch_size=data_cfg.map_batch_size,
        num_cpus=data_cfg.map_num_cpus,
    )
