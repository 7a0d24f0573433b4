"""Curation: a platform log -> (prompt, popular image, unpopular image) triplet shards,
with the paper's bias controls (appendix A.2), as Ray Data passes over the log.

Rules (each a field of :class:`CurateConfig`):

1. NSFW: rows with ``nsfw_score >= nsfw_max`` are removed before anything else
   (the column is optional; ``nsfw_classifier`` plugs in a real classifier that
   scores the images first).
2. Positives: the top ``top_fraction`` of images by ``remix_count`` (content
   signal) — every image whose count reaches the count of the k-th most remixed
   image, k = ceil(top_fraction x images), so ties at the boundary are all in, and
   at least ``min_remixes`` — plus every image with ``influencer_remix`` (creator
   signal).
3. View threshold: the ``threshold_quantile`` quantile (numpy's linear
   interpolation) of ``views_before_first_remix`` over images with >= 1 remix
   whose prompt has a positive.
4. Negatives: images of those prompts with ``remix_count == 0`` and
   ``views >= threshold``.
5. Prompts with no positive, with nothing but positives, or with no negative are
   dropped and counted by reason. Triplets: positive x negative within a prompt,
   at most ``max_pairs_per_prompt`` per prompt (the pairs with the lowest seeded
   hash: deterministic and independent of row order).
6. Splits by a stable hash (BLAKE2b) of the normalized prompt (lowercase,
   single spaces), ``split_ratios`` train/val/test, so no prompt is in two splits.
7. Packing: image bytes fetched from ``image_uri`` into ``pos_image``/``neg_image``,
   validated (decodes, sides within limits); pairs with a bad image dropped and
   counted. Shards of about ``rows_per_shard`` rows, written atomically; a re-run
   skips finished shards.

How it scales: pass 1 streams the log once for histograms and per-prompt
partial aggregates (merged on the driver: a few numbers per distinct prompt);
pass 2 streams it for the threshold (exact quantile from value counts); pass 3
streams it again keeping only positive/negative candidates, groups those by
prompt (the only shuffle, over a small fraction of the log), and pass 4 packs
shards in parallel. No process ever holds the whole log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sr_ray.core import identity, images, parquet, storage
from sr_ray.core.config import to_dict
from sr_ray.core.errors import ConfigError, DataError
from sr_ray.core.limits import InputLimits
from sr_ray.core.ray_utils import init_ray, require_shared_storage
from sr_ray.curation.datacard import table1_ratios, write_datacard
from sr_ray.curation.nsfw import NSFWScorer
from sr_ray.demo.community import CommunityConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# column -> (kind, required); kinds checked against the Parquet schema of every log file
LOG_COLUMNS = {
    "image_id": ("string", True), "prompt": ("string", True), "image_uri": ("string", True),
    "remix_count": ("integer", True), "views_before_first_remix": ("integer", True),
    "views": ("integer", True), "influencer_remix": ("boolean", True), "nsfw_score": ("floating", False),
}
VIEW_BINS = np.concatenate([[0.0], np.logspace(0, 9, 91)])  # plot histograms of view counts


@dataclass
class CurateConfig:
    log: str | None = None
    """Platform log: a folder or file of Parquet shards, local or s3://. Null (the job, not this function):
    simulate a community (``community``) into ``demo_cache_dir`` and curate that."""
    out: str | None = None
    """Output folder (local or s3://): train/ val/ test/ shards, datacard.json, REPORT.md, plot."""
    s3_endpoint: str | None = None
    """S3 endpoint URL; default AWS_ENDPOINT_URL, else AWS."""
    top_fraction: float = 0.01
    """Share of images, by remix count, that are positives (content signal)."""
    min_remixes: int = 1
    """A content-signal positive has at least this many remixes."""
    threshold_quantile: float = 0.99
    """Quantile of views-before-first-remix that a negative's views must reach."""
    nsfw_max: float = 0.5
    """Rows with nsfw_score >= this are removed first."""
    nsfw_classifier: str | None = None
    """Optional ``module:Class``: a callable class scoring a batch {"image": bytes} -> nsfw scores in [0, 1]."""
    max_pairs_per_prompt: int = 0
    """Cap on triplets per prompt (0: all positive x negative pairs)."""
    seed: int = 0
    """Seed of the per-prompt pair sample and the order of rows in shards."""
    split_ratios: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    """train/val/test shares of prompts."""
    pack: bool = True
    """Pack image bytes (pos_image/neg_image); false: write the authors' form (pos_path/neg_path)."""
    rows_per_shard: int = 2000
    min_image_side: int = 16
    max_image_side: int = 8192
    max_bad_image_rate: float = 0.05
    """Fail when more than this share of the fetched images is unusable."""
    fetch_threads: int = 16
    """Concurrent image reads per packing task."""
    batch_rows: int = 65_536
    """Log rows per map_batches call in the streaming passes."""
    overwrite: bool = False
    """Curate into an out folder that holds triplets of other rules or another log (it is emptied first)."""
    limits: InputLimits = field(default_factory=InputLimits)
    """Largest image (pixels, bytes, aspect ratio) and longest prompt: rows beyond them are dropped and counted."""
    ray_address: str | None = None
    """Ray cluster to join (default: RAY_ADDRESS, else a new local one)."""
    community: CommunityConfig = field(default_factory=CommunityConfig)
    """The simulated community the job curates when ``log`` is null (sr_ray.app.defaults)."""
    demo_cache_dir: str = "~/.cache/sr-ray/community"
    """Where the job keeps simulated communities and their curated triplets (cached by parameters)."""

    def __post_init__(self) -> None:
        if not 0 < self.top_fraction <= 1:
            raise ValueError("top_fraction must be in (0, 1]")
        if not 0 <= self.threshold_quantile <= 1:
            raise ValueError("threshold_quantile must be in [0, 1]")
        if len(self.split_ratios) != 3 or min(self.split_ratios) < 0 or abs(sum(self.split_ratios) - 1) > 1e-6:
            raise ValueError("split_ratios must be three non-negative shares summing to 1")
        if self.rows_per_shard < 1 or self.max_pairs_per_prompt < 0:
            raise ValueError("rows_per_shard must be >= 1 and max_pairs_per_prompt >= 0")


RULE_KEYS = ("top_fraction", "min_remixes", "threshold_quantile", "nsfw_max", "nsfw_classifier",
             "max_pairs_per_prompt", "seed", "split_ratios", "pack", "rows_per_shard",
             "min_image_side", "max_image_side", "limits")
IDENTITY_FILE = "_curation.json"


def rules_of(cfg: CurateConfig) -> dict[str, Any]:
    """The settings that decide an output's content (an out folder is tied to them)."""
    d = to_dict(cfg)
    return {k: d[k] for k in RULE_KEYS}


# ---------------------------------------------------------------- small pure rules


def normalize_prompt(prompt: str) -> str:
    return " ".join(str(prompt).lower().split())


def _h64(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def split_of(norm_prompt: str, ratios) -> str:
    """train/val/test of a normalized prompt: a stable hash mapped to [0, 1) against the cumulative ratios."""
    u = _h64("split", norm_prompt) / 2**64
    if u < ratios[0]:
        return "train"
    return "val" if u < ratios[0] + ratios[1] else "test"


def pair_rank(seed: int, pos_id: str, neg_id: str) -> int:
    """Deterministic pseudo-random rank of a pair (the per-prompt cap keeps the lowest)."""
    return _h64(seed, pos_id, neg_id)


def prompt_hash(prompts) -> np.ndarray:
    """uint64 key per prompt string (vectorized; for grouping inside one run only)."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(prompts, dtype=object), categorize=False)


def linear_quantile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """numpy's default (linear) quantile of a multiset given as sorted ``values`` with ``counts``."""
    n = int(counts.sum())
    if n == 0:
        return math.inf
    pos = (n - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    cum = np.cumsum(counts)
    v_lo = float(values[np.searchsorted(cum, lo, side="right")])
    v_hi = float(values[np.searchsorted(cum, hi, side="right")])
    return v_lo + (v_hi - v_lo) * (pos - lo)


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    v = np.concatenate([p[0] for p in parts])
    c = np.concatenate([p[1] for p in parts])
    u, inv = np.unique(v, return_inverse=True)
    return u, np.bincount(inv, weights=c, minlength=len(u)).astype(np.int64)


# ---------------------------------------------------------------- input checks


def _kind_ok(t: pa.DataType, kind: str) -> bool:
    return {"string": pa.types.is_string(t) or pa.types.is_large_string(t),
            "integer": pa.types.is_integer(t),
            "boolean": pa.types.is_boolean(t),
            "floating": pa.types.is_floating(t) or pa.types.is_integer(t)}[kind]


def check_log(uri: str, endpoint: str | None) -> tuple[list[parquet.ParquetFile], bool]:
    """(log files, has nsfw_score) after checking every file's schema; DataError names file and columns."""
    files = parquet.inspect_files(uri, "log", endpoint)
    has_nsfw = True
    for f in files:
        s = f.schema
        missing = [c for c, (_, req) in LOG_COLUMNS.items() if req and c not in s.names]
        wrong = [f"{c} is {s.field(c).type}, expected {kind}" for c, (kind, _) in LOG_COLUMNS.items()
                 if c in s.names and not _kind_ok(s.field(c).type, kind)]
        if missing or wrong:
            parts = ([f"missing column(s) {missing}"] if missing else []) + ([f"wrong type(s): {'; '.join(wrong)}"]
                                                                            if wrong else [])
            raise DataError(f"platform log file {f.uri}: {', '.join(parts)} (contract: {list(LOG_COLUMNS)})")
        has_nsfw &= "nsfw_score" in s.names
    return files, has_nsfw


# ---------------------------------------------------------------- Ray Data passes (batch functions)


def _nsfw_ok(t: pa.Table, nsfw_max: float, has_nsfw: bool) -> np.ndarray:
    if not has_nsfw:
        return np.ones(t.num_rows, bool)
    s = t.column("nsfw_score").to_numpy(zero_copy_only=False)
    return ~(np.nan_to_num(s.astype(np.float64), nan=0.0) >= nsfw_max)


def _prompt_ok(t: pa.Table, max_chars: int) -> np.ndarray:
    """A prompt that is there, not blank, and at most ``max_chars`` long (the others' rows are dropped, counted)."""
    p = t.column("prompt")
    ok = pc.and_(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(p)), 0), pc.less_equal(pc.utf8_length(p), max_chars))
    return pc.fill_null(ok, False).to_numpy(zero_copy_only=False).astype(bool)


def _keep_mask(t: pa.Table, nsfw_max: float, has_nsfw: bool, max_prompt_chars: int) -> np.ndarray:
    return _nsfw_ok(t, nsfw_max, has_nsfw) & _prompt_ok(t, max_prompt_chars)


def _ints(t: pa.Table, col: str, fill: int = 0) -> np.ndarray:
    return pc.fill_null(t.column(col), fill).to_numpy(zero_copy_only=False).astype(np.int64)


def _bools(t: pa.Table, col: str) -> np.ndarray:
    return pc.fill_null(t.column(col), False).to_numpy(zero_copy_only=False).astype(bool)


def _pass1(t: pa.Table, nsfw_max: float, has_nsfw: bool, max_prompt_chars: int) -> pa.Table:
    """Per batch: counts, histograms, and per-prompt partial aggregates (hash, images, max remix, any influencer)."""
    prompt_ok = _prompt_ok(t, max_prompt_chars)
    keep = _nsfw_ok(t, nsfw_max, has_nsfw) & prompt_ok
    remix = _ints(t, "remix_count")[keep]
    views = _ints(t, "views")[keep]
    infl = _bools(t, "influencer_remix")[keep]
    ph = prompt_hash(t.column("prompt").to_numpy(zero_copy_only=False)[keep])
    rv, rc = np.unique(remix, return_counts=True)
    u, inv = np.unique(ph, return_inverse=True)
    n_img = np.bincount(inv, minlength=len(u))
    mx = np.full(len(u), -1, np.int64)
    np.maximum.at(mx, inv, remix)
    anyi = np.bincount(inv, weights=infl, minlength=len(u)) > 0
    return pa.table({
        "rows": [int(t.num_rows)], "nsfw_removed": [int((prompt_ok & ~keep).sum())],
        "bad_prompts": [int((~prompt_ok).sum())],
        "remix_values": [rv], "remix_counts": [rc],
        "views_hist": [np.histogram(views, VIEW_BINS)[0]],
        "zero_remix_views_hist": [np.histogram(views[remix == 0], VIEW_BINS)[0]],
        "ph": [u], "n_images": [n_img], "max_remix": [mx], "any_influencer": [anyi],
    })


def _in_set(t: pa.Table, keys: np.ndarray) -> np.ndarray:
    ph = prompt_hash(t.column("prompt").to_numpy(zero_copy_only=False))
    return np.isin(ph, keys, assume_unique=False), ph


def _pass2(t: pa.Table, nsfw_max: float, has_nsfw: bool, max_prompt_chars: int, pos_keys) -> pa.Table:
    """Per batch: value counts of views_before_first_remix over remixed images of positive prompts."""
    keys = pos_keys if isinstance(pos_keys, np.ndarray) else _get(pos_keys)
    inp, _ = _in_set(t, keys)
    m = _keep_mask(t, nsfw_max, has_nsfw, max_prompt_chars) & inp & (_ints(t, "remix_count") >= 1)
    v = _ints(t, "views_before_first_remix", -1)[m]
    v = v[v >= 0]
    vv, vc = np.unique(v, return_counts=True)
    return pa.table({"values": [vv], "counts": [vc], "hist": [np.histogram(v, VIEW_BINS)[0]]})


def _get(ref):
    import ray

    return ray.get(ref)


def _pass3(t: pa.Table, nsfw_max: float, has_nsfw: bool, max_prompt_chars: int, pos_keys, cutoff: int,
           threshold: float) -> pa.Table:
    """Rows that are positives or negatives of positive prompts, labelled; everything else dropped."""
    keys = pos_keys if isinstance(pos_keys, np.ndarray) else _get(pos_keys)
    inp, ph = _in_set(t, keys)
    remix = _ints(t, "remix_count")
    content = remix >= cutoff
    creator = _bools(t, "influencer_remix")
    is_pos = content | creator
    is_neg = ~is_pos & (remix == 0) & (_ints(t, "views") >= threshold)
    m = _keep_mask(t, nsfw_max, has_nsfw, max_prompt_chars) & inp & (is_pos | is_neg)
    return pa.table({
        "ph": ph[m], "prompt": t.column("prompt").filter(pa.array(m)),
        "image_id": t.column("image_id").filter(pa.array(m)), "image_uri": t.column("image_uri").filter(pa.array(m)),
        "is_pos": is_pos[m], "content": content[m], "creator": creator[m],
    })


def _prompt_groups(t: pa.Table, seed: int, cap: int, ratios: list[float]) -> pa.Table:
    """One prompt's candidates -> one row: its split, counts and the (capped) pairs as lists."""
    d = t.to_pydict()
    prompt = d["prompt"][0]
    # an image_id listed twice (a log written twice, a join gone wrong) counts once: as a positive if either
    # row says so, with the smallest URI; the extra rows are counted (deterministic whatever the row order)
    rows = sorted(zip(d["image_id"], [not p for p in d["is_pos"]], d["image_uri"], range(t.num_rows)))
    first = {}
    for i, not_pos, u, k in rows:
        first.setdefault(i, (u, not not_pos, k))
    dups = t.num_rows - len(first)
    pos = [(i, u) for i, (u, p, _) in sorted(first.items()) if p]
    neg = [(i, u) for i, (u, p, _) in sorted(first.items()) if not p]
    kept = [k for _, (_, _, k) in first.items()]
    pairs = [(pair_rank(seed, a[0], b[0]), a, b) for a in pos for b in neg]
    if cap and len(pairs) > cap:
        pairs = sorted(pairs)[:cap]
    return pa.table({
        "ph": [d["ph"][0]], "prompt": [prompt], "split": [split_of(normalize_prompt(prompt), ratios)],
        "n_pos": [len(pos)], "n_neg": [len(neg)],
        "n_content": [sum(d["content"][j] and not d["creator"][j] for j in kept if d["is_pos"][j])],
        "n_creator": [sum(d["creator"][j] and not d["content"][j] for j in kept if d["is_pos"][j])],
        "n_both": [sum(d["content"][j] and d["creator"][j] for j in kept)], "n_duplicates": [dups],
        "pairs_before_cap": [len(pos) * len(neg)], "n_pairs": [len(pairs)],
        "n_used_images": [len({a[1] for _, a, _ in pairs} | {b[1] for _, _, b in pairs})],
        "pair_rank": [[r for r, _, _ in pairs]],
        "pos_id": [[a[0] for _, a, _ in pairs]], "pos_uri": [[a[1] for _, a, _ in pairs]],
        "neg_id": [[b[0] for _, _, b in pairs]], "neg_uri": [[b[1] for _, _, b in pairs]],
    }, schema=pa.schema([("ph", pa.uint64()), ("prompt", pa.string()), ("split", pa.string()),
                         ("n_pos", pa.int64()), ("n_neg", pa.int64()), ("n_content", pa.int64()),
                         ("n_creator", pa.int64()), ("n_both", pa.int64()), ("n_duplicates", pa.int64()),
                         ("pairs_before_cap", pa.int64()),
                         ("n_pairs", pa.int64()), ("n_used_images", pa.int64()), ("pair_rank", pa.list_(pa.uint64())),
                         ("pos_id", pa.list_(pa.string())), ("pos_uri", pa.list_(pa.string())),
                         ("neg_id", pa.list_(pa.string())), ("neg_uri", pa.list_(pa.string()))]))


def _explode(t: pa.Table, n_shards: dict[str, int]) -> pa.Table:
    """Per-prompt rows (kept prompts) -> one row per pair, with its shard."""
    cols = {k: [] for k in ("prompt", "split", "pos_id", "neg_id", "pos_uri", "neg_uri", "rank", "shard",
                            "shard_key")}
    d = t.to_pydict()
    for i in range(t.num_rows):
        if d["n_neg"][i] == 0:  # dropped prompt: no pairs
            continue
        s = d["split"][i]
        for r, a, au, b, bu in zip(d["pair_rank"][i], d["pos_id"][i], d["pos_uri"][i], d["neg_id"][i],
                                    d["neg_uri"][i]):
            cols["prompt"].append(d["prompt"][i])
            cols["split"].append(s)
            cols["pos_id"].append(a)
            cols["neg_id"].append(b)
            cols["pos_uri"].append(au)
            cols["neg_uri"].append(bu)
            cols["rank"].append(r)
            cols["shard"].append(int(r % n_shards[s]))
            cols["shard_key"].append(SPLITS.index(s) << 32 | cols["shard"][-1])  # one group per output shard
    return pa.table(cols, schema=pa.schema([
        ("prompt", pa.string()), ("split", pa.string()), ("pos_id", pa.string()), ("neg_id", pa.string()),
        ("pos_uri", pa.string()), ("neg_uri", pa.string()), ("rank", pa.uint64()), ("shard", pa.int64()),
        ("shard_key", pa.int64())]))


def check_image(data: bytes, min_side: int, max_side: int, limits: InputLimits | None = None) -> None:
    """Raise BadImage unless ``data`` decodes within ``limits`` and both sides are within [min_side, max_side]."""
    img = images.decode(data, limits or InputLimits())
    if min(img.size) < min_side or max(img.size) > max_side:
        raise images.BadImage(f"size {img.width}x{img.height} outside [{min_side}, {max_side}]")


PACKED_SCHEMA = pa.schema([("prompt", pa.string()), ("pos_id", pa.string()), ("neg_id", pa.string()),
                           ("pos_image", pa.binary()), ("neg_image", pa.binary())])
PATHS_SCHEMA = pa.schema([("prompt", pa.string()), ("pos_id", pa.string()), ("neg_id", pa.string()),
                          ("pos_path", pa.string()), ("neg_path", pa.string())])


def shard_name(split: str, shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def _pack_shard(t: pa.Table, out: str, cfg_d: dict) -> pa.Table:
    """One shard's pairs -> fetch, validate, write ``<out>/<split>/part-*.parquet`` (+ a done-marker with stats)."""
    endpoint = cfg_d["s3_endpoint"]
    split, shard = t.column("split")[0].as_py(), int(t.column("shard")[0].as_py())
    marker = storage.join(out, "_shards", f"{split}-{shard:05d}.json")
    if storage.exists(marker, endpoint):  # finished by an earlier run
        stats = json.loads(storage.read_bytes(marker, endpoint))
        stats["resumed"] = True
        return pa.table({"stats": [json.dumps(stats)]})
    t = t.sort_by("rank")
    d = t.to_pydict()
    uris = sorted(set(d["pos_uri"]) | set(d["neg_uri"]))
    bad: dict[str, str] = {}
    data: dict[str, bytes] = {}
    limits = InputLimits(**cfg_d["limits"])
    filesystems: dict[bool, Any] = {}

    def fetch(u):
        try:
            if not u or not storage.is_absolute(u):
                raise images.BadImage(f"image_uri {u!r} is not absolute (a local path from / or s3://)")
            if "://" in u and not storage.is_s3(u):
                storage.resolve(u, endpoint)  # raises ValueError naming the scheme (https://, gs://)
            if storage.is_s3(u) not in filesystems:
                filesystems[storage.is_s3(u)] = storage.resolve(u, endpoint)[0]
            b = storage.read_bytes(u, fs=filesystems[storage.is_s3(u)])
            check_image(b, cfg_d["min_image_side"], cfg_d["max_image_side"], limits)
            return u, b, None
        except images.BadImage as e:
            return u, None, str(e)
        except (OSError, ValueError) as e:  # missing, no permission, a scheme sr-ray cannot read (https://)
            return u, None, f"unreadable: {type(e).__name__}: {e}"

    if cfg_d["pack"]:  # the authors' form stores URIs only: nothing is fetched (training validates)
        with ThreadPoolExecutor(cfg_d["fetch_threads"]) as ex:
            for u, b, err in ex.map(fetch, uris):
                if err:
                    bad[u] = err
                else:
                    data[u] = b
    ok = [i for i in range(t.num_rows) if d["pos_uri"][i] not in bad and d["neg_uri"][i] not in bad]
    if cfg_d["pack"]:
        table = pa.table({"prompt": [d["prompt"][i] for i in ok], "pos_id": [d["pos_id"][i] for i in ok],
                          "neg_id": [d["neg_id"][i] for i in ok],
                          "pos_image": [data[d["pos_uri"][i]] for i in ok],
                          "neg_image": [data[d["neg_uri"][i]] for i in ok]}, schema=PACKED_SCHEMA)
    else:
        table = pa.table({"prompt": [d["prompt"][i] for i in ok], "pos_id": [d["pos_id"][i] for i in ok],
                          "neg_id": [d["neg_id"][i] for i in ok], "pos_path": [d["pos_uri"][i] for i in ok],
                          "neg_path": [d["neg_uri"][i] for i in ok]}, schema=PATHS_SCHEMA)
    path = storage.join(out, split, shard_name(split, shard))
    if table.num_rows:
        storage.write_parquet(table, path, endpoint, row_group_size=256)
    stats = {"split": split, "shard": shard, "rows": table.num_rows, "pairs": t.num_rows,
             "dropped_pairs": t.num_rows - table.num_rows, "images": len(uris) if cfg_d["pack"] else 0,
             "bad_images": dict(sorted(bad.items())), "file": path if table.num_rows else None,
             "bytes": int(table.nbytes)}
    storage.write_text(marker, json.dumps(stats), endpoint)  # written last: marks the shard done
    return pa.table({"stats": [json.dumps(stats)]})


# ---------------------------------------------------------------- driver


def _progress(stage: str, t0: float, **kv) -> None:
    extra = " ".join(f"{k}={v}" for k, v in kv.items())
    log.info("[curate] %s done in %.1fs %s", stage, time.perf_counter() - t0, extra)


def curation_identity(cfg: CurateConfig, files: list[parquet.ParquetFile]) -> dict[str, Any]:
    """What decides an out folder's content: the rules and the log (every file's URI, size and mtime)."""
    return {"rules": rules_of(cfg), "log": [f.identity() for f in files]}


def _score_nsfw(cfg: CurateConfig, files: list[parquet.ParquetFile], out: str) -> list[parquet.ParquetFile]:
    """Run the plugged-in NSFW classifier over the log's images; returns the files of the scored log."""
    import ray.data

    scored = storage.join(out, "_scored_log")
    if not storage.exists(storage.join(scored, "_SUCCESS"), cfg.s3_endpoint):
        ds = parquet.read(files, list(files[0].schema.names), "platform log", cfg.s3_endpoint, on_error="raise")
        ds = ds.drop_columns([parquet.FILE_COL, parquet.ERROR_COL])
        ds = ds.map_batches(NSFWScorer, fn_constructor_kwargs={"spec": cfg.nsfw_classifier,
                                                               "endpoint": cfg.s3_endpoint},
                            batch_format="pyarrow", batch_size=256,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4))
        fs, path = storage.resolve(scored, cfg.s3_endpoint)
        ds.write_parquet(path if storage.is_s3(out) else scored, filesystem=fs if storage.is_s3(out) else None)
        storage.write_text(storage.join(scored, "_SUCCESS"), "", cfg.s3_endpoint)
    return parquet.inspect_files(scored, "scored platform log", cfg.s3_endpoint)


def _inputs(cfg: CurateConfig) -> tuple[str, str, list[parquet.ParquetFile], bool]:
    """(log URI, out URI, log files, has nsfw_score), checked before Ray."""
    log_uri, out = cfg.log, cfg.out
    if log_uri is None:
        raise ConfigError("log= is required: the platform log, a folder or file of Parquet shards (local or s3://); "
                          "the job (sr-ray curate_dataset) simulates a demo community when none is given")
    if out is None:
        raise DataError("out= is required when log= is given (a local folder or s3://bucket/prefix)")
    storage.check_output_dir(out, "out", cfg.s3_endpoint)
    files, has_nsfw = check_log(log_uri, cfg.s3_endpoint)  # before Ray starts: bad input fails fast
    return log_uri, out, files, has_nsfw


def _pass1_all(ds, cfg: CurateConfig, common: dict, log_uri: str) -> dict[str, Any]:
    """Pass 1 over the log: counts, histograms, per-prompt aggregates merged on the driver."""
    p: dict[str, Any] = {"rows": 0, "nsfw_removed": 0, "bad_prompts": 0,
                         "views_hist": np.zeros(len(VIEW_BINS) - 1, np.int64)}
    p["zero_hist"] = np.zeros_like(p["views_hist"])
    remix_parts, agg = [], []
    for b in ds.map_batches(_pass1, fn_kwargs=common, batch_format="pyarrow",
                            batch_size=cfg.batch_rows).iter_batches(batch_format="pyarrow", batch_size=None):
        for r in b.to_pylist():
            for k in ("rows", "nsfw_removed", "bad_prompts"):
                p[k] += r[k]
            remix_parts.append((np.asarray(r["remix_values"], np.int64), np.asarray(r["remix_counts"], np.int64)))
            p["views_hist"] += np.asarray(r["views_hist"], np.int64)
            p["zero_hist"] += np.asarray(r["zero_remix_views_hist"], np.int64)
            agg.append((np.asarray(r["ph"], np.uint64), np.asarray(r["n_images"], np.int64),
                        np.asarray(r["max_remix"], np.int64), np.asarray(r["any_influencer"], bool)))
    if p["rows"] == 0:
        raise DataError(f"platform log {storage.redact(log_uri)!r} has no rows")
    p["remix_v"], p["remix_c"] = _merge_counts(remix_parts)
    ph_all = np.concatenate([a[0] for a in agg]).astype(np.uint64)
    uph, inv = np.unique(ph_all, return_inverse=True)
    p["uph"] = uph
    p["n_images"] = np.bincount(inv, weights=np.concatenate([a[1] for a in agg]), minlength=len(uph)).astype(np.int64)
    p["max_remix"] = np.full(len(uph), -1, np.int64)
    np.maximum.at(p["max_remix"], inv, np.concatenate([a[2] for a in agg]).astype(np.int64))
    p["any_infl"] = np.bincount(inv, weights=np.concatenate([a[3] for a in agg]).astype(np.float64),
                                minlength=len(uph)) > 0
    p["kept_rows"] = p["rows"] - p["nsfw_removed"] - p["bad_prompts"]
    return p


def _positives(p: dict[str, Any], cfg: CurateConfig) -> None:
    """The remix cutoff of the top fraction and the prompts with a positive (added to ``p``)."""
    p["top_k"] = max(1, math.ceil(cfg.top_fraction * p["kept_rows"]))
    desc_v, desc_c = p["remix_v"][::-1], p["remix_c"][::-1]
    cutoff = int(desc_v[min(np.searchsorted(np.cumsum(desc_c), p["top_k"]), len(desc_v) - 1)]) if len(desc_v) else 0
    p["cutoff"] = max(cutoff, cfg.min_remixes)
    p["pos_keys"] = p["uph"][(p["max_remix"] >= p["cutoff"]) | p["any_infl"]]


def _threshold_pass(ds, cfg: CurateConfig, common: dict, keys_ref, p: dict[str, Any]) -> None:
    """Pass 2: the view threshold (exact quantile from value counts), added to ``p``."""
    v_parts, p["vbfr_hist"] = [], np.zeros_like(p["views_hist"])
    for b in ds.map_batches(_pass2, fn_kwargs={**common, "pos_keys": keys_ref}, batch_format="pyarrow",
                            batch_size=cfg.batch_rows).iter_batches(batch_format="pyarrow", batch_size=None):
        for r in b.to_pylist():
            v_parts.append((np.asarray(r["values"], np.int64), np.asarray(r["counts"], np.int64)))
            p["vbfr_hist"] += np.asarray(r["hist"], np.int64)
    vv, vc = _merge_counts(v_parts)
    p["threshold"] = linear_quantile(vv, vc, cfg.threshold_quantile)
    p["remixed_images"] = int(vc.sum())


SUMMARY_COLS = ("ph", "split", "n_pos", "n_neg", "n_content", "n_creator", "n_both", "n_duplicates",
                "pairs_before_cap", "n_pairs", "n_used_images")


def _pairs_pass(ds, cfg: CurateConfig, common: dict, keys_ref, p: dict[str, Any]):
    """Pass 3: candidates grouped by prompt -> per-prompt pairs (materialized) and per-prompt numbers."""
    per_prompt = (ds.map_batches(_pass3, fn_kwargs={**common, "pos_keys": keys_ref, "cutoff": p["cutoff"],
                                                    "threshold": p["threshold"]},
                                 batch_format="pyarrow", batch_size=cfg.batch_rows)
                  .groupby("ph", num_partitions=max(2, min(200, len(p["pos_keys"]) // 5000)))
                  .map_groups(_prompt_groups, batch_format="pyarrow",
                              fn_kwargs={"seed": cfg.seed, "cap": cfg.max_pairs_per_prompt,
                                         "ratios": list(cfg.split_ratios)})
                  .materialize())
    summ = {k: [] for k in SUMMARY_COLS}
    for b in per_prompt.select_columns(list(summ)).iter_batches(batch_format="pyarrow", batch_size=None):
        for k in summ:
            summ[k].append(b.column(k).to_numpy(zero_copy_only=False))
    summ = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in summ.items()}
    idx = np.searchsorted(p["uph"], summ["ph"].astype(np.uint64))
    n_img = p["n_images"][idx] if len(idx) else np.zeros(0, np.int64)
    summ["kept"] = summ["n_neg"] > 0
    summ["all_pos"] = (summ["n_neg"] == 0) & (summ["n_pos"] == n_img)
    summ["no_neg"] = (summ["n_neg"] == 0) & ~summ["all_pos"]
    return per_prompt, summ


def _pack_pass(per_prompt, cfg: CurateConfig, out: str, pairs_per_split: dict[str, int]) -> list[dict]:
    """Pass 4: pack and write shards in parallel (finished ones are skipped); returns every shard's stats."""
    n_shards = {s: max(1, math.ceil(n / cfg.rows_per_shard)) for s, n in pairs_per_split.items()}
    cfg_d = {**to_dict(cfg), "s3_endpoint": cfg.s3_endpoint}
    shard_stats: list[dict] = []
    if sum(pairs_per_split.values()):
        pairs = per_prompt.map_batches(_explode, fn_kwargs={"n_shards": n_shards}, batch_format="pyarrow")
        parts = max(1, min(200, sum(n_shards.values())))
        for b in (pairs.groupby("shard_key", num_partitions=parts)
                  .map_groups(_pack_shard, fn_kwargs={"out": out, "cfg_d": cfg_d}, batch_format="pyarrow")
                  .iter_batches(batch_format="pyarrow", batch_size=None)):
            shard_stats += [json.loads(x) for x in b.column("stats").to_pylist()]
    return shard_stats


def _counts(p: dict[str, Any], summ: dict, pairs_per_split: dict, shard_stats: list[dict], bad: dict) -> dict:
    kept = summ["kept"]
    positives = int(summ["n_pos"].sum())
    negatives_kept = int(summ["n_neg"][kept].sum())
    pos_kept = int(summ["n_pos"][kept].sum())
    return {
        "images": p["rows"], "bad_prompts": p["bad_prompts"], "nsfw_removed": p["nsfw_removed"],
        "images_after_nsfw": p["kept_rows"], "duplicate_image_rows": int(summ["n_duplicates"].sum()),
        "remix_cutoff": p["cutoff"], "top_k": p["top_k"], "view_threshold": p["threshold"],
        "positives": positives, "positives_content": int(summ["n_content"].sum()),
        "positives_creator": int(summ["n_creator"].sum()), "positives_both": int(summ["n_both"].sum()),
        "negatives": int(summ["n_neg"].sum()), "negatives_in_kept_prompts": negatives_kept,
        "prompts": int(len(p["uph"])), "prompts_with_positive": int(len(p["pos_keys"])),
        "prompts_kept": int(kept.sum()),
        "prompts_dropped": {"no_positive": int(len(p["uph"]) - len(p["pos_keys"])),
                            "all_positive": int(summ["all_pos"].sum()), "no_negative": int(summ["no_neg"].sum())},
        "pairs_before_cap": int(summ["pairs_before_cap"][kept].sum()),
        "triplets_selected": pairs_per_split,
        "triplets": {s: sum(st["rows"] for st in shard_stats if st["split"] == s) for s in SPLITS},
        "prompts_per_split": {s: int((kept & (summ["split"] == s)).sum()) for s in SPLITS},
        "bad_images": len(bad), "dropped_pairs": sum(st["dropped_pairs"] for st in shard_stats),
        "share_positive": round(positives / max(p["kept_rows"], 1), 5),
        "share_positive_of_pos_neg": round(pos_kept / max(pos_kept + negatives_kept, 1), 5),
        "images_in_triplets": int(summ["n_used_images"][kept].sum()),
        "table1": table1_ratios(int(kept.sum()), pos_kept, negatives_kept, int(summ["pairs_before_cap"][kept].sum()),
                                int(summ["n_creator"].sum()), positives),
    }


def curate(cfg: CurateConfig) -> dict[str, Any]:
    """Run the curation (see the module docstring); returns the summary (also in ``datacard.json``)."""
    try:
        return _curate(cfg)
    except Exception as e:  # a DataError raised inside a Ray task (an unreadable row group) arrives wrapped
        err = parquet.data_error_of(e)
        if err is not None and err is not e:
            raise err from None
        raise


def _curate(cfg: CurateConfig) -> dict[str, Any]:
    import ray

    wall0 = time.perf_counter()
    log_uri, out, files, has_nsfw = _inputs(cfg)
    init_ray(cfg.ray_address)
    require_shared_storage(log_uri, "log", "Ray Data's tasks read it")
    require_shared_storage(out, "out", "Ray Data's tasks write the shards")
    identity.claim(out, IDENTITY_FILE, curation_identity(cfg, files), f"out={storage.redact(out)}",
                   "overwrite=true", cfg.overwrite, cfg.s3_endpoint)
    if cfg.nsfw_classifier:
        t = time.perf_counter()
        files, has_nsfw = _score_nsfw(cfg, files, out), True
        _progress("nsfw classifier", t)
    cols = [c for c in LOG_COLUMNS if c != "nsfw_score" or has_nsfw]
    ds = parquet.read(files, cols, "platform log", cfg.s3_endpoint, on_error="raise").drop_columns(
        [parquet.FILE_COL, parquet.ERROR_COL])
    common = {"nsfw_max": cfg.nsfw_max, "has_nsfw": has_nsfw, "max_prompt_chars": cfg.limits.max_prompt_chars}

    t = time.perf_counter()
    p = _pass1_all(ds, cfg, common, log_uri)
    _positives(p, cfg)
    _progress("pass 1 (histograms, prompts)", t, rows=p["rows"], prompts=len(p["uph"]),
              positive_prompts=len(p["pos_keys"]), remix_cutoff=p["cutoff"])
    keys_ref = ray.put(p["pos_keys"])
    t = time.perf_counter()
    _threshold_pass(ds, cfg, common, keys_ref, p)
    _progress("pass 2 (view threshold)", t, threshold=p["threshold"], remixed_images=p["remixed_images"])
    t = time.perf_counter()
    per_prompt, summ = _pairs_pass(ds, cfg, common, keys_ref, p)
    pairs_per_split = {s: int(summ["n_pairs"][summ["kept"] & (summ["split"] == s)].sum()) for s in SPLITS}
    _progress("pass 3 (positives, negatives, pairs)", t, kept_prompts=int(summ["kept"].sum()), pairs=pairs_per_split)
    t = time.perf_counter()
    shard_stats = _pack_pass(per_prompt, cfg, out, pairs_per_split)
    bad = {u: r for st in shard_stats for u, r in st["bad_images"].items()}
    counts = _counts(p, summ, pairs_per_split, shard_stats, bad)
    written = counts["triplets"]
    _progress("pass 4 (pack shards)", t, shards=len(shard_stats), rows=written, bad_images=len(bad),
              resumed_shards=sum(bool(st.get("resumed")) for st in shard_stats))
    wall = time.perf_counter() - wall0
    summary = {
        "out": storage.redact(out), "log": storage.redact(log_uri),
        **{f"{s}": storage.join(out, s) for s in SPLITS if written[s]},
        "counts": counts, "shards": len([s for s in shard_stats if s["rows"]]),
        "resumed_shards": sum(bool(st.get("resumed")) for st in shard_stats),
        "bad_image_examples": dict(list(sorted(bad.items()))[:20]),
        "wall_s": round(wall, 1), "rows_per_s": round(p["rows"] / wall, 1),
    }
    write_datacard(out, summary, cfg, {"remix_values": p["remix_v"], "remix_counts": p["remix_c"],
                                       "view_bins": VIEW_BINS, "views_hist": p["views_hist"],
                                       "zero_remix_views_hist": p["zero_hist"], "vbfr_hist": p["vbfr_hist"]},
                   cfg.s3_endpoint)
    images_in_pairs = counts["images_in_triplets"]
    if cfg.pack and sum(st["images"] for st in shard_stats) and len(bad) / max(images_in_pairs, 1) > \
            cfg.max_bad_image_rate:
        ex = "; ".join(f"{u}: {r}" for u, r in list(sorted(bad.items()))[:5])
        raise DataError(f"{len(bad)} of {images_in_pairs} images are unusable "
                        f"(> max_bad_image_rate={cfg.max_bad_image_rate}); e.g. {ex}")
    return summary
