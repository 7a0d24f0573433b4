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
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sr_ray.core import identity, storage
from sr_ray.core.config import ConfigError, dump_yaml, from_dict, to_dict
from sr_ray.core.logs import setup_logging
from sr_ray.core.ray_utils import check_resources, init_ray, worker_prints_to_stderr
from sr_ray.reward.data import DataConfig, DataError, preflight, resolve_splits, triplet_dataset
from sr_ray.reward.losses import LossConfig, compute_loss, global_batch_loss
from sr_ray.reward.model import ModelConfig, RewardModel, activation_problem, build_clip, count_params
from sr_ray.reward.score import MODEL_FILE, evaluate_split, pairwise_accuracy, save_model

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
FAULT_MARKER = ".fault_injected"
IDENTITY_FILE = "run_identity.json"
DATA_ERROR_FILE = "_data_error.txt"
# keys a resumed run may change: they decide where and how fast it runs, or how it reports, not what it learns
OPERATIONAL = ("run.ray_address", "run.log_every_steps", "run.fail_at_step", "run.overwrite",
               "run.checkpoints_to_keep", "scaling.max_failures", "scaling.resource_wait_s", "data.s3_endpoint",
               "data.preflight_rows", "data.map_num_cpus", "data.map_batch_size", "data.prefetch_batches",
               "data.min_rows_for_bad_rate", "data.max_bad_row_rate", "data.demo.cache_dir")


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
class ScalingConfig:
    num_workers: int = 1
    """Ray Train workers (data-parallel replicas)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; fractional on a small machine so Ray Data keeps a CPU."""
    gpus_per_worker: float = 1.0
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), bf16, or fp32."""
    max_failures: int = 2
    """Worker failures survived by restarting from the latest checkpoint."""
    resource_wait_s: float = 300.0
    """On a cluster that may grow (joined, not started here): how long to wait for nodes that can hold a worker."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError("scaling.num_workers must be >= 1")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError("scaling.precision must be auto, bf16 or fp32")


@dataclass
class RunConfig:
    name: str = "sr-reward-demo"
    """Run name; re-running with the same name, storage, settings and data resumes (other settings or data
    under the same name are refused, naming what differs)."""
    overwrite: bool = False
    """Delete an existing run of this name (other settings or data) and start it again."""
    storage_path: str = "./runs"
    """Local folder or s3://bucket/prefix that holds runs (checkpoints, config, TensorBoard, summary)."""
    val_every_steps: int = 0
    """Also validate and checkpoint every N steps (0: once per epoch only)."""
    log_every_steps: int = 20
    checkpoints_to_keep: int = 2
    """Best checkpoints kept by validation accuracy (the latest is always kept too)."""
    save_full_model: bool = False
    """Store every weight in checkpoints; by default only trained ones when weights are pretrained."""
    ray_address: str | None = None
    """Ray cluster to join: an address or ``auto`` (default: RAY_ADDRESS, as set by ``ray job submit``, else a new local cluster)."""
    fail_at_step: int = 0
    """Fault injection for recovery tests: rank 0 exits once at this step (0: never)."""


@dataclass
class TrainRewardConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)


def run_dir(cfg) -> str:
    """``<storage_path>/<name>`` of a job config's ``run`` section (reward training, SD fine-tuning), absolute."""
    return storage.join(absolute_storage(cfg.run.storage_path), cfg.run.name)


def absolute_storage(path: str) -> str:
    """``path`` made absolute; a relative path inside a ``ray job submit --working-dir`` copy is flagged."""
    if storage.is_s3(path):
        return path
    out = str(Path(path).expanduser().resolve())
    if "/runtime_resources/working_dir_files/" in out:
        log.warning("storage path %r resolves into Ray's copy of the job's working dir (%s), which Ray deletes "
                    "with the job's files: pass an absolute path or s3:// to keep the results", path, out)
    return out


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


class StopForData(DataError):
    """Raised by every worker at the same step (its test uses numbers summed over workers): the run stops
    without the retries Ray Train gives a crashed worker, and the driver reports the message."""


class Reducer:
    """Sums numbers over workers (gloo or nccl); identity with one worker."""

    def __init__(self, device: torch.device):
        self.device = device
        self.dist = torch.distributed.is_available() and torch.distributed.is_initialized()

    def sum(self, *values: float) -> list[float]:
        if not self.dist:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def _batch_to(batch: dict, device: torch.device):
    valid = batch["valid"].to(device=device, dtype=torch.bool)
    return (batch["tokens"].to(device), batch["pos"].to(device), batch["neg"].to(device),
            batch["prompt_id"].to(device), valid)


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
            t, p, n = model(tokens[valid], pos[valid], neg[valid])
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


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


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

    Bad data (too many bad rows, an empty validation) ends the run on every worker at once: rank 0 leaves the
    message in ``<run dir>/_data_error.txt`` and every worker returns, so Ray Train does not restart workers
    to fail again on the same data; the driver raises it as a :class:`DataError`.
    """
    try:
        _train_loop(config)
    except StopForData as e:
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:
            storage.write_text(storage.join(config["run_dir"], DATA_ERROR_FILE), str(e))


def _train_loop(config: dict[str, Any]) -> None:
    worker = _RewardWorker(config)
    worker.run()
    worker.close()


class _RewardWorker:
    """One Ray Train worker: its state, and the loop as named steps (build, resume, train, report)."""

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        worker_prints_to_stderr()
        setup_logging()
        self.cfg = cfg = from_dict(TrainRewardConfig, config["cfg"])
        self.steps_per_epoch, self.rdir = int(config["steps_per_epoch"]), config["run_dir"]
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.per_worker = cfg.optim.batch_size // self.world
        _seed_all(cfg.optim.seed)
        self.device = ray.train.torch.get_device()
        self.use_bf16 = cfg.scaling.precision == "bf16" or (cfg.scaling.precision == "auto"
                                                            and self.device.type == "cuda")
        model = self._build()
        self._resume(model)
        self.model = ray.train.torch.prepare_model(model)  # device + DDP when world > 1
        self.core: RewardModel = self.model.module if hasattr(self.model, "module") else self.model
        self.reducer = Reducer(self.device)
        self._open_tensorboard()
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val") if "val" in config.get("splits", ["val"]) else None
        self.bad = self.seen = 0.0
        self.train_time, self.wait, self.done_since_log, self.window_t0 = 0.0, 0.0, 0, time.perf_counter()
        self.steps_at_start = self.step
        self.last_loss = float("nan")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _build(self) -> RewardModel:
        """The model (frozen per config), its AdamW over the trainable parameters and the LR schedule."""
        cfg = self.cfg
        model = RewardModel(build_clip(cfg.model))
        self.trainable, self.total = count_params(model)
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

        self.step, self.best_acc, self.resumed_from = 0, float("-inf"), None
        ckpt = ray.train.get_checkpoint()
        if not ckpt:
            return
        with ckpt.as_directory() as d:
            blob = torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)
            model.clip.load_state_dict(blob["state_dict"], strict=blob["full"])
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        self.optim.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.best_acc = state["step"], state["best_val_pairwise_accuracy"]
        self.resumed_from = self.step
        torch.set_rng_state(state["torch_rng"])
        if self.rank == 0:
            log.info("[train] resumed from checkpoint at step %d/%d", self.step, self.total_steps)

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = self.local_tb = None
        if self.rank != 0:
            return
        rdir = self.rdir
        self.local_tb = (Path(rdir) / "tensorboard") if not storage.is_s3(rdir) \
            else Path(tempfile.mkdtemp()) / "tensorboard"
        self.writer = SummaryWriter(str(self.local_tb), purge_step=self.step if self.step else None)
        log.info("[train] %d workers, %s, bf16=%s, trainable %d / %d params, %d steps (%d/epoch), global batch %d",
                 self.world, self.device, self.use_bf16, self.trainable, self.total, self.total_steps,
                 self.steps_per_epoch, self.cfg.optim.batch_size)

    def _upload_tensorboard(self) -> None:
        if self.local_tb is not None and storage.is_s3(self.rdir):
            storage.upload_dir(self.local_tb, storage.join(self.rdir, "tensorboard"))

    def report(self, epoch: int) -> None:
        """Validate on all workers, then report metrics and (rank 0) a checkpoint to Ray Train."""
        import ray.train

        cfg = self.cfg
        nbad, nseen = self.reducer.sum(self.bad, self.seen)
        metrics: dict[str, Any] = {"step": self.step, "epoch": epoch, "train_loss": self.last_loss,
                                   "bad_rows": int(nbad), "rows_seen": int(nseen),
                                   # training steps only (data wait included, validation excluded)
                                   "triplets_per_s": (self.step - self.steps_at_start) * cfg.optim.batch_size
                                   / max(1e-9, self.train_time)}
        if self.val_shard is not None:
            metrics |= evaluate(self.core, self.val_shard, cfg, self.device, self.autocast, self.reducer,
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
        self.writer.flush()
        self._upload_tensorboard()
        acc = metrics.get("val_pairwise_accuracy")
        log.info("[val] step %d  pairwise accuracy %s  val loss %s", self.step,
                 f"{acc:.4f}" if acc is not None else "n/a",
                 f"{metrics['val_loss']:.4f}" if "val_loss" in metrics else "n/a")
        return ray.train.Checkpoint.from_directory(tmp)

    def _check_bad_rows(self) -> None:
        all_bad, all_seen = self.reducer.sum(self.bad, self.seen)  # every worker takes the same decision
        d = self.cfg.data
        if all_seen >= d.min_rows_for_bad_rate and all_bad / all_seen > d.max_bad_row_rate:
            raise StopForData(
                f"{int(all_bad)} of {int(all_seen)} training rows ({all_bad / all_seen:.1%}) had an unusable "
                f"image or prompt (or sat in an unreadable Parquet row group), more than "
                f"data.max_bad_row_rate={d.max_bad_row_rate}; each skipped row and unreadable row "
                f"group is named in the log")

    def _inject_fault(self) -> None:
        """``run.fail_at_step``: rank 0 exits once at that step (recovery tests)."""
        marker = storage.join(self.rdir, FAULT_MARKER)
        if self.cfg.run.fail_at_step and self.step == self.cfg.run.fail_at_step and self.rank == 0 \
                and not storage.exists(marker):
            storage.write_text(marker, f"worker killed at step {self.step}\n")
            # Ray Train registers a reported checkpoint at the controller's next poll of the
            # workers (every 2 s by default); a worker that dies sooner loses that report. Wait
            # past it so the fault models a crash some time after the last checkpoint.
            time.sleep(5)
            log.warning("[train] fault injection: worker exits at step %d", self.step)
            os._exit(1)

    def _log_progress(self, epoch: int) -> None:
        cfg, step = self.cfg, self.step
        if self.rank != 0 or not (step % cfg.run.log_every_steps == 0 or step == self.total_steps):
            return
        dt = time.perf_counter() - self.window_t0
        tps = self.done_since_log * cfg.optim.batch_size / max(dt, 1e-9)
        lr = self.sched.get_last_lr()[0]
        for tag, value in (("train/loss", self.last_loss), ("train/lr", lr), ("train/triplets_per_s", tps),
                           ("train/data_wait_fraction", self.wait / max(dt, 1e-9)), ("train/bad_rows", self.bad)):
            self.writer.add_scalar(tag, value, step)
        log.info("[train] epoch %d/%d  step %d/%d (%.0f%%)  loss %.4f  lr %.2e  %.1f triplets/s  "
                 "data wait %.0f%%  bad rows %d  eta %s", epoch + 1, cfg.optim.epochs, step, self.total_steps,
                 100 * step / self.total_steps, self.last_loss, lr, tps, 100 * self.wait / max(dt, 1e-9),
                 int(self.bad), _fmt_eta((self.total_steps - step) * dt / max(self.done_since_log, 1)))
        self.wait, self.done_since_log, self.window_t0 = 0.0, 0, time.perf_counter()

    def _epoch(self, epoch: int) -> None:
        cfg, spe = self.cfg, self.steps_per_epoch
        skip = self.step - epoch * spe
        it = iter(self.train_shard.iter_torch_batches(
            batch_size=self.per_worker, drop_last=True, prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.optim.seed + epoch + 1000 * self.rank if cfg.data.shuffle_buffer else None))
        for i in range(spe):
            t0 = time.perf_counter()
            batch = next(it, None)
            self.wait += time.perf_counter() - t0
            if batch is None:
                raise DataError(f"train shard of worker {self.rank} ran out after {i} of {spe} batches")
            if i < skip:
                continue  # resuming mid-epoch: these batches were trained on before the checkpoint
            tokens, pos, neg, pids, valid = _batch_to(batch, self.device)
            self.bad += float((~valid).sum())
            self.seen += float(valid.numel())
            self._check_bad_rows()
            self.last_loss = train_step(self.model, (tokens, pos, neg, pids, valid), cfg.loss, self.optim,
                                        self.params, cfg.optim.grad_clip, self.autocast)
            self.sched.step()
            self.step += 1
            self.done_since_log += 1
            self.train_time += time.perf_counter() - t0
            self._inject_fault()
            self._log_progress(epoch)
            if i == spe - 1 or (cfg.run.val_every_steps and self.step % cfg.run.val_every_steps == 0):
                self.report(epoch)
        del it

    def run(self) -> None:
        self.model.train()
        first = self.step // self.steps_per_epoch if self.steps_per_epoch else 0
        for epoch in range(first, self.cfg.optim.epochs):
            self._epoch(epoch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self._upload_tensorboard()


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


def _init_ray(cfg: TrainRewardConfig) -> bool:
    """Join ``run.ray_address`` or ``RAY_ADDRESS``, else start a local cluster (see :func:`init_ray`)."""
    return init_ray(cfg.run.ray_address)


def worker_bundle(scaling: ScalingConfig) -> dict[str, float]:
    """One Train worker's resources (``ScalingConfig.resources_per_worker``)."""
    return {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}


def prepare(cfg: TrainRewardConfig) -> tuple[TrainRewardConfig, dict, int]:
    """Everything before the cluster trains: config and data checks, the run's identity, ``config.yaml``.
    Returns (resolved config, split infos, steps per epoch)."""
    check_config(cfg)
    if not cfg.data.train and cfg.data.demo.source == "community":
        _init_ray(cfg)  # the demo chain curates on Ray Data first
    cfg = replace(cfg, data=resolve_splits(cfg.data),
                  run=replace(cfg.run, storage_path=absolute_storage(cfg.run.storage_path)))
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


def fit(cfg: TrainRewardConfig, infos: dict, steps: int, callbacks: list | None):
    """The TorchTrainer over :func:`train_func`; returns (Result, storage filesystem or None, wall seconds)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    model_cfg = to_dict(cfg.model)
    datasets = {k: triplet_dataset(infos[k], model_cfg, cfg.data) for k in ("train", "val") if k in infos}
    fs, storage_path = None, cfg.run.storage_path
    if storage.is_s3(storage_path):
        fs, storage_path = storage.resolve(storage_path, cfg.data.s3_endpoint)
    rdir = run_dir(cfg)
    error_file = storage.join(rdir, DATA_ERROR_FILE)
    storage.remove_file(error_file, cfg.data.s3_endpoint)  # a stale one from an earlier attempt
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": to_dict(cfg), "steps_per_epoch": steps, "run_dir": rdir, "splits": list(datasets)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=worker_bundle(cfg.scaling)),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.checkpoints_to_keep,
                checkpoint_score_attribute="val_pairwise_accuracy" if "val" in datasets else None,
                checkpoint_score_order="max"),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if storage.exists(error_file, cfg.data.s3_endpoint):
        raise DataError(storage.read_bytes(error_file, cfg.data.s3_endpoint).decode())
    return result, fs, time.perf_counter() - t0


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
    fixed = _init_ray(cfg)
    check_resources([worker_bundle(cfg.scaling)] * cfg.scaling.num_workers + [{"CPU": cfg.data.map_num_cpus}],
                    "the training workers (scaling.num_workers x scaling.cpus_per_worker/gpus_per_worker) and "
                    "a Ray Data task (data.map_num_cpus)", fixed=fixed, wait_s=cfg.scaling.resource_wait_s)
    result, fs, wall = fit(cfg, infos, steps, callbacks)
    summary = summarize(cfg, infos, result, fs, wall, score_test)
    storage.write_text(storage.join(run_dir(cfg), "summary.json"), json.dumps(summary, indent=1))
    return summary
