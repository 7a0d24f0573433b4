"""Train the Social Reward model with Ray Train: one explicit loop, one driver.

``train_reward(cfg)`` (the driver) checks the data and config, starts Ray if
needed, runs a ``TorchTrainer`` over :func:`train_func` (the per-worker loop),
scores the test split with the best checkpoint, and writes ``summary.json``.
Re-running with the same ``run.name`` and ``run.storage_path`` resumes from the
latest checkpoint (Ray Train V2 restores its run state from storage).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sr_ray.core import identity, raytrain, storage
from sr_ray.core.config import ConfigError, dump_yaml, to_dict
from sr_ray.core.ray_utils import check_resources, init_ray, require_shared_storage
from sr_ray.core.raytrain import (
    IDENTITY_FILE,
    STATE_FILE,
    Reducer,
    StopForData,
    absolute_storage,
    run_dir,
    worker_bundle,
)
from sr_ray.reward import feature_cache
from sr_ray.reward.data import DataConfig, DataError, preflight, triplet_dataset
from sr_ray.reward.features import HeadRewardModel
from sr_ray.reward.losses import LossConfig, compute_loss, global_batch_loss
from sr_ray.reward.model import ModelConfig, RewardModel, activation_problem, build_clip, count_params
from sr_ray.reward.score import MODEL_FILE, evaluate_split, pairwise_accuracy, save_model

log = logging.getLogger(__name__)

META_FILE = "meta.json"
# keys a resumed run may change: they decide where and how fast it runs, or how it reports, not what it learns
OPERATIONAL = ("run.ray_address", "run.log_every_steps", "run.fail_at_step", "run.trace_batches", "run.exact_resume",
               "run.overwrite", "run.checkpoints_to_keep", "scaling.max_failures", "scaling.placement_strategy",
               "scaling.resource_wait_s", "data.s3_endpoint", "data.preflight_rows", "data.map_num_cpus",
               "data.map_batch_size", "data.prefetch_batches", "data.min_rows_for_bad_rate", "data.max_bad_row_rate",
               "data.demo.cache_dir", "data.feature_cache_actors")


@dataclass
class OptimConfig:
    lr: float = 3e-5
    """Peak learning rate (the authors' code: 3e-5; the paper text says 3e-4)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices; norms, biases and embeddings-as-vectors get none unless ``decay_1d``."""
    decay_1d: bool = False
    """Decay 1-D parameters (norms, biases) too: one parameter group, as the authors' ``AdamW(params)``."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    schedule: str = "cosine"
    """``cosine``: linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``;
    ``constant``: ``lr`` throughout (after the warmup, if any), as the authors' code."""
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Max global gradient norm (0: off)."""
    batch_size: int = 32
    """Global batch (triplets per step over all workers); the paper: 32."""
    epochs: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1:
            raise ValueError("optim.lr must be > 0, optim.batch_size and optim.epochs >= 1")
        if len(self.betas) != 2:
            raise ValueError("optim.betas must hold two numbers")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule={self.schedule!r} is not one of ['constant', 'cosine']")


@dataclass
class ScalingConfig(raytrain.ScalingConfig):
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), bf16, or fp32."""
    resource_wait_s: float = 300.0
    """On a cluster that may grow (joined, not started here): how long to wait for nodes that can hold a worker."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError("scaling.precision must be auto, bf16 or fp32")


@dataclass
class RunConfig(raytrain.RunConfig):
    name: str = "sr-reward-demo"
    val_every_steps: int = 0
    """Also validate and checkpoint every N steps (0: once per epoch only)."""
    save_full_model: bool = False
    """Store every weight in checkpoints; by default only trained ones when weights are pretrained."""


@dataclass
class TrainRewardConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)


def steps_per_epoch(cfg: TrainRewardConfig, rows: int) -> int:
    """Optimizer steps per epoch over ``rows`` training triplets (each worker reads an equal share)."""
    nw = cfg.scaling.num_workers
    return (rows // nw) // (cfg.optim.batch_size // nw)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total`` (or 1: constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float, decay_1d: bool = False) -> list[dict]:
    """AdamW groups of the trainable parameters: matrices decay; 1-D ones (norms, biases) only with ``decay_1d``."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 or decay_1d else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batch_to(batch: dict, device: torch.device):
    """(tokens, pos, neg, prompt ids, valid) on ``device``; with a text feature cache, tokens is (ids, states)."""
    valid = batch["valid"].to(device=device, dtype=torch.bool)
    tokens = batch["tokens"].to(device)
    if "text" in batch:
        tokens = (tokens, batch["text"].to(device))
    return tokens, batch["pos"].to(device), batch["neg"].to(device), batch["prompt_id"].to(device), valid


def _rows(tokens, mask: torch.Tensor):
    return tuple(t[mask] for t in tokens) if isinstance(tokens, tuple) else tokens[mask]


@torch.no_grad()
def evaluate(model: RewardModel, shard, cfg: TrainRewardConfig, device, autocast, reducer: Reducer,
             per_worker_batch: int) -> dict[str, float]:
    """Pairwise accuracy (ties count half) and mean loss of ``model`` on a dataset shard, over all workers."""
    model.eval()
    correct = count = loss_sum = bad = 0.0
    for batch in shard.iter_torch_batches(batch_size=per_worker_batch, drop_last=False):
        tokens, pos, neg, pids, valid = _batch_to(batch, device)
        bad += float((~valid).sum())
        if not valid.any():
            continue
        with autocast():
            t, p, n = model(_rows(tokens, valid), pos[valid], neg[valid])
        c, k = pairwise_accuracy(RewardModel.score(t, p), RewardModel.score(t, n))
        correct, count = correct + c, count + k
        loss_sum += float(compute_loss(t, p, n, cfg.loss, pids[valid])) * k
    correct, count, loss_sum, bad = reducer.sum(correct, count, loss_sum, bad)
    model.train()
    if count == 0:
        raise StopForData(f"the validation split produced no usable triplets ({int(bad)} bad rows; their reasons "
                          f"are in the log)")
    return {"val_pairwise_accuracy": correct / count, "val_loss": loss_sum / count,
            "val_triplets": int(count), "val_bad_rows": int(bad)}


def train_step(model, batch, loss_cfg: LossConfig, optim, params, grad_clip: float, autocast) -> float:
    """One optimisation step on (tokens, pos, neg, prompt_ids, valid); rows with valid=False are left out.

    The loss is over the global batch (every worker's rows, :func:`global_batch_loss`). Returns its value."""
    tokens, pos, neg, pids, valid = batch
    with autocast():
        t, p, n = model(tokens, pos, neg)
    to_backward, value = global_batch_loss(t.float(), p.float(), n.float(), pids, valid, loss_cfg)
    optim.zero_grad(set_to_none=True)
    to_backward.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optim.step()
    return float(value)


def train_func(config: dict[str, Any]) -> None:
    """The per-worker training loop (Ray Train). ``config``: {"cfg": dict, "steps_per_epoch": int, "run_dir": str}.

    Bad data (too many bad rows, an empty validation) ends the run on every worker at once and the driver
    raises it as a :class:`DataError` (:func:`sr_ray.core.raytrain.run_worker`).
    """
    raytrain.run_worker(RewardWorker, config)


class RewardWorker(raytrain.Worker):
    """One Ray Train worker of reward training: the model and its optimizer, the epoch, validation reports."""

    tag, unit, rows, config_class = "train", "triplets", "training rows", TrainRewardConfig

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        self.feature_cache_plan = config.get("feature_cache_plan")
        super().__init__(config)
        cfg = self.cfg
        _seed_all(cfg.optim.seed)
        model = self._build()
        self._resume(model)
        self.model = ray.train.torch.prepare_model(model)  # device + DDP when world > 1
        self.core: RewardModel = self.model.module if hasattr(self.model, "module") else self.model
        self.open_tensorboard(f"{self.world} workers, {self.device}, bf16={self.bf16}, trainable {self.trainable} / "
                              f"{self.total_params} params, {self.total_steps} steps ({self.steps_per_epoch}/epoch), "
                              f"global batch {cfg.optim.batch_size}")
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val") if "val" in config.get("splits", ["val"]) else None

    def plan(self) -> tuple[str, int, int]:
        o = self.cfg.optim
        return self.cfg.scaling.precision, o.batch_size, self.steps_per_epoch * o.epochs

    def _build(self) -> RewardModel:
        """The model (frozen per config), its AdamW over the trainable parameters and the LR schedule."""
        cfg = self.cfg
        cut = self.feature_cache_plan
        model = HeadRewardModel(build_clip(cfg.model), cut["image_depth"], cut["text_depth"]) if cut else \
            RewardModel(build_clip(cfg.model))
        self.trainable, self.total_params = count_params(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("nothing to train: model.unfreeze_vision_blocks and model.unfreeze_text_blocks are "
                              "both 0")
        groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_1d)
        self.optim = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.optim, lambda s: lr_factor(s, self.total_steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio,
                                            cfg.optim.schedule))
        return model

    def _resume(self, model: RewardModel) -> None:
        """Weights, optimizer, schedule, step and RNG from Ray Train's latest checkpoint, when there is one."""
        import ray.train

        self.best_acc = float("-inf")
        ckpt = ray.train.get_checkpoint()
        if not ckpt:
            return
        with ckpt.as_directory() as d:
            blob = torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)
            model.clip.load_state_dict(blob["state_dict"], strict=blob["full"])
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        self.optim.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.best_acc = state["best_val_pairwise_accuracy"]
        torch.set_rng_state(state["torch_rng"])
        self.resumed(state["step"])

    def report(self, epoch: int) -> None:
        """Validate on all workers, then report metrics and (rank 0) a checkpoint to Ray Train."""
        import ray.train

        nbad, nseen = self.reducer.sum(self.bad, self.seen)
        metrics: dict[str, Any] = {"step": self.step, "epoch": epoch, "train_loss": self.last_loss,
                                   "bad_rows": int(nbad), "rows_seen": int(nseen), "triplets_per_s": self.rate()}
        if self.val_shard is not None:
            metrics |= evaluate(self.core, self.val_shard, self.cfg, self.device, self.autocast, self.reducer,
                                self.per_worker)
            self.best_acc = max(self.best_acc, metrics["val_pairwise_accuracy"])
        metrics["best_val_pairwise_accuracy"] = self.best_acc
        if self.resumed_from is not None:
            metrics["resumed_from_step"] = self.resumed_from
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = self._save(tmp, metrics) if self.rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)

    def _save(self, tmp: str, metrics: dict[str, Any]):
        """Rank 0: the checkpoint folder (model, optimizer state, metrics), TensorBoard and the [val] line."""
        import ray.train

        save_model(tmp, self.core, self.cfg.model, full=self.cfg.run.save_full_model)
        torch.save({"optimizer": self.optim.state_dict(), "scheduler": self.sched.state_dict(), "step": self.step,
                    "best_val_pairwise_accuracy": self.best_acc, "torch_rng": torch.get_rng_state()},
                   Path(tmp) / STATE_FILE)
        Path(tmp, META_FILE).write_text(json.dumps(metrics, indent=1))
        for k in ("val_pairwise_accuracy", "val_loss"):
            if k in metrics:
                self.writer.add_scalar(k.replace("_", "/", 1), metrics[k], self.step)
        self.upload_tensorboard()
        acc = metrics.get("val_pairwise_accuracy")
        log.info("[val] step %d  pairwise accuracy %s  val loss %s", self.step,
                 f"{acc:.4f}" if acc is not None else "n/a",
                 f"{metrics['val_loss']:.4f}" if "val_loss" in metrics else "n/a")
        return ray.train.Checkpoint.from_directory(tmp)

    def _epoch(self, epoch: int) -> None:
        cfg, spe = self.cfg, self.steps_per_epoch
        shuffle = cfg.data.shuffle_buffer
        for i, batch, t0 in self.batches(self.train_shard, epoch, prefetch_batches=cfg.data.prefetch_batches,
                                         local_shuffle_buffer_size=shuffle or None,
                                         local_shuffle_seed=cfg.optim.seed + epoch + 1000 * self.rank
                                         if shuffle else None):
            tokens, pos, neg, pids, valid = _batch_to(batch, self.device)
            self.count_rows(valid)
            self.last_loss = train_step(self.model, (tokens, pos, neg, pids, valid), cfg.loss, self.optim,
                                        self.params, cfg.optim.grad_clip, self.autocast)
            self.sched.step()
            self.advance(epoch, t0, self.sched.get_last_lr()[0])
            if i == spe - 1 or (cfg.run.val_every_steps and self.step % cfg.run.val_every_steps == 0):
                self.report(epoch)

    def run(self) -> None:
        self.model.train()
        first = self.step // self.steps_per_epoch if self.steps_per_epoch else 0
        for epoch in range(first, self.cfg.optim.epochs):
            self._epoch(epoch)


def check_config(cfg: TrainRewardConfig) -> None:
    """Config checks that need no data: batch split, model name and weights, where the run goes."""
    import open_clip

    if cfg.optim.batch_size % cfg.scaling.num_workers:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is not divisible by "
                          f"scaling.num_workers={cfg.scaling.num_workers}")
    name = cfg.model.name
    if not name.startswith(("local-dir:", "hf-hub:")) and name not in open_clip.list_models():
        raise ConfigError(f"model.name={name!r} is not an open_clip architecture (see open_clip.list_models())")
    pre = cfg.model.pretrained
    if pre and not storage.is_s3(pre) and not os.path.isfile(pre) and not name.startswith(("local-dir:", "hf-hub:")) \
            and not open_clip.get_pretrained_cfg(name, pre):
        raise ConfigError(f"model.pretrained={pre!r} is neither a file nor a pretrained tag of {name} "
                          f"(tags: {open_clip.list_pretrained_tags_by_model(name)})")
    problem = activation_problem(name, pre)
    if problem:
        raise ConfigError(problem)
    storage.check_output_dir(cfg.run.storage_path, "run.storage_path", cfg.data.s3_endpoint)
    storage.check_output_dir(run_dir(cfg), "run.name", cfg.data.s3_endpoint)
    if cfg.data.feature_cache:  # a tower with nothing frozen, or an unknown layout, is refused before Ray starts
        feature_cache.plan(cfg.model)
        storage.check_output_dir(cfg.data.feature_cache, "data.feature_cache", cfg.data.s3_endpoint)


def run_identity(cfg: TrainRewardConfig, infos: dict) -> dict[str, Any]:
    """What a run is: its settings (less the OPERATIONAL keys) and every data file's URI, size and mtime."""
    return {"config": identity.config_identity(to_dict(cfg), OPERATIONAL),
            "data": {split: info.identity() for split, info in infos.items()}}


def claim_run(cfg: TrainRewardConfig, infos: dict, rdir: str) -> bool:
    """Resume only the same run (see :func:`sr_ray.core.identity.claim`); True when resuming."""
    resuming = identity.claim(rdir, IDENTITY_FILE, run_identity(cfg, infos), f"run.name={cfg.run.name}",
                              "run.overwrite=true", cfg.run.overwrite, cfg.data.s3_endpoint)
    if resuming:
        log.info("[train] %s: same settings and data as the run there: resuming it", storage.redact(rdir))
    return resuming


def require_train_split(data: DataConfig) -> None:
    """The stage trains on the splits it is given; the job (sr_ray.app.defaults) fills in the demo's."""
    if not data.train:
        raise ConfigError("data.train is required: a folder or file of triplet Parquet (local or s3://); the job "
                          "(sr-ray train_reward) trains on the demo triplets when none is given")


def prepare(cfg: TrainRewardConfig) -> tuple[TrainRewardConfig, dict, int]:
    """Everything before the cluster trains: config and data checks, the run's identity, ``config.yaml``.
    Returns (resolved config, split infos, steps per epoch)."""
    check_config(cfg)
    require_train_split(cfg.data)
    cfg = replace(cfg, run=replace(cfg.run, storage_path=absolute_storage(cfg.run.storage_path)))
    infos = preflight(cfg.data)
    rows = infos["train"].rows
    steps = steps_per_epoch(cfg, rows)
    if steps < 1:
        raise DataError(f"data.train has {rows} rows: fewer than one global batch of {cfg.optim.batch_size}")
    rdir = run_dir(cfg)
    claim_run(cfg, infos, rdir)
    storage.write_text(storage.join(rdir, "config.yaml"), dump_yaml(cfg))
    log.info("[train] run dir %s; train %d triplets (%s form), %s", storage.redact(rdir), rows,
             infos["train"].form, ", ".join(f"{k} {v.rows}" for k, v in infos.items() if k != "train"))
    return cfg, infos, steps


def check_shared(cfg: TrainRewardConfig) -> None:
    """On several nodes: the splits must be shared (object storage or a network mount); the run's storage is
    checked by :func:`sr_ray.core.raytrain.fit`."""
    for split in ("train", "val", "test"):
        if getattr(cfg.data, split):
            require_shared_storage(getattr(cfg.data, split), f"data.{split}", "Ray Data's tasks read it")
    if cfg.data.feature_cache:
        require_shared_storage(cfg.data.feature_cache, "data.feature_cache", "Ray Data's tasks write and read it")


def fit(cfg: TrainRewardConfig, infos: dict, steps: int, callbacks: list | None, cache: dict | None = None):
    """The Ray Train run of :func:`train_func` (on the feature cache's rows when ``cache`` is its manifest);
    returns (Result, storage filesystem or None, wall seconds)."""
    model_cfg = to_dict(cfg.model)
    splits = [k for k in ("train", "val") if k in infos]
    if cache:
        datasets = {k: feature_cache.cached_dataset(cfg.data.feature_cache, k, cache, cfg.model, cfg.data,
                                                    ordered=k == "train" and cfg.run.exact_resume) for k in splits}
    else:
        datasets = {k: triplet_dataset(infos[k], model_cfg, cfg.data, ordered=k == "train" and cfg.run.exact_resume)
                    for k in splits}
    return raytrain.fit(train_func, {"cfg": to_dict(cfg), "steps_per_epoch": steps, "run_dir": run_dir(cfg),
                                     "splits": splits, "feature_cache_plan": cache["plan"] if cache else None},
                        cfg, datasets, cfg.data.s3_endpoint,
                        score_metric="val_pairwise_accuracy" if "val" in datasets else None, callbacks=callbacks)


def ensure_feature_cache(cfg: TrainRewardConfig, infos: dict, max_vision_k: int | None = None,
                         max_text_k: int | None = None) -> dict | None:
    """The feature cache's manifest (built now where missing), or None without ``data.feature_cache``."""
    if not cfg.data.feature_cache:
        return None
    splits = {k: v for k, v in infos.items() if k in ("train", "val")}
    return feature_cache.ensure(cfg.data.feature_cache, splits, cfg.model, cfg.optim.seed, cfg.data,
                                cfg.data.feature_cache_actors, cfg.scaling.use_gpu, max_vision_k, max_text_k)


def summarize(cfg: TrainRewardConfig, infos: dict, result, fs, wall: float, score_test: bool) -> dict[str, Any]:
    """The run's summary from Train's result; the best checkpoint scores the test split."""
    rdir = run_dir(cfg)
    if "val" in infos:
        best = result.get_best_checkpoint(metric="val_pairwise_accuracy", mode="max")
        best_metrics = max((m for _, m in result.best_checkpoints), key=lambda m: m["val_pairwise_accuracy"])
    else:
        best, best_metrics = result.checkpoint, result.best_checkpoints[-1][1]
    if best is None:
        raise RuntimeError(f"training of {storage.redact(rdir)} produced no checkpoint")
    best_uri = storage.to_uri(best.path, fs is not None)
    last_metrics = result.metrics or {}  # the latest report (every report carries a checkpoint)
    trainable, total = count_params(build_clip(cfg.model, load_weights=False))
    summary: dict[str, Any] = {
        "run_dir": storage.redact(rdir),
        "checkpoint": best_uri,
        "val_pairwise_accuracy": best_metrics.get("val_pairwise_accuracy"),
        "val_loss": best_metrics.get("val_loss"),
        "best_step": best_metrics.get("step"),
        "steps": last_metrics.get("step"),
        "trainable_params": trainable,
        "total_params": total,
        "triplets_per_s": last_metrics.get("triplets_per_s"),
        "bad_rows": last_metrics.get("bad_rows"),
        "resumed_from_step": last_metrics.get("resumed_from_step"),
        "train_triplets": infos["train"].rows,
        "splits": {k: storage.redact(getattr(cfg.data, k)) if getattr(cfg.data, k) else None
                   for k in ("train", "val", "test")},
        "loss": cfg.loss.name,
        "model": cfg.model.name,
        "wall_s": round(wall, 1),
    }
    if "test" in infos and score_test:
        test = evaluate_split(best_uri, infos["test"], to_dict(cfg.model), cfg.data)
        summary["test_pairwise_accuracy"] = test["pairwise_accuracy"]
        summary["test_triplets"] = test["triplets"]
        summary["test_bad_rows"] = test["bad_rows"]
    return summary


def train_reward(cfg: TrainRewardConfig, callbacks: list | None = None, score_test: bool = True) -> dict[str, Any]:
    """Run the whole job; returns (and writes as ``summary.json``) the summary dict.

    ``callbacks``: Ray Train callbacks (the Tune sweep passes ``TuneReportCallback``);
    ``score_test``: score the test split with the best checkpoint at the end.
    """
    cfg, infos, steps = prepare(cfg)
    fixed = init_ray(cfg.run.ray_address)
    check_resources([worker_bundle(cfg.scaling)] * cfg.scaling.num_workers + [{"CPU": cfg.data.map_num_cpus}],
                    "the training workers (scaling.num_workers x scaling.cpus_per_worker/gpus_per_worker) and "
                    "a Ray Data task (data.map_num_cpus)", fixed=fixed, wait_s=cfg.scaling.resource_wait_s)
    check_shared(cfg)
    cache = ensure_feature_cache(cfg, infos)
    result, fs, wall = fit(cfg, infos, steps, callbacks, cache)
    summary = summarize(cfg, infos, result, fs, wall, score_test)
    if cache:
        summary["feature_cache"] = {"uri": storage.redact(cfg.data.feature_cache), "built_s": cache["built_s"],
                                    **{k: cache["plan"][k] for k in ("image_depth", "text_depth")},
                                    "bytes_per_triplet": feature_cache.row_bytes(cache)}
    storage.write_text(storage.join(run_dir(cfg), "summary.json"), json.dumps(summary, indent=1))
    return summary
