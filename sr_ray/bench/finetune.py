"""Fine-tuning throughput: plain DDP against DeepSpeed ZeRO and cached latents, in one run.

Every variant is the fine-tuning job itself (:func:`finetune_sd`) on the same
fine-tune set, model, batch and number of steps, on one Ray cluster; the
reference is plain DDP (Ray Train's ``prepare_model``, torch AdamW) measured in
the same run. Reported: the job's samples/s over its training steps (data wait
included, start-up and checkpoints excluded), its ratio to DDP, the wall time,
and on GPU the peak memory per worker.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field

from sr_ray.core import storage
from sr_ray.core.config import from_dict, set_dotted, to_dict
from sr_ray.core.ray_utils import init_ray
from sr_ray.demo.data import ensure_demo_finetune_set
from sr_ray.diffusion.components import SDModelConfig
from sr_ray.diffusion.finetune import FinetuneSDConfig, finetune_sd

VARIANTS = {
    "ddp": {"deepspeed.enabled": False},
    "zero2": {"deepspeed.enabled": True, "deepspeed.zero_stage": 2},
    "zero2+latents": {"deepspeed.enabled": True, "deepspeed.zero_stage": 2, "data.cache_latents": True},
    "ddp+latents": {"deepspeed.enabled": False, "data.cache_latents": True},
    "zero3": {"deepspeed.enabled": True, "deepspeed.zero_stage": 3},
}


@dataclass
class BenchFinetuneConfig:
    model: SDModelConfig = field(default_factory=SDModelConfig)
    variants: list[str] = field(default_factory=lambda: ["ddp", "zero2", "zero2+latents"])
    """Runs in order; the first is the reference of the ratios."""
    data: str | None = None
    """Fine-tune set; none: the demo set drawn in code."""
    resolution: int = 32
    batch_size: int = 8
    workers: int = 2
    steps: int = 40
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    out: str = "./runs/benchmark-finetune"

    def __post_init__(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"variants: some of {sorted(VARIANTS)}, not {bad}")


def bench_finetune(cfg: BenchFinetuneConfig) -> dict:
    data = cfg.data or ensure_demo_finetune_set()
    init_ray(None)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in cfg.variants:
            tree = to_dict(FinetuneSDConfig())
            tree.update({"model": to_dict(cfg.model)})
            over = {"data.train": data, "data.resolution": cfg.resolution, "optim.batch_size": cfg.batch_size,
                    "optim.max_steps": cfg.steps, "optim.epochs": 1000, "scaling.num_workers": cfg.workers,
                    "scaling.use_gpu": cfg.use_gpu, "scaling.cpus_per_worker": cfg.cpus_per_worker,
                    "scaling.max_failures": 0, "run.storage_path": tmp, "run.name": name,
                    "run.checkpoint_every_steps": 10**9, "run.sample_every_steps": -1,
                    "run.save_pipeline": False, "run.log_every_steps": max(1, cfg.steps // 4), **VARIANTS[name]}
            for k, v in over.items():
                set_dotted(tree, k.split("."), v)
            t0 = time.perf_counter()
            s = finetune_sd(from_dict(FinetuneSDConfig, tree))
            runs.append({"variant": name, "samples_per_s": round(s["samples_per_s"], 2), "steps": s["steps"],
                         "wall_s": round(time.perf_counter() - t0, 1), "peak_gpu_mem_gb": s.get("peak_gpu_mem_gb")})
    ref = runs[0]["samples_per_s"]
    for r in runs:
        r["ratio_vs_" + cfg.variants[0]] = round(r["samples_per_s"] / ref, 3)
    result = {"model": cfg.model.name, "resolution": cfg.resolution, "batch_size": cfg.batch_size,
              "workers": cfg.workers, "steps": cfg.steps, "device": "gpu" if cfg.use_gpu else "cpu", "runs": runs}
    storage.write_text(storage.join(cfg.out, "results.json"), json.dumps(result, indent=1))
    storage.write_text(storage.join(cfg.out, "results.md"), format_table(result) + "\n")
    return result


def format_table(r: dict) -> str:
    ref = r["runs"][0]["variant"]
    lines = [f"model {r['model']} at {r['resolution']} px on {r['workers']} {r['device']} worker(s), global batch "
             f"{r['batch_size']}, {r['steps']} steps per variant",
             f"{'variant':16s} {'samples/s':>10s} {'vs ' + ref:>10s} {'wall s':>8s} {'peak GiB':>9s}"]
    for run in r["runs"]:
        mem = f"{run['peak_gpu_mem_gb']:.1f}" if run.get("peak_gpu_mem_gb") else "-"
        lines.append(f"{run['variant']:16s} {run['samples_per_s']:10.2f} {run['ratio_vs_' + ref]:10.2f} "
                     f"{run['wall_s']:8.1f} {mem:>9s}")
    return "\n".join(lines)
