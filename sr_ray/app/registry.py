"""Every job by name: its config class, its function, its presets, and one way to run it.

``jobs/<name>.py`` and ``sr-ray <name>`` both come here. The stages are imported only when a job runs, so
``sr-ray jobs`` answers without loading torch or Ray. A chained job runs through :mod:`sr_ray.app.defaults`,
which fills an input not given with the demo chain before the stage runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sr_ray.app.cli import run_job
from sr_ray.core.config import PRESET_DIR, preset_names, preset_path


@dataclass(frozen=True)
class Job:
    target: str
    """``module:ConfigClass:function``."""
    what: str
    """One line for ``sr-ray jobs``."""
    table: str | None = None
    """A benchmark's ``module:format_table``, printed before the summary."""
    chained: bool = False
    """Run through :mod:`sr_ray.app.defaults` (same name), which fills missing inputs with the demo chain."""


JOBS: dict[str, Job] = {
    "curate_dataset": Job("sr_ray.curation.curate:CurateConfig:curate",
                          "platform log -> triplet shards with the paper's rules (+ data card)", chained=True),
    "train_reward": Job("sr_ray.reward.train:TrainRewardConfig:train_reward",
                        "fine-tune CLIP on triplets with Ray Train -> a reward checkpoint", chained=True),
    "tune_reward": Job("sr_ray.reward.tune:TuneRewardConfig:tune_reward",
                       "Ray Tune sweep of the training job (Table 7)", chained=True),
    "score_generations": Job("sr_ray.generations.score:ScoreConfig:score_generations",
                             "batch-score users' generations with a reward model", chained=True),
    "select_pairs": Job("sr_ray.generations.select:SelectConfig:select_pairs",
                        "best/worst image per prompt + regularization -> the fine-tune set", chained=True),
    "finetune_sd": Job("sr_ray.diffusion.finetune:FinetuneSDConfig:finetune_sd",
                       "fine-tune Stable Diffusion on the fine-tune set (Ray Train + DeepSpeed)", chained=True),
    "generate": Job("sr_ray.diffusion.generate:GenerateConfig:generate",
                    "images for prompt sets from one or more SD models", chained=True),
    "evaluate_t2i": Job("sr_ray.eval.t2i:EvaluateT2IConfig:evaluate_t2i",
                        "baseline vs fine-tuned under six metrics (Tables 5-6)", chained=True),
    "closed_loop": Job("sr_ray.app.closed_loop:ClosedLoopConfig:closed_loop",
                       "the paper's loop: generate, rank by the reward, fine-tune on the best, evaluate (Tables 5-6)",
                       chained=True),
    "compare_rewards": Job("sr_ray.eval.compare:CompareConfig:compare_rewards",
                           "reward models' pairwise accuracy on preference sets (Tables 3-4)", chained=True),
    "analyze_prompts": Job("sr_ray.analysis.prompts:AnalyzePromptsConfig:analyze_prompts",
                           "how far apart are communities' prompts: clusters + KL (Table 2, Figs. 3/4/8)",
                           chained=True),
    "export": Job("sr_ray.reward.export:ExportConfig:export",
                  "a reward checkpoint -> an open_clip / Hugging Face model folder (+ push_to_hub)"),
    "serve": Job("sr_ray.serve:ServeConfig:serve_job",
                 "the reward model over HTTP: Ray Serve, dynamic batching (/score, /rank, /healthz)"),
    "rank_images": Job("sr_ray.eval.figures:RankImagesConfig:rank_images",
                       "one prompt's images ranked by a scorer, as a picture (Figs. 6/9)"),
    "verify_scorers": Job("sr_ray.bench.verify_scorers:VerifyScorersConfig:verify_scorers",
                          "every peer scorer against the peer's own code", "sr_ray.bench.verify_scorers:format_table"),
    "benchmark_train": Job("sr_ray.bench.train:BenchTrainConfig:bench_train",
                           "training step vs the authors' approach", "sr_ray.bench.train:format_table"),
    "benchmark_feature_cache": Job("sr_ray.bench.feature_cache:BenchFeatureCacheConfig:bench_feature_cache",
                                   "the training job without and with data.feature_cache: epochs, build, accuracy",
                                   "sr_ray.bench.feature_cache:format_table"),
    "benchmark_gpu": Job("sr_ray.bench.gpu:BenchGPUConfig:bench_gpu",
                         "every GPU figure in one run, one Markdown report (size=tiny: on CPU)",
                         "sr_ray.bench.gpu:format_table"),
    "benchmark_score": Job("sr_ray.bench.score:BenchScoreConfig:bench_score",
                           "batch scoring vs a validation-style loop", "sr_ray.bench.score:format_table"),
    "benchmark_curate": Job("sr_ray.bench.curate:BenchCurateConfig:bench_curate",
                            "curation on Ray vs pandas and DuckDB, 1M and 10M rows", "sr_ray.bench.curate:format_table"),
    "benchmark_finetune": Job("sr_ray.bench.finetune:BenchFinetuneConfig:bench_finetune",
                              "SD fine-tuning variants (DDP, ZeRO stages, caching)",
                              "sr_ray.bench.finetune:format_table"),
    "benchmark_scorers": Job("sr_ray.bench.scorers:BenchScorersConfig:bench_scorers",
                             "each scorer's throughput vs its model alone", "sr_ray.bench.scorers:format_table"),
    "benchmark_serve": Job("sr_ray.bench.serve:BenchServeConfig:bench_serve",
                           "the Serve app under closed-loop load vs RewardScorer offline",
                           "sr_ray.bench.serve:format_table"),
    "benchmark_prompts": Job("sr_ray.bench.prompts:BenchPromptsConfig:bench_prompts",
                             "prompt analysis: embedding prompts/s, Ward time/memory 6K-60K",
                             "sr_ray.bench.prompts:format_table"),
}


def _attr(spec: str) -> Any:
    module, *names = spec.split(":")
    obj = importlib.import_module(module)
    for n in names:
        obj = getattr(obj, n)
    return obj


def resolve(name: str) -> tuple[type, Callable[[Any], dict], Callable | None]:
    """(config class, job function, table printer or None) of job ``name``."""
    job = JOBS.get(name)
    if job is None:
        raise KeyError(f"no job {name!r}; jobs: {sorted(JOBS)}")
    module, cls, fn = job.target.split(":")
    run = _attr(f"sr_ray.app.defaults:{name}") if job.chained else _attr(f"{module}:{fn}")
    return _attr(f"{module}:{cls}"), run, _attr(job.table) if job.table else None


def default_preset(name: str):
    """The preset a job runs on without ``--config``: its ``demo`` preset, when it has one."""
    return preset_path(name, "demo") if "demo" in preset_names(name) else None


def run(name: str, argv: Sequence[str] | None, doc: str | None = None) -> dict[str, Any]:
    """Run job ``name`` as its script does: ``[--config PRESET|FILE] [key=value ...]``, the JSON summary last."""
    cls, fn, table = resolve(name)
    return run_job(cls, fn, argv, default_preset(name), doc or JOBS[name].what, table=table, job=name)


def listing() -> str:
    """``sr-ray jobs``: every job, what it does, and its presets."""
    width = max(map(len, JOBS))
    lines = []
    for n, j in JOBS.items():
        presets = preset_names(n)
        lines.append(f"{n:<{width}}  {j.what}" + (f"  [presets: {', '.join(presets)}]" if presets else ""))
    return "\n".join(lines + ["", f"presets live in {PRESET_DIR}/<job>/<name>.yaml; --config takes a name or a file"])
