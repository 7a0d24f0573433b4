"""The curation job's record beside its shards: ``datacard.json``, ``REPORT.md`` and
``distributions.png`` (remix-count and view distributions, threshold marked)."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import numpy as np

from sr_ray.core import images, storage
from sr_ray.core.config import to_dict

# Table 1 / appendix A.3 of the paper: 1.7M images, 3M pairs, 104K prompts, positives 8% of the dataset's images
PAPER_TABLE1 = {"images_per_prompt": round(1.7e6 / 104e3, 1), "pairs_per_prompt": round(3e6 / 104e3, 1),
                "positive_share": 0.08, "creator_share_of_positives": None}
TABLE1_LABELS = {"images_per_prompt": "images per prompt", "pairs_per_prompt": "pairs per prompt (before any cap)",
                 "positive_share": "positives / dataset images",
                 "creator_share_of_positives": "creator-signal-only positives / positives"}


def table1_ratios(prompts: int, positives: int, negatives: int, pairs: int, creator_only: int,
                  all_positives: int) -> dict[str, float]:
    """The dataset's shape as the paper's Table 1 gives it: the dataset is the positives and negatives of the
    kept prompts (``prompts``, ``positives``, ``negatives``, ``pairs`` all of those); the creator share is over
    every positive found (``creator_only`` of ``all_positives``: remixed by an influencer, not in the top
    fraction)."""
    images = positives + negatives
    return {"images_per_prompt": round(images / max(prompts, 1), 3),
            "pairs_per_prompt": round(pairs / max(prompts, 1), 3),
            "positive_share": round(positives / max(images, 1), 5),
            "creator_share_of_positives": round(creator_only / max(all_positives, 1), 5)}


def table1_markdown(ratios: dict[str, float]) -> list[str]:
    lines = ["| Table 1 shape | this dataset | paper |", "| --- | --- | --- |"]
    for k, label in TABLE1_LABELS.items():
        paper = PAPER_TABLE1[k]
        fmt = (lambda v: f"{v:.1%}") if "share" in k else (lambda v: f"{v:.1f}")
        lines.append(f"| {label} | {fmt(ratios[k])} | {'—' if paper is None else fmt(paper)} |")
    return lines


def remix_summary(values: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Mean, share never remixed, and quantiles of remix_count from its value counts."""
    n = int(counts.sum())
    if n == 0:
        return {}
    cum = np.cumsum(counts)

    def q(p):
        return int(values[np.searchsorted(cum, p * (n - 1), side="right")])

    zero = int(counts[values == 0].sum())
    return {"images": n, "mean": round(float((values * counts).sum() / n), 4), "share_zero": round(zero / n, 4),
            "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": int(values.max())}


def plot(hist: dict[str, np.ndarray], threshold: float, cutoff: int) -> bytes:
    """PNG: remix-count distribution (log-log, cutoff marked) and view distributions (threshold marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    v, c = hist["remix_values"], hist["remix_counts"]
    m = v > 0
    a.loglog(v[m], c[m], ".", ms=4)
    a.axvline(cutoff, color="C3", ls="--", label=f"top-fraction cutoff = {cutoff} remixes")
    a.set_xlabel("remix count")
    a.set_ylabel("images")
    a.set_title(f"Remix counts ({int(c[v == 0].sum()):,} images never remixed, not shown)")
    a.legend()
    bins = hist["view_bins"]
    centers = np.sqrt(np.maximum(bins[:-1], 0.5) * bins[1:])
    for key, label in (("views_hist", "views, all images"), ("zero_remix_views_hist", "views, never remixed"),
                       ("vbfr_hist", "views before first remix (prompts with a positive)")):
        h = hist[key]
        if h.sum():
            b.step(centers, h, where="mid", label=label)
    if np.isfinite(threshold):
        b.axvline(threshold, color="C3", ls="--", label=f"view threshold = {threshold:,.0f}")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("views")
    b.set_ylabel("images")
    b.set_title("Exposure")
    b.legend(fontsize=8)
    return images.figure_png(fig)


def markdown(summary: dict[str, Any]) -> str:
    c = summary["counts"]
    d = c["prompts_dropped"]
    rs = summary["remix_distribution"]
    lines = [
        "# Curated triplets: data card", "",
        f"Log: `{summary['log']}`  ", f"Output: `{summary['out']}`", "",
        "| quantity | value |", "| --- | --- |",
        f"| images in the log | {c['images']:,} |",
        f"| removed: no usable prompt (null, blank, too long) | {c.get('bad_prompts', 0):,} |",
        f"| removed as NSFW | {c['nsfw_removed']:,} |",
        f"| extra rows of an image_id listed twice in a prompt | {c.get('duplicate_image_rows', 0):,} |",
        f"| remix cutoff (top {summary['config']['top_fraction']:.2%}: k = {c['top_k']:,}) | {c['remix_cutoff']:,} |",
        f"| positives (content only / creator only / both) | {c['positives']:,} "
        f"({c['positives_content']:,} / {c['positives_creator']:,} / {c['positives_both']:,}) |",
        f"| view threshold (q = {summary['config']['threshold_quantile']}) | {c['view_threshold']:,.1f} |",
        f"| negatives | {c['negatives']:,} |",
        f"| share of positives among all images of the log | {c['share_positive']:.2%} |",
        f"| prompts | {c['prompts']:,} |",
        f"| prompts kept | {c['prompts_kept']:,} |",
        f"| prompts dropped: no positive / nothing but positives / no negative | "
        f"{d['no_positive']:,} / {d['all_positive']:,} / {d['no_negative']:,} |",
        f"| pairs before the per-prompt cap | {c['pairs_before_cap']:,} |",
        f"| bad images (pairs dropped) | {c['bad_images']:,} ({c['dropped_pairs']:,}) |",
        "", "| split | prompts | triplets |", "| --- | --- | --- |",
    ]
    lines += [f"| {s} | {c['prompts_per_split'][s]:,} | {c['triplets'][s]:,} |" for s in ("train", "val", "test")]
    lines += ["", "The dataset's shape beside the paper's (Table 1, A.3; the dataset = the positives and negatives "
              "of the kept prompts):", ""] + table1_markdown(c["table1"])
    lines += ["", "Remix counts: " + ", ".join(f"{k} {v}" for k, v in rs.items()), "",
              "![distributions](distributions.png)", "", "Some triplets (first of a few prompts):", "",
              "![triplets](triplets.png)", ""]
    if summary.get("bad_image_examples"):
        lines += ["## Bad images (first 20)", ""] + [f"- `{u}`: {r}" for u, r in
                                                      summary["bad_image_examples"].items()] + [""]
    return "\n".join(lines)


def sample_triplets(out: str, endpoint: str | None, prompts: int = 6) -> list[tuple[str, bytes, bytes]]:
    """(prompt, popular image, unpopular image) of the first triplet of up to ``prompts`` distinct prompts of the
    first packed split (train, else val, else test); none when the shards hold paths, not bytes."""
    import pyarrow.parquet as pq

    for split in ("train", "val", "test"):
        try:
            files = storage.list_files(storage.join(out, split), endpoint=endpoint)
        except FileNotFoundError:
            continue
        fs, _ = storage.resolve(out, endpoint)
        rows: dict[str, tuple[str, bytes, bytes]] = {}
        for f in files:
            with fs.open_input_file(f) as fh:
                pf = pq.ParquetFile(fh)
                if "pos_image" not in pf.schema_arrow.names:
                    return []
                for r in pf.read(columns=["prompt", "pos_image", "neg_image"]).to_pylist():
                    rows.setdefault(r["prompt"], (r["prompt"], r["pos_image"], r["neg_image"]))
                    if len(rows) == prompts:
                        return list(rows.values())
        if rows:
            return list(rows.values())
    return []


def triplet_grid(rows: list[tuple[str, bytes, bytes]], cell: int = 128) -> bytes:
    """PNG (paper Fig. 2): a row per prompt, its popular image left, an unpopular one right, the prompt above."""
    from PIL import Image, ImageDraw

    cap, head, gap = 28, 18, 8
    chars = int((2 * cell + gap) / 6)
    canvas = Image.new("RGB", (2 * cell + gap, head + len(rows) * (cap + cell + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), "popular", fill="darkgreen")
    draw.text((cell + gap + 2, 2), "unpopular", fill="darkred")
    for k, (prompt, pos, neg) in enumerate(rows):
        y = head + k * (cap + cell + 4)
        draw.text((2, y + 1), "\n".join(textwrap.wrap(prompt, chars)[:2]), fill="black", spacing=1)
        for j, data in enumerate((pos, neg)):
            try:
                canvas.paste(images.decode(data).resize((cell, cell), Image.BICUBIC), (j * (cell + gap), y + cap))
            except images.BadImage:
                draw.rectangle([j * (cell + gap), y + cap, j * (cell + gap) + cell - 1, y + cap + cell - 1],
                               outline="red")
    return images.encode_png(canvas)


def write_datacard(out: str, summary: dict, cfg, hist: dict, endpoint: str | None) -> None:
    """Adds ``remix_distribution`` and ``config`` to ``summary`` and writes the files under ``out`` (with
    ``triplets.png``, a few training triplets, when the shards hold image bytes)."""
    summary["remix_distribution"] = remix_summary(hist["remix_values"], hist["remix_counts"])
    summary["config"] = to_dict(cfg)
    storage.write_text(storage.join(out, "datacard.json"), json.dumps(summary, indent=1, default=float), endpoint)
    storage.write_text(storage.join(out, "REPORT.md"), markdown(summary), endpoint)
    storage.write_bytes(storage.join(out, "distributions.png"),
                        plot(hist, summary["counts"]["view_threshold"], summary["counts"]["remix_cutoff"]), endpoint)
    rows = sample_triplets(out, endpoint)
    if rows:
        storage.write_bytes(storage.join(out, "triplets.png"), triplet_grid(rows), endpoint)
