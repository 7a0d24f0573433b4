"""Select the fine-tuning set of Stable Diffusion from scored generations (paper sec. 4.3).

Per prompt with at least ``min_images`` scored images, the best-scored image
becomes a ``source=best`` row with its prompt, and the worst a ``source=worst``
row whose prompt carries the special token (default ``t@y quality``; appended
after ``token_separator``, or put first with ``token_position=prefix``). At
inference the token is the *negative prompt*: the fine-tuned model has learned
what "t@y quality" looks like, and guidance steers away from it. A prompt whose
best and worst differ by ``margin`` or less is skipped (a near tie says nothing;
an exact tie is always skipped). Regularization rows (a LAION-like set:
``caption``, ``image`` bytes or ``image_uri``) are sampled to
``regularization_ratio`` x the selected rows, without replacement, as
``source=regularization``. With ``worst=false`` only the best rows are kept
(the closed loop's demo: its 2-layer text encoder does not keep the token apart
from the prompt, so a worst image teaches the prompt's words the wrong picture).

Output (the fine-tune-set contract): ``prompt``, ``image`` (bytes), ``source``
in {best, worst, regularization}, ``generation_id`` (regularization rows:
``reg:<file>:<row>``), plus ``score`` (null for regularization), shuffled (every
row goes to a shard by a seeded hash, and shards are in hash order), in shards
``part-NNNNN.parquet`` of about ``rows_per_shard`` rows written atomically. A
re-run with the same settings skips finished shards. Beside them:
``report.json``, ``report.md`` and ``score_distribution.png`` (best vs worst
scores, and the best-worst gap with the margin marked).

How it scales: Ray Data groups the scores by a hash of the prompt (only id,
prompt and score move) and picks best and worst per prompt in vectorised
partitions; the driver then holds two rows per prompt. One pass over the
generation files attaches the selected rows' image bytes (fetched from
``image_uri`` where there are none); regularization rows are read by file and
row number; a shuffle by shard key brings each shard's rows to one task, which
validates the images and writes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sr_ray.core import identity, images, parquet, special_token, storage
from sr_ray.core.config import ConfigError, to_dict
from sr_ray.core.errors import DataError
from sr_ray.core.ray_utils import init_ray
from sr_ray.reward.data import read_image_bytes

log = logging.getLogger(__name__)

SOURCES = ("best", "worst", "regularization")
FINETUNE_SCHEMA = pa.schema([("prompt", pa.string()), ("image", pa.binary()), ("source", pa.string()),
                             ("generation_id", pa.string()), ("score", pa.float32())])
# rows in flight between the stages: the contract's columns plus the shard, the order in it, and a fetch error
_FLIGHT = pa.schema([*FINETUNE_SCHEMA, ("shard", pa.int64()), ("order", pa.int64()), ("reason", pa.string())])


@dataclass
class SelectConfig:
    scores: str | None = None
    """Scoring-job output (local or s3://); none (the job, not this function): the scoring demo's output
    (scored first when missing)."""
    generations: str | None = None
    """Where the image bytes are: the generations that were scored; none: as recorded in <scores>/_summary.json."""
    regularization: str | None = None
    """Parquet file or folder with caption + image (bytes) or image_uri; none: the demo regularization set
    (only with the demo scores; otherwise give one or set regularization_ratio=0)."""
    out: str = "./runs/finetune-set-demo"
    min_images: int = 2
    """Prompts with fewer scored images are skipped."""
    margin: float = 0.0
    """Skip a prompt unless best - worst > margin (an exact tie is always skipped)."""
    token: str = special_token.DEFAULT
    """Special token in the worst image's prompt; the negative prompt at inference (recorded in
    ``<out>/finetune_set.json``, from where fine-tuning and generation read it)."""
    token_position: str = "suffix"
    """suffix: "<prompt><sep><token>"; prefix: "<token><sep><prompt>"."""
    token_separator: str = ", "
    worst: bool = True
    """Also the worst image per prompt, with the token (the paper); false: the best images only (the token is
    still recorded, but no row carries it: sample the fine-tuned model without it as negative prompt)."""
    regularization_ratio: float = 1.0
    """Regularization rows per selected (best and worst) row; the paper mixes in as many as selected."""
    val_prompts: float = 0.1
    """Share of the selectable prompts held out of the fine-tune set (seeded by prompt, so prompt-disjoint and
    the same on every run) and written as ``internal.jsonl`` beside it: the paper's "internal" evaluation
    prompts, which evaluate_t2i uses by default for a fine-tuning run on this set."""
    rows_per_shard: int = 1000
    seed: int = 0
    """Seed of the regularization sample and of the shuffle."""
    max_bad_image_rate: float = 0.05
    """Fail when more than this share of the rows' images cannot be read or decoded (they are skipped and counted)."""
    image_root: str | None = None
    """Prefix of relative image_uri values (generations and regularization)."""
    s3_endpoint: str | None = None
    ray_address: str | None = None
    batch_rows: int = 256
    """Rows per Ray Data batch when attaching image bytes."""
    demo: dict[str, Any] = field(default_factory=dict)
    """Demo regularization set: rows, image_size, seed, bad_rows, rows_per_file, cache_dir."""

    def __post_init__(self) -> None:
        if self.min_images < 2:
            raise ValueError("min_images must be >= 2 (best and worst must be different images)")
        if self.margin < 0:
            raise ValueError("margin must be >= 0")
        if not self.token.strip():
            raise ValueError("token must not be empty: it marks the worst images")
        if self.token_position not in ("suffix", "prefix"):
            raise ValueError("token_position must be suffix or prefix")
        if self.regularization_ratio < 0:
            raise ValueError("regularization_ratio must be >= 0")
        if not 0 <= self.val_prompts < 1:
            raise ValueError("val_prompts must be in [0, 1)")
        if self.rows_per_shard < 1 or self.batch_rows < 1:
            raise ValueError("rows_per_shard and batch_rows must be >= 1")
        if not 0.0 <= self.max_bad_image_rate <= 1.0:
            raise ValueError("max_bad_image_rate must be in [0, 1]")


def with_token(prompt: str, cfg: SelectConfig) -> str:
    """The worst image's prompt: the special token where ``token_position`` says."""
    if cfg.token_position == "prefix":
        return f"{cfg.token}{cfg.token_separator}{prompt}"
    return f"{prompt}{cfg.token_separator}{cfg.token}"


INTERNAL = special_token.HELD_OUT_FILE
"""The held-out prompts beside a fine-tune set (a prompt file: its set is named 'internal')."""


def held_out(seed: int, prompt: str, share: float) -> bool:
    """Whether ``prompt`` is one of the held-out evaluation prompts: a seeded hash of the prompt alone, so
    every image of a prompt goes the same way and a re-run holds out the same prompts."""
    return share > 0 and row_key(seed, f"val-prompt:{prompt}") % 1_000_000 < share * 1_000_000


def row_key(seed: int, ident: str) -> int:
    """A row's seeded 63-bit hash: its shard is key % shards and its place in the shard the key's order."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{ident}".encode(), digest_size=8).digest(), "little") >> 1


# --- checks before Ray -------------------------------------------------------------------------------------------

def _generations_of(cfg: SelectConfig, scores: str) -> str:
    if cfg.generations:
        return cfg.generations
    summary = storage.join(scores, "_summary.json")
    try:
        return json.loads(storage.read_bytes(summary, cfg.s3_endpoint))["generations"]
    except (FileNotFoundError, OSError, KeyError, ValueError):
        raise ConfigError(f"generations: not given, and {summary} (written by the scoring job) does not say "
                          f"where the scored generations are; pass generations=<their folder>") from None


# --- pass 1: best and worst per prompt ---------------------------------------------------------------------------

def _prompt_partition(t: pa.Table, parts: int) -> pa.Table:
    import pandas as pd

    h = pd.util.hash_array(t.column("prompt").to_numpy(zero_copy_only=False).astype(object))
    return t.append_column("pk", pa.array((h % np.uint64(parts)).astype(np.int64)))


def _best_worst(t: pa.Table) -> pa.Table:
    """One partition's rows -> per prompt: images, best id/score, worst id/score (ties: smallest id)."""
    df = t.select(["generation_id", "prompt", "score"]).to_pandas()
    scored = df[np.isfinite(df["score"].to_numpy(dtype=np.float64))]
    key = ["prompt", "score", "generation_id"]
    best = scored.sort_values(key, ascending=[True, False, True]).drop_duplicates("prompt")
    worst = scored.sort_values(key, ascending=[True, True, True]).drop_duplicates("prompt")
    out = (best.set_index("prompt").rename(columns={"generation_id": "best_id", "score": "best_score"})
           .join(worst.set_index("prompt").rename(columns={"generation_id": "worst_id", "score": "worst_score"})))
    out["images"] = scored.groupby("prompt").size()
    out = out.reset_index()
    unscored = int(len(df) - len(scored))
    table = pa.table({"prompt": pa.array(out["prompt"], pa.string()), "images": pa.array(out["images"], pa.int64()),
                      "best_id": pa.array(out["best_id"], pa.string()),
                      "best_score": pa.array(out["best_score"], pa.float64()),
                      "worst_id": pa.array(out["worst_id"], pa.string()),
                      "worst_score": pa.array(out["worst_score"], pa.float64())})
    return table.append_column("unscored", pa.array([unscored] + [0] * (len(table) - 1), pa.int64())) \
        if len(table) else table.append_column("unscored", pa.array([], pa.int64()))


def pick_per_prompt(score_files: list[str], fs, rows: int):
    """Ray Data: scores grouped by prompt (hash partitions) -> one row per prompt (see :func:`_best_worst`)."""
    import ray.data

    parts = max(1, min(200, rows // 20_000))
    ds = ray.data.read_parquet(score_files, filesystem=fs).select_columns(["generation_id", "prompt", "score"])
    ds = ds.map_batches(_prompt_partition, fn_kwargs={"parts": parts}, batch_format="pyarrow")
    ds = ds.groupby("pk", num_partitions=max(1, min(parts, 16))).map_groups(_best_worst, batch_format="pyarrow")
    tables = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if len(b)]
    if not tables:
        return None
    return pa.concat_tables(tables).sort_by("prompt")


# --- pass 2: attach image bytes ----------------------------------------------------------------------------------

def _fetch(uri: str | None, image_root: str | None, endpoint: str | None) -> tuple[bytes | None, str]:
    try:
        return read_image_bytes(uri, image_root, endpoint), ""
    except images.BadImage as e:
        return None, str(e)


def _get(ref):
    import ray

    return ref if isinstance(ref, pa.Table) else ray.get(ref)


def _attach_generations(t: pa.Table, plan, image_root: str | None, endpoint: str | None) -> pa.Table:
    """Generation rows that are in the plan -> flight rows with their image bytes (read from image_uri if none)."""
    plan = _get(plan)
    idx = pc.index_in(t.column("generation_id"), value_set=plan.column("generation_id"))
    keep = pc.is_valid(idx)
    t, idx = t.filter(keep), idx.filter(keep)
    if not len(t):
        return _FLIGHT.empty_table()
    rows = plan.take(idx)
    img = t.column("image").to_pylist() if "image" in t.column_names else [None] * len(t)
    uri = t.column("image_uri").to_pylist() if "image_uri" in t.column_names else [None] * len(t)
    reasons = [""] * len(t)
    for i in range(len(t)):
        if img[i] is None:
            img[i], reasons[i] = _fetch(uri[i], image_root, endpoint)
    return pa.table({"prompt": rows.column("prompt"), "image": pa.array(img, pa.binary()),
                     "source": rows.column("source"), "generation_id": rows.column("generation_id"),
                     "score": rows.column("score"), "shard": rows.column("shard"), "order": rows.column("order"),
                     "reason": pa.array(reasons, pa.string())}, schema=_FLIGHT)


def _read_regularization(t: pa.Table, image_root: str | None, endpoint: str | None, files_uri: str) -> pa.Table:
    """Items (file, row numbers, ids, shards, orders) -> flight rows of those regularization rows."""
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(files_uri, endpoint)
    out = []
    for item in t.to_pylist():
        with fs.open_input_file(item["path"]) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in ("caption", "image", "image_uri") if c in pf.schema_arrow.names]
            # read only the row groups that hold the rows asked for
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            starts = np.cumsum([0] + sizes)
            rows = np.asarray(item["rows"], np.int64)
            groups = sorted(set((np.searchsorted(starts, rows, side="right") - 1).tolist()))
            offset = np.cumsum([0] + [sizes[g] for g in groups])
            local = [offset[groups.index(int(g))] + r - starts[g]
                     for r, g in zip(rows, np.searchsorted(starts, rows, side="right") - 1)]
            sel = pf.read_row_groups(groups, columns=cols).take(pa.array(local, pa.int64()))
        img = sel.column("image").to_pylist() if "image" in cols else [None] * len(sel)
        uri = sel.column("image_uri").to_pylist() if "image_uri" in cols else [None] * len(sel)
        reasons = [""] * len(sel)
        for i in range(len(sel)):
            if img[i] is None:
                img[i], reasons[i] = _fetch(uri[i], image_root, endpoint)
        captions = sel.column("caption").to_pylist()
        for i, c in enumerate(captions):
            if c is None or not str(c).strip():
                reasons[i] = reasons[i] or "empty caption"
        out.append(pa.table({"prompt": pa.array([c or "" for c in captions], pa.string()),
                             "image": pa.array(img, pa.binary()),
                             "source": pa.array(["regularization"] * len(sel), pa.string()),
                             "generation_id": pa.array(item["ids"], pa.string()),
                             "score": pa.nulls(len(sel), pa.float32()),
                             "shard": pa.array(item["shards"], pa.int64()),
                             "order": pa.array(item["orders"], pa.int64()),
                             "reason": pa.array(reasons, pa.string())}, schema=_FLIGHT))
    return pa.concat_tables(out) if out else _FLIGHT.empty_table()


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def _pack_shard(t: pa.Table, out: str, endpoint: str | None) -> pa.Table:
    """One shard's rows -> validated, in hash order, written atomically (stats marker first, shard = commit)."""
    shard = int(t.column("shard")[0].as_py())
    t = t.sort_by([("order", "ascending"), ("generation_id", "ascending")])
    reasons = t.column("reason").to_pylist()
    imgs = t.column("image").to_pylist()
    for i, b in enumerate(imgs):
        if not reasons[i]:
            try:
                images.decode(b)
            except images.BadImage as e:
                reasons[i] = str(e)
    ok = pa.array([not r for r in reasons])
    good = t.filter(ok).select(FINETUNE_SCHEMA.names).cast(FINETUNE_SCHEMA)
    bad = {g: r for g, r in zip(t.column("generation_id").to_pylist(), reasons) if r}
    counts = {s: int(pc.sum(pc.equal(good.column("source"), s)).as_py() or 0) for s in SOURCES}
    stats = {"shard": shard, "rows": len(good), **counts, "bad_images": bad}
    storage.write_text(storage.join(out, "_shards", f"{shard:05d}.json"), json.dumps(stats), endpoint)
    storage.write_parquet(good, storage.join(out, shard_name(shard)), endpoint, row_group_size=128)
    return pa.table({"stats": [json.dumps(stats)]})


# --- report -------------------------------------------------------------------------------------------------------

def _dist(x: np.ndarray) -> dict[str, float]:
    if not len(x):
        return {}
    q = np.quantile(x, [0.05, 0.5, 0.95])
    return {"n": int(len(x)), "mean": round(float(x.mean()), 5), "std": round(float(x.std()), 5),
            "p05": round(float(q[0]), 5), "median": round(float(q[1]), 5), "p95": round(float(q[2]), 5)}


def plot(best: np.ndarray, worst: np.ndarray, gap_all: np.ndarray, margin: float) -> bytes:
    """PNG: score histograms of the selected best vs worst images; best - worst per prompt, margin marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    both = np.concatenate([best, worst]) if len(best) else np.zeros(1)
    bins = np.linspace(both.min(), both.max() + 1e-6, 41)
    a.hist(best, bins=bins, alpha=0.6, color="C2", label=f"best (n={len(best):,}, mean {best.mean():.3f})"
           if len(best) else "best")
    a.hist(worst, bins=bins, alpha=0.6, color="C3", label=f"worst (n={len(worst):,}, mean {worst.mean():.3f})"
           if len(worst) else "worst")
    a.set_xlabel("reward score (cosine similarity)")
    a.set_ylabel("images")
    a.set_title("Selected images: best vs worst per prompt")
    a.legend()
    if len(gap_all):
        b.hist(gap_all, bins=40, color="C0")
    b.axvline(margin, color="C3", ls="--", label=f"margin = {margin:g} (prompts at or left of it skipped)")
    b.set_xlabel("best - worst score of a prompt")
    b.set_ylabel("prompts")
    b.set_title(f"Score gap, all prompts with enough images (n={len(gap_all):,})")
    b.legend(fontsize=8)
    return images.figure_png(fig)


def markdown(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = ["# Fine-tune set", "", f"From `{report['scores']}` (scores) and `{report['regularization']}` "
             f"(regularization); {report['shards']} shards in `{report['out']}`.", "",
             "| | rows |", "| --- | ---: |"]
    for k in ("best", "worst", "regularization", "rows"):
        lines.append(f"| {k} | {c[k]:,} |")
    lines += ["", "| prompts | count |", "| --- | ---: |"]
    for k in ("prompts", "prompts_selected", "prompts_too_few_images", "prompts_within_margin", "prompts_held_out"):
        lines.append(f"| {k.replace('prompts_', '').replace('_', ' ') if k != 'prompts' else 'all'} | {c[k]:,} |")
    lines += ["", f"Worst prompts carry `{report['token_example']}`; use the token as the negative prompt at "
              f"inference.", "", "| score | n | mean | median | p05 | p95 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for k in ("best", "worst", "gap"):
        d = report["score_distribution"][k]
        if d:
            lines.append(f"| {k} | {d['n']:,} | {d['mean']:.4f} | {d['median']:.4f} | {d['p05']:.4f} | {d['p95']:.4f} |")
    lines += ["", f"Bad images skipped: {c['bad_images']}. Regularization: {c['regularization_requested']:,} "
              f"requested, {c['regularization_available']:,} available.", "", "![scores](score_distribution.png)"]
    return "\n".join(lines) + "\n"


# --- the job -------------------------------------------------------------------------------------------------------

@dataclass
class _Inputs:
    scores: str
    score_files: list
    generations: str
    gen_files: list
    reg_uri: str | None
    reg_files: list
    rows: int


def _inputs(cfg: SelectConfig) -> _Inputs:
    """Scores, their generations and the regularization set, every file checked."""
    endpoint = cfg.s3_endpoint
    scores = cfg.scores
    score_files = parquet.inputs(scores, "scores", ["generation_id", "prompt", "score"], endpoint=endpoint,
                                 kinds={"prompt": "string", "generation_id": "id"})
    generations = _generations_of(cfg, scores)
    gen_files = parquet.inputs(generations, "generations", ["generation_id"], ["image", "image_uri"],
                               {"image": "binary", "image_uri": "string"}, endpoint)
    reg_uri, reg_files = None, []
    if cfg.regularization_ratio > 0:
        reg_uri = cfg.regularization
        reg_files = parquet.inputs(reg_uri, "regularization", ["caption"], ["image", "image_uri"],
                                   {"image": "binary", "image_uri": "string", "caption": "string"}, endpoint)
    return _Inputs(scores, score_files, generations, gen_files, reg_uri, reg_files,
                   sum(f.rows for f in score_files))


def _pick(cfg: SelectConfig, inp: _Inputs) -> dict[str, Any]:
    """Pass 1: best and worst per prompt, and which prompts are kept (enough images, gap above the margin)."""
    t = time.perf_counter()
    sfs, _ = storage.resolve(inp.scores, cfg.s3_endpoint)
    per = pick_per_prompt([f.path for f in inp.score_files], sfs, inp.rows)
    if per is None:
        raise DataError(f"scores={inp.scores}: no scored rows")
    n_img = per.column("images").to_numpy()
    best_s, worst_s = per.column("best_score").to_numpy(), per.column("worst_score").to_numpy()
    enough = n_img >= cfg.min_images
    gap = best_s - worst_s
    chosen = enough & (gap > cfg.margin)
    held = np.array([held_out(cfg.seed, p, cfg.val_prompts) for p in per.column("prompt").to_pylist()], bool)
    held &= chosen
    sel = per.filter(pa.array(chosen & ~held))
    log.info("[select] pass 1 (best/worst per prompt): %d prompts, %d with >= %d images, %d selected (%.1fs)",
             len(per), int(enough.sum()), cfg.min_images, len(sel), time.perf_counter() - t)
    return {"per": per, "sel": sel, "n_img": n_img, "best_s": best_s, "worst_s": worst_s, "enough": enough,
            "gap": gap, "chosen": chosen, "kept": chosen & ~held,
            "held": sorted(per.filter(pa.array(held)).column("prompt").to_pylist())}


def _regularization_plan(cfg: SelectConfig, reg_files: list, n_sel: int) -> tuple[list[tuple[str, int]], int, int]:
    """(file, row) of every regularization row to use (seeded, without replacement), rows asked, rows there."""
    n_reg_want = int(round(cfg.regularization_ratio * n_sel))
    if not n_reg_want:
        return [], n_reg_want, 0
    sizes = [f.rows for f in reg_files]
    reg_available = int(sum(sizes))
    if reg_available < n_reg_want:
        log.warning("[select] regularization set has %d rows, fewer than the %d asked for (ratio %g): "
                    "using all of them", reg_available, n_reg_want, cfg.regularization_ratio)
    picks = np.sort(np.random.default_rng(cfg.seed).choice(reg_available, min(n_reg_want, reg_available),
                                                           replace=False))
    starts = np.cumsum([0] + sizes)
    fi = np.searchsorted(starts, picks, side="right") - 1
    return [(reg_files[f].path, int(r - starts[f])) for f, r in zip(fi, picks)], n_reg_want, reg_available


def _settings(cfg: SelectConfig, inp: _Inputs, n_shards: int) -> dict[str, Any]:
    return {"scores": inp.scores, "generations": inp.generations, "regularization": inp.reg_uri,
            "min_images": cfg.min_images, "margin": cfg.margin,
            "token": with_token("{prompt}", cfg) if cfg.worst else "none: no worst rows (worst=false)",
            "regularization_ratio": cfg.regularization_ratio, "seed": cfg.seed, "shards": n_shards,
            "val_prompts": cfg.val_prompts,
            "rows_per_shard": cfg.rows_per_shard,
            # the files as they are now: re-scored scores (same folder, new content) are other inputs
            "inputs": {"scores": [f.identity() for f in inp.score_files],
                       "generations": [f.identity() for f in inp.gen_files],
                       "regularization": [f.identity() for f in inp.reg_files]}}


def selected_sources(cfg: SelectConfig) -> tuple[str, ...]:
    """The rows each selected prompt gives: its best image, and its worst unless ``worst=false``."""
    return SOURCES[:2] if cfg.worst else SOURCES[:1]


def _generation_plan(cfg: SelectConfig, sel: pa.Table, n_shards: int, finished: set[int]) -> pa.Table:
    """Every selected best (and worst) row's id, prompt (the worst with the token), source, score, shard and place."""
    sources = selected_sources(cfg)
    ids = [g for s in sources for g in sel.column(f"{s}_id").to_pylist()]
    prompts = sel.column("prompt").to_pylist()
    keys = [row_key(cfg.seed, g) for g in ids]
    plan = pa.table({
        "generation_id": pa.array(ids, pa.string()),
        "prompt": pa.array([p if s == "best" else with_token(p, cfg) for s in sources for p in prompts], pa.string()),
        "source": pa.array([s for s in sources for _ in range(len(sel))], pa.string()),
        "score": pa.array(np.concatenate([sel.column(f"{s}_score").to_numpy() for s in sources]).astype(np.float32)),
        "shard": pa.array([k % n_shards for k in keys], pa.int64()),
        "order": pa.array(keys, pa.int64())})
    return plan.filter(pc.invert(pc.is_in(plan.column("shard"), pa.array(sorted(finished), pa.int64()))))


def _regularization_items(cfg: SelectConfig, reg_plan, n_shards: int, finished: set[int]) -> dict[str, dict]:
    """The regularization rows of unfinished shards, grouped by file: rows, ids, shards and places."""
    items: dict[str, dict[str, list]] = {}
    for path, r in reg_plan:
        ident = f"reg:{posixpath.splitext(posixpath.basename(path))[0]}:{r}"
        k = row_key(cfg.seed, ident)
        if k % n_shards in finished:
            continue
        it = items.setdefault(path, {"path": path, "rows": [], "ids": [], "shards": [], "orders": []})
        it["rows"].append(r)
        it["ids"].append(ident)
        it["shards"].append(k % n_shards)
        it["orders"].append(k)
    return items


def _write_shards(cfg: SelectConfig, inp: _Inputs, gen_plan: pa.Table, reg_items: dict, todo: int) -> list[dict]:
    """Pass 2: image bytes attached, grouped by shard, validated and written; the stats of each shard written."""
    import ray
    import ray.data

    t = time.perf_counter()
    stats: list[dict] = []
    if not todo:
        return stats
    endpoint = cfg.s3_endpoint
    gfs, _ = storage.resolve(inp.generations, endpoint)
    flight = ray.data.read_parquet([f.path for f in inp.gen_files], filesystem=gfs).map_batches(
        _attach_generations, batch_format="pyarrow", batch_size=cfg.batch_rows,
        fn_kwargs={"plan": ray.put(gen_plan), "image_root": cfg.image_root, "endpoint": endpoint})
    if reg_items:
        chunked = [{**{k: it[k][i:i + cfg.batch_rows] for k in ("rows", "ids", "shards", "orders")},
                    "path": it["path"]} for it in reg_items.values() for i in range(0, len(it["rows"]), cfg.batch_rows)]
        reg_ds = ray.data.from_items(chunked).map_batches(
            _read_regularization, batch_format="pyarrow", batch_size=1,
            fn_kwargs={"image_root": cfg.image_root, "endpoint": endpoint, "files_uri": inp.reg_uri})
        flight = flight.union(reg_ds)
    packed = flight.groupby("shard", num_partitions=max(1, min(todo, 64))).map_groups(
        _pack_shard, batch_format="pyarrow", fn_kwargs={"out": cfg.out, "endpoint": endpoint})
    for b in packed.iter_batches(batch_format="pyarrow", batch_size=None):
        stats += [json.loads(x) for x in b.column("stats").to_pylist()]
        log.info("[select] %d/%d shards written (%.0fs)", len(stats), todo, time.perf_counter() - t)
    return stats


def _report(cfg: SelectConfig, inp: _Inputs, pick: dict, all_stats: list[dict], bad: dict, n_shards: int,
            skipped: int, n_reg_want: int, reg_available: int, t0: float) -> dict[str, Any]:
    """report.json, report.md and the score-distribution plot beside the shards; returns the report."""
    per, enough, chosen, gap = pick["per"], pick["enough"], pick["chosen"], pick["gap"]
    best_s, worst_s, n_img = pick["best_s"], pick["worst_s"], pick["n_img"]
    counts = {"scored_rows": inp.rows, "prompts": len(per), "prompts_too_few_images": int((~enough).sum()),
              "prompts_within_margin": int((enough & ~chosen).sum()), "prompts_selected": len(pick["sel"]),
              "prompts_held_out": len(pick["held"]),
              "unscored_rows": int(pc.sum(per.column("unscored")).as_py() or 0),
              **{s: sum(st[s] for st in all_stats) for s in SOURCES}, "rows": sum(st["rows"] for st in all_stats),
              "regularization_requested": n_reg_want, "regularization_available": reg_available,
              "bad_images": len(bad)}
    report = {
        "out": cfg.out, "scores": inp.scores, "generations": inp.generations, "regularization": inp.reg_uri,
        "shards": n_shards, "shards_skipped": skipped, "counts": counts,
        "token_example": with_token("<prompt>", cfg),
        "score_distribution": {"best": _dist(best_s[pick["kept"]]), "worst": _dist(worst_s[pick["kept"]]),
                               "gap": _dist(gap[enough])},
        "images_per_prompt": {str(k): int(v) for k, v in zip(*np.unique(n_img, return_counts=True))},
        "bad_image_examples": dict(sorted(bad.items())[:20]), "config": to_dict(cfg),
        "wall_s": round(time.perf_counter() - t0, 1)}
    endpoint = cfg.s3_endpoint
    storage.write_text(storage.join(cfg.out, "report.json"), json.dumps(report, indent=1), endpoint)
    storage.write_text(storage.join(cfg.out, INTERNAL), "".join(json.dumps({"prompt": p}) + "\n"
                                                                 for p in pick["held"]), endpoint)
    storage.write_text(storage.join(cfg.out, "report.md"), markdown(report), endpoint)
    special_token.write(cfg.out, special_token.SET_FILE, cfg.token, endpoint)
    storage.write_bytes(storage.join(cfg.out, "score_distribution.png"),
                        plot(best_s[pick["kept"]], worst_s[pick["kept"]], gap[enough], cfg.margin), endpoint)
    log.info("[select] %d rows (best %d, worst %d, regularization %d) in %d shards under %s; report.md beside them",
             counts["rows"], counts["best"], counts["worst"], counts["regularization"], n_shards, cfg.out)
    return report


def select_pairs(cfg: SelectConfig) -> dict[str, Any]:
    """Best/worst per prompt + regularization -> shuffled fine-tune shards and a report; returns the summary."""
    t0 = time.perf_counter()
    if cfg.scores is None:
        raise ConfigError("scores= is required: the scoring job's output folder (local or s3://); the job "
                          "(sr-ray select_pairs) runs the scoring demo first when none is given")
    if cfg.regularization is None and cfg.regularization_ratio > 0:
        raise ConfigError("regularization: give the regularization set (caption + image/image_uri Parquet), "
                          "or set regularization_ratio=0 to select without one")
    init_ray(cfg.ray_address)
    inp = _inputs(cfg)
    log.info("[select] %d scored generations in %d shard(s) under %s", inp.rows, len(inp.score_files), inp.scores)
    pick = _pick(cfg, inp)
    n_sel = len(selected_sources(cfg)) * len(pick["sel"])
    reg_plan, n_reg_want, reg_available = _regularization_plan(cfg, inp.reg_files, n_sel)
    planned = n_sel + len(reg_plan)
    n_shards = max(1, math.ceil(planned / cfg.rows_per_shard))
    identity.same_settings(cfg.out, "_selection.json", _settings(cfg, inp, n_shards), "a fine-tune set",
                           cfg.s3_endpoint)
    present = storage.data_file_names(cfg.out, cfg.s3_endpoint)
    finished = {s for s in range(n_shards) if shard_name(s) in present}
    stats = _write_shards(cfg, inp, _generation_plan(cfg, pick["sel"], n_shards, finished),
                          _regularization_items(cfg, reg_plan, n_shards, finished), n_shards - len(finished))
    resumed = [json.loads(storage.read_bytes(storage.join(cfg.out, "_shards", f"{s:05d}.json"), cfg.s3_endpoint))
               for s in sorted(finished)]
    all_stats = stats + resumed
    bad = {g: r for st in all_stats for g, r in st["bad_images"].items()}
    report = _report(cfg, inp, pick, all_stats, bad, n_shards, len(finished), n_reg_want, reg_available, t0)
    if planned and len(bad) / planned > cfg.max_bad_image_rate:
        ex = "; ".join(f"{g}: {r}" for g, r in list(sorted(bad.items()))[:5])
        raise DataError(f"{len(bad)} of {planned} images are unusable (> max_bad_image_rate="
                        f"{cfg.max_bad_image_rate}); e.g. {ex}")
    return {k: report[k] for k in ("out", "shards", "shards_skipped", "counts", "score_distribution", "wall_s")} | {
        "report": storage.join(cfg.out, "report.md")}
