"""The curation rules in DuckDB SQL: the benchmark's second reference, what a user with one
big machine would pick (embedded, multi-threaded, spills to disk, reads the log's Parquet
in place), and a third implementation the tests check against the pandas one.

Same rules and counts as :mod:`sr_ray.bench.curate_reference` (NSFW, remix cutoff with ties,
creator signal, the view threshold as numpy's linear quantile, negatives, dropped prompts,
the per-prompt cap by :func:`~sr_ray.curation.curate.pair_rank`, splits by
:func:`~sr_ray.curation.curate.split_of`). The two hashes are Python functions registered as
DuckDB UDFs (Arrow-vectorized), so the triplets are the same to the last pair. It selects
triplets but does not pack images.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sr_ray.curation.curate import CurateConfig, linear_quantile, normalize_prompt, pair_ranks, split_of
from sr_ray.curation.datacard import table1_ratios

PAIR_COLUMNS = ["prompt", "pos_id", "neg_id", "pos_uri", "neg_uri", "split"]


def _source(log_path: str) -> tuple[str, bool]:
    """(read_parquet argument, has nsfw_score) of a log folder or file."""
    files = sorted(os.path.join(log_path, f) for f in os.listdir(log_path) if f.endswith(".parquet")) \
        if os.path.isdir(log_path) else [log_path]
    if not files:
        raise FileNotFoundError(f"{log_path}: no .parquet files there")
    has_nsfw = all("nsfw_score" in pq.read_schema(f).names for f in files)
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]", has_nsfw


def _register_udfs(con, cfg: CurateConfig) -> None:
    def rank(pos_ids: pa.Array, neg_ids: pa.Array) -> pa.Array:
        return pa.array(pair_ranks(cfg.seed, pos_ids.to_pylist(), neg_ids.to_pylist()), pa.uint64())

    def split(prompts: pa.Array) -> pa.Array:
        return pa.array([split_of(normalize_prompt(p), cfg.split_ratios) for p in prompts.to_pylist()], pa.string())

    con.create_function("pair_rank", rank, ["VARCHAR", "VARCHAR"], "UBIGINT", type="arrow")
    con.create_function("split_of", split, ["VARCHAR"], "VARCHAR", type="arrow")


def _one(con, sql: str, params: list | None = None) -> Any:
    return con.execute(sql, params or []).fetchone()[0]


def _select(con, log_path: str, cfg: CurateConfig) -> dict:
    """Runs the rules, leaving the triplets in the temporary table ``pairs``; returns the counts."""
    src, has_nsfw = _source(log_path)
    nsfw = f"coalesce(nsfw_score, 0) >= {float(cfg.nsfw_max)!r}" if has_nsfw else "false"
    con.execute(f"CREATE OR REPLACE TEMP VIEW raw AS SELECT * FROM read_parquet({src}, union_by_name=true)")
    counts: dict = {"images": _one(con, "SELECT count(*) FROM raw"), "nsfw_removed": _one(
        con, f"SELECT count(*) FROM raw WHERE {nsfw}")}
    con.execute(f"""CREATE OR REPLACE TEMP VIEW log AS
        SELECT prompt, image_id, image_uri, remix_count, views, views_before_first_remix AS vbfr,
               coalesce(influencer_remix, false) AS creator FROM raw WHERE NOT ({nsfw})""")
    n = counts["images"] - counts["nsfw_removed"]
    k = max(1, math.ceil(cfg.top_fraction * n))
    cutoff = _one(con, "SELECT remix_count FROM log ORDER BY remix_count DESC LIMIT 1 OFFSET ?", [k - 1]) if n else 0
    cutoff = max(int(cutoff), cfg.min_remixes)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE pos_prompts AS
        SELECT DISTINCT prompt FROM log WHERE remix_count >= {cutoff} OR creator""")
    content, creator, both, n_positive = con.execute(f"""SELECT
        count(*) FILTER (remix_count >= {cutoff} AND NOT creator), count(*) FILTER (creator AND remix_count < {cutoff}),
        count(*) FILTER (remix_count >= {cutoff} AND creator), count(*) FILTER (remix_count >= {cutoff} OR creator)
        FROM log""").fetchone()
    counts.update(remix_cutoff=cutoff, positives_content=content, positives_creator=creator, positives_both=both)
    # numpy's quantile to the last bit, from the value counts DuckDB aggregates
    vc = con.execute("""SELECT vbfr, count(*) FROM log SEMI JOIN pos_prompts USING (prompt)
        WHERE remix_count >= 1 AND vbfr IS NOT NULL GROUP BY vbfr ORDER BY vbfr""").fetchnumpy()
    values, value_counts = (np.asarray(x, np.float64) for x in vc.values())
    threshold = linear_quantile(values, value_counts, cfg.threshold_quantile)
    counts["view_threshold"] = threshold
    _pairs(con, cfg, cutoff, threshold)
    counts.update(_prompt_counts(con))
    counts["table1"] = table1_ratios(counts["prompts_kept"], counts["positives"], counts["negatives"],
                                     counts["pairs_before_cap"], creator, n_positive)
    counts["triplets"] = {s: 0 for s in ("train", "val", "test")} | dict(
        con.execute("SELECT split, count(*) FROM pairs GROUP BY split").fetchall())
    return counts


def _pairs(con, cfg: CurateConfig, cutoff: int, threshold: float) -> None:
    """Tables ``sub`` (rows of positive prompts, labelled), ``per`` (per prompt), ``kept`` and ``pairs``."""
    thr = "'infinity'::DOUBLE" if math.isinf(threshold) else repr(float(threshold))
    con.execute(f"""CREATE OR REPLACE TEMP TABLE sub AS
        SELECT prompt, image_id, image_uri, is_pos, NOT is_pos AND remix_count = 0 AND views >= {thr} AS is_neg
        FROM (SELECT *, remix_count >= {cutoff} OR creator AS is_pos FROM log SEMI JOIN pos_prompts USING (prompt))""")
    con.execute("""CREATE OR REPLACE TEMP TABLE per AS SELECT prompt, count(*) AS n,
        count(*) FILTER (is_pos) AS pos, count(*) FILTER (is_neg) AS neg FROM sub GROUP BY prompt""")
    con.execute("CREATE OR REPLACE TEMP TABLE kept AS SELECT prompt, split_of(prompt) AS split FROM per "
                "WHERE neg > 0 AND pos < n")
    ranked = "pair_rank(p.image_id, q.image_id)" if cfg.max_pairs_per_prompt else "0"
    con.execute(f"""CREATE OR REPLACE TEMP TABLE all_pairs AS
        SELECT p.prompt, p.image_id AS pos_id, q.image_id AS neg_id, p.image_uri AS pos_uri, q.image_uri AS neg_uri,
               k.split, {ranked} AS r
        FROM sub p JOIN sub q ON p.prompt = q.prompt AND p.is_pos AND q.is_neg JOIN kept k ON k.prompt = p.prompt""")
    cap = f"QUALIFY row_number() OVER (PARTITION BY prompt ORDER BY r) <= {int(cfg.max_pairs_per_prompt)}" \
        if cfg.max_pairs_per_prompt else ""
    con.execute(f"CREATE OR REPLACE TEMP TABLE pairs AS SELECT {', '.join(PAIR_COLUMNS)} FROM all_pairs {cap}")


def _prompt_counts(con) -> dict:
    prompts = _one(con, "SELECT count(DISTINCT prompt) FROM log")
    with_pos, all_pos, no_neg, kept = con.execute("""SELECT count(*), count(*) FILTER (pos = n),
        count(*) FILTER (neg = 0 AND pos < n), count(*) FILTER (neg > 0 AND pos < n) FROM per""").fetchone()
    positives, negatives = con.execute("""SELECT count(*) FILTER (is_pos), count(*) FILTER (is_neg)
        FROM sub SEMI JOIN kept USING (prompt)""").fetchone()
    return {"prompts": prompts, "prompts_dropped": {"no_positive": prompts - with_pos, "all_positive": all_pos,
                                                    "no_negative": no_neg},
            "prompts_kept": kept, "positives": positives, "negatives": negatives,
            "pairs_before_cap": _one(con, "SELECT count(*) FROM all_pairs")}


def _connect(cfg: CurateConfig, threads: int | None):
    import duckdb

    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    _register_udfs(con, cfg)
    return con


def curate_duckdb(log_path: str, cfg: CurateConfig, threads: int | None = None) -> tuple[pd.DataFrame, dict]:
    """(triplets DataFrame [prompt, pos_id, neg_id, pos_uri, neg_uri, split], counts dict) of a local log
    folder or file, with ``threads`` DuckDB threads (default: all cores)."""
    con = _connect(cfg, threads)
    counts = _select(con, log_path, cfg)
    return con.execute(f"SELECT {', '.join(PAIR_COLUMNS)} FROM pairs").df(), counts


def curate_duckdb_to(log_path: str, cfg: CurateConfig, out: str, threads: int | None = None) -> dict:
    """:func:`curate_duckdb`, the triplets written by DuckDB in the authors' form (``<out>/<split>/part-00000.parquet``
    with pos_path/neg_path) instead of returned; returns the counts."""
    con = _connect(cfg, threads)
    counts = _select(con, log_path, cfg)
    for s in ("train", "val", "test"):
        os.makedirs(os.path.join(out, s), exist_ok=True)
        path = os.path.join(out, s, "part-00000.parquet").replace("'", "''")
        con.execute(f"""COPY (SELECT prompt, pos_id, neg_id, pos_uri AS pos_path, neg_uri AS neg_path FROM pairs
                        WHERE split = '{s}') TO '{path}' (FORMAT parquet)""")
    return counts
