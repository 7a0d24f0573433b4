"""Sweep the reward model with Ray Tune: losses x learning rate x unfrozen blocks (or
any training key), Ray Train inside each trial, ASHA early stopping, resumable,
to a ranked table, a plot and the best checkpoint.

Each trial runs :func:`sr_ray.reward.train.train_reward` (the reward-training job itself)
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

from sr_ray.core import images, storage
from sr_ray.core.config import ConfigError, from_dict, set_dotted, to_dict
from sr_ray.core.logs import setup_logging
from sr_ray.core.ray_utils import init_ray, require_shared_storage
from sr_ray.core.raytrain import absolute_storage
from sr_ray.reward.data import preflight
from sr_ray.reward.train import (
    TrainRewardConfig,
    check_config,
    ensure_feature_cache,
    require_train_split,
    steps_per_epoch,
    train_reward,
)

log = logging.getLogger(__name__)

METRIC = "val_pairwise_accuracy"
PAPER_TABLE7 = {"triplet": 69.7, "infonce": 68.5, "supcon": 67.1, "bce": 67.0, "rce": 65.9}
"""Test pairwise accuracy (%) per loss in the paper's Table 7 (its "contrastive" is sr-ray's supcon)."""
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
    max_concurrent_trials: int = 0
    """Trials running at once; 0: as many as fit the cluster now, leaving data_cpus free for Ray Data."""
    trial_cpus: float = 0.5
    """CPUs held by each trial's driver (its Train workers ask for scaling.cpus_per_worker on top)."""
    data_cpus: float = 1.0
    """CPUs kept free of trials for Ray Data's read and preprocessing tasks (a read task asks for 1 CPU):
    with none left, every trial's data pipeline waits for ever."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    name: str = "sr-reward-sweep"
    """Sweep name; re-running with the same name and storage continues an interrupted sweep."""
    storage_path: str = "./runs"
    resume: bool = True
    """Continue an interrupted sweep of the same name (finished trials are not rerun); false: refuse to touch it."""
    seed: int = 0
    """Seed of the random search."""
    score_test: str = "best"
    """Which trials the test split scores at the end: best (the best by val), all (every trial with a
    checkpoint: Table 7 reports each loss's test accuracy), none."""

    def __post_init__(self) -> None:
        if self.score_test not in ("best", "all", "none"):
            raise ValueError("score_test must be best, all or none")
        if self.num_samples < 1 or self.max_concurrent_trials < 0:
            raise ValueError("num_samples must be >= 1 and max_concurrent_trials >= 0 (0: as many as fit)")
        if self.trial_cpus < 0 or self.data_cpus < 0:
            raise ValueError("trial_cpus and data_cpus must be >= 0")


def sweep_dir(cfg: TuneRewardConfig) -> str:
    return storage.join(absolute_storage(cfg.storage_path), cfg.name)


def trial_config(base: dict, overrides: dict[str, Any]) -> TrainRewardConfig:
    """The training config of one trial: ``base`` (a TrainRewardConfig dict) with dotted ``overrides``."""
    import copy

    tree = copy.deepcopy(base)
    for k, v in overrides.items():
        set_dotted(tree, k.split("."), v)
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


CACHE_FIXED = ("model.name", "model.pretrained", "optim.seed", "data.train", "data.val", "data.image_root")


def feature_cache_bounds(cfg: TuneRewardConfig) -> tuple[int, int]:
    """(most vision blocks, most text blocks) any trial trains: the one feature cache the sweep builds before its
    trials must be cut below both. A swept key that changes the trunk or the data cannot share a cache."""
    fixed = [k for k in cfg.search if k in CACHE_FIXED or k.startswith("data.demo.")]
    if fixed:
        raise ConfigError(f"train.data.feature_cache is shared by every trial, but search.{fixed[0]} changes the "
                          f"frozen trunk or the data it caches; sweep without a feature cache, or not over {fixed[0]}")
    out = []
    for tower in ("vision", "text"):
        key = f"model.unfreeze_{tower}_blocks"
        spec = cfg.search.get(key)
        values = [getattr(cfg.train.model, f"unfreeze_{tower}_blocks")]
        if spec:
            kind, vals = next(iter(spec.items()))
            values = list(range(vals[0], vals[1])) if kind == "randint" else list(vals)
        out.append(-1 if -1 in values else max(int(v) for v in values))
    return out[0], out[1]


def _typed(base: dict, key: str, value: Any) -> Any:
    """``value`` as the training config's field ``key`` holds it (YAML reads ``1e-3`` as a string)."""
    node: Any = trial_config(base, {key: value})
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def param_space(cfg: TuneRewardConfig) -> dict[str, Any]:
    from ray import tune

    base = to_dict(cfg.train)
    space = {}
    for key, spec in cfg.search.items():
        kind, v = next(iter(spec.items()))
        v = [_typed(base, key, x) for x in v]
        space[key] = {"grid": lambda: tune.grid_search(v), "choice": lambda: tune.choice(v),
                      "uniform": lambda: tune.uniform(v[0], v[1]),
                      "loguniform": lambda: tune.loguniform(v[0], v[1]),
                      "randint": lambda: tune.randint(v[0], v[1] + 1)}[kind]()
    return space


def _trial(config: dict, base: dict, trials_dir: str) -> None:
    """One Tune trial: the training job with this trial's overrides, reporting to Tune."""
    import ray
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    setup_logging()
    cfg = trial_config(base, config)
    trial_id = ray.tune.get_context().get_trial_id()
    log.info("[tune] trial %s %s; free in the cluster: %s", trial_id, json.dumps(config),
             {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")})
    cfg = replace(cfg, run=replace(cfg.run, name=trial_id, storage_path=trials_dir, ray_address=None))

    train_reward(cfg, callbacks=[TuneReportCallback()], score_test=False)


def concurrency(cfg: TuneRewardConfig, cluster: dict[str, float]) -> int:
    """Trials to run at once: ``max_concurrent_trials``, or (0) as many as fit ``cluster`` now.

    A trial holds ``trial_cpus`` plus its Train workers' CPUs (and GPUs); ``data_cpus``
    stay free for Ray Data. An explicit value above what fits is kept (an autoscaling
    cluster may grow) but logged, since on a fixed cluster the extra trials only wait.
    """
    sc = cfg.train.scaling
    cpus = cfg.trial_cpus + sc.num_workers * sc.cpus_per_worker
    fits = int((cluster.get("CPU", 0.0) - cfg.data_cpus + 1e-9) // cpus) if cpus else 1_000_000
    if sc.use_gpu:
        fits = min(fits, int(cluster.get("GPU", 0.0) + 1e-9) // max(1, int(sc.num_workers * sc.gpus_per_worker)))
    if cfg.max_concurrent_trials:
        if cfg.max_concurrent_trials > fits:
            log.warning("[tune] max_concurrent_trials=%d but %d fit the cluster now (%s; each trial %.2f CPU, "
                        "%.2f CPU kept for Ray Data): the others wait for resources", cfg.max_concurrent_trials,
                        max(fits, 0), {k: cluster.get(k, 0) for k in ("CPU", "GPU")}, cpus, cfg.data_cpus)
        return cfg.max_concurrent_trials
    if fits < 1:
        raise ConfigError(f"no trial fits the cluster ({ {k: cluster.get(k, 0) for k in ('CPU', 'GPU')} }): a trial "
                          f"needs {cpus:.2f} CPU (trial_cpus + scaling.num_workers x scaling.cpus_per_worker) and "
                          f"data_cpus={cfg.data_cpus} stay free for Ray Data; lower them or use a bigger cluster")
    return fits


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _plot(rows: list[dict], keys: list[str]) -> bytes:
    """One panel per swept key (loss and unfrozen blocks first): each trial's best val accuracy.

    Categorical keys get a column per value with a bar at the best trial; numeric keys
    a scatter (log axis when they span a decade). Hollow markers: trials ASHA stopped early.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("loss.name", "model.unfreeze_vision_blocks", "model.unfreeze_text_blocks") if k in keys]
    panels += [k for k in keys if k not in panels][: max(0, 4 - len(panels))]
    done = [r for r in rows if r.get(METRIC) is not None]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.8), squeeze=False)
    for ax, k in zip(axes[0], panels):
        values = [r[k] for r in done]
        numeric = all(isinstance(v, float) for v in values) and len(set(values)) > 1
        if numeric:
            xs = values
            if min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
        else:
            names = sorted({str(v) for v in values}, key=lambda g: (len(g), g))
            pos = {g: i for i, g in enumerate(names)}
            xs = [pos[str(v)] for v in values]
            for g, i in pos.items():
                ax.hlines(max(r[METRIC] for r in done if str(r[k]) == g), i - 0.3, i + 0.3, color="k")
            ax.set_xticks(range(len(names)), names, rotation=20)
        for x, r in zip(xs, done):
            early = r["status"] == "stopped early"
            ax.scatter([x], [r[METRIC]], s=36, facecolors="none" if early else "C0", edgecolors="C0")
        ax.set_xlabel(k)
        ax.set_ylabel("best val pairwise accuracy")
        ax.axhline(0.5, color="grey", ls=":")
    fig.suptitle("Sweep: best validation pairwise accuracy per trial (hollow: stopped early by ASHA)")
    return images.figure_png(fig)


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
        lines.append("| " + " | ".join([str(r["rank"]), r["trial_id"], *[_fmt(r[k]) for k in keys],
                                         f"{acc:.4f}" if acc is not None else "-", str(r["validations"]),
                                         r["status"]]) + " |")
    return "\n".join(lines) + "\n"


def tune_reward(cfg: TuneRewardConfig) -> dict[str, Any]:
    """Run (or continue) the sweep; returns the summary (also ``<sweep dir>/summary.json``)."""
    import ray
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    check_search(cfg)
    check_config(cfg.train)
    t0 = time.perf_counter()
    sdir = sweep_dir(cfg)
    require_train_split(cfg.train.data)
    train = cfg.train
    infos = preflight(train.data)  # bad data fails here, before any trial starts
    if "val" not in infos:
        raise ConfigError("a sweep needs data.val: trials are ranked and stopped on validation accuracy")
    bounds = feature_cache_bounds(cfg) if train.data.feature_cache else None
    init_ray(cfg.train.run.ray_address)
    require_shared_storage(sdir, "storage_path", "Tune's trials write checkpoints and results")
    at_once = concurrency(cfg, ray.cluster_resources())
    if train.data.feature_cache:  # built once here, so that no two trials build it at once
        require_shared_storage(train.data.feature_cache, "train.data.feature_cache", "Ray Data's tasks write it")
        ensure_feature_cache(train, infos, *bounds)
    log.info("[tune] %s: %d trial(s) at a time, each %.2f CPU (+%.2f per Train worker x %d)", sdir, at_once,
             cfg.trial_cpus, cfg.train.scaling.cpus_per_worker, cfg.train.scaling.num_workers)
    storage.write_text(storage.join(sdir, "sweep_config.json"), json.dumps(to_dict(cfg), indent=1))

    base = to_dict(train)
    trials_dir = storage.join(sdir, "trials")
    space = param_space(cfg)
    scheduler = (ASHAScheduler(time_attr="training_iteration", grace_period=cfg.scheduler.grace_period,
                               reduction_factor=cfg.scheduler.reduction_factor, max_t=cfg.scheduler.max_t)
                 if cfg.scheduler.name == "asha" else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base, trials_dir=trials_dir),
                                    {"CPU": cfg.trial_cpus})
    # Tune keeps its experiment state in <sweep dir>/tune (local or S3)
    fs, root = storage.resolve(sdir, train.data.s3_endpoint) if storage.is_s3(sdir) else (None, sdir)
    exp = f"{root}/tune"
    restorable = tune.Tuner.can_restore(exp, storage_filesystem=fs)
    if restorable and not cfg.resume:
        raise ConfigError(f"{sdir} already holds a sweep named {cfg.name!r}: resume=true continues it; "
                          f"give another name to start a new one")
    if restorable:
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
                search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=at_once)),
            run_config=tune.RunConfig(name="tune", storage_path=root, storage_filesystem=fs,
                                      callbacks=[TBXLoggerCallback()], verbose=1),
        )
    grid = tuner.fit()

    keys = list(cfg.search)
    rows = _trial_rows(grid, keys, train, sdir, infos)
    best = rows[0] if rows and rows[0][METRIC] is not None else None
    if best is None:
        raise RuntimeError(f"no trial of {sdir} reported a validation accuracy; see the trial logs in {trials_dir}")
    summary = _summary(cfg, sdir, rows, keys, best)
    if "test" in infos and cfg.score_test != "none":
        _score_test(rows if cfg.score_test == "all" else [best], keys, base, infos["test"], train)
        if best.get("test_pairwise_accuracy") is not None:
            summary["best_test_pairwise_accuracy"] = best["test_pairwise_accuracy"]
    summary["table7"] = table7(rows, keys, base)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    _write_outputs(sdir, rows, keys, summary, train.data.s3_endpoint)
    return summary


def _summary(cfg: TuneRewardConfig, sdir: str, rows: list[dict], keys: list[str], best: dict) -> dict[str, Any]:
    return {
        "name": cfg.name, "sweep_dir": sdir,
        "best_config": {k: best[k] for k in keys}, "best_val_pairwise_accuracy": best[METRIC],
        "best_checkpoint": best["checkpoint"], "best_trial": best["trial_id"],
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "errored": sum(r["status"] == "error" for r in rows),
        "trials": [{"trial_id": r["trial_id"], "config": {k: r[k] for k in keys}, METRIC: r[METRIC],
                    "validations": r["validations"], "status": r["status"]} for r in rows],
    }


def _trial_rows(grid, keys: list[str], train: TrainRewardConfig, sdir: str, infos: dict) -> list[dict]:
    """A row per trial (its swept values, best val accuracy, status, best kept checkpoint), best first, ranked."""
    rows = []
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or os.path.basename(str(r.path).rstrip("/"))
        hist = r.metrics_dataframe
        best_acc = float(hist[METRIC].max()) if hist is not None and METRIC in hist else None
        best_ckpt = _best_checkpoint(hist, train.data.s3_endpoint, storage.is_s3(sdir))
        rows.append({"trial_id": trial_id,
                     **{k: (r.config or {}).get(k) for k in keys}, METRIC: best_acc,
                     "validations": 0 if hist is None else len(hist),
                     "status": _status(r, hist, _expected_steps(train, r.config, keys, infos["train"].rows)),
                     "checkpoint": best_ckpt})
    rows.sort(key=lambda r: -1 if r[METRIC] is None else r[METRIC], reverse=True)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _score_test(rows: list[dict], keys: list[str], base: dict, test_info, train: TrainRewardConfig) -> None:
    """Each row's kept checkpoint scored on the test split: accuracy and its interval over prompts, in place."""
    from sr_ray.reward.score import evaluate_split

    for r in rows:
        if r["checkpoint"]:
            model = trial_config(base, {k: r[k] for k in keys}).model
            test = evaluate_split(r["checkpoint"], test_info, to_dict(model), train.data)
            r.update(test_pairwise_accuracy=test["pairwise_accuracy"], test_ci_low=test.get("ci_low"),
                     test_ci_high=test.get("ci_high"))


def table7(rows: list[dict], keys: list[str], base: dict) -> list[dict]:
    """Paper Table 7: per loss, its best trial by val accuracy, with val and test accuracy (95 % interval over
    prompts), learning rate and unfrozen blocks, beside the paper's test accuracy."""
    out = []
    for r in rows:  # rows are sorted best first
        cfg = trial_config(base, {k: r[k] for k in keys})
        loss = cfg.loss.name
        if r[METRIC] is None or any(t["loss"] == loss for t in out):
            continue
        out.append({"loss": loss, "trial_id": r["trial_id"], "val": r[METRIC],
                    "test": r.get("test_pairwise_accuracy"), "test_ci_low": r.get("test_ci_low"),
                    "test_ci_high": r.get("test_ci_high"), "lr": cfg.optim.lr,
                    "unfrozen_vision": cfg.model.unfreeze_vision_blocks,
                    "unfrozen_text": cfg.model.unfreeze_text_blocks, "paper_test": PAPER_TABLE7.get(loss)})
    return out


def table7_markdown(t7: list[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    lines = ["| loss | val % | test % [95 % CI] | lr | unfrozen (vision+text) | paper test % |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    for t in t7:
        ci = f" [{pct(t['test_ci_low'])}, {pct(t['test_ci_high'])}]" if t["test_ci_low"] is not None else ""
        lines.append(f"| {t['loss']} | {pct(t['val'])} | {pct(t['test'])}{ci} | {t['lr']:.2g} | "
                     f"{t['unfrozen_vision']}+{t['unfrozen_text']} | {t['paper_test'] or '-'} |")
    return "\n".join(lines) + ("\n\nEach loss's best trial by validation accuracy; test accuracy with a bootstrap "
                               "interval over prompts (a tie counts half). Paper: its Table 7 (the authors' data).\n")


def _best_checkpoint(hist, endpoint: str | None, s3: bool = False) -> str | None:
    """The URI of the checkpoint of the trial's best validation that is still there.

    Train keeps ``run.checkpoints_to_keep`` checkpoints by val accuracy; of equal
    scores it keeps the newest, so ties are tried newest first. On S3 the reported
    path is ``bucket/key`` (the filesystem's own form); the URI gets ``s3://`` back.
    """
    if hist is None or METRIC not in hist or "checkpoint_path" not in hist:
        return None
    ranked = hist.sort_values([METRIC, "step"] if "step" in hist else [METRIC], ascending=False)
    for path in ranked["checkpoint_path"].dropna():
        uri = storage.to_uri(path, s3)
        if storage.exists(uri, endpoint):
            return uri
    return None


def _status(result, hist, expected_steps: int) -> str:
    if result.error:
        return "error"
    last_step = int(hist["step"].max()) if hist is not None and "step" in hist and len(hist) else 0
    return "finished" if last_step >= expected_steps else "stopped early"


def _expected_steps(train: TrainRewardConfig, config: dict | None, keys: list[str], rows: int) -> int:
    """Optimizer steps a trial makes when it runs to the end (the training job's own arithmetic)."""
    cfg = trial_config(to_dict(train), {k: (config or {})[k] for k in keys if k in (config or {})})
    return steps_per_epoch(cfg, rows) * cfg.optim.epochs


def _write_outputs(sdir: str, rows: list[dict], keys: list[str], summary: dict, endpoint: str | None) -> None:
    import csv

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["rank", "trial_id", *keys, METRIC, "test_pairwise_accuracy", "test_ci_low",
                                        "test_ci_high", "validations", "status", "checkpoint"])
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in w.fieldnames})
    storage.write_text(storage.join(sdir, "results.csv"), buf.getvalue(), endpoint)
    storage.write_text(storage.join(sdir, "results.md"), _markdown(rows, keys, summary), endpoint)
    storage.write_bytes(storage.join(sdir, "sweep.png"), _plot(rows, keys), endpoint)
    storage.write_text(storage.join(sdir, "summary.json"), json.dumps(summary, indent=1, default=str), endpoint)
    t7 = summary.get("table7") or []
    storage.write_text(storage.join(sdir, "table7.md"), table7_markdown(t7), endpoint)
    buf = io.StringIO()
    if t7:
        w = csv.DictWriter(buf, fieldnames=list(t7[0]))
        w.writeheader()
        w.writerows(t7)
    storage.write_text(storage.join(sdir, "table7.csv"), buf.getvalue(), endpoint)
