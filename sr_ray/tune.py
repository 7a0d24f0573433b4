"""Sweep the reward model with Ray Tune: losses x learning rate x unfrozen blocks (or
any training key), Ray Train inside each trial, ASHA early stopping, resumable,
to a ranked table, a plot and the best checkpoint.

Each trial runs :func:`sr_ray.train.train_reward` (the reward-training job itself)
with its own overrides; ``TuneReportCallback`` forwards every validation report
(``val_pairwise_accuracy``, with the checkpoint's path) from Ray Train to Tune, the
way Ray's docs combine them since Train V2. Trial runs (checkpoints, TensorBoard,
config, summary) live in ``<sweep dir>/trials/<trial id>``, so
``tensorboard --logdir <sweep dir>`` shows every trial.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from sr_ray import storage
from sr_ray.config import ConfigError, from_dict, to_dict
from sr_ray.train import TrainRewardConfig, absolute_storage

log = logging.getLogger(__name__)

METRIC = "val_pairwise_accuracy"
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class SchedulerConfig:
    name: str = "asha"
    """asha (early stopping on val pairwise accuracy) or fifo (every trial runs to the end)."""
    grace_period: int = 1
    """Validations a trial gets before ASHA may stop it."""
    reduction_factor: float = 2.0
    """ASHA keeps the top 1/reduction_factor of trials at each rung."""
    max_t: int = 100
    """Most validations a trial can report (ASHA's last rung)."""

    def __post_init__(self) -> None:
        if self.name not in ("asha", "fifo"):
            raise ValueError("scheduler.name must be asha or fifo")


@dataclass
class TuneRewardConfig:
    train: TrainRewardConfig = field(default_factory=TrainRewardConfig)
    """The training job every trial starts from (same keys as jobs/train_reward.py)."""
    search: dict[str, Any] = field(default_factory=dict)
    """Dotted training key -> {grid: [...]} | {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi]}."""
    num_samples: int = 1
    """Samples of the random keys; grid keys are crossed with each sample."""
    max_concurrent_trials: int = 2
    trial_cpus: float = 0.5
    """CPUs held by each trial's driver (its Train workers ask for scaling.cpus_per_worker on top)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    name: str = "sr-reward-sweep"
    """Sweep name; re-running with the same name and storage continues an interrupted sweep."""
    storage_path: str = "./runs"
    resume: bool = True
    """Continue an interrupted sweep of the same name (finished trials are not rerun)."""
    seed: int = 0
    """Seed of the random search."""

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ValueError("num_samples and max_concurrent_trials must be >= 1")


def sweep_dir(cfg: TuneRewardConfig) -> str:
    return storage.join(absolute_storage(cfg.storage_path), cfg.name)


def _set(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def trial_config(base: dict, overrides: dict[str, Any]) -> TrainRewardConfig:
    """The training config of one trial: ``base`` (a TrainRewardConfig dict) with dotted ``overrides``."""
    import copy

    tree = copy.deepcopy(base)
    for k, v in overrides.items():
        _set(tree, k, v)
    return from_dict(TrainRewardConfig, tree)


def check_search(cfg: TuneRewardConfig) -> None:
    """Reject unknown keys, malformed specs and bad values before Ray starts (names the key)."""
    if not cfg.search:
        raise ConfigError("search is empty: give at least one training key to sweep, e.g. loss.name: {grid: [...]}")
    base = to_dict(cfg.train)
    for key, spec in cfg.search.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(f"search.{key}: expected one of {{{', '.join(SPACE_KINDS)}: ...}}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search.{key}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "randint") and len(values) != 2:
            raise ConfigError(f"search.{key}.{kind}: expected [low, high], got {values!r}")
        samples = values if kind in ("grid", "choice") else values[:1]
        for v in samples:
            try:
                trial_config(base, {key: v})
            except ConfigError as e:
                raise ConfigError(f"search.{key}: {e}") from None


def param_space(cfg: TuneRewardConfig) -> dict[str, Any]:
    from ray import tune

    space = {}
    for key, spec in cfg.search.items():
        kind, v = next(iter(spec.items()))
        space[key] = {"grid": lambda: tune.grid_search(v), "choice": lambda: tune.choice(v),
                      "uniform": lambda: tune.uniform(float(v[0]), float(v[1])),
                      "loguniform": lambda: tune.loguniform(float(v[0]), float(v[1])),
                      "randint": lambda: tune.randint(int(v[0]), int(v[1]) + 1)}[kind]()
    return space


def _trial(config: dict) -> None:
    """One Tune trial: the training job with this trial's overrides, reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    overrides = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = trial_config(config["_base"], overrides)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = replace(cfg, run=replace(cfg.run, name=trial_id, storage_path=config["_trials_dir"], ray_address=None))
    from sr_ray.train import train_reward

    train_reward(cfg, callbacks=[TuneReportCallback()], score_test=False)


def _plot(rows: list[dict], keys: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("loss.name", "model.unfreeze_vision_blocks", "model.unfreeze_text_blocks") if k in keys]
    panels += [k for k in keys if k not in panels][: max(0, 3 - len(panels))]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.8), squeeze=False)
    for ax, k in zip(axes[0], panels):
        groups: dict[str, list[float]] = {}
        for r in rows:
            if r.get(METRIC) is not None:
                groups.setdefault(str(r[k]), []).append(r[METRIC])
        names = sorted(groups, key=lambda g: (len(g), g))
        for i, g in enumerate(names):
            ax.scatter([i] * len(groups[g]), groups[g], alpha=0.7)
            ax.hlines(max(groups[g]), i - 0.3, i + 0.3, color="k")
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_xlabel(k)
        ax.set_ylabel("val pairwise accuracy")
        ax.axhline(0.5, color="grey", ls=":")
    fig.suptitle("Sweep: validation pairwise accuracy per trial (bar: best)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _markdown(rows: list[dict], keys: list[str], summary: dict) -> str:
    head = ["rank", "trial", *keys, METRIC, "validations", "status"]
    lines = [f"# Sweep {summary['name']}", "",
             f"Best: `{json.dumps(summary['best_config'])}` — val {summary['best_val_pairwise_accuracy']:.4f}"
             + (f", test {summary['best_test_pairwise_accuracy']:.4f}" if summary.get("best_test_pairwise_accuracy")
                is not None else ""), "",
             f"Best checkpoint: `{summary['best_checkpoint']}`", "", "![sweep](sweep.png)", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        acc = r.get(METRIC)
        lines.append("| " + " | ".join([str(r["rank"]), r["trial_id"], *[str(r[k]) for k in keys],
                                         f"{acc:.4f}" if acc is not None else "-", str(r["validations"]),
                                         r["status"]]) + " |")
    return "\n".join(lines) + "\n"


def tune_reward(cfg: TuneRewardConfig) -> dict[str, Any]:
    """Run (or continue) the sweep; returns the summary (also ``<sweep dir>/summary.json``)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from sr_ray.data import preflight, resolve_splits
    from sr_ray.ray_utils import init_ray
    from sr_ray.score import evaluate_split
    from sr_ray.train import check_config

    check_search(cfg)
    check_config(cfg.train)
    t0 = time.perf_counter()
    sdir = sweep_dir(cfg)
    if not cfg.train.data.train and cfg.train.data.demo.source == "community":
        init_ray(cfg.train.run.ray_address)
    train = replace(cfg.train, data=resolve_splits(cfg.train.data))
    infos = preflight(train.data)  # bad data fails here, before any trial starts
    if "val" not in infos:
        raise ConfigError("a sweep needs data.val: trials are ranked and stopped on validation accuracy")
    init_ray(cfg.train.run.ray_address)
    storage.write_text(storage.join(sdir, "sweep_config.json"), json.dumps(to_dict(cfg), indent=1))

    base = to_dict(train)
    trials_dir = storage.join(sdir, "trials")
    space = {**param_space(cfg), "_base": base, "_trials_dir": trials_dir}
    scheduler = (ASHAScheduler(time_attr="training_iteration", grace_period=cfg.scheduler.grace_period,
                               reduction_factor=cfg.scheduler.reduction_factor, max_t=cfg.scheduler.max_t)
                 if cfg.scheduler.name == "asha" else FIFOScheduler())
    trainable = tune.with_resources(_trial, {"CPU": cfg.trial_cpus})
    # Tune keeps its experiment state in <sweep dir>/tune (local or S3)
    fs, root = storage.resolve(sdir, train.data.s3_endpoint) if storage.is_s3(sdir) else (None, sdir)
    exp = f"{root}/tune"
    if cfg.resume and tune.Tuner.can_restore(exp, storage_filesystem=fs):
        log.info("[tune] continuing the sweep in %s (finished trials are kept)", sdir)
        tuner = tune.Tuner.restore(exp, trainable=trainable, param_space=space, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=fs)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", scheduler=scheduler, num_samples=cfg.num_samples,
                # the generator itself caps running trials (TuneConfig's cap is not applied to a given search_alg)
                search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials)),
            run_config=tune.RunConfig(name="tune", storage_path=root, storage_filesystem=fs,
                                      callbacks=[_tbx_callback()], verbose=1),
        )
    grid = tuner.fit()

    keys = list(cfg.search)
    rows = []
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or os.path.basename(str(r.path).rstrip("/"))
        hist = r.metrics_dataframe
        best_acc = float(hist[METRIC].max()) if hist is not None and METRIC in hist else None
        best_ckpt = None
        if hist is not None and METRIC in hist and "checkpoint_path" in hist:
            best_ckpt = hist.loc[hist[METRIC].idxmax(), "checkpoint_path"]
        rows.append({"trial_id": trial_id,
                     **{k: (r.config or {}).get(k) for k in keys}, METRIC: best_acc,
                     "validations": 0 if hist is None else len(hist),
                     "status": "error" if r.error else ("stopped early" if hist is not None and len(hist) and
                                                         len(hist) < _expected_validations(train, r.config, keys)
                                                         else "finished"),
                     "checkpoint": best_ckpt})
    rows.sort(key=lambda r: -1 if r[METRIC] is None else r[METRIC], reverse=True)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    best = rows[0] if rows and rows[0][METRIC] is not None else None
    if best is None:
        raise RuntimeError(f"no trial of {sdir} reported a validation accuracy; see the trial logs in {trials_dir}")
    summary: dict[str, Any] = {
        "name": cfg.name, "sweep_dir": sdir, "trials": len(rows),
        "best_config": {k: best[k] for k in keys}, "best_val_pairwise_accuracy": best[METRIC],
        "best_checkpoint": best["checkpoint"], "best_trial": best["trial_id"],
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "errored": sum(r["status"] == "error" for r in rows),
    }
    if "test" in infos and best["checkpoint"]:
        best_model = trial_config(base, summary["best_config"]).model
        test = evaluate_split(best["checkpoint"], infos["test"], to_dict(best_model), train.data)
        summary["best_test_pairwise_accuracy"] = test["pairwise_accuracy"]
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    _write_outputs(sdir, rows, keys, summary, train.data.s3_endpoint)
    return summary


def _expected_validations(train: TrainRewardConfig, config: dict | None, keys: list[str]) -> int:
    """Validations a trial makes when it runs to the end (one per epoch unless validating every N steps)."""
    cfg = trial_config(to_dict(train), {k: (config or {}).get(k) for k in keys if k in (config or {})})
    if cfg.run.val_every_steps:
        return 0  # unknown without the step count; never call such a trial stopped early
    return cfg.optim.epochs


def _tbx_callback():
    from ray.tune.logger import TBXLoggerCallback

    return TBXLoggerCallback()


def _write_outputs(sdir: str, rows: list[dict], keys: list[str], summary: dict, endpoint: str | None) -> None:
    import csv

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["rank", "trial_id", *keys, METRIC, "validations", "status", "checkpoint"])
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in w.fieldnames})
    storage.write_text(storage.join(sdir, "results.csv"), buf.getvalue(), endpoint)
    storage.write_text(storage.join(sdir, "results.md"), _markdown(rows, keys, summary), endpoint)
    storage.write_bytes(storage.join(sdir, "sweep.png"), _plot(rows, keys), endpoint)
    storage.write_text(storage.join(sdir, "summary.json"), json.dumps(summary, indent=1, default=str), endpoint)
