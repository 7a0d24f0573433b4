"""What the prompt analysis writes under ``out``:

- ``table2.md`` / ``table2.csv``: KL(row || column) for every ordered pair with its bootstrap interval (the
  paper's Table 2), then Jensen-Shannon and the label-shuffle null;
- ``distributions.csv``: each dataset's share of its prompts per cluster (a row per cluster);
- ``clusters.png``: each dataset's share of prompts per cluster (Fig. 4);
- ``tsne.png``: the 2-D t-SNE of the sample coloured by dataset (Fig. 8);
- ``themes.md``: per dataset, the clusters that add most to KL(dataset || the others pooled), with their top
  words and example prompts (Fig. 3's themes);
- ``clusters.parquet``: every sampled prompt with dataset, its first words, cluster and t-SNE x/y;
- ``report.md``, ``summary.json``, ``config.yaml``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa

from sr_ray.analysis import divergence
from sr_ray.core import images, storage
from sr_ray.core.config import dump_yaml


def kl_markdown(div: dict[str, dict[str, divergence.Divergence]], level: float) -> str:
    """KL(row || column) matrix, each cell ``value [low, high]``."""
    names = list(div)
    head = ["| KL(row ‖ column), nats | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows = []
    for a in names:
        cells = ["—" if a == b else f"{div[a][b].kl:.3f} [{div[a][b].ci_low:.3f}, {div[a][b].ci_high:.3f}]"
                 for b in names]
        rows.append(f"| **{a}** | " + " | ".join(cells) + " |")
    return "\n".join(head + rows) + f"\n\n[low, high]: {level:.0%} basic bootstrap interval over prompts."


def js_markdown(div: dict[str, dict[str, divergence.Divergence]]) -> str:
    """One row per unordered pair: JS with interval, both KLs, the shuffle null and its p-value."""
    names = list(div)
    lines = ["| pair | JS, nats | KL(a ‖ b) | KL(b ‖ a) | null 95% (a ‖ b) | p-value | prompts a, b |",
             "|---|---|---|---|---|---|---|"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d, r = div[a][b], div[b][a]
            lines.append(f"| {a} vs {b} | {d.js:.3f} [{d.js_ci_low:.3f}, {d.js_ci_high:.3f}] | {d.kl:.3f} | "
                         f"{r.kl:.3f} | {d.null_p95:.3f} | {d.p_value:.3g} | {d.n_p:,}, {d.n_q:,} |")
    return "\n".join(lines)


def table_frame(div: dict[str, dict[str, divergence.Divergence]]) -> pd.DataFrame:
    return pd.DataFrame([{"p": a, "q": b, **d.as_dict()} for a, row in div.items() for b, d in row.items()])


def shares(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """Share of each dataset's sample per cluster: rows clusters 0..k-1, a column per dataset."""
    t = pd.crosstab(frame["cluster"], frame["dataset"]).reindex(range(k), fill_value=0)
    t = t[list(dict.fromkeys(frame["dataset"]))]
    return t / t.sum(axis=0)


def themes(frame: pd.DataFrame, k: int, smoothing: float, per_dataset: int) -> dict[str, list[dict]]:
    """Per dataset, its ``per_dataset`` clusters with the largest term p log(p / q) of KL(dataset || others),
    where q is the other datasets' pooled (smoothed) distribution."""
    counts = pd.crosstab(frame["cluster"], frame["dataset"]).reindex(range(k), fill_value=0)
    out = {}
    for name in dict.fromkeys(frame["dataset"]):
        p = divergence.smoothed(counts[name].to_numpy(), smoothing)
        q = divergence.smoothed(counts.drop(columns=[name]).sum(axis=1).to_numpy(), smoothing)
        term = p * np.log(p / q)
        top = np.argsort(-term, kind="stable")[:per_dataset]
        out[name] = [{"cluster": int(c), "share": float(p[c]), "share_others": float(q[c]),
                      "ratio": float(p[c] / q[c]), "kl_term": float(term[c]),
                      "prompts": int(counts.loc[c, name])} for c in top]
    return out


def themes_markdown(frame: pd.DataFrame, th: dict[str, list[dict]], words: dict[int, list[str]], examples: int,
                    seed: int) -> str:
    lines = ["# Themes: where each dataset is densest", "",
             "Per dataset, the clusters that add most to KL(dataset ‖ the other datasets pooled): its share of "
             "the dataset's prompts vs the others' share, the cluster's top words (by count × cluster-rarity) "
             "and example prompts of the dataset in it.", ""]
    rng = np.random.default_rng(seed)
    for name, rows in th.items():
        lines += [f"## {name}", ""]
        for r in rows:
            c = r["cluster"]
            mine = frame[(frame["cluster"] == c) & (frame["dataset"] == name)]["prompt"].tolist()
            picks = [mine[i] for i in sorted(rng.permutation(len(mine))[:examples])]
            lines += [f"### cluster {c}: {', '.join(words[c]) or '—'}", "",
                      f"{r['share']:.1%} of {name} vs {r['share_others']:.1%} of the others ({r['ratio']:.1f}×); "
                      f"{r['prompts']} prompts; KL term {r['kl_term']:.3f}", ""]
            lines += [f"- {p[:200]}" for p in picks] + [""]
    return "\n".join(lines)


def plot_clusters(sh: pd.DataFrame) -> bytes:
    """A panel per dataset: its share of prompts per cluster, clusters in one order for every panel (the
    first dataset's over-representation against the rest, so the datasets' differences read as slopes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sh.columns)
    rest = sh.drop(columns=[names[0]]).mean(axis=1)
    order = np.argsort(-np.log((sh[names[0]] + 1e-4) / (rest + 1e-4)).to_numpy(), kind="stable")
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 1.7 * len(names) + 0.8), sharex=True, sharey=True)
    for ax, name, colour in zip(np.atleast_1d(axes), names, plt.cm.tab10.colors):
        ax.bar(np.arange(len(sh)), sh[name].to_numpy()[order] * 100, width=1.0, color=colour)
        ax.set_ylabel("% prompts", fontsize=8)
        ax.set_title(name, fontsize=9, loc="left")
    np.atleast_1d(axes)[-1].set_xlabel(f"cluster ({len(sh)}), ordered by {names[0]}'s share over the others'")
    fig.suptitle("Cluster distribution per dataset (Ward clusters of Sentence-BERT embeddings)", fontsize=10)
    fig.tight_layout()
    return images.figure_png(fig)


def plot_tsne(frame: pd.DataFrame) -> bytes:
    """The sample's 2-D t-SNE, a colour per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    size = float(np.clip(3000 / max(len(frame), 1), 1.5, 12))
    for name, colour in zip(dict.fromkeys(frame["dataset"]), plt.cm.tab10.colors):
        part = frame[frame["dataset"] == name]
        ax.scatter(part["x"], part["y"], s=size, alpha=0.6, color=colour, label=f"{name} ({len(part):,})",
                   linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("t-SNE of prompt embeddings (first words, Sentence-BERT)", fontsize=10)
    ax.legend(fontsize=8, markerscale=max(1.0, 6 / size))
    fig.tight_layout()
    return images.figure_png(fig)


def write_all(cfg, frame: pd.DataFrame, div, words: dict[int, list[str]], counts: dict[str, dict],
              how: dict) -> None:
    """Every output but the summary (see the module doc)."""
    ep = cfg.s3_endpoint

    def w(name: str, data) -> None:
        storage.write_bytes(storage.join(cfg.out, name), data if isinstance(data, bytes) else data.encode(), ep)

    kl_md, js_md = kl_markdown(div, cfg.level), js_markdown(div)
    w("table2.md", f"{kl_md}\n\n{js_md}\n")
    w("table2.csv", table_frame(div).to_csv(index=False))
    sh = shares(frame, cfg.clusters)
    w("distributions.csv", sh.rename_axis("cluster").reset_index().to_csv(index=False))
    w("clusters.png", plot_clusters(sh))
    if cfg.tsne:
        w("tsne.png", plot_tsne(frame))
    th = themes(frame, cfg.clusters, cfg.smoothing, cfg.themes_per_dataset)
    w("themes.md", themes_markdown(frame, th, words, cfg.examples_per_theme, cfg.seed))
    cols = ["dataset", "prompt", "text", "cluster", "x", "y"]
    storage.write_parquet(pa.Table.from_pandas(frame[cols], preserve_index=False),
                          storage.join(cfg.out, "clusters.parquet"), ep)
    w("config.yaml", dump_yaml(cfg))
    w("report.md", report_markdown(cfg, counts, how, kl_md, js_md, th, words))


def report_markdown(cfg, counts: dict[str, dict], how: dict, kl_md: str, js_md: str, th: dict, words: dict) -> str:
    rows = "\n".join(f"| {n} | {c['read']:,} | {c['examined']:,} | {c['dropped_non_english']:,} | {c['sampled']:,} |"
                     for n, c in counts.items())
    short = [n for n, c in counts.items() if cfg.sample_per_dataset and c["sampled"] < cfg.sample_per_dataset]
    lines = [
        "# Prompt analysis", "",
        f"Datasets: {', '.join(counts)}. English prompts (dropped: mostly non-Latin letters, or langid "
        f"{cfg.english_confidence}+ sure of another language with under {cfg.english_vocab_share:.0%} English "
        f"words), "
        f"{cfg.sample_per_dataset or 'all'} sampled per dataset (seed {cfg.seed}), cut to their first "
        f"{cfg.first_words or 'all'} words, embedded with {cfg.embed.model}, {cfg.clusters} Ward clusters "
        f"({how['method']}: {how['ward_points']:,} points in the tree, {how['assigned']:,} assigned), "
        f"smoothing {cfg.smoothing} per cluster, {cfg.n_boot} bootstrap resamples.", "",
        "| dataset | distinct prompts | examined | dropped (not English) | sampled |", "|---|---|---|---|---|", rows, ""]
    if short:
        lines += [f"Fewer English prompts than sample_per_dataset={cfg.sample_per_dataset} in: {', '.join(short)} "
                  + ("(every dataset sampled down to the smallest: equal_samples)." if cfg.equal_samples else
                     "(all of them are used; equal_samples=true samples every dataset down to the smallest)."), ""]
    lines += ["## Table 2: KL divergence between the datasets' cluster distributions", "", kl_md, "", js_md, "",
              "A KL below its shuffle null (what the same prompts dealt out at random give) is no evidence of a "
              "difference; the interval says how much the value moves with the sample.", "",
              "## Themes (top cluster per dataset; all in themes.md)", ""]
    lines += [f"- **{n}**: cluster {r[0]['cluster']} ({', '.join(words[r[0]['cluster']])}): "
              f"{r[0]['share']:.1%} vs {r[0]['share_others']:.1%} of the others" for n, r in th.items() if r]
    lines += ["", "Pictures: clusters.png (cluster distribution per dataset, Fig. 4)"
              + (", tsne.png (t-SNE coloured by dataset, Fig. 8)." if cfg.tsne else ".")]
    return "\n".join(lines) + "\n"


def write_summary(cfg, summary: dict) -> None:
    storage.write_bytes(storage.join(cfg.out, "summary.json"), json.dumps(summary, indent=1).encode(),
                        cfg.s3_endpoint)
