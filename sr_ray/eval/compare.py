"""Compare reward models on pairwise preference test sets (paper Tables 3-4, and beyond them).

``compare_rewards(cfg)``:

1. every test set is checked before Ray starts (a peer's JSON/CSV/Pick-a-Pic file is first imported into
   the triplet contract under ``<out>/sets/``), and so is every scorer name;
2. Ray Data reads each set once; CPU tasks decode both images of each pair once; each scorer that has no
   finished result for the set runs as an actor pool over the decoded pairs (its model loaded once per
   actor; GPUs with ``compute.use_gpu``);
3. each (set, scorer) result is written as ``scores/<set>/<scorer>.parquet`` beside a record of what made
   it (the set's files, the scorer's settings): a re-run reuses every result whose record still matches;
4. the tables: pairwise accuracy of every scorer on every set with a 95 % bootstrap interval over prompts
   (``table.md/.csv``, ``accuracy.png``), the agreement matrix (share of pairs two scorers order alike,
   ``agreement.md/.csv``), the paired difference of every scorer against the first (``differences.md/.csv``),
   per-pair scores (``scores.parquet``) and ``report.md``.

Pairs the raters marked as ties (``tie``) are kept in ``scores.parquet`` and left out of accuracy; a pair
with an unreadable image counts against ``max_bad_image_rate`` and is left out for every scorer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from sr_ray.core import identity, images, parquet, stats, storage
from sr_ray.core.config import ConfigError, from_dict, to_dict
from sr_ray.core.errors import DataError
from sr_ray.core.limits import InputLimits
from sr_ray.core.ray_utils import DecodedPoolConfig, check_resources, init_ray, worker_prints_to_stderr
from sr_ray.eval import preference_sets
from sr_ray.eval.scorers import ScorerSettings, check_names, make_scorer, weights_fingerprint
from sr_ray.reward.data import DataConfig, read_image_bytes, split_info

log = logging.getLogger(__name__)

PAIR_COLS = ["prompt", "pos_id", "neg_id", "tie"]


@dataclass
class ScorerPoolConfig(DecodedPoolConfig):
    """Every scorer runs as its own pool of ``num_actors`` actors, all at once (the pairs stream through them)."""

    cpus_per_actor: float = 0.5
    batch_size: int = 16
    """Pairs per scorer call (2x images)."""


@dataclass
class CompareConfig(ScorerSettings):
    test: list[str] = field(default_factory=list)
    """Test sets: triplet Parquet folders/files, or a peer's file (HPD v2 / ImageReward test.json, Pick-a-Pic
    Parquet, the authors' CSV), local or s3://; empty: the reward demo's test split."""
    kinds: dict[str, str] = field(default_factory=dict)
    """{set name: kind} where detection by content should be overridden (triplets, pickapic, hpdv2, ...)."""
    image_root: str | None = None
    """Base URI of relative image paths (the paths form, the JSON sets, the authors' CSV)."""
    scorers: list[str] = field(default_factory=lambda: ["social_reward", "clip", "laion_aesthetic"])
    """Scorers to compare, the first is the reference of the paired differences; built-in names or
    ``module:factory`` import paths."""
    ties: str = "half"
    """When a scorer gives both images one score: half (counts 1/2), correct (counts 1: the authors' code),
    skip (left out)."""
    n_boot: int = 2000
    level: float = 0.95
    seed: int = 0
    compute: ScorerPoolConfig = field(default_factory=ScorerPoolConfig)
    limits: InputLimits = field(default_factory=InputLimits)
    max_bad_image_rate: float = 0.01
    """Fail when more than this share of a set's pairs has an unreadable image."""
    out: str = "./runs/compare-demo"
    s3_endpoint: str | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        check_names(self.scorers, "scorers")
        if self.ties not in stats.TIE_POLICIES:
            raise ValueError(f"ties={self.ties!r}: one of {stats.TIE_POLICIES}")
        if not 0 < self.level < 1 or self.n_boot < 100:
            raise ValueError("level must be in (0, 1) and n_boot >= 100")
        if not 0 <= self.max_bad_image_rate <= 1:
            raise ValueError("max_bad_image_rate must be in [0, 1]")
        bad = {k: v for k, v in self.kinds.items() if v not in preference_sets.KINDS}
        if bad:
            raise ValueError(f"kinds: {bad} not in {preference_sets.KINDS}")


# ---------------------------------------------------------------- Ray stages

class DecodePairs:
    """``map_batches`` task: both images of each pair decoded once -> ``pos``/``neg`` HxWx3 uint8 (0x0x3 when
    unreadable) and ``reason`` (empty when both are fine)."""

    def __init__(self, image_root: str | None, endpoint: str | None, limits: dict):
        self.image_root, self.endpoint, self.limits = image_root, endpoint, from_dict(InputLimits, limits)

    def _one(self, data, path) -> np.ndarray:
        if data is None and path is not None:
            data = read_image_bytes(str(path), self.image_root, self.endpoint, self.limits)
        return np.asarray(images.decode(data, self.limits))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[parquet.ROW_COL])
        empty = np.zeros((0, 0, 3), np.uint8)
        out = {"pos": [], "neg": [], "reason": []}
        for i in range(n):
            pics, why = [], str(batch[parquet.ERROR_COL][i] or "")
            for side in ("pos", "neg"):
                try:
                    if why:
                        raise images.BadImage(why)
                    pics.append(self._one(_get(batch, f"{side}_image", i), _get(batch, f"{side}_path", i)))
                except images.BadImage as e:
                    why = why or f"{side}: {e}"
                    pics.append(empty)
            out["pos"].append(pics[0] if not why else empty)
            out["neg"].append(pics[1] if not why else empty)
            out["reason"].append(why)
        keep = {k: batch[k] for k in (parquet.ROW_COL, *PAIR_COLS) if k in batch}
        return {**keep, "pos": _objects(out["pos"]), "neg": _objects(out["neg"]),
                "reason": np.array(out["reason"], dtype=object)}


def decode_pairs(batch: dict[str, np.ndarray], image_root: str | None, endpoint: str | None,
                 limits: dict) -> dict[str, np.ndarray]:
    """:class:`DecodePairs` as a plain function: a CPU task of Ray Data (cheap to build per batch)."""
    return DecodePairs(image_root, endpoint, limits)(batch)


def _get(batch: dict, col: str, i: int):
    return batch[col][i] if col in batch else None


def _objects(arrays: list) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


class PairScorer:
    """``map_batches`` actor: one scorer, built once, scores both images of every readable pair ->
    ``<name>__pos``, ``<name>__neg`` (NaN for unreadable pairs); every other column passes through."""

    def __init__(self, name: str, settings: dict, batch_size: int):
        worker_prints_to_stderr()
        self.name = name
        self.scorer = make_scorer(name, from_dict(ScorerSettings, settings), None, batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [i for i, r in enumerate(batch["reason"]) if not r]
        pos = np.full(len(batch["reason"]), np.nan, np.float32)
        neg = pos.copy()
        if ok:
            prompts = [str(batch["prompt"][i]) for i in ok]
            s = np.asarray(self.scorer.score(prompts * 2, [batch["pos"][i] for i in ok] +
                                             [batch["neg"][i] for i in ok]), np.float32)
            pos[ok], neg[ok] = s[:len(ok)], s[len(ok):]
        return {**batch, f"{self.name}__pos": pos, f"{self.name}__neg": neg}


# ---------------------------------------------------------------- test sets and finished results

@dataclass
class TestSet:
    name: str
    uri: str
    kind: str
    files: list
    form: str

    def identity(self) -> list[dict]:
        return [f.identity() for f in self.files]


def resolve_sets(cfg: CompareConfig) -> list[TestSet]:
    """Each test set checked (and a peer's format imported under ``<out>/sets/``) before Ray works."""
    sets = []
    try:
        names = preference_sets.set_names(cfg.test)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for uri, name in zip(cfg.test, names):
        kind = cfg.kinds.get(name) or preference_sets.detect(uri, cfg.s3_endpoint)
        if kind != "triplets":
            uri = import_once(uri, name, kind, cfg)
        info = split_info(name, uri, DataConfig(image_root=cfg.image_root, s3_endpoint=cfg.s3_endpoint))
        sets.append(TestSet(name, uri, kind, info.parquet, info.form))
    return sets


def import_once(uri: str, name: str, kind: str, cfg: CompareConfig) -> str:
    """``<out>/sets/<name>.parquet`` from a peer's file, written again only when the source changed."""
    dest = storage.join(cfg.out, "sets", f"{name}.parquet")
    record_uri = storage.join(cfg.out, "sets", f"_{name}.json")
    fs, path = storage.resolve(uri, cfg.s3_endpoint)
    info = fs.get_file_info(path)
    source = {"uri": uri, "kind": kind, "size": info.size, "mtime_ns": info.mtime_ns, "image_root": cfg.image_root}
    if identity.read_record(record_uri, cfg.s3_endpoint) == source and storage.exists(dest, cfg.s3_endpoint):
        return dest
    table = preference_sets.import_set(uri, kind, cfg.image_root, cfg.s3_endpoint)
    if table.num_rows == 0:
        raise DataError(f"test set {storage.redact(uri)} ({kind}): no pairs")
    storage.write_parquet(table, dest, cfg.s3_endpoint)
    identity.write_record(record_uri, source, cfg.s3_endpoint)
    log.info("[compare] %s (%s): %d pairs -> %s", storage.redact(uri), kind, table.num_rows, dest)
    return dest


def result_uri(cfg: CompareConfig, ts: TestSet, scorer: str, ext: str = "parquet") -> str:
    safe = scorer.replace(":", "__").replace("/", "_")
    return storage.join(cfg.out, "scores", ts.name, f"{safe}.{ext}")


def result_record(cfg: CompareConfig, ts: TestSet, scorer: str) -> dict[str, Any]:
    """What a (set, scorer) result depends on: the set's files, the scorer's settings, limits, image root."""
    settings = to_dict(cfg.scorer_settings())
    own = settings.get(scorer) if scorer in settings else settings["plugins"].get(scorer, {})
    return {"set": ts.identity(), "scorer": scorer, "settings": own, "bf16": cfg.bf16,
            "weights": weights_fingerprint(own, cfg.s3_endpoint), "limits": to_dict(cfg.limits),
            "image_root": cfg.image_root}


def finished(cfg: CompareConfig, ts: TestSet, scorer: str, want: dict[str, Any]) -> bool:
    """Whether the (set, scorer) result on disk was made as ``want`` (its :func:`result_record`) says."""
    rec = identity.read_record(result_uri(cfg, ts, scorer, "json"), cfg.s3_endpoint)
    if rec is None:
        return False
    if rec != want:
        log.warning("[compare] %s / %s: the result on record was made with other inputs or settings "
                    "(%s): scoring again", ts.name, scorer,
                    identity.describe(identity.differing_keys(rec, want)))
        return False
    return storage.exists(result_uri(cfg, ts, scorer), cfg.s3_endpoint) and \
        storage.exists(storage.join(cfg.out, "scores", ts.name, "_pairs.parquet"), cfg.s3_endpoint)


# ---------------------------------------------------------------- scoring

def score_set(cfg: CompareConfig, ts: TestSet, pending: dict[str, dict]) -> None:
    """One pass over the set: decode once, every pending scorer's actor pool in turn, results written.
    ``pending``: {scorer: the record written beside its result}."""
    cols = ["prompt", *[c for c in ("pos_image", "neg_image", "pos_path", "neg_path", "pos_id", "neg_id", "tie")
                        if any(c in f.schema.names for f in ts.files)]]
    c = cfg.compute
    ds = parquet.read(ts.files, cols, f"test set {ts.name}", cfg.s3_endpoint, row_index=True,
                      num_cpus=c.decode_num_cpus)  # a read task would take a whole CPU
    ds = ds.map_batches(decode_pairs, fn_args=(cfg.image_root, cfg.s3_endpoint, to_dict(cfg.limits)),
                        batch_size=c.batch_size, num_cpus=c.decode_num_cpus)
    settings = to_dict(cfg.scorer_settings())
    for name in pending:
        ds = ds.map_batches(PairScorer, fn_constructor_args=(name, settings, c.batch_size), batch_size=c.batch_size,
                            **c.map_kwargs())
    meta = [parquet.ROW_COL, *[k for k in PAIR_COLS if k in cols], "reason"]
    keep = meta + [f"{n}__{s}" for n in pending for s in ("pos", "neg")]
    t0 = time.perf_counter()
    scored = ds.select_columns(keep).to_pandas().rename(columns={parquet.ROW_COL: "pair"})
    scored = scored.sort_values("pair").reset_index(drop=True)
    log.info("[compare] %s: %d pairs x %d scorer(s) in %.1f s", ts.name, len(scored), len(pending),
             time.perf_counter() - t0)
    bad = scored[scored["reason"] != ""]
    if len(scored) and len(bad) / len(scored) > cfg.max_bad_image_rate:
        ex = "; ".join(f"pair {r.pair}: {r.reason}" for r in bad.head(3).itertuples())
        raise DataError(f"test set {ts.name}: {len(bad)} of {len(scored)} pairs have an unreadable image "
                        f"(> max_bad_image_rate={cfg.max_bad_image_rate}); e.g. {ex}")
    _write_results(cfg, ts, pending, scored[["pair", *meta[1:]]].copy(), scored)


def _write_results(cfg: CompareConfig, ts: TestSet, pending: dict[str, dict], pairs: pd.DataFrame,
                   scored: pd.DataFrame) -> None:
    ep = cfg.s3_endpoint
    for c, default in (("pos_id", None), ("neg_id", None), ("tie", False)):
        if c not in pairs:
            pairs[c] = default
    pairs["tie"] = pairs["tie"].fillna(False).astype(bool)
    pairs["pos_id"], pairs["neg_id"] = pairs["pos_id"].astype("string"), pairs["neg_id"].astype("string")
    storage.write_parquet(pa.Table.from_pandas(pairs, preserve_index=False),
                          storage.join(cfg.out, "scores", ts.name, "_pairs.parquet"), ep)
    for name in pending:
        part = scored[["pair", f"{name}__pos", f"{name}__neg"]].rename(
            columns={f"{name}__pos": "pos", f"{name}__neg": "neg"})
        storage.write_parquet(pa.Table.from_pandas(part, preserve_index=False), result_uri(cfg, ts, name), ep)
        identity.write_record(result_uri(cfg, ts, name, "json"), pending[name], ep)


def load_set_scores(cfg: CompareConfig, ts: TestSet) -> pd.DataFrame:
    """The set's pairs with ``<scorer>_pos``/``<scorer>_neg`` columns of every scorer, in pair order."""
    fs, _ = storage.resolve(cfg.out, cfg.s3_endpoint)
    read = lambda uri: pd.read_parquet(storage.resolve(uri, cfg.s3_endpoint)[1], filesystem=fs)  # noqa: E731
    df = read(storage.join(cfg.out, "scores", ts.name, "_pairs.parquet"))
    for name in cfg.scorers:
        s = read(result_uri(cfg, ts, name)).rename(columns={"pos": f"{name}_pos", "neg": f"{name}_neg"})
        df = df.merge(s, on="pair", how="left")
        for side in ("pos", "neg"):  # numpy floats: an unreadable pair's NaN must read as missing
            df[f"{name}_{side}"] = df[f"{name}_{side}"].to_numpy(np.float64, na_value=np.nan)
    df.insert(0, "set", ts.name)
    return df


# ---------------------------------------------------------------- tables

def accuracy_table(df: pd.DataFrame, cfg: CompareConfig) -> pd.DataFrame:
    """Per (set, scorer): pairwise accuracy, its bootstrap interval over prompts, pairs and prompts counted,
    pairs left out as unreadable and as rater ties."""
    rows = []
    for name, part in df.groupby("set", sort=False):
        rated = part[~part["tie"]]
        for s in cfg.scorers:
            e = stats.pairwise_accuracy(rated[f"{s}_pos"], rated[f"{s}_neg"], rated["prompt"], cfg.ties,
                                        cfg.n_boot, cfg.level, cfg.seed)
            rows.append({"set": name, "scorer": s, **e.as_dict(),
                         "unreadable_pairs": int(rated[f"{s}_pos"].isna().sum()),
                         "rater_ties": int(part["tie"].sum()), "tie_policy": cfg.ties})
    return pd.DataFrame(rows)


def difference_table(df: pd.DataFrame, cfg: CompareConfig) -> pd.DataFrame:
    """Accuracy of every scorer minus the first's on the same pairs, with a paired prompt-bootstrap interval."""
    ref, rows = cfg.scorers[0], []
    for name, part in df.groupby("set", sort=False):
        rated = part[~part["tie"]]
        for s in cfg.scorers[1:]:
            e = stats.paired_difference(rated[f"{s}_pos"], rated[f"{s}_neg"], rated[f"{ref}_pos"],
                                        rated[f"{ref}_neg"], rated["prompt"], cfg.ties, cfg.n_boot, cfg.level,
                                        cfg.seed)
            rows.append({"set": name, "scorer": s, "reference": ref, "difference": e.value, "ci_low": e.ci_low,
                         "ci_high": e.ci_high, "pairs": e.n, "prompts": e.clusters})
    return pd.DataFrame(rows, columns=["set", "scorer", "reference", "difference", "ci_low", "ci_high", "pairs",
                                       "prompts"])


def agreement_table(df: pd.DataFrame, scorers: list[str]) -> pd.DataFrame:
    """Per set and over all sets: for every two scorers the share of pairs they order alike (rater ties kept:
    agreement does not need the raters)."""
    rows = []
    for name, part in [*df.groupby("set", sort=False), ("all", df)]:
        m = stats.agreement({s: stats.preference(part[f"{s}_pos"], part[f"{s}_neg"]) for s in scorers})
        rows += [{"set": name, "scorer": a, **{b: m[a][b] for b in scorers}} for a in scorers]
    return pd.DataFrame(rows)


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


def accuracy_markdown(t: pd.DataFrame, level: float) -> str:
    """Rows: scorers; columns: sets; cells ``acc % [low, high] (pairs)``."""
    sets = list(dict.fromkeys(t["set"]))
    lines = ["| scorer | " + " | ".join(sets) + " |", "| --- |" + " ---: |" * len(sets)]
    for s in dict.fromkeys(t["scorer"]):
        cells = []
        for name in sets:
            r = t[(t["set"] == name) & (t["scorer"] == s)].iloc[0]
            cells.append(f"{_pct(r.accuracy)} [{_pct(r.ci_low)}, {_pct(r.ci_high)}] ({r.pairs:,})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    policy = t["tie_policy"].iloc[0] if len(t) else "half"
    lines += ["", f"Pairwise accuracy % [{level:.0%} bootstrap interval over prompts] (pairs). A scorer's tie "
              f"counts as: {policy}. Pairs the raters tied are left out."]
    return "\n".join(lines)


def frame_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for r in df.itertuples(index=False):
        out.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, (float, np.floating)) else str(v) for v in r) + " |")
    return "\n".join(out)


def plot_accuracy(t: pd.DataFrame, level: float) -> bytes:
    """Grouped bars: a group per test set, a bar per scorer, the bootstrap interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets, scorers = list(dict.fromkeys(t["set"])), list(dict.fromkeys(t["scorer"]))
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(sets) * max(1, len(scorers)) + 2), 4.2))
    w = 0.8 / max(1, len(scorers))
    for j, s in enumerate(scorers):
        part = t[t["scorer"] == s].set_index("set").reindex(sets)
        acc = part["accuracy"].to_numpy() * 100
        err = np.vstack([acc - part["ci_low"].to_numpy() * 100, part["ci_high"].to_numpy() * 100 - acc])
        bars = ax.bar(np.arange(len(sets)) + j * w, acc, w, yerr=np.nan_to_num(err), capsize=3, label=s)
        ax.bar_label(bars, labels=[_pct(a / 100) for a in acc], label_type="center", fontsize=8, color="white")
    ax.axhline(50, color="grey", ls="--", lw=1)
    ax.set_xticks(np.arange(len(sets)) + w * (len(scorers) - 1) / 2)
    ax.set_xticklabels(sets)
    ax.set_ylabel("pairwise accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Pairwise accuracy ({level:.0%} bootstrap intervals over prompts)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return images.figure_png(fig)


# ---------------------------------------------------------------- the job

def _write_outputs(cfg: CompareConfig, df: pd.DataFrame, acc: pd.DataFrame, diff: pd.DataFrame,
                   agree: pd.DataFrame) -> None:
    ep = cfg.s3_endpoint
    w = lambda name, data: storage.write_bytes(storage.join(cfg.out, name),  # noqa: E731
                                               data if isinstance(data, bytes) else data.encode(), ep)
    storage.write_parquet(pa.Table.from_pandas(df, preserve_index=False), storage.join(cfg.out, "scores.parquet"), ep)
    md = accuracy_markdown(acc, cfg.level)
    w("table.csv", acc.to_csv(index=False))
    w("table.md", md + "\n")
    w("accuracy.png", plot_accuracy(acc, cfg.level))
    w("differences.csv", diff.to_csv(index=False))
    w("differences.md", frame_markdown(diff) + "\n")
    w("agreement.csv", agree.to_csv(index=False))
    w("agreement.md", frame_markdown(agree) + "\n")
    report = ["# Reward model comparison", "", f"Test sets: {', '.join(dict.fromkeys(df['set']))}; scorers: "
              f"{', '.join(cfg.scorers)}; {len(df):,} pairs.", "", "## Pairwise accuracy", "", md, "",
              "![accuracy](accuracy.png)", "", f"## Difference to {cfg.scorers[0]} (paired bootstrap)", "",
              frame_markdown(diff) if len(diff) else "(one scorer)", "",
              "An interval above 0: the scorer orders more pairs correctly than the reference, beyond chance.", "",
              "## Agreement", "", "Share of pairs on which two scorers prefer the same image.", "",
              frame_markdown(agree), ""]
    w("report.md", "\n".join(report))


def compare_rewards(cfg: CompareConfig) -> dict[str, Any]:
    """Score every test set with every scorer (reusing finished results), tabulate; returns the JSON summary."""
    t0 = time.perf_counter()
    if not cfg.test:
        raise ConfigError("test: no preference set given (Pick-a-Pic Parquet, HPD v2 / ImageReward json, the "
                          "authors' CSV or sr-ray triplets); the job (sr-ray compare_rewards) uses the reward demo's "
                          "test split when none is given")
    if "social_reward" in cfg.scorers:
        from sr_ray.reward.score import read_checkpoint

        if not cfg.social_reward.checkpoint:
            raise ConfigError("social_reward.checkpoint is required with the social_reward scorer (a reward run's "
                              "checkpoint, local or s3://); the job uses the reward demo's when none is given")
        read_checkpoint(cfg.social_reward.checkpoint, mmap=True)  # not a checkpoint: named now, not in an actor
    storage.check_output_dir(cfg.out, "out", cfg.s3_endpoint)
    sets = resolve_sets(cfg)
    reused = 0
    for ts in sets:
        records = {s: result_record(cfg, ts, s) for s in cfg.scorers}  # weights fingerprinted once per run
        pending = {s: rec for s, rec in records.items() if not finished(cfg, ts, s, rec)}
        reused += len(cfg.scorers) - len(pending)
        if pending:
            started = init_ray(cfg.ray_address)
            c = cfg.compute
            check_resources(c.bundles(len(pending)), f"{len(pending)} scorer pool(s) of {c.num_actors} actor(s) "
                            "(compute.cpus_per_actor, gpus_per_actor) and a decode task (compute.decode_num_cpus)",
                            fixed=started, wait_s=c.resource_wait_s)
            log.info("[compare] %s (%s, %d files): scoring with %s", ts.name, ts.kind, len(ts.files), list(pending))
            score_set(cfg, ts, pending)
    df = pd.concat([load_set_scores(cfg, ts) for ts in sets], ignore_index=True)
    acc, diff, agree = accuracy_table(df, cfg), difference_table(df, cfg), agreement_table(df, cfg.scorers)
    _write_outputs(cfg, df, acc, diff, agree)
    results: dict[str, dict] = {}
    for r in acc.itertuples():
        results.setdefault(r.set, {})[r.scorer] = {"accuracy": round(r.accuracy, 5), "ci_low": round(r.ci_low, 5),
                                                    "ci_high": round(r.ci_high, 5), "pairs": int(r.pairs)}
    log.info("[compare] pairwise accuracy:\n%s", accuracy_markdown(acc, cfg.level))
    summary = {"results": results, "tie_policy": cfg.ties, "out": cfg.out, "results_reused": reused,
               "wall_s": round(time.perf_counter() - t0, 1)}
    storage.write_bytes(storage.join(cfg.out, "summary.json"), json.dumps(summary, indent=1).encode(), cfg.s3_endpoint)
    return summary
