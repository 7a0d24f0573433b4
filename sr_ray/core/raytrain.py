"""The one Ray Train harness: what every training job shares (reward training, SD fine-tuning, the next one).

Driver side: where a run lives (:func:`run_dir`, :func:`absolute_storage`), what one worker asks for
(:func:`worker_bundle`), and :func:`fit`, a ``TorchTrainer`` with Run/Failure/CheckpointConfig on local or S3
storage that turns a worker's bad-data stop into a :class:`DataError` on the driver.

Worker side: :class:`Worker`, the state and named steps every training loop has: rank, world, device and
precision; the resumable epoch (:meth:`Worker.batches` skips what the checkpoint already covers);
:meth:`Worker.advance` after each optimizer step (counters, fault injection, the progress line and TensorBoard
scalars); the bad-row guard summed over workers; TensorBoard on rank 0, uploaded to S3 when the run lives
there. A job subclasses it with its model, its step and its checkpoint; :func:`run_worker` is the
``train_loop_per_worker`` wrapper. A change such as gradient accumulation or another logger is made here once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from sr_ray.core import storage
from sr_ray.core.config import from_dict
from sr_ray.core.errors import DataError
from sr_ray.core.logs import setup_logging
from sr_ray.core.ray_utils import require_shared_storage, worker_prints_to_stderr

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
FAULT_MARKER = ".fault_injected"
TRACE_DIR = "_batches"
IDENTITY_FILE = "run_identity.json"
DATA_ERROR_FILE = "_data_error.txt"


@dataclass
class ScalingConfig:
    """Ray Train workers; each job's ``scaling`` section extends it (its own defaults, its own keys)."""

    num_workers: int = 1
    """Ray Train workers (data-parallel replicas)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; fractional on a small machine so Ray Data keeps a CPU."""
    gpus_per_worker: float = 1.0
    max_failures: int = 2
    """Worker failures survived by restarting from the latest checkpoint (a lost node is one failure)."""
    placement_strategy: str = "PACK"
    """How Ray places the workers on nodes: PACK (as few nodes as fit), SPREAD (one per node where it can),
    STRICT_PACK, STRICT_SPREAD (Ray's placement-group strategies)."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError("scaling.num_workers must be >= 1")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"scaling.placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                             f"not {self.placement_strategy!r}")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RunConfig:
    """Where a run lives and how it reports; each job's ``run`` section extends it."""

    name: str = "run"
    """Run name; re-running with the same name, storage, settings and data resumes (other settings or data
    under the same name are refused, naming what differs)."""
    overwrite: bool = False
    """Delete an existing run of this name (other settings or data) and start it again."""
    storage_path: str = "./runs"
    """Local folder or s3://bucket/prefix that holds runs (checkpoints, config, TensorBoard, summary)."""
    log_every_steps: int = 20
    checkpoints_to_keep: int = 2
    ray_address: str | None = None
    """Ray cluster to join: an address or ``auto`` (default: RAY_ADDRESS, as set by ``ray job submit``, else a new
    local cluster)."""
    fail_at_step: int = 0
    """Fault injection for recovery tests: rank 0 exits once at this step (0: never)."""
    exact_resume: bool = True
    """Feed every attempt the training data in the same order (Ray Data's ``preserve_order``; locality hints off),
    so a run restored after a lost worker or node skips exactly the batches its checkpoint covers: no row trained
    twice, none left out. False: a little more throughput; a restore may then repeat or skip some rows of the
    epoch it resumes in (seen on two nodes: 5 of 5 re-fed steps held other rows)."""
    trace_batches: bool = False
    """Audits and recovery tests: every worker keeps (epoch, step, a fingerprint of each row of its batch) in
    ``<run>/_batches/from<step it started from>-<time>-rank<r>.jsonl``, so what a restored run trained can be
    checked batch by batch."""


# ---------------------------------------------------------------- driver

def absolute_storage(path: str) -> str:
    """``path`` made absolute; a relative path inside a ``ray job submit --working-dir`` copy is flagged."""
    if storage.is_s3(path):
        return path
    out = str(Path(path).expanduser().resolve())
    if "/runtime_resources/working_dir_files/" in out:
        log.warning("storage path %r resolves into Ray's copy of the job's working dir (%s), which Ray deletes "
                    "with the job's files: pass an absolute path or s3:// to keep the results", path, out)
    return out


def run_dir(cfg) -> str:
    """``<storage_path>/<name>`` of a job config's ``run`` section, absolute."""
    return storage.join(absolute_storage(cfg.run.storage_path), cfg.run.name)


def worker_bundle(scaling: ScalingConfig) -> dict[str, float]:
    """One Train worker's resources (``ScalingConfig.resources_per_worker``)."""
    return {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}


def fit(train_func: Callable[[dict], None], loop_config: dict[str, Any], cfg, datasets: dict, endpoint: str | None,
        score_metric: str | None = None, callbacks: list | None = None):
    """Run ``train_func`` on ``cfg.scaling.num_workers`` Ray Train workers over ``datasets``; returns (Result,
    storage filesystem or None, wall seconds). ``cfg``: a job config with ``scaling`` and ``run`` sections.
    ``score_metric``: keep the best checkpoints by this reported metric (max), else the latest. A worker's
    bad-data stop (:class:`StopForData`) is raised here as a :class:`DataError`."""
    require_shared_storage(cfg.run.storage_path, "run.storage_path", "Ray Train's workers write checkpoints")
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, storage_path = None, cfg.run.storage_path
    if storage.is_s3(storage_path):
        fs, storage_path = storage.resolve(storage_path, endpoint)
    error_file = storage.join(run_dir(cfg), DATA_ERROR_FILE)
    storage.remove_file(error_file, endpoint)  # a stale one from an earlier attempt
    trainer = TorchTrainer(
        train_func, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=worker_bundle(cfg.scaling),
                                               placement_strategy=cfg.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.checkpoints_to_keep, checkpoint_score_attribute=score_metric,
                checkpoint_score_order="max"),
            callbacks=callbacks or None),
        datasets=datasets, dataset_config=data_config(cfg.run.exact_resume, "train" in datasets))
    t0 = time.perf_counter()
    result = trainer.fit()
    if storage.exists(error_file, endpoint):
        raise DataError(storage.read_bytes(error_file, endpoint).decode())
    return result, fs, time.perf_counter() - t0


def data_config(exact_resume: bool, has_train: bool):
    """Ray Train's DataConfig: Train's default ingest options, in order for the ``train`` dataset when
    ``exact_resume`` (the output splitter then hands every worker the same blocks on every attempt)."""
    import ray.train

    if not (exact_resume and has_train):
        return None
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options={"train": options})


# ---------------------------------------------------------------- worker

class StopForData(DataError):
    """Raised by every worker at the same step (its test uses numbers summed over workers): the run stops
    without the retries Ray Train gives a crashed worker, and the driver reports the message."""


def run_worker(worker_cls: type[Worker], config: dict[str, Any]) -> None:
    """The body of a job's ``train_loop_per_worker``: build the worker, run it, finish it. A bad-data stop is
    left in ``<run dir>/_data_error.txt`` by rank 0 and every worker returns, so Ray Train does not restart
    workers to fail again on the same data (:func:`fit` raises it)."""
    try:
        worker = worker_cls(config)
        worker.run()
        worker.finish()
    except StopForData as e:
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:
            storage.write_text(storage.join(config["run_dir"], DATA_ERROR_FILE), str(e))


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


def fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Worker:
    """One Ray Train worker's shared state and steps. ``config``: {"cfg": dict, "steps_per_epoch": int,
    "run_dir": str}. Subclasses set ``tag`` (log prefix), ``unit`` (what a row is) and ``rows`` (how the bad-row
    message names them), give :meth:`plan`, build their model, and implement :meth:`run` from :meth:`batches` and
    :meth:`advance`."""

    tag = "train"
    unit = "rows"
    rows = "training rows"
    config_class: type = object

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        worker_prints_to_stderr()
        setup_logging()
        self.cfg = from_dict(self.config_class, config["cfg"])
        self.steps_per_epoch, self.rdir = int(config["steps_per_epoch"]), config["run_dir"]
        precision, batch_size, total_steps = self.plan()
        self.total_steps, self.batch_size = total_steps, batch_size
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.per_worker = batch_size // self.world
        self.device = ray.train.torch.get_device()
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.reducer = Reducer(self.device)
        self.step, self.resumed_from = 0, None
        self.bad = self.seen = 0.0
        self.last_loss, self.train_time, self.wait = float("nan"), 0.0, 0.0
        self.done_since_log, self.window_t0 = 0, time.perf_counter()
        self.writer = self.local_tb = None
        self.traced, self.trace_file = [], None

    def plan(self) -> tuple[str, int, int]:
        """(precision: auto/bf16/fp32, global batch size, total optimizer steps) of ``self.cfg``."""
        raise NotImplementedError

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def resumed(self, step: int) -> None:
        """Record the step a checkpoint brought back."""
        self.step = self.resumed_from = step
        if self.rank == 0:
            log.info("[%s] resumed from checkpoint at step %d/%d", self.tag, step, self.total_steps)

    # -- TensorBoard (rank 0)

    def open_tensorboard(self, header: str) -> None:
        """Rank 0: a SummaryWriter under ``<run>/tensorboard`` (a local folder uploaded when the run is on S3),
        purged past the resumed step; logs ``header``."""
        from torch.utils.tensorboard import SummaryWriter

        self.steps_at_start = self.step
        if self.rank != 0:
            return
        self.local_tb = (Path(self.rdir) / "tensorboard") if not storage.is_s3(self.rdir) \
            else Path(tempfile.mkdtemp()) / "tensorboard"
        self.writer = SummaryWriter(str(self.local_tb), purge_step=self.step if self.step else None)
        log.info("[%s] %s", self.tag, header)

    def upload_tensorboard(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if self.local_tb is not None and storage.is_s3(self.rdir):
            storage.upload_dir(self.local_tb, storage.join(self.rdir, "tensorboard"))

    def close_tensorboard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.upload_tensorboard()

    # -- the loop

    def batches(self, shard, epoch: int, **iter_kwargs) -> Iterator[tuple[int, Any, float]]:
        """(index in epoch, batch, start time) for this epoch's steps not yet trained (a resumed run skips the
        batches its checkpoint covers); stops at ``total_steps``. The time spent waiting for data is counted."""
        skip = self.step - epoch * self.steps_per_epoch
        it = iter(shard.iter_torch_batches(batch_size=self.per_worker, drop_last=True, **iter_kwargs))
        for i in range(self.steps_per_epoch):
            if self.step >= self.total_steps:
                break
            t0 = time.perf_counter()
            batch = next(it, None)
            self.wait += time.perf_counter() - t0
            if batch is None:
                raise DataError(f"train shard of worker {self.rank} ran out after {i} of {self.steps_per_epoch} "
                                f"batches")
            if i >= skip:
                self.trace(epoch, batch)
                yield i, batch, t0
        del it

    def trace(self, epoch: int, batch: dict) -> None:
        """``run.trace_batches``: record the batch about to be trained as step ``self.step + 1`` and rewrite this
        worker's trace file (small: one line per step)."""
        if not self.cfg.run.trace_batches:
            return
        if self.trace_file is None:  # named by the step this attempt starts from (0, or the restored one)
            self.trace_file = storage.join(self.rdir, TRACE_DIR, f"from{self.step:06d}-{time.time_ns():x}-rank"
                                                                 f"{self.rank}.jsonl")
        cols = [(v.cpu().numpy() if hasattr(v, "cpu") else np.asarray(v)) for _, v in sorted(batch.items())]
        rows = [hashlib.blake2b(b"".join(np.ascontiguousarray(c[i]).tobytes() for c in cols), digest_size=6).hexdigest()
                for i in range(len(cols[0]))]
        self.traced.append({"rank": self.rank, "epoch": epoch, "step": self.step + 1, "rows": rows})
        storage.write_text(self.trace_file, "".join(json.dumps(t) + "\n" for t in self.traced))

    def count_rows(self, valid: torch.Tensor) -> None:
        """Count a batch's bad rows; the run stops (every worker at once) when too many were bad."""
        d = self.cfg.data
        self.bad += float((~valid.bool()).sum())
        self.seen += float(valid.numel())
        all_bad, all_seen = self.reducer.sum(self.bad, self.seen)  # every worker takes the same decision
        if all_seen >= d.min_rows_for_bad_rate and all_bad / all_seen > d.max_bad_row_rate:
            raise StopForData(
                f"{int(all_bad)} of {int(all_seen)} {self.rows} ({all_bad / all_seen:.1%}) had an unusable image "
                f"or prompt (or sat in an unreadable Parquet row group), more than data.max_bad_row_rate="
                f"{d.max_bad_row_rate}; each skipped row and unreadable row group is named in the log")

    def advance(self, epoch: int, t0: float, lr: float) -> None:
        """After an optimizer step: counters, fault injection, the progress line."""
        self.step += 1
        self.done_since_log += 1
        self.train_time += time.perf_counter() - t0
        self.inject_fault()
        self.log_progress(epoch, lr)

    def rate(self) -> float:
        """Rows per second over this session's training steps (data wait included, validation excluded)."""
        return (self.step - self.steps_at_start) * self.batch_size / max(1e-9, self.train_time)

    def inject_fault(self) -> None:
        """``run.fail_at_step``: rank 0 exits once at that step (recovery tests)."""
        marker = storage.join(self.rdir, FAULT_MARKER)
        if self.cfg.run.fail_at_step and self.step == self.cfg.run.fail_at_step and self.rank == 0 \
                and not storage.exists(marker):
            storage.write_text(marker, f"worker killed at step {self.step}\n")
            # Ray Train registers a reported checkpoint at the controller's next poll of the workers (every 2 s
            # by default); a worker that dies sooner loses that report. Wait past it so the fault models a
            # crash some time after the last checkpoint.
            time.sleep(5)
            log.warning("[%s] fault injection: worker exits at step %d", self.tag, self.step)
            os._exit(1)

    def log_progress(self, epoch: int, lr: float) -> None:
        """Rank 0, every ``run.log_every_steps``: the progress line and TensorBoard's train/ scalars."""
        step, total = self.step, self.total_steps
        if self.rank != 0 or not (step % self.cfg.run.log_every_steps == 0 or step == total):
            return
        dt = time.perf_counter() - self.window_t0
        rate = self.done_since_log * self.batch_size / max(dt, 1e-9)
        wait = self.wait / max(dt, 1e-9)
        for tag, value in (("train/loss", self.last_loss), ("train/lr", lr), (f"train/{self.unit}_per_s", rate),
                           ("train/data_wait_fraction", wait), ("train/bad_rows", self.bad)):
            self.writer.add_scalar(tag, value, step)
        epochs = max(math.ceil(total / max(self.steps_per_epoch, 1)), 1)
        log.info("[%s] epoch %d/%d  step %d/%d (%.0f%%)  loss %.4f  lr %.2e  %.1f %s/s  data wait %.0f%%  "
                 "bad rows %d  eta %s", self.tag, epoch + 1, epochs, step, total, 100 * step / total,
                 self.last_loss, lr, rate, self.unit, 100 * wait, int(self.bad),
                 fmt_eta((total - step) * dt / max(self.done_since_log, 1)))
        self.wait, self.done_since_log, self.window_t0 = 0.0, 0, time.perf_counter()

    def run(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        self.close_tensorboard()
