"""Every GPU figure in one command, one Markdown report.

    python jobs/benchmark_gpu.py                 # on a GPU machine: the full report (about 30 minutes on one H100)
    python jobs/benchmark_gpu.py size=tiny       # anywhere: the same report on tiny models (minutes on a CPU)

Sections (each is an existing benchmark, run in this process with the sizes below; a section that fails is
reported with its error and the others still run; the report is rewritten after every section, so a run
cut short leaves what it measured):

1. Scoring (:mod:`sr_ray.bench.score`): the reward model's images/s per GPU through the batch-scoring job, for
   torch (bf16 autocast + SDPA), torch.compile and the DeepSpeed backend, against the authors' loop and the
   model alone; hours for 1M images on 1 and 8 GPUs.
2. Reward training (:mod:`sr_ray.bench.train`): triplets/s per GPU of the paper's setting (3 vision / 2 text
   blocks trained): the authors' step, sr-ray's, and sr-ray's on the feature cache; the data-wait share of each.
3. SD fine-tuning (:mod:`sr_ray.bench.finetune`): an SD 2.1-base-sized U-Net at 512 px, samples/s and peak memory
   for DDP, ZeRO-2 and ZeRO-2 with cached latents.

Every rate is also given as a share of the physical limit: the FLOPs the work takes (counted by
``torch.utils.flop_counter`` on the very model, per image, triplet or sample) times the rate, over the device's
dense bf16 peak (H100/H200: 989 TFLOP/s; ``peak_tflops=`` for another card). On CPU the peak is measured (a
large fp32 matmul), so the tiny report's shares are of this machine's own limit.
"""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sr_ray.bench.finetune import BenchFinetuneConfig, bench_finetune
from sr_ray.bench.score import BenchScoreConfig, bench_score
from sr_ray.bench.train import BenchTrainConfig, bench_train
from sr_ray.core import storage
from sr_ray.reward import feature_cache
from sr_ray.reward.features import HeadRewardModel, image_trunk, text_trunk
from sr_ray.reward.model import ModelConfig

KNOWN_PEAKS_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


@dataclass
class BenchGPUConfig:
    size: str = "auto"
    """full (ViT-L/14, SD 2.1-base-sized U-Net at 512 px), tiny (sr-tiny and the tiny SD, on CPU), auto: full when
    a GPU is visible."""
    sections: list[str] = field(default_factory=lambda: ["score", "train", "finetune"])
    peak_tflops: float | None = None
    """The device's dense bf16 peak; default: known GPUs, and on CPU a measured fp32 matmul rate."""
    out: str = "./runs/benchmark-gpu"
    """Folder of report.md and results.json."""

    def __post_init__(self) -> None:
        if self.size not in ("auto", "full", "tiny"):
            raise ValueError("size must be auto, full or tiny")
        bad = [s for s in self.sections if s not in ("score", "train", "finetune")]
        if bad or not self.sections:
            raise ValueError(f"sections: some of score, train, finetune; not {bad}")


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs ``fn`` runs (matmuls, convolutions, attention; forward and any backward it calls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def measured_peak_tflops(n: int = 2048, repeats: int = 10) -> float:
    """This CPU's fp32 matmul rate, the best of ``repeats`` n x n products (all threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def device_peak(cfg: BenchGPUConfig) -> tuple[str, float, str]:
    """(device name, peak TFLOP/s, where the peak comes from)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if cfg.peak_tflops:
            return name, cfg.peak_tflops, "given"
        for key, peak in KNOWN_PEAKS_TFLOPS.items():
            if key in name:
                return name, peak, f"{key} dense bf16 spec"
        raise ValueError(f"the bf16 peak of {name!r} is not known here: give peak_tflops=")
    name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    if cfg.peak_tflops:
        return name, cfg.peak_tflops, "given"
    return name, round(measured_peak_tflops(), 3), "measured fp32 matmul"


def image_flops(model: ModelConfig) -> float:
    """FLOPs of one image through the reward model's image tower."""
    from sr_ray.reward.model import RewardModel, build_clip, preprocess_cfg

    m = RewardModel(build_clip(model, load_weights=False))
    m.requires_grad_(True)  # keeps nn.MultiheadAttention off its fused inference path, which the counter cannot see
    s = preprocess_cfg(model)["size"]
    h, w = (s, s) if isinstance(s, int) else s
    return count_flops(lambda: m.encode_image(torch.zeros(1, 3, h, w)))


def triplet_flops(model: ModelConfig, side: str) -> float:
    """FLOPs of one training triplet (forward and backward) for ``side``: authors (every parameter computes a
    gradient), ours (frozen parts compute none), cached (the trainable head on the trunk's output)."""
    from sr_ray.reward.model import RewardModel, build_clip, preprocess_cfg, tokenizer

    clip = build_clip(model, load_weights=False)
    s = preprocess_cfg(model)["size"]
    h, w = (s, s) if isinstance(s, int) else s
    ids, pos, neg = tokenizer(model)(["a prompt"]), torch.zeros(1, 3, h, w), torch.zeros(1, 3, h, w)
    net = RewardModel(clip)
    if side == "authors":
        for p in net.parameters():
            p.requires_grad_(True)
    if side == "cached":
        cut = feature_cache.plan(model)
        net = HeadRewardModel(clip, cut.image_depth, cut.text_depth)
        with torch.no_grad():
            pos, neg = image_trunk(clip, pos, cut.image_depth), image_trunk(clip, neg, cut.image_depth)
            if cut.text_depth is not None:
                ids = (ids, text_trunk(clip, ids, cut.text_depth))

    def step():
        t, p, n = net(ids, pos, neg)
        ((t * p).sum() - (t * n).sum()).backward()

    return count_flops(step)


def unet_sample_flops(name: str, resolution: int) -> float:
    """FLOPs of one training sample through the U-Net (forward and backward), the dominant term of SD fine-tuning."""
    from sr_ray.diffusion.components import BUILT_IN

    unet = BUILT_IN[name](0)["unet"]
    lat = torch.zeros(1, unet.config.in_channels, resolution // 8, resolution // 8)
    enc = torch.zeros(1, 77, unet.config.cross_attention_dim)
    return count_flops(lambda: unet(lat, torch.tensor([10]), enc).sample.sum().backward())


def share(rate: float | None, flops: float, peak_tflops: float) -> float | None:
    """Achieved FLOP/s over the peak."""
    return None if not rate else round(rate * flops / (peak_tflops * 1e12), 4)


def _score(full: bool, peak: float, out: str) -> dict:
    model = ModelConfig(name="ViT-L-14" if full else "sr-tiny", pretrained=None)
    cfg = BenchScoreConfig(model=model, prompts=1000 if full else 6, images_per_prompt=4 if full else 2,
                           image_size=256 if full else 32, batch_size=128 if full else 8,
                           loader_workers=8 if full else 0, actors=[1],
                           backends=["torch", "torch+compile", "deepspeed"] if full else ["torch", "deepspeed"],
                           cpus_per_actor=4 if full else 0.5, use_gpu=full, out=storage.join(out, "score"))
    r = bench_score(cfg)
    f = image_flops(model)
    rows = [{"name": "authors' loop", "images_per_s": r["authors"]["steady_images_per_s"]},
            {"name": "model alone (ceiling)", "images_per_s": r["ceiling"]["steady_images_per_s"]}]
    rows += [{"name": f"sr-ray {x['backend']}", "images_per_s": x["steady_images_per_s"]} for x in r["ours"]]
    for x in rows:
        x["share_of_peak"] = share(x["images_per_s"], f, peak)
        x["hours_1m_1gpu"] = round(1e6 / x["images_per_s"] / 3600, 2)
        x["hours_1m_8gpu"] = round(1e6 / x["images_per_s"] / 3600 / 8, 3)
    return {"model": model.name, "images": r["images"], "gflops_per_image": float(f"{f / 1e9:.3g}"), "rows": rows,
            "bytes_per_image": r["object_store_bytes_per_image"]}


def _train(full: bool, peak: float, out: str) -> dict:
    model = ModelConfig(name="ViT-L-14" if full else "sr-tiny", pretrained=None, unfreeze_vision_blocks=3 if full
                        else 1, unfreeze_text_blocks=2 if full else 1)
    steps, warm, batch = (20, 3, 32) if full else (4, 1, 16)
    r = bench_train(BenchTrainConfig(model=model, rows=batch * (steps + warm), batch_size=batch, steps=steps,
                                     warmup_steps=warm, loader_workers=8 if full else 0, data_source="pipelines",
                                     cache_dir=storage.join(out, "cache")))
    rows = []
    for side, key in (("authors", "authors"), ("ours", "ours"), ("cached", "cached")):
        rate = r.get(f"{key}_triplets_per_s")
        f = triplet_flops(model, side)
        rows.append({"name": {"authors": "authors' step (no-op freeze, DataLoader)",
                              "ours": "sr-ray (freeze, Ray Data)",
                              "cached": "sr-ray + feature cache"}[side],
                     "triplets_per_s": rate, "data_wait": r.get(f"{key}_data_wait"),
                     "gflops_per_triplet": float(f"{f / 1e9:.3g}"), "share_of_peak": share(rate, f, peak)})
    return {"model": model.name, "unfrozen": [model.unfreeze_vision_blocks, model.unfreeze_text_blocks],
            "batch_size": batch, "steps": steps, "rows": rows, "cache_build_triplets_per_s":
                r.get("cache_build_triplets_per_s"), "peak_gpu_mem_gb": r.get("peak_gpu_mem_gb")}


def _finetune(full: bool, peak: float, out: str) -> dict:
    from sr_ray.diffusion.components import SD21_RANDOM, TINY, SDModelConfig

    name, res = (SD21_RANDOM, 512) if full else (TINY, 32)
    r = bench_finetune(BenchFinetuneConfig(model=SDModelConfig(name=name), resolution=res, batch_size=4,
                                           workers=1, steps=20 if full else 4, use_gpu=full,
                                           cpus_per_worker=4 if full else 0.5, out=storage.join(out, "finetune"),
                                           variants=["ddp", "zero2", "zero2+latents"]))
    f = unet_sample_flops(name, res)
    rows = [{"name": x["variant"], "samples_per_s": x["samples_per_s"], "peak_gpu_mem_gb": x.get("peak_gpu_mem_gb"),
             "share_of_peak": share(x["samples_per_s"], f, peak)} for x in r["runs"]]
    return {"model": name, "resolution": res, "batch_size": 4, "gflops_per_sample_unet": float(f"{f / 1e9:.3g}"),
            "rows": rows}


SECTIONS = {"score": _score, "train": _train, "finetune": _finetune}


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{v:.1%}"
    return (f"{v:,.2f}" if abs(v) >= 1 else f"{v:.3g}") if isinstance(v, float) else str(v)


def _table(rows: list[dict], cols: list[tuple[str, str, bool]]) -> list[str]:
    out = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + " --- |" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(k), pct) for _, k, pct in cols) + " |" for r in rows]
    return out


def _intro(name: str, x: dict) -> str:
    """The sentence above a section's table (what was measured, on what)."""
    if name == "score":
        b = x["bytes_per_image"]
        return (f"{x['model']}, {x['images']} images, {x['gflops_per_image']} GFLOPs per image; one scorer actor per "
                f"device (GPU, or the CPU); steady rates (after the model is loaded). Object store per image: "
                f"{b['uint8']:,} B (uint8) instead of {b['float32']:,} B (float32).")
    if name == "train":
        return (f"{x['model']}, last {x['unfrozen'][0]} vision / {x['unfrozen'][1]} text blocks trained, batch "
                f"{x['batch_size']}, {x['steps']} timed steps. The feature cache's one-off build: "
                f"{_fmt(x['cache_build_triplets_per_s'])} triplets/s.")
    return (f"{x['model']} at {x['resolution']} px, batch {x['batch_size']} on one worker; "
            f"{x['gflops_per_sample_unet']} GFLOPs per sample in the U-Net (forward and backward).")


REPORT = {  # section -> (title, table columns: header, key, as a percentage)
    "score": ("Scoring", [("", "name", False), ("images/s per device", "images_per_s", False),
                          ("share of peak", "share_of_peak", True), ("1M images, 1 GPU (h)", "hours_1m_1gpu", False),
                          ("1M images, 8 GPUs (h)", "hours_1m_8gpu", False)]),
    "train": ("Reward training", [("", "name", False), ("triplets/s per device", "triplets_per_s", False),
                                  ("data wait", "data_wait", True), ("GFLOPs per triplet", "gflops_per_triplet", False),
                                  ("share of peak", "share_of_peak", True)]),
    "finetune": ("SD fine-tuning", [("variant", "name", False), ("samples/s", "samples_per_s", False),
                                    ("peak GiB", "peak_gpu_mem_gb", False), ("share of peak", "share_of_peak", True)]),
}


def report_markdown(r: dict) -> str:
    lines = [f"# sr-ray GPU report ({r['size']})", "",
             f"{r['device']}; peak {r['peak_tflops']} TFLOP/s ({r['peak_source']}); {r['date']}; "
             f"{r['wall_s']:.0f} s in all. Shares of peak: the FLOPs counted by torch.utils.flop_counter on the very "
             f"model times the rate, over the peak.", ""]
    for name, (title, cols) in REPORT.items():
        x = r["sections"].get(name)
        if x is None:
            continue
        body = [f"Failed: `{x['error']}`"] if "error" in x else [_intro(name, x), ""] + _table(x["rows"], cols)
        lines += [f"## {title}", "", *body, ""]
    return "\n".join(lines)


def bench_gpu(cfg: BenchGPUConfig) -> dict:
    full = cfg.size == "full" or (cfg.size == "auto" and torch.cuda.is_available())
    device, peak, source = device_peak(cfg)
    r: dict[str, Any] = {"size": "full" if full else "tiny", "device": device, "peak_tflops": peak,
                         "peak_source": source, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         "sections": {}, "wall_s": 0.0}
    t0 = time.perf_counter()
    for name in cfg.sections:
        t = time.perf_counter()
        try:
            r["sections"][name] = SECTIONS[name](full, peak, cfg.out)
        except Exception as e:  # one section's failure must not lose the others' figures
            traceback.print_exc()
            r["sections"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        r["sections"][name]["section_s"] = round(time.perf_counter() - t, 1)
        r["wall_s"] = time.perf_counter() - t0
        storage.write_text(storage.join(cfg.out, "results.json"), json.dumps(r, indent=1, default=str))
        storage.write_text(storage.join(cfg.out, "report.md"), report_markdown(r) + "\n")
        print(f"[gpu] {name} done in {time.perf_counter() - t:.0f}s -> {storage.join(cfg.out, 'report.md')}",
              flush=True)
    return r


def format_table(r: dict) -> str:
    return report_markdown(r)
