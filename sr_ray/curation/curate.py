"""Curation: a platform log -> (prompt, popular image, unpopular image) triplet shards,
with the paper's bias controls (appendix A.2), in two streaming passes over the log.

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

How it scales: the log is read twice, streaming, by plain Ray tasks (a few per CPU, each
over consecutive row groups, in batches of ``batch_rows``), and never shuffled. Pass 1
yields per batch the histograms, per-prompt partial aggregates and (prompt hash, views
before first remix) of the remixed rows; the driver merges them (a few numbers per distinct
prompt, two per remixed row), finds the remix cutoff and the prompts with a positive, and
takes the exact view threshold from those rows' value counts. Pass 2 keeps only the
positives and negatives of positive prompts (a fifth of the simulated log) and brings them
to the driver, where dedup, per-prompt counts, the positive x negative pairs, the cap and
the splits are array operations (sort, group boundaries, repeat), the pair ranks hashed in
Ray tasks. Plain Ray tasks pack the shards, a few shards each. The driver holds the
candidates and the pairs' row numbers, never the log. (Ray Data's streaming executor was
measured at 2-3x these tasks' wall time per pass on 2 CPUs, hence plain tasks.)
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


def pair_ranks(seed: int, pos_ids, neg_ids) -> np.ndarray:
    """:func:`pair_rank` of many pairs (two equally long sequences of ids) as uint64: the same hash, without a
    Python int per pair (one joined buffer of 8-byte digests, read by numpy)."""
    blake, pre = hashlib.blake2b, f"{seed}\x1f"
    digests = b"".join(blake(f"{pre}{a}\x1f{b}".encode(), digest_size=8).digest() for a, b in zip(pos_ids, neg_ids))
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def prompt_hash(prompts) -> np.ndarray:
    """uint64 key per prompt string (vectorized; for grouping inside one run only)."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(prompts, dtype=object), categorize=False)


def linear_quantile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """numpy's default (linear) quantile of a multiset given as sorted ``values`` with ``counts``, to the last bit
    (numpy's interpolation: from the lower neighbour below the midpoint, from the upper one above it)."""
    n = int(counts.sum())
    if n == 0:
        return math.inf
    pos = (n - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    cum = np.cumsum(counts)
    v_lo = float(values[np.searchsorted(cum, lo, side="right")])
    v_hi = float(values[np.searchsorted(cum, hi, side="right")])
    t = pos - lo
    return v_hi - (v_hi - v_lo) * (1 - t) if t >= 0.5 else v_lo + (v_hi - v_lo) * t


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


# ---------------------------------------------------------------- the two streaming passes (batch functions)


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


def _ints(t: pa.Table, col: str, fill: int = 0) -> np.ndarray:
    return pc.fill_null(t.column(col), fill).to_numpy(zero_copy_only=False).astype(np.int64)


def _bools(t: pa.Table, col: str) -> np.ndarray:
    return pc.fill_null(t.column(col), False).to_numpy(zero_copy_only=False).astype(bool)


def _prompt_codes(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(per row: index into the batch's distinct prompts, per distinct prompt: its :func:`prompt_hash`).
    Hashing the distinct prompts only (Arrow's dictionary encoding) is ~10x less work than hashing every row;
    a null prompt gets index 0 (its row is dropped by the prompt check anyway)."""
    enc = pc.dictionary_encode(t.column("prompt").combine_chunks())
    idx = pc.fill_null(enc.indices, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    words = enc.dictionary.to_numpy(zero_copy_only=False)
    return idx, (prompt_hash(words) if len(words) else np.zeros(1, np.uint64))


def _member(x: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """x[i] in sorted_keys, for a sorted unique key array (binary search; no sort of ``x``)."""
    if not len(sorted_keys):
        return np.zeros(len(x), bool)
    i = np.minimum(np.searchsorted(sorted_keys, x), len(sorted_keys) - 1)
    return sorted_keys[i] == x


def _scan(t: pa.Table, nsfw_max: float, has_nsfw: bool, max_prompt_chars: int) -> pa.Table:
    """Pass 1, per batch: counts, histograms, per-prompt partial aggregates (hash, images, max remix, any
    influencer), and (prompt hash, views before first remix) of every kept remixed row, so the driver gets the
    exact view threshold once it knows the prompts with a positive (no second pass for it)."""
    prompt_ok = _prompt_ok(t, max_prompt_chars)
    keep = _nsfw_ok(t, nsfw_max, has_nsfw) & prompt_ok
    idx, u = _prompt_codes(t)
    idx = idx[keep]
    remix = _ints(t, "remix_count")[keep]
    views = _ints(t, "views")[keep]
    vbfr = _ints(t, "views_before_first_remix", -1)[keep]
    rv, rc = np.unique(remix, return_counts=True)
    n_img = np.bincount(idx, minlength=len(u))
    mx = np.full(len(u), -1, np.int64)
    np.maximum.at(mx, idx, remix)
    anyi = np.bincount(idx, weights=_bools(t, "influencer_remix")[keep], minlength=len(u)) > 0
    seen, remixed = n_img > 0, (remix >= 1) & (vbfr >= 0)
    return pa.table({
        "rows": [int(t.num_rows)], "nsfw_removed": [int((prompt_ok & ~keep).sum())],
        "bad_prompts": [int((~prompt_ok).sum())],
        "remix_values": [rv], "remix_counts": [rc],
        "views_hist": [np.histogram(views, VIEW_BINS)[0]],
        "zero_remix_views_hist": [np.histogram(views[remix == 0], VIEW_BINS)[0]],
        "ph": [u[seen]], "n_images": [n_img[seen]], "max_remix": [mx[seen]], "any_influencer": [anyi[seen]],
        "remixed_ph": [u[idx[remixed]]], "remixed_vbfr": [vbfr[remixed]],
    })


def _get(ref):
    import ray

    return ray.get(ref)


CANDIDATE_SCHEMA = pa.schema([("ph", pa.uint64()), ("prompt", pa.large_string()), ("image_id", pa.large_string()),
                              ("image_uri", pa.large_string()), ("uh", pa.uint64()), ("is_pos", pa.bool_()),
                              ("content", pa.bool_()), ("creator", pa.bool_())])


def _candidates(t: pa.Table, nsfw_max: float, has_nsfw: bool, max_prompt_chars: int, pos_keys, cutoff: int,
                threshold: float) -> pa.Table:
    """Pass 2, per batch: rows that are positives or negatives of positive prompts, labelled; the rest dropped."""
    keys = pos_keys if isinstance(pos_keys, np.ndarray) else _get(pos_keys)
    idx, u = _prompt_codes(t)
    remix = _ints(t, "remix_count")
    content = remix >= cutoff
    creator = _bools(t, "influencer_remix")
    is_pos = content | creator
    is_neg = ~is_pos & (remix == 0) & (_ints(t, "views") >= threshold)
    m = (_nsfw_ok(t, nsfw_max, has_nsfw) & _prompt_ok(t, max_prompt_chars) & _member(u, keys)[idx]
         & (is_pos | is_neg))
    mask = pa.array(m)
    uri = t.column("image_uri").filter(mask)
    return pa.table({
        "ph": u[idx[m]], "prompt": t.column("prompt").filter(mask), "image_id": t.column("image_id").filter(mask),
        "image_uri": uri, "uh": prompt_hash(uri.to_numpy(zero_copy_only=False)),  # counts distinct images
        "is_pos": is_pos[m], "content": content[m], "creator": creator[m],
    }).cast(CANDIDATE_SCHEMA)


# ---------------------------------------------------------------- per-prompt rules, vectorized over all candidates


def dedup_candidates(cand: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates -> (row numbers of the rows that count, ordered by prompt hash then image_id; the prompt group of
    each; duplicate rows per group). An image_id listed twice in a prompt (a log written twice, a join gone wrong)
    counts once: as a positive if either row says so, with the smallest URI (whatever the rows' order)."""
    order = pc.sort_indices(cand, sort_keys=[("ph", "ascending"), ("image_id", "ascending"),
                                             ("is_pos", "descending"), ("image_uri", "ascending")]).to_numpy()
    n = len(order)
    ph = cand.column("ph").to_numpy()[order]
    new_group = np.ones(n, bool)
    new_group[1:] = ph[1:] != ph[:-1]
    first = new_group.copy()
    if n > 1:
        ids = cand.column("image_id").take(pa.array(order)).combine_chunks()
        a, b = ids.slice(1), ids.slice(0, n - 1)
        same = pc.fill_null(pc.equal(a, b), pc.and_(pc.is_null(a), pc.is_null(b)))  # two null ids: the same
        first[1:] |= ~same.to_numpy(zero_copy_only=False)
    g_all = np.cumsum(new_group) - 1
    n_groups = int(new_group.sum())
    dups = np.bincount(g_all, minlength=n_groups) - np.bincount(g_all[first], minlength=n_groups)
    return order[first], g_all[first], dups


def cross_pairs(g: np.ndarray, is_pos: np.ndarray, n_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every positive x negative pair within a group, for rows sorted by group ``g``: (positive row, negative
    row, group) per pair. ``n_neg``: negatives per group. Built with repeat/arange, no loop over pairs."""
    pos_rows, neg_rows = np.flatnonzero(is_pos), np.flatnonzero(~is_pos)
    gp = g[pos_rows]
    reps = n_neg[gp]
    neg_start = np.searchsorted(g[neg_rows], gp)  # the group's first negative among neg_rows
    total = int(reps.sum())
    block = np.repeat(np.cumsum(reps) - reps, reps)
    pair_neg = neg_rows[np.repeat(neg_start, reps) + (np.arange(total) - block)]
    return np.repeat(pos_rows, reps), pair_neg, np.repeat(gp, reps)


def lowest_per_group(group: np.ndarray, rank: np.ndarray, cap: int) -> np.ndarray:
    """Mask of the ``cap`` lowest-ranked items of each group (all of them when ``cap`` is 0)."""
    if not cap or not len(group):
        return np.ones(len(group), bool)
    order = np.lexsort((rank, group))
    gs = group[order]
    start = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
    nth = np.arange(len(gs)) - np.repeat(start, np.diff(np.r_[start, len(gs)]))
    keep = np.zeros(len(group), bool)
    keep[order[nth < cap]] = True
    return keep


def distinct_per_group(group: np.ndarray, key: np.ndarray, n_groups: int) -> np.ndarray:
    """Number of distinct ``key`` values per group (``group`` in [0, n_groups))."""
    if not len(group):
        return np.zeros(n_groups, np.int64)
    order = np.lexsort((key, group))
    g, k = group[order], key[order]
    new = np.r_[True, (g[1:] != g[:-1]) | (k[1:] != k[:-1])]
    return np.bincount(g[new], minlength=n_groups)


def shard_plan(split: np.ndarray, rank: np.ndarray, rows_per_shard: int) -> tuple[np.ndarray, list]:
    """Pairs (split index, rank) -> (their order, grouped by shard; [(split, shard, start, end)] of that order).
    A pair's shard is its rank modulo its split's shard count (shards of about ``rows_per_shard`` rows)."""
    per_split = np.bincount(split, minlength=len(SPLITS))
    n_shards = np.maximum(1, -(-per_split // rows_per_shard))
    shard = (rank % n_shards.astype(np.uint64)[split]).astype(np.int64) if len(split) else np.zeros(0, np.int64)
    key = (np.cumsum(n_shards) - n_shards)[split] + shard  # a shard's number over all splits
    order = np.argsort(key.astype(np.uint16) if n_shards.sum() < 2**16 else key, kind="stable")  # radix sort
    sizes = np.bincount(key, minlength=int(n_shards.sum()))
    ends = np.cumsum(sizes)
    plan = [(SPLITS[s], int(i), int(ends[k] - sizes[k]), int(ends[k]))
            for k, (s, i) in enumerate((s, i) for s in range(len(SPLITS)) for i in range(n_shards[s])) if sizes[k]]
    return order, plan


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


def shard_marker(out: str, split: str, shard: int) -> str:
    """The done-marker of a shard (its stats as JSON, written after the shard)."""
    return storage.join(out, "_shards", f"{split}-{shard:05d}.json")


def fetch_images(uris: list[str], cfg_d: dict) -> tuple[dict[str, bytes], dict[str, str]]:
    """(bytes of every usable image, why each other one is unusable), read in ``fetch_threads`` threads."""
    endpoint, limits = cfg_d["s3_endpoint"], InputLimits(**cfg_d["limits"])
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

    data: dict[str, bytes] = {}
    bad: dict[str, str] = {}
    with ThreadPoolExecutor(cfg_d["fetch_threads"]) as ex:
        for u, b, err in ex.map(fetch, uris):
            if err:
                bad[u] = err
            else:
                data[u] = b
    return data, bad


def pack_shard(t: pa.Table, split: str, shard: int, out: str, cfg_d: dict) -> dict:
    """One shard's pairs (prompt, pos_id, neg_id, pos_uri, neg_uri; in output order) -> images fetched and
    validated (pack) -> ``<out>/<split>/part-*.parquet`` and its done-marker; returns the shard's stats."""
    endpoint = cfg_d["s3_endpoint"]
    pos_uri, neg_uri = t.column("pos_uri"), t.column("neg_uri")
    uris = sorted(set(pc.unique(pa.chunked_array(pos_uri.chunks + neg_uri.chunks, pos_uri.type)).to_pylist())) \
        if cfg_d["pack"] else []
    data, bad = fetch_images(uris, cfg_d) if cfg_d["pack"] else ({}, {})  # authors' form: training validates
    ok = t.filter(pc.invert(pc.or_(pc.is_in(pos_uri, pa.array(sorted(bad), pos_uri.type)),
                                   pc.is_in(neg_uri, pa.array(sorted(bad), neg_uri.type))))) if bad else t
    cols = {"prompt": ok.column("prompt"), "pos_id": ok.column("pos_id"), "neg_id": ok.column("neg_id")}
    if cfg_d["pack"]:
        keys = pa.array(list(data), pos_uri.type)
        blobs = pa.array(list(data.values()), pa.large_binary())
        cols |= {"pos_image": blobs.take(pc.index_in(ok.column("pos_uri"), value_set=keys)),
                 "neg_image": blobs.take(pc.index_in(ok.column("neg_uri"), value_set=keys))}
        table = pa.table(cols).cast(PACKED_SCHEMA)
    else:
        table = pa.table(cols | {"pos_path": ok.column("pos_uri"), "neg_path": ok.column("neg_uri")}).cast(PATHS_SCHEMA)
    path = storage.join(out, split, shard_name(split, shard))
    if table.num_rows:
        storage.write_parquet(table, path, endpoint, row_group_size=256)
    stats = {"split": split, "shard": shard, "rows": table.num_rows, "pairs": t.num_rows,
             "dropped_pairs": t.num_rows - table.num_rows, "images": len(uris) if cfg_d["pack"] else 0,
             "bad_images": dict(sorted(bad.items())), "file": path if table.num_rows else None,
             "bytes": int(table.nbytes)}
    storage.write_text(shard_marker(out, split, shard), json.dumps(stats), endpoint)  # last: marks the shard done
    return stats


def _pack_task(images_of: pa.Table, shards: list[tuple[str, int, int, int]], pos: np.ndarray, neg: np.ndarray,
               rank: np.ndarray, out: str, cfg_d: dict) -> list[dict]:
    """A Ray task packing a few shards in turn: (split, shard, start, end) rows of the pairs (``pos``, ``neg``:
    row numbers in ``images_of``: prompt, image_id, image_uri), in rank order; finished shards are skipped."""
    stats = []
    uri = pc.fill_null(images_of.column("image_uri"), "")  # a null URI: a bad image, named ''
    for split, shard, a, b in shards:
        marker = shard_marker(out, split, shard)
        if storage.exists(marker, cfg_d["s3_endpoint"]):  # finished by an earlier run
            stats.append({**json.loads(storage.read_bytes(marker, cfg_d["s3_endpoint"])), "resumed": True})
            continue
        o = a + np.argsort(rank[a:b], kind="stable")
        p, n = pa.array(pos[o]), pa.array(neg[o])
        t = pa.table({"prompt": images_of.column("prompt").take(p), "pos_id": images_of.column("image_id").take(p),
                      "neg_id": images_of.column("image_id").take(n), "pos_uri": uri.take(p), "neg_uri": uri.take(n)})
        stats.append(pack_shard(t, split, shard, out, cfg_d))
    return stats


def _rank_task(seed: int, pos_ids: pa.Array, neg_ids: pa.Array) -> np.ndarray:
    return pair_ranks(seed, pos_ids.to_pylist(), neg_ids.to_pylist())


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


def _flat(t: pa.Table, col: str, dtype) -> np.ndarray:
    """A list column of the per-batch results, all batches' lists end to end."""
    return pc.list_flatten(t.column(col)).to_numpy(zero_copy_only=False).astype(dtype)


def _stream_task(src: parquet.RowGroupSource, units: list, batch_rows: int, fn, kw: dict) -> pa.Table:
    """A Ray task: ``fn`` over the row groups ``units`` of the log, in batches of at most ``batch_rows`` rows."""
    fs, _ = storage.resolve(src.uri, src.endpoint)
    out = [fn(t.slice(a, batch_rows), **kw) for i, g, _ in units for t in src.read_unit(fs, i, g)
           for a in range(0, t.num_rows, batch_rows)]
    return pa.concat_tables(out, promote_options="permissive") if out else None


def _stream(files: list[parquet.ParquetFile], columns: list[str], cfg: CurateConfig, fn, kw: dict) -> pa.Table | None:
    """One streaming pass: ``fn(batch, **kw)`` over every batch of the log in plain Ray tasks (a few per CPU,
    consecutive row groups each), the results concatenated on the driver (None: no rows)."""
    import ray

    src = parquet.RowGroupSource(files, columns, "platform log", cfg.s3_endpoint, on_error="raise")
    units = src.units()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = max(cfg.batch_rows, math.ceil(sum(n for *_, n in units) / (4 * cpus)))
    groups, rows = [[]], 0
    for u in units:
        if rows >= per_task:
            groups, rows = groups + [[]], 0
        groups[-1].append(u)
        rows += u[2]
    task, src_ref = ray.remote(num_cpus=1)(_stream_task), ray.put(src)
    parts = [t for t in ray.get([task.remote(src_ref, g, cfg.batch_rows, fn, kw) for g in groups if g]) if t]
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def _scan_all(files, cols: list[str], cfg: CurateConfig, common: dict, log_uri: str) -> dict[str, Any]:
    """Pass 1 over the log: counts, histograms and per-prompt aggregates merged on the driver (a few numbers per
    distinct prompt), plus the prompt hash and views before first remix of every remixed row (two ints a row)."""
    t = _stream(files, [c for c in cols if c not in ("image_id", "image_uri")], cfg, _scan, common)
    p: dict[str, Any] = {k: int(pc.sum(t.column(k)).as_py() or 0) if t else 0
                         for k in ("rows", "nsfw_removed", "bad_prompts")}
    if p["rows"] == 0:
        raise DataError(f"platform log {storage.redact(log_uri)!r} has no rows")
    nb = len(VIEW_BINS) - 1
    p["views_hist"] = _flat(t, "views_hist", np.int64).reshape(-1, nb).sum(0)
    p["zero_hist"] = _flat(t, "zero_remix_views_hist", np.int64).reshape(-1, nb).sum(0)
    rv, inv = np.unique(_flat(t, "remix_values", np.int64), return_inverse=True)
    p["remix_v"], p["remix_c"] = rv, np.bincount(inv, weights=_flat(t, "remix_counts", np.int64),
                                                 minlength=len(rv)).astype(np.int64)
    uph, inv = np.unique(_flat(t, "ph", np.uint64), return_inverse=True)
    p["uph"] = uph
    p["n_images"] = np.bincount(inv, weights=_flat(t, "n_images", np.int64), minlength=len(uph)).astype(np.int64)
    p["max_remix"] = np.full(len(uph), -1, np.int64)
    np.maximum.at(p["max_remix"], inv, _flat(t, "max_remix", np.int64))
    p["any_infl"] = np.bincount(inv, weights=_flat(t, "any_influencer", np.float64), minlength=len(uph)) > 0
    p["remixed_ph"], p["remixed_vbfr"] = _flat(t, "remixed_ph", np.uint64), _flat(t, "remixed_vbfr", np.int64)
    p["kept_rows"] = p["rows"] - p["nsfw_removed"] - p["bad_prompts"]
    return p


def _positives(p: dict[str, Any], cfg: CurateConfig) -> None:
    """The remix cutoff of the top fraction and the prompts with a positive (added to ``p``)."""
    p["top_k"] = max(1, math.ceil(cfg.top_fraction * p["kept_rows"]))
    desc_v, desc_c = p["remix_v"][::-1], p["remix_c"][::-1]
    cutoff = int(desc_v[min(np.searchsorted(np.cumsum(desc_c), p["top_k"]), len(desc_v) - 1)]) if len(desc_v) else 0
    p["cutoff"] = max(cutoff, cfg.min_remixes)
    p["pos_keys"] = p["uph"][(p["max_remix"] >= p["cutoff"]) | p["any_infl"]]


def _threshold(p: dict[str, Any], cfg: CurateConfig) -> None:
    """The view threshold: the exact quantile of views before first remix over the remixed rows of prompts with
    a positive, from pass 1's (prompt hash, value) pairs (added to ``p``)."""
    v = p.pop("remixed_vbfr")[_member(p.pop("remixed_ph"), p["pos_keys"])]
    vv, vc = np.unique(v, return_counts=True)
    p["threshold"] = linear_quantile(vv, vc, cfg.threshold_quantile)
    p["remixed_images"] = int(len(v))
    p["vbfr_hist"] = np.histogram(v, VIEW_BINS)[0]


def _collect_candidates(files, cols: list[str], cfg: CurateConfig, common: dict, p: dict[str, Any]) -> pa.Table:
    """Pass 2 over the log: the positives and negatives of positive prompts (CANDIDATE_SCHEMA), to the driver."""
    if not len(p["pos_keys"]):
        return CANDIDATE_SCHEMA.empty_table()
    import ray

    kw = {**common, "pos_keys": ray.put(p["pos_keys"]), "cutoff": p["cutoff"], "threshold": p["threshold"]}
    t = _stream(files, [c for c in cols if c != "views_before_first_remix"], cfg, _candidates, kw)
    return (t.cast(CANDIDATE_SCHEMA) if t else CANDIDATE_SCHEMA.empty_table()).combine_chunks()


RANK_CHUNK = 250_000  # pairs per ranking task (fewer pairs are ranked on the driver)


def _ranks(ids: pa.Array, pos: np.ndarray, neg: np.ndarray, seed: int) -> np.ndarray:
    """:func:`pair_ranks` of the pairs (rows of ``ids``), in Ray tasks when there are many."""
    if len(pos) <= RANK_CHUNK:
        return pair_ranks(seed, ids.take(pos).to_pylist(), ids.take(neg).to_pylist())
    import ray

    task = ray.remote(num_cpus=1)(_rank_task)
    refs = [task.remote(seed, ids.take(pos[a:a + RANK_CHUNK]), ids.take(neg[a:a + RANK_CHUNK]))
            for a in range(0, len(pos), RANK_CHUNK)]
    return np.concatenate(ray.get(refs))


def _column(t: pa.Table, col: str, dtype=None) -> np.ndarray:
    x = t.column(col).to_numpy(zero_copy_only=False) if t.num_rows else np.zeros(0, dtype or np.int64)
    return x.astype(dtype) if dtype else x


def _prompt_rules(cand: pa.Table, cfg: CurateConfig, p: dict[str, Any]) -> tuple[dict, dict]:
    """Rules 4-6 over all candidates at once: per-prompt numbers (``summ``, one entry per positive prompt) and
    the selected pairs (``pairs``: rows of ``cand``, rank, split), with array operations, no loop over rows."""
    rows, g, dups = dedup_candidates(cand)
    n_groups = len(dups)
    is_pos, content, creator = (_column(cand, c, bool)[rows] for c in ("is_pos", "content", "creator"))

    def per_group(x):
        return np.bincount(g, weights=x, minlength=n_groups).astype(np.int64)

    starts = rows[np.flatnonzero(np.r_[True, g[1:] != g[:-1]])] if len(g) else np.zeros(0, np.int64)
    summ = {"ph": _column(cand, "ph", np.uint64)[starts], "n_pos": per_group(is_pos), "n_neg": per_group(~is_pos),
            "n_content": per_group(content & ~creator), "n_creator": per_group(creator & ~content),
            "n_both": per_group(content & creator), "n_duplicates": dups}
    summ["pairs_before_cap"] = summ["n_pos"] * summ["n_neg"]
    pos_r, neg_r, pg = cross_pairs(g, is_pos, summ["n_neg"])
    pos, neg = rows[pos_r], rows[neg_r]
    rank = _ranks(cand.column("image_id").combine_chunks(), pos, neg, cfg.seed)
    sel = lowest_per_group(pg, rank, cfg.max_pairs_per_prompt)
    pos, neg, pg, rank = pos[sel], neg[sel], pg[sel], rank[sel]
    summ["n_pairs"] = np.bincount(pg, minlength=n_groups).astype(np.int64)
    used = np.zeros(cand.num_rows, bool)
    used[pos], used[neg] = True, True
    group_of = np.zeros(cand.num_rows, np.int64)
    group_of[rows] = g
    used = np.flatnonzero(used)  # a row in a pair is in its prompt's group: count distinct URIs of those rows
    summ["n_used_images"] = distinct_per_group(group_of[used], _column(cand, "uh", np.uint64)[used], n_groups)
    summ["kept"] = summ["n_neg"] > 0
    n_img = p["n_images"][np.searchsorted(p["uph"], summ["ph"])] if n_groups else np.zeros(0, np.int64)
    summ["all_pos"] = (summ["n_neg"] == 0) & (summ["n_pos"] == n_img)
    summ["no_neg"] = (summ["n_neg"] == 0) & ~summ["all_pos"]
    kept = np.flatnonzero(summ["kept"])
    summ["split"] = np.full(n_groups, "", dtype=object)
    summ["split"][kept] = [split_of(normalize_prompt(x), cfg.split_ratios)
                           for x in cand.column("prompt").take(pa.array(starts[kept])).to_pylist()]
    group_split = np.full(n_groups, -1, np.int64)
    group_split[kept] = [SPLITS.index(x) for x in summ["split"][kept]]
    return summ, {"pos": pos, "neg": neg, "rank": rank, "split": group_split[pg]}


def _pack_pass(cand: pa.Table, pairs: dict, cfg: CurateConfig, out: str) -> list[dict]:
    """Pack and write shards in plain Ray tasks, a few shards each (finished ones are skipped); every shard's
    stats."""
    order, shards = shard_plan(pairs["split"], pairs["rank"], cfg.rows_per_shard)
    if not shards:
        return []
    import ray

    pos, neg, rank = pairs["pos"][order], pairs["neg"][order], pairs["rank"][order]
    cfg_d = {**to_dict(cfg), "s3_endpoint": cfg.s3_endpoint}
    images_ref = ray.put(cand.select(["prompt", "image_id", "image_uri"]))
    task = ray.remote(num_cpus=1)(_pack_task)
    n_tasks = max(1, min(len(shards), 2 * int(ray.cluster_resources().get("CPU", 1))))
    refs = []
    for group in np.array_split(np.arange(len(shards)), n_tasks):
        a, b = shards[group[0]][2], shards[group[-1]][3]
        mine = [(sp, sh, s - a, e - a) for sp, sh, s, e in shards[group[0]:group[-1] + 1]]
        refs.append(task.remote(images_ref, mine, pos[a:b], neg[a:b], rank[a:b], out, cfg_d))
    return [st for r in ray.get(refs) for st in r]


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
    wall0 = time.perf_counter()
    log_uri, out, files, has_nsfw = _inputs(cfg)
    init_ray(cfg.ray_address)
    require_shared_storage(log_uri, "log", "Ray tasks read it")
    require_shared_storage(out, "out", "Ray tasks write the shards")
    identity.claim(out, IDENTITY_FILE, curation_identity(cfg, files), f"out={storage.redact(out)}",
                   "overwrite=true", cfg.overwrite, cfg.s3_endpoint)
    if cfg.nsfw_classifier:
        t = time.perf_counter()
        files, has_nsfw = _score_nsfw(cfg, files, out), True
        _progress("nsfw classifier", t)
    cols = [c for c in LOG_COLUMNS if c != "nsfw_score" or has_nsfw]
    common = {"nsfw_max": cfg.nsfw_max, "has_nsfw": has_nsfw, "max_prompt_chars": cfg.limits.max_prompt_chars}

    t = time.perf_counter()
    p = _scan_all(files, cols, cfg, common, log_uri)
    _positives(p, cfg)
    _threshold(p, cfg)
    _progress("pass 1 (histograms, prompts, view threshold)", t, rows=p["rows"], prompts=len(p["uph"]),
              positive_prompts=len(p["pos_keys"]), remix_cutoff=p["cutoff"], threshold=p["threshold"])
    t = time.perf_counter()
    cand = _collect_candidates(files, cols, cfg, common, p)
    _progress("pass 2 (positives, negatives)", t, candidates=cand.num_rows)
    t = time.perf_counter()
    summ, pairs = _prompt_rules(cand, cfg, p)
    pairs_per_split = {s: int(summ["n_pairs"][summ["kept"] & (summ["split"] == s)].sum()) for s in SPLITS}
    _progress("pairs, cap, splits", t, kept_prompts=int(summ["kept"].sum()), pairs=pairs_per_split)
    t = time.perf_counter()
    shard_stats = _pack_pass(cand, pairs, cfg, out)
    bad = {u: r for st in shard_stats for u, r in st["bad_images"].items()}
    counts = _counts(p, summ, pairs_per_split, shard_stats, bad)
    written = counts["triplets"]
    _progress("pack shards", t, shards=len(shard_stats), rows=written, bad_images=len(bad),
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
