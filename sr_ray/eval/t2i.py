"""Text-to-image evaluation: baseline vs fine-tuned Stable Diffusion (paper Tables 5 and 6), and best-of-N.

``evaluate_t2i(cfg)``:

1. generates ``images_per_prompt`` images per prompt for every model
   (:mod:`sr_ray.diffusion.generate`: same noise per (prompt, index) for all
   models, the special token as the fine-tuned model's negative prompt), into
   ``<out>/generations`` (resumable by shard), unless ``generations`` names a
   finished folder;
2. scores every image with every metric, i.e. every scorer of :mod:`sr_ray.eval.scorers` (the paper's six:
   Social Reward, CLIP alignment, LAION aesthetic, HPS v2, ImageReward, PickScore) on a Ray Data actor
   pool -> ``<out>/scores.parquet``; an undecodable image gets NaN scores and a ``reason``, and is counted;
3. writes **Table 5** (mean of each metric per prompt set and model with a bootstrap interval over prompts,
   ``table5.md/.csv``), **Table 6** (win-rate of each model over the baseline per metric: prompt by prompt
   on the mean of its images, a tie counts half, with a bootstrap interval over prompts,
   ``table6.md/.csv`` and ``win_rates.png``), an image grid per prompt set
   (``grid-<set>.png``: a row per prompt, the models' images side by side), and
   ``report.md`` with all of it;
4. with ``best_of_n=[<metric>, ...]`` (paper Fig. 1): keeps the top image of each
   (model, prompt) by each metric -> ``best_of_n.parquet`` (with image bytes, ``picked_by``),
   ``best_of_n.png`` (the picks of every metric side by side, a row per prompt) and
   ``best_of_n.md/.csv`` (each metric's mean over the picks vs over all images,
   i.e. over a random pick).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from sr_ray.core import images, special_token, stats, storage
from sr_ray.core.config import ConfigError, from_dict, to_dict
from sr_ray.core.errors import DataError
from sr_ray.core.ray_utils import ActorPoolConfig, init_ray, worker_prints_to_stderr
from sr_ray.diffusion.generate import GenComputeConfig, GenerateConfig, SamplingConfig, generate, load_prompt_sets
from sr_ray.eval.scorers import ScorerSettings, check_names, make_scorer

log = logging.getLogger(__name__)

KEYS = ["generation_id", "model", "prompt_set", "prompt_index", "image_index", "prompt"]


@dataclass
class ScoringComputeConfig(ActorPoolConfig):
    batch_size: int = 32


@dataclass
class EvaluateT2IConfig(ScorerSettings):
    """The scorers' own settings (``social_reward.checkpoint``, ``clip.model``, ``pickscore.model`` ...) are
    top-level sections, as in the comparison job."""

    baseline: str = "tiny"
    """The model fine-tuning started from: tiny, a diffusers dir, or a hub id (stabilityai/stable-diffusion-2-1-base)."""
    finetuned: str | None = None
    """A fine-tuning run dir (its pipeline/) or a diffusers dir; none: evaluate the baseline alone."""
    models: dict[str, str] = field(default_factory=dict)
    """More models to compare with the baseline: {name: model}."""
    prompts: list[str] = field(default_factory=list)
    """Prompt-set files (one set per file, by stem: e.g. internal.txt general.txt); empty: the fine-tuning run's
    held-out prompts, and (the job, not this function) the demo's prompt sets."""
    max_prompts: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    generation: GenComputeConfig = field(default_factory=GenComputeConfig)
    metrics: list[str] = field(default_factory=lambda: ["social_reward", "clip"])
    """Scorers to use as metrics (the paper's six: social_reward, clip, laion_aesthetic, hpsv2, imagereward,
    pickscore); built-in names or ``module:factory`` import paths."""
    n_boot: int = 2000
    """Bootstrap replicates of the intervals (Table 5 means, Table 6 win-rates; resampling prompts)."""
    level: float = 0.95
    scoring: ScoringComputeConfig = field(default_factory=ScoringComputeConfig)
    best_of_n: list[str] = field(default_factory=list)
    """Best-of-N (paper Fig. 1): keep each (model, prompt)'s top image by each of these metrics (N =
    images_per_prompt); several: ``best_of_n.png`` shows their picks side by side."""
    grid_prompts: int = 4
    """Prompts per set in the image grids."""
    generations: str | None = None
    """Score an existing generations folder instead of generating (its models and prompts)."""
    out: str = "./runs/t2i-eval-demo"
    finetune_demo: bool = False
    """When ``finetuned`` has no pipeline yet, the job runs the fine-tuning demo into it first (the demo config)."""
    max_bad_image_rate: float = 0.01
    s3_endpoint: str | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        names = ["baseline", *(["finetuned"] if self.finetuned else []), *self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: {names} name a model twice (baseline and finetuned are taken)")
        check_names(self.metrics, "metrics")
        unknown = [m for m in self.best_of_n if m not in self.metrics]
        if unknown:
            raise ValueError(f"best_of_n={unknown}: not among metrics {self.metrics}")
        if self.grid_prompts < 0:
            raise ValueError("grid_prompts must be >= 0")

    def model_map(self) -> dict[str, str]:
        return {"baseline": self.baseline, **({"finetuned": self.finetuned} if self.finetuned else {}),
                **self.models}


# ---------------------------------------------------------------- scoring

class ImageMetricScorer:
    """Callable class for ``map_batches``: generation rows -> their keys + one float column per metric + reason.
    Every metric's scorer is built once per actor."""

    def __init__(self, names: list[str], settings: dict, batch_size: int, device: str | None = None):
        worker_prints_to_stderr()
        cfg = from_dict(ScorerSettings, settings)
        self.metrics = [make_scorer(n, cfg, device, batch_size) for n in names]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pics, reasons = [], []
        for data in batch["image"]:
            try:
                pics.append(images.decode(data))
                reasons.append("")
            except images.BadImage as e:
                pics.append(None)
                reasons.append(str(e))
        ok = [i for i, p in enumerate(pics) if p is not None]
        out = {k: batch[k] for k in KEYS}
        prompts = [str(batch["prompt"][i]) for i in ok]
        for m in self.metrics:
            col = np.full(len(pics), np.nan, dtype=np.float32)
            if ok:
                col[ok] = m.score(prompts, [pics[i] for i in ok])
            out[m.name] = col
        out["reason"] = np.array(reasons, dtype=object)
        return out


def score_images(gen_uri: str, names: list[str], settings: ScorerSettings, compute: ScoringComputeConfig,
                 endpoint: str | None) -> pd.DataFrame:
    """Every generation of ``gen_uri`` scored by every metric (Ray Data actor pool)."""
    import ray.data

    files = storage.list_files(gen_uri, endpoint=endpoint)
    if not files:
        raise ConfigError(f"generations={gen_uri}: no Parquet files")
    fs, _ = storage.resolve(gen_uri, endpoint)
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(KEYS + ["image"])
    ds = ds.map_batches(ImageMetricScorer, batch_format="numpy", batch_size=compute.batch_size,
                        fn_constructor_kwargs={"names": names, "settings": to_dict(settings),
                                               "batch_size": compute.batch_size}, **compute.map_kwargs())
    df = ds.to_pandas()
    for n in names:  # numpy floats: an undecodable image's NaN must read as missing (not so in Arrow dtypes)
        df[n] = df[n].to_numpy(np.float64, na_value=np.nan)
    return df.sort_values(["model", "prompt_set", "prompt_index", "image_index"]).reset_index(drop=True)


# ---------------------------------------------------------------- tables

def table5(scores: pd.DataFrame, metrics: list[str], n_boot: int = 2000, level: float = 0.95,
           seed: int = 0) -> pd.DataFrame:
    """Mean of each metric per (prompt_set, model) over its images (bad images left out), with
    ``<metric>_ci_low``/``_ci_high``: a bootstrap interval resampling prompts (a prompt's images together);
    + prompts, images."""
    rows = []
    for (pset, model), part in scores.groupby(["prompt_set", "model"], sort=True):
        row = {"prompt_set": pset, "model": model, "prompts": part["prompt"].nunique(),
               "images": int(part["generation_id"].count())}
        for m in metrics:
            ok = part[m].notna()
            e = stats.bootstrap_mean(part.loc[ok, m], part.loc[ok, "prompt"], n_boot=n_boot, level=level, seed=seed)
            row.update({m: e.value, f"{m}_ci_low": e.ci_low, f"{m}_ci_high": e.ci_high})
        rows.append(row)
    return pd.DataFrame(rows)


def win_rates(scores: pd.DataFrame, baseline: str, metrics: list[str], n_boot: int = 2000, level: float = 0.95,
              seed: int = 0) -> pd.DataFrame:
    """Table 6: per prompt set, model (not the baseline) and metric, the share of prompts where the model's mean
    score over its images beats the baseline's (a tie counts half), with a bootstrap interval over prompts.
    Prompts either side lacks are left out.

    Long form: prompt_set, model, metric, win_rate, ci_low, ci_high, wins, ties, losses, prompts.
    """
    per = scores.groupby(["prompt_set", "model", "prompt"], sort=True)[metrics].mean()
    if baseline not in per.index.get_level_values("model"):
        raise ValueError(f"no scores of the baseline model {baseline!r}")
    base = per.xs(baseline, level="model")
    rows = []
    for model in sorted(set(per.index.get_level_values("model")) - {baseline}):
        cand = per.xs(model, level="model")
        both = cand.merge(base, left_index=True, right_index=True, suffixes=("", "__base"))
        for pset, part in both.groupby(level="prompt_set", sort=True):
            for m in metrics:
                d = (part[m] - part[m + "__base"]).dropna()
                wins, ties, losses = int((d > 0).sum()), int((d == 0).sum()), int((d < 0).sum())
                dv = d.to_numpy(np.float64)
                credit = (dv > 0) + 0.5 * (dv == 0)
                e = stats.bootstrap_mean(credit, d.index.get_level_values("prompt"), n_boot=n_boot,
                                         level=level, seed=seed)
                rows.append({"prompt_set": pset, "model": model, "metric": m, "win_rate": e.value,
                             "ci_low": e.ci_low, "ci_high": e.ci_high, "wins": wins, "ties": ties,
                             "losses": losses, "prompts": wins + ties + losses})
    return pd.DataFrame(rows, columns=["prompt_set", "model", "metric", "win_rate", "ci_low", "ci_high", "wins",
                                       "ties", "losses", "prompts"])


def table5_markdown(t5: pd.DataFrame, metrics: list[str], level: float) -> str:
    """Rows: prompt set x model; a column per metric: ``mean [low, high]``."""
    cols = ["prompt_set", "model", "prompts", "images", *metrics]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for r in t5.to_dict(orient="records"):
        cells = [str(r["prompt_set"]), str(r["model"]), str(r["prompts"]), str(r["images"])]
        cells += [f"{r[m]:.4f} [{r[f'{m}_ci_low']:.4f}, {r[f'{m}_ci_high']:.4f}]" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nCells: mean over images [{level:.0%} bootstrap interval over prompts]."


def best_of_n(scores: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The top image of each (model, prompt_set, prompt) by ``metric`` (images without a score never win)."""
    ok = scores.dropna(subset=[metric])
    idx = ok.groupby(["model", "prompt_set", "prompt"], sort=True)[metric].idxmax()
    return ok.loc[idx.values].reset_index(drop=True)


def best_of_n_table(scores: pd.DataFrame, picks: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per (prompt_set, model, metric): mean over the best-of-N picks vs over all images (a random pick)."""
    allm = scores.groupby(["prompt_set", "model"])[metrics].mean()
    pm = picks.groupby(["prompt_set", "model"])[metrics].mean()
    rows = []
    for key in pm.index:
        for m in metrics:
            rows.append({"prompt_set": key[0], "model": key[1], "metric": m, "best_of_n": pm.loc[key, m],
                         "random": allm.loc[key, m], "gain": pm.loc[key, m] - allm.loc[key, m]})
    return pd.DataFrame(rows)


def _md_table(df: pd.DataFrame, floatfmt: str = "{:.4f}") -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for _, r in df.iterrows():
        out.append("| " + " | ".join(floatfmt.format(v) if isinstance(v, (float, np.floating)) else str(v)
                                     for v in r) + " |")
    return "\n".join(out)


def table6_markdown(t6: pd.DataFrame) -> str:
    """Rows: prompt set x model; columns: metrics; cells: win-rate % (wins/ties/losses)."""
    if t6.empty:
        return "(no model to compare with the baseline)"
    cells = t6.assign(cell=[f"{r.win_rate:.1%} [{r.ci_low:.1%}, {r.ci_high:.1%}] ({r.wins}/{r.ties}/{r.losses})"
                            for r in t6.itertuples()])
    order = list(dict.fromkeys(t6["metric"]))
    wide = cells.pivot(index=["prompt_set", "model"], columns="metric", values="cell")[order].reset_index()
    return _md_table(wide) + ("\n\nCells: win-rate over the baseline [bootstrap interval over prompts] "
                              "(wins/ties/losses of prompts; a tie counts half).")


def plot_win_rates(t6: pd.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [f"{r.prompt_set}\n{r.model}" for r in t6[["prompt_set", "model"]].drop_duplicates().itertuples()]
    metrics = list(dict.fromkeys(t6["metric"]))
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(groups) * max(1, len(metrics)) / 2), 3.8))
    w = 0.8 / max(1, len(metrics))
    for j, m in enumerate(metrics):
        part = t6[t6["metric"] == m]
        rate = part["win_rate"].to_numpy() * 100
        err = np.vstack([rate - part["ci_low"].to_numpy() * 100, part["ci_high"].to_numpy() * 100 - rate])
        ax.bar(np.arange(len(part)) + j * w, rate, w, yerr=np.nan_to_num(np.clip(err, 0, None)), capsize=2, label=m)
    ax.axhline(50, color="grey", ls="--", lw=1)
    ax.set_xticks(np.arange(len(groups)) + w * (len(metrics) - 1) / 2)
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel("win-rate over baseline (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Table 6: win-rate per prompt (mean of its images), bootstrap intervals over prompts", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return images.figure_png(fig)


def image_grid(rows: list[tuple[str, list[tuple[str, list[bytes]]]]], cell: int = 128) -> bytes:
    """PNG: a row per prompt (caption on top), then each model's images side by side under its name."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("no rows for the grid")
    per_model = [(m, len(imgs)) for m, imgs in rows[0][1]]
    cols = sum(n for _, n in per_model)
    gap, caption, header = 6, 16, 16
    width = cols * cell + (len(per_model) - 1) * gap
    height = header + len(rows) * (caption + cell)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for m, n in per_model:
        draw.text((x + 2, 2), m, fill="black")
        x += n * cell + gap
    for r, (prompt, models) in enumerate(rows):
        y = header + r * (caption + cell)
        draw.text((2, y + 2), prompt[:int(width / 6)], fill="black")
        x = 0
        for _, imgs in models:
            for data in imgs:
                try:
                    im = images.decode(data).resize((cell, cell), Image.NEAREST)
                    canvas.paste(im, (x, y + caption))
                except images.BadImage:
                    draw.rectangle([x, y + caption, x + cell - 1, y + caption + cell - 1], outline="red")
                x += cell
            x += gap
    return images.encode_png(canvas)


def _grids(gen_uri: str, models: list[str], k: int, endpoint: str | None) -> dict[str, bytes]:
    """{prompt set: grid PNG} for the first ``k`` prompts of each set."""
    import pyarrow.dataset as pads

    if not k:
        return {}
    t = _generations(gen_uri, endpoint).to_table(
        columns=["model", "prompt_set", "prompt_index", "image_index", "prompt", "image"],
        filter=pads.field("prompt_index") < k).to_pandas()
    out = {}
    for pset, part in t.groupby("prompt_set", sort=True):
        rows = []
        for _, p in part.groupby("prompt_index", sort=True):
            rows.append((str(p["prompt"].iloc[0]),
                         [(m, list(p[p["model"] == m].sort_values("image_index")["image"])) for m in models]))
        out[str(pset)] = image_grid(rows)
    return out


def _generations(gen_uri: str, endpoint: str | None):
    """The generation files as one pyarrow dataset (the grids and best-of-N read a filtered few rows of it)."""
    import pyarrow.dataset as pads

    fs, _ = storage.resolve(gen_uri, endpoint)
    return pads.dataset(storage.list_files(gen_uri, endpoint=endpoint), filesystem=fs, format="parquet")


def _pick_images(gen_uri: str, ids: list[str], endpoint: str | None) -> pa.Table:
    import pyarrow.dataset as pads

    return _generations(gen_uri, endpoint).to_table(columns=["generation_id", "image"],
                                                     filter=pads.field("generation_id").isin(ids))


# ---------------------------------------------------------------- the job

def _with_checkpoint(cfg: EvaluateT2IConfig) -> EvaluateT2IConfig:
    """Social Reward's checkpoint checked now (named, before any model loads)."""
    from sr_ray.reward.score import read_checkpoint

    if "social_reward" not in cfg.metrics:
        return cfg
    if not cfg.social_reward.checkpoint:
        raise ConfigError("social_reward.checkpoint is required with the social_reward metric (a reward run's "
                          "checkpoint, local or s3://); the job (sr-ray evaluate_t2i) uses the reward demo's when "
                          "none is given")
    read_checkpoint(cfg.social_reward.checkpoint, mmap=True)
    return cfg


def internal_prompts(finetuned: str | None, endpoint: str | None) -> str | None:
    """The held-out prompts of the fine-tune set a fine-tuning run trained on (``internal.jsonl`` beside the set
    its ``config.yaml`` names, written by select_pairs), when there are any: the paper's internal prompts."""
    import yaml

    if not finetuned:
        return None
    try:
        run_cfg = yaml.safe_load(storage.read_bytes(storage.join(finetuned, "config.yaml"), endpoint)) or {}
    except (OSError, ValueError):
        return None  # a diffusers folder or a hub id: no fine-tuning run record
    train = ((run_cfg.get("data") or {}).get("train") or "").rstrip("/")
    if not train:
        return None
    folder = train.rsplit("/", 1)[0] if train.endswith(".parquet") else train
    uri = storage.join(folder, special_token.HELD_OUT_FILE)
    try:
        return uri if storage.read_bytes(uri, endpoint).strip() else None
    except (OSError, ValueError):
        return None


def prompt_sets(cfg: EvaluateT2IConfig, given: dict[str, list[str]] | None = None
                ) -> tuple[list[str], dict[str, list[str]]]:
    """(prompt files, {set: prompts}): the files given (``given``: already read), with the fine-tuning run's
    held-out prompts as the ``internal`` set unless a file of that name is given."""
    files = list(cfg.prompts)
    held = None if any(Path(f).stem == "internal" for f in files) else internal_prompts(cfg.finetuned,
                                                                                      cfg.s3_endpoint)
    if given is None:
        given = load_prompt_sets(files, cfg.max_prompts, cfg.s3_endpoint) if files else {}
    if not held:
        return files, given or load_prompt_sets([], cfg.max_prompts)
    log.info("[evaluate] internal prompts: %s (held out of the fine-tune set)", held)
    sets = {**load_prompt_sets([held], cfg.max_prompts, cfg.s3_endpoint), **given}
    return [held, *files], sets


def _generate(cfg: EvaluateT2IConfig) -> tuple[str, dict | None]:
    """The generations folder: ``generations`` as given, else generated into ``<out>/generations``."""
    if cfg.generations:
        return cfg.generations, None
    given = load_prompt_sets(cfg.prompts, cfg.max_prompts, cfg.s3_endpoint) if cfg.prompts else {}  # bad: now
    files, sets = prompt_sets(cfg, given)
    gen_uri = storage.join(cfg.out, "generations")
    return gen_uri, generate(GenerateConfig(
        models=cfg.model_map(), prompts=files, max_prompts=cfg.max_prompts, sampling=cfg.sampling,
        compute=cfg.generation, out=gen_uri, s3_endpoint=cfg.s3_endpoint, ray_address=cfg.ray_address), sets)


def _score(cfg: EvaluateT2IConfig, gen_uri: str) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """(scores, undecodable rows, seconds): every image by every metric; too many bad images fail the job."""
    init_ray(cfg.ray_address)
    t = time.perf_counter()
    scores = score_images(gen_uri, cfg.metrics, cfg.scorer_settings(), cfg.scoring, cfg.s3_endpoint)
    seconds = time.perf_counter() - t
    bad = scores[scores["reason"] != ""]
    if len(scores) and len(bad) / len(scores) > cfg.max_bad_image_rate:
        raise DataError(f"{len(bad)} of {len(scores)} generated images could not be decoded "
                        f"(first: {bad['generation_id'].iloc[0]}: {bad['reason'].iloc[0]}), "
                        f"more than max_bad_image_rate={cfg.max_bad_image_rate}")
    storage.write_parquet(pa.Table.from_pandas(scores, preserve_index=False), storage.join(cfg.out, "scores.parquet"),
                          cfg.s3_endpoint)
    return scores, bad, seconds


def _writer(cfg: EvaluateT2IConfig):
    return lambda name, data: storage.write_bytes(storage.join(cfg.out, name),
                                                  data if isinstance(data, bytes) else data.encode(), cfg.s3_endpoint)


def best_of_n_figure(picked: pd.DataFrame, k: int) -> bytes:
    """PNG (paper Fig. 1): per prompt set, its first ``k`` prompts, a row each: the image every scorer picked for
    the last model (the fine-tuned one when there is one), side by side under the scorer's name."""
    model = sorted(set(picked["model"]) - {"baseline"})[-1] if set(picked["model"]) - {"baseline"} else "baseline"
    part = picked[picked["model"] == model]
    rows = []
    for _, ps in part.groupby("prompt_set", sort=True):
        for prompt in list(dict.fromkeys(ps.sort_values("prompt_index")["prompt"]))[:k]:
            cell = ps[ps["prompt"] == prompt].set_index("picked_by")["image"]
            rows.append((f"{model}: {prompt}", [(by, [cell[by]]) for by in dict.fromkeys(part["picked_by"])]))
    return image_grid(rows)


def _best_of_n_part(cfg: EvaluateT2IConfig, scores: pd.DataFrame, gen_uri: str) -> tuple[list[str], dict]:
    """Best-of-N picks of every ``best_of_n`` metric, their table and picture written; (report lines, summary)."""
    w, names = _writer(cfg), cfg.metrics
    picks = pd.concat([best_of_n(scores, by).assign(picked_by=by) for by in cfg.best_of_n], ignore_index=True)
    bt = pd.concat([best_of_n_table(scores, picks[picks["picked_by"] == by], names).assign(picked_by=by)
                    for by in cfg.best_of_n], ignore_index=True)
    imgs = _pick_images(gen_uri, list(dict.fromkeys(picks["generation_id"])), cfg.s3_endpoint).to_pandas()
    picked = picks.merge(imgs, on="generation_id", how="left")
    storage.write_parquet(pa.Table.from_pandas(picked, preserve_index=False),
                          storage.join(cfg.out, "best_of_n.parquet"), cfg.s3_endpoint)
    w("best_of_n.csv", bt.to_csv(index=False))
    w("best_of_n.md", _md_table(bt) + "\n")
    if cfg.grid_prompts:
        w("best_of_n.png", best_of_n_figure(picked, cfg.grid_prompts))
    n = int(scores.groupby(["model", "prompt_set", "prompt"]).size().max())
    lines = [f"## Best-of-{n} by {', '.join(cfg.best_of_n)}", "",
             "Mean of each metric over the kept images vs over all images (a random pick).", "", _md_table(bt), "",
             "![best of n](best_of_n.png)", ""]
    return lines, {"metrics": cfg.best_of_n, "n": n, "picks": int(len(picks)),
                   "gain": {f"{r.picked_by}/{r.prompt_set}/{r.model}/{r.metric}": round(r.gain, 5)
                            for r in bt.itertuples()}}


def evaluate_t2i(cfg: EvaluateT2IConfig) -> dict[str, Any]:
    """Generate (or reuse), score, tabulate; returns the JSON summary (also ``<out>/summary.json``)."""
    t0 = time.perf_counter()
    cfg = _with_checkpoint(cfg)
    gen_uri, gen_summary = _generate(cfg)
    scores, bad, score_s = _score(cfg, gen_uri)
    names, w = cfg.metrics, _writer(cfg)
    models = list(dict.fromkeys(["baseline", *sorted(set(scores["model"]) - {"baseline"})]))
    t5 = table5(scores, names, cfg.n_boot, cfg.level)
    t6 = win_rates(scores, "baseline", names, cfg.n_boot, cfg.level) if "baseline" in set(scores["model"]) \
        else pd.DataFrame()
    t5_md, t6_md = table5_markdown(t5, names, cfg.level), table6_markdown(t6)
    w("table5.csv", t5.to_csv(index=False))
    w("table5.md", t5_md + "\n")
    w("table6.csv", t6.to_csv(index=False))
    w("table6.md", t6_md + "\n")
    if not t6.empty:
        w("win_rates.png", plot_win_rates(t6))
    grids = _grids(gen_uri, models, cfg.grid_prompts, cfg.s3_endpoint)
    for pset, png in grids.items():
        w(f"grid-{pset}.png", png)
    report = ["# Text-to-image evaluation", "",
              f"Models: {json.dumps(cfg.model_map() if not cfg.generations else models)}; "
              f"generations `{gen_uri}`; metrics {names}; {len(scores)} images, {len(bad)} undecodable.", "",
              "## Table 5: mean of each metric", "", t5_md, "", "## Table 6: win-rate over the baseline", "", t6_md, ""]
    summary: dict[str, Any] = {
        "out": cfg.out, "generations": gen_uri, "images": int(len(scores)), "bad_images": int(len(bad)),
        "models": models, "prompt_sets": sorted(set(scores["prompt_set"])), "metrics": names,
        "table5": t5.to_dict(orient="records"),
        "win_rates": {f"{r.prompt_set}/{r.model}/{r.metric}": [round(r.win_rate, 4), round(r.ci_low, 4),
                                                               round(r.ci_high, 4)] for r in t6.itertuples()},
        "grids": [storage.join(cfg.out, f"grid-{p}.png") for p in grids],
        "score_images_per_s": round(len(scores) / score_s, 2), "generation": gen_summary}
    if cfg.best_of_n:
        lines, summary["best_of_n"] = _best_of_n_part(cfg, scores, gen_uri)
        report += lines
    report += ["## Images", ""] + [f"![{p}](grid-{p}.png)" for p in grids]
    w("report.md", "\n".join(report) + "\n")
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    w("summary.json", json.dumps(summary, indent=1, default=str))
    log.info("[evaluate] Table 5:\n%s\n[evaluate] Table 6:\n%s", t5_md, t6_md)
    return summary
