"""The curation rules in single-process pandas: the benchmark's reference, and an
independent implementation the tests check the Ray Data job against.

It loads the whole log into one DataFrame, which is what sr-ray's job avoids.
It selects triplets (prompt, pos_id, neg_id, split) but does not pack images.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sr_ray.curation.curate import CurateConfig, normalize_prompt, pair_rank, split_of
from sr_ray.curation.datacard import table1_ratios


def curate_pandas(log: pd.DataFrame, cfg: CurateConfig) -> tuple[pd.DataFrame, dict]:
    """(triplets DataFrame [prompt, pos_id, neg_id, pos_uri, neg_uri, split], counts dict)."""
    counts: dict = {"images": len(log)}
    if "nsfw_score" in log.columns:
        nsfw = log["nsfw_score"].fillna(0) >= cfg.nsfw_max
        counts["nsfw_removed"] = int(nsfw.sum())
        log = log[~nsfw]
    else:
        counts["nsfw_removed"] = 0
    n = len(log)
    k = max(1, math.ceil(cfg.top_fraction * n))
    cutoff = int(log["remix_count"].sort_values(ascending=False).iloc[k - 1]) if n else 0
    cutoff = max(cutoff, cfg.min_remixes)
    content = log["remix_count"] >= cutoff
    creator = log["influencer_remix"].fillna(False).astype(bool)
    log = log.assign(is_pos=content | creator)
    counts.update(remix_cutoff=cutoff, positives_content=int((content & ~creator).sum()),
                  positives_creator=int((creator & ~content).sum()), positives_both=int((content & creator).sum()))
    pos_prompts = log.loc[log["is_pos"], "prompt"].unique()
    in_pos = log["prompt"].isin(pos_prompts)
    vals = log.loc[in_pos & (log["remix_count"] >= 1), "views_before_first_remix"].dropna()
    threshold = float(np.quantile(vals.to_numpy(dtype=np.float64), cfg.threshold_quantile)) if len(vals) else math.inf
    counts["view_threshold"] = threshold
    sub = log[in_pos]
    sub = sub.assign(is_neg=(~sub["is_pos"]) & (sub["remix_count"] == 0) & (sub["views"] >= threshold))
    per = sub.groupby("prompt").agg(n=("is_pos", "size"), pos=("is_pos", "sum"), neg=("is_neg", "sum"))
    n_prompts = log["prompt"].nunique()
    all_pos = per["pos"] == per["n"]
    no_neg = (per["neg"] == 0) & ~all_pos
    counts["prompts"] = int(n_prompts)
    counts["prompts_dropped"] = {"no_positive": int(n_prompts - len(per)), "all_positive": int(all_pos.sum()),
                                 "no_negative": int(no_neg.sum())}
    kept = per.index[(per["neg"] > 0) & ~all_pos]
    counts["prompts_kept"] = int(len(kept))
    sub = sub[sub["prompt"].isin(kept)]
    pos = sub.loc[sub["is_pos"], ["prompt", "image_id", "image_uri"]]
    neg = sub.loc[sub["is_neg"], ["prompt", "image_id", "image_uri"]]
    counts["positives"], counts["negatives"] = int(len(pos)), int(len(neg))
    pairs = pos.merge(neg, on="prompt", suffixes=("_p", "_n")).rename(columns={
        "image_id_p": "pos_id", "image_id_n": "neg_id", "image_uri_p": "pos_uri", "image_uri_n": "neg_uri"})
    counts["pairs_before_cap"] = int(len(pairs))
    counts["table1"] = table1_ratios(len(kept), len(pos), len(neg), len(pairs), counts["positives_creator"],
                                     int(log["is_pos"].sum()))
    if cfg.max_pairs_per_prompt and len(pairs):
        pairs = pairs.assign(_r=[pair_rank(cfg.seed, a, b) for a, b in zip(pairs["pos_id"], pairs["neg_id"])])
        pairs = pairs.sort_values(["prompt", "_r"]).groupby("prompt").head(cfg.max_pairs_per_prompt).drop(columns="_r")
    splits = {p: split_of(normalize_prompt(p), cfg.split_ratios) for p in pairs["prompt"].unique()}
    pairs = pairs.assign(split=pairs["prompt"].map(splits))
    counts["triplets"] = {s: int((pairs["split"] == s).sum()) for s in ("train", "val", "test")}
    return pairs[["prompt", "pos_id", "neg_id", "pos_uri", "neg_uri", "split"]].reset_index(drop=True), counts
