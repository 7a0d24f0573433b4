"""Fine-tune Stable Diffusion on the selected pairs with Ray Train (+ DeepSpeed), paper sec. 4.3.

``finetune_sd(cfg)`` (the driver) checks the fine-tune set and config, starts
Ray if needed, and runs a ``TorchTrainer`` over :func:`train_func`: every worker
builds the diffusers components, freezes the VAE (and the text encoder or the
U-Net when asked), and trains the standard noise-prediction loss (epsilon or
v-prediction, from the scheduler's config) on batches streamed by Ray Data.
With ``deepspeed.enabled`` the trainable module goes through
``deepspeed.initialize`` (ZeRO stage from config, bf16 on GPU); otherwise
through Ray Train's DDP. Checkpoints go through Ray Train (with DeepSpeed every
rank saves its ZeRO shard, and each reports its folder), so a run resumes after
a worker is killed, or when re-run with the same name. At the end rank 0 writes
a diffusers pipeline directory (``<run>/pipeline``, ``save_pretrained``) that
``StableDiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from sr_ray.core import identity, raytrain, special_token, storage
from sr_ray.core.config import ConfigError, dump_yaml, to_dict
from sr_ray.core.errors import DataError
from sr_ray.core.ray_utils import check_resources, init_ray, require_shared_storage
from sr_ray.core.raytrain import IDENTITY_FILE, STATE_FILE, absolute_storage, run_dir, worker_bundle
from sr_ray.diffusion.components import SDModelConfig, check_model, load_components, pipeline, prepare_model
from sr_ray.diffusion.data import FinetuneDataConfig, finetune_dataset, preflight
from sr_ray.diffusion.denoiser import Denoiser, diffusion_loss

log = logging.getLogger(__name__)

DS_TAG = "ds"
# keys a resumed run may change: where and how fast it runs, how it reports; not what it learns
OPERATIONAL = ("run.ray_address", "run.log_every_steps", "run.fail_at_step", "run.trace_batches", "run.exact_resume",
               "run.overwrite", "run.checkpoints_to_keep", "run.sample_every_steps", "run.sample_prompts",
               "run.sample_steps", "run.save_pipeline", "scaling.max_failures", "scaling.placement_strategy",
               "data.s3_endpoint", "data.demo.cache_dir")


def weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` (it passes False: any pickle).

    A ZeRO checkpoint holds tensors and plain values plus three DeepSpeed classes, allowed by name; anything
    else in a checkpoint file is refused instead of executed.
    """
    import torch
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnly(engine._config)


@dataclass
class FinetuneOptimConfig:
    train_unet: bool = True
    train_text_encoder: bool = True
    """The paper fine-tunes both; the VAE is always frozen."""
    lr: float = 1e-5
    """The paper: 1e-5."""
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    """Linear warmup, then a constant rate (diffusers' default schedule)."""
    grad_clip: float = 1.0
    batch_size: int = 8
    """Global batch (images per step over all workers)."""
    epochs: int = 1
    max_steps: int = 0
    """Stop after this many steps (0: run the epochs)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("optim: nothing to train (train_unet and train_text_encoder are both false)")
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1 or self.max_steps < 0:
            raise ValueError("optim.lr must be > 0, batch_size and epochs >= 1, max_steps >= 0")


@dataclass
class DeepSpeedConfig:
    enabled: bool = True
    zero_stage: int = 2
    """ZeRO stage 0-3 (2: optimizer states and gradients sharded over workers)."""
    offload_optimizer: bool = False
    """Optimizer states in CPU memory (ZeRO-Offload; uses DeepSpeed's CPU Adam)."""
    precision: str = "auto"
    """auto: bf16 on GPU, fp32 on CPU (DeepSpeed has no fp16 on CPU); bf16; fp32."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError("deepspeed.zero_stage must be 0, 1, 2 or 3")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError("deepspeed.precision must be auto, bf16 or fp32")


@dataclass
class FinetuneScalingConfig(raytrain.ScalingConfig):
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    max_failures: int = 1


@dataclass
class FinetuneRunConfig(raytrain.RunConfig):
    SIGNED: ClassVar[tuple[str, ...]] = ("sample_every_steps",)  # -1: never

    name: str = "sd-finetune-demo"
    log_every_steps: int = 5
    checkpoint_every_steps: int = 20
    """Checkpoint (through Ray Train) every N steps and at the end."""
    sample_every_steps: int = 0
    """Generate the sample prompts into TensorBoard every N steps (0: at the end only; -1: never)."""
    sample_prompts: list[str] = field(default_factory=lambda: ["a red cat, watercolor", "a blue house, photo"])
    sample_steps: int = 20
    """DDIM steps of the samples."""
    negative_prompt: str | None = None
    """The samples' negative prompt; default: the fine-tune set's special token (its ``finetune_set.json``, written
    by select_pairs), else ``t@y quality``. It is recorded in the saved pipeline for generation."""
    save_pipeline: bool = True
    """Write <run>/pipeline (diffusers save_pretrained) at the end."""


@dataclass
class FinetuneSDConfig:
    model: SDModelConfig = field(default_factory=SDModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: FinetuneScalingConfig = field(default_factory=FinetuneScalingConfig)
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)


def freeze(parts: dict[str, Any], cfg: FinetuneOptimConfig) -> dict[str, int]:
    """VAE frozen; U-Net and text encoder as configured. Returns trainable parameter counts per component."""
    parts["vae"].requires_grad_(False)
    parts["unet"].requires_grad_(cfg.train_unet)
    parts["text_encoder"].requires_grad_(cfg.train_text_encoder)
    return {k: sum(p.numel() for p in parts[k].parameters() if p.requires_grad)
            for k in ("unet", "text_encoder", "vae")}


def deepspeed_config(cfg: FinetuneSDConfig, per_worker: int, bf16: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": per_worker, "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.optim.grad_clip, "zero_optimization": zero, "bf16": {"enabled": bf16},
            # a torch AdamW (or DeepSpeedCPUAdam with offload) instead of DeepSpeed's CUDA-only FusedAdam
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def without_inference_kernels() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce kernel (``deepspeed_shm_comm``) at
    ``deepspeed.initialize``: only inference tensor parallelism calls it (``inference_all_reduce``), never ZeRO
    training, which all-reduces through torch.distributed (gloo); the JIT build costs ~37 s on 2 cores the first
    time on a machine. DeepSpeed reads the op's entry in its table of compatible ops before building it. Also
    quiets torch's FutureWarning on ``all_gather_into_tensor``, which ZeRO-2 calls every step (it names no
    problem of this code)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def _to(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def sample_images(parts: dict[str, Any], denoiser: Denoiser, prompts: list[str], negative: str, steps: int,
                  resolution: int, seed: int, device: torch.device) -> np.ndarray:
    """(N, 3, R, R) uint8 images of ``prompts`` with the current weights (DDIM, fixed seed)."""
    pipe = pipeline({**parts, "unet": denoiser.unet, "text_encoder": denoiser.text_encoder})
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i, p in enumerate(prompts):
        g = torch.Generator(device=device.type).manual_seed(seed + i)
        img = pipe(p, negative_prompt=negative or None, num_inference_steps=steps, height=resolution,
                   width=resolution, generator=g, output_type="np").images[0]
        out.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(2, 0, 1))
    return np.stack(out)


def save_pipeline(parts: dict[str, Any], denoiser: Denoiser, uri: str, token: str) -> None:
    """A diffusers pipeline directory at ``uri`` (local or s3://), weights in fp32, DDIM sampler, with the special
    token recorded beside them (``sr_ray.json``)."""
    pipe = pipeline({**parts, "unet": denoiser.unet.float(), "text_encoder": denoiser.text_encoder.float(),
                     "vae": parts["vae"].float()})
    if storage.is_s3(uri):
        with tempfile.TemporaryDirectory() as tmp:
            pipe.save_pretrained(tmp)
            storage.upload_dir(tmp, uri)
    else:
        pipe.save_pretrained(uri)
    special_token.write(uri, special_token.PIPELINE_FILE, token)


def train_func(config: dict[str, Any]) -> None:
    """Per-worker loop (Ray Train). ``config``: {"cfg": dict, "steps_per_epoch": int, "run_dir": str}."""
    raytrain.run_worker(FinetuneWorker, config)


class FinetuneWorker(raytrain.Worker):
    """One Ray Train worker of the fine-tune: components, DeepSpeed or DDP, samples, checkpoints, the pipeline."""

    tag, unit, rows, config_class = "finetune", "samples", "fine-tune rows", FinetuneSDConfig

    def __init__(self, config: dict[str, Any]):
        import ray.train

        super().__init__(config)
        cfg = self.cfg
        torch.manual_seed(cfg.optim.seed + self.rank)
        self._build()
        self._resume()
        counts = self.counts
        self.open_tensorboard(
            f"{self.world} workers, {self.device}, "
            f"{f'DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}' if cfg.deepspeed.enabled else 'DDP'}, bf16={self.bf16}, "
            f"trainable: unet {counts['unet']}, text encoder {counts['text_encoder']} (vae {counts['vae']}), "
            f"{self.total_steps} steps, global batch {cfg.optim.batch_size}")
        self.shard = ray.train.get_dataset_shard("train")

    def plan(self) -> tuple[str, int, int]:
        o = self.cfg.optim
        return self.cfg.deepspeed.precision, o.batch_size, o.max_steps or self.steps_per_epoch * o.epochs

    def _build(self) -> None:
        """Components (VAE frozen), the optimizer and schedule, wrapped by DeepSpeed or DDP."""
        import ray.train.torch

        cfg = self.cfg
        self.parts = parts = load_components(cfg.model)
        self.counts = freeze(parts, cfg.optim)
        self.vae = parts["vae"].to(self.device, torch.bfloat16 if self.bf16 else torch.float32)
        self.scheduler = parts["noise_scheduler"]
        denoiser = Denoiser(parts["unet"], parts["text_encoder"])
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        warm = cfg.optim.warmup_steps
        o = cfg.optim
        if cfg.deepspeed.enabled and cfg.deepspeed.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optim = DeepSpeedCPUAdam(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay)
        else:
            optim = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.engine = None
        if cfg.deepspeed.enabled:
            import deepspeed

            if self.device.type == "cpu":
                without_inference_kernels()
            self.engine, optim, _, sched = deepspeed.initialize(
                model=denoiser, optimizer=optim, lr_scheduler=sched,
                config=deepspeed_config(cfg, self.per_worker, self.bf16))
            self.engine.checkpoint_engine = weights_only_checkpoint_engine(self.engine)
            self.model, self.core = self.engine, self.engine.module
        else:
            self.model = ray.train.torch.prepare_model(denoiser)
            self.core = self.model.module if hasattr(self.model, "module") else self.model
        self.optim, self.sched = optim, sched

    def _resume(self) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if not ckpt:
            return
        with ckpt.as_directory() as d:
            if self.engine is not None:
                _, client = self.engine.load_checkpoint(d, tag=DS_TAG)
                step = int(client["step"])
            else:
                state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
                self.core.load_state_dict(state["model"])
                self.optim.load_state_dict(state["optimizer"])
                self.sched.load_state_dict(state["scheduler"])
                step = int(state["step"])
        self.resumed(step)

    def full_params(self):
        """Whole weights on every rank for the block: ZeRO-3 partitions them (every rank must enter)."""
        if self.engine is not None and self.cfg.deepspeed.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.core.parameters()))
        return contextlib.nullcontext()

    def samples(self) -> None:
        cfg = self.cfg
        with self.full_params():
            if self.rank == 0:
                imgs = sample_images(self.parts, self.core, cfg.run.sample_prompts, cfg.run.negative_prompt,
                                     cfg.run.sample_steps, cfg.data.resolution, cfg.optim.seed, self.device)
                self.writer.add_images("samples", imgs, self.step, dataformats="NCHW")
                self.writer.add_text("samples/prompts", " | ".join(cfg.run.sample_prompts) +
                                     f"  (negative: {cfg.run.negative_prompt!r})", self.step)

    def checkpoint(self, epoch: int) -> None:
        """Metrics summed over workers, and a checkpoint (every rank's ZeRO shard, or rank 0's state) to Ray Train."""
        import ray.train

        step = self.step
        nbad, nseen, loss_sum = self.reducer.sum(self.bad, self.seen, self.last_loss)
        metrics = {"step": step, "epoch": epoch, "loss": loss_sum / self.world, "bad_rows": int(nbad),
                   "trainable_params": self.counts, "rows_seen": int(nseen), "samples_per_s": self.rate(),
                   "lr": self.sched.get_last_lr()[0]}
        if self.resumed_from is not None:
            metrics["resumed_from_step"] = self.resumed_from
        if self.device.type == "cuda":
            metrics["peak_gpu_mem_gb"] = self.reducer.sum(torch.cuda.max_memory_allocated() / 2**30)[0] / self.world
        with tempfile.TemporaryDirectory() as tmp:
            report = None
            if self.engine is not None:  # every rank writes its ZeRO shard; Ray Train merges the ranks' folders
                self.engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": step})
                report = ray.train.Checkpoint.from_directory(tmp)
            elif self.rank == 0:
                torch.save({"model": self.core.state_dict(), "optimizer": self.optim.state_dict(),
                            "scheduler": self.sched.state_dict(), "step": step}, Path(tmp) / STATE_FILE)
                report = ray.train.Checkpoint.from_directory(tmp)
            if self.rank == 0:
                Path(tmp, "meta.json").write_text(json.dumps(metrics, indent=1))
                self.upload_tensorboard()
            ray.train.report(metrics, checkpoint=report)

    def _train_step(self, batch: dict) -> None:
        cfg = self.cfg
        loss = diffusion_loss(self.model, self.vae, self.scheduler, batch)
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()  # optimizer, clipping and the lr scheduler
        else:
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
            self.optim.step()
            self.sched.step()
        self.last_loss = float(loss.detach())

    def _epoch(self, epoch: int) -> None:
        cfg = self.cfg
        for _, batch, t0 in self.batches(self.shard, epoch, prefetch_batches=cfg.data.prefetch_batches):
            batch = _to(batch, self.device)
            self.count_rows(batch["valid"])
            self._train_step(batch)
            self.advance(epoch, t0, self.sched.get_last_lr()[0])
            every = cfg.run.sample_every_steps
            if every > 0 and self.step % every == 0 and self.step < self.total_steps:
                self.samples()
            if self.step % cfg.run.checkpoint_every_steps == 0 or self.step == self.total_steps:
                self.checkpoint(epoch)

    def run(self) -> None:
        self.model.train()
        epoch = self.step // self.steps_per_epoch if self.steps_per_epoch else 0
        while self.step < self.total_steps:
            self._epoch(epoch)
            epoch += 1

    def finish(self) -> None:
        """Samples of the final model, the saved pipeline, TensorBoard closed (and uploaded)."""
        if self.cfg.run.sample_every_steps >= 0 and self.step > self.steps_at_start:
            self.samples()
        if self.cfg.run.save_pipeline:
            with self.full_params():
                if self.rank == 0:
                    save_pipeline(self.parts, self.core, storage.join(self.rdir, "pipeline"),
                                  self.cfg.run.negative_prompt)
                    log.info("[finetune] pipeline saved to %s", storage.join(self.rdir, "pipeline"))
        self.close_tensorboard()


def prepare(cfg: FinetuneSDConfig) -> tuple[FinetuneSDConfig, Any, int]:
    """Everything before the cluster trains: config and data checks, the special token, the run's identity,
    ``config.yaml``. Returns (resolved config, the set's info, steps per epoch)."""
    if cfg.data.train is None:
        raise ConfigError("data.train is required: a fine-tune set (select_pairs' output, local or s3://); the job "
                          "(sr-ray finetune_sd) uses the selection demo's output or a set drawn in code when none "
                          "is given")
    check_model(cfg.model)
    storage.check_output_dir(cfg.run.storage_path, "run.storage_path", cfg.data.s3_endpoint)
    prepare_model(cfg.model.name)
    if cfg.optim.batch_size % cfg.scaling.num_workers:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is not divisible by "
                          f"scaling.num_workers={cfg.scaling.num_workers}")
    if cfg.deepspeed.enabled and cfg.deepspeed.zero_stage > 0 and cfg.scaling.num_workers == 1:
        log.warning("[finetune] ZeRO-%d over one worker shards nothing", cfg.deepspeed.zero_stage)
    uri = cfg.data.train
    token = special_token.resolve(cfg.run.negative_prompt, special_token.read(uri, special_token.SET_FILE,
                                                                              cfg.data.s3_endpoint),
                                  "run.negative_prompt", f"the fine-tune set {storage.redact(uri)}")
    cfg = replace(cfg, run=replace(cfg.run, storage_path=absolute_storage(cfg.run.storage_path), negative_prompt=token))
    info = preflight(cfg.data, uri)
    spe = (info.rows // cfg.scaling.num_workers) // (cfg.optim.batch_size // cfg.scaling.num_workers)
    if spe < 1:
        raise DataError(f"data.train has {info.rows} rows: fewer than one global batch of {cfg.optim.batch_size}")
    rdir = run_dir(cfg)
    identity.claim(rdir, IDENTITY_FILE, {"config": identity.config_identity(to_dict(cfg), OPERATIONAL),
                                         "data": info.identity},
                   f"run.name={cfg.run.name}", "run.overwrite=true", cfg.run.overwrite, cfg.data.s3_endpoint)
    storage.write_text(storage.join(rdir, "config.yaml"), dump_yaml(cfg))
    log.info("[finetune] run dir %s; fine-tune set %s: %d rows %s", rdir, uri, info.rows, info.sources)
    return cfg, info, spe


def summarize(cfg: FinetuneSDConfig, info, result, fs, wall: float) -> dict[str, Any]:
    """The run's summary from Train's result (its last report)."""
    rdir, m = run_dir(cfg), result.metrics or {}
    return {
        "run_dir": rdir, "pipeline": storage.join(rdir, "pipeline") if cfg.run.save_pipeline else None,
        "checkpoint": storage.to_uri(result.checkpoint.path, fs is not None) if result.checkpoint else None,
        "steps": m.get("step"), "loss": m.get("loss"), "samples_per_s": m.get("samples_per_s"),
        "bad_rows": m.get("bad_rows"), "rows_seen": m.get("rows_seen"), "peak_gpu_mem_gb": m.get("peak_gpu_mem_gb"),
        "resumed_from_step": m.get("resumed_from_step"), "train_rows": info.rows, "sources": info.sources,
        "trainable_params": m.get("trainable_params"), "model": cfg.model.name,
        "deepspeed": f"ZeRO-{cfg.deepspeed.zero_stage}" if cfg.deepspeed.enabled else None,
        "workers": cfg.scaling.num_workers, "wall_s": round(wall, 1),
    }


def finetune_sd(cfg: FinetuneSDConfig) -> dict[str, Any]:
    """Run the whole job; returns (and writes as ``summary.json``) the summary."""
    cfg, info, spe = prepare(cfg)
    fixed = init_ray(cfg.run.ray_address)
    check_resources([worker_bundle(cfg.scaling)] * cfg.scaling.num_workers,
                    "the fine-tuning workers (scaling.num_workers x scaling.cpus_per_worker/gpus_per_worker)",
                    fixed=fixed)
    require_shared_storage(cfg.data.train, "data.train", "Ray Data's tasks read it")
    dataset = finetune_dataset(info, to_dict(cfg.model), cfg.data, cfg.optim.seed, ordered=cfg.run.exact_resume)
    result, fs, wall = raytrain.fit(train_func, {"cfg": to_dict(cfg), "steps_per_epoch": spe,
                                                 "run_dir": run_dir(cfg)}, cfg, {"train": dataset}, cfg.data.s3_endpoint)
    summary = summarize(cfg, info, result, fs, wall)
    storage.write_text(storage.join(run_dir(cfg), "summary.json"), json.dumps(summary, indent=1))
    return summary
