"""The demo chain: what each job runs on when an input is not given.

Every stage takes explicit inputs and refuses to start without them (a ConfigError naming the key). A job run
from the command line (``jobs/<name>.py``, ``sr-ray <name>``) comes through here first, and a missing input
becomes the previous stage's demo output, made once and cached:

    curate_dataset     no log          -> a simulated community (demo.community), curated once per rule set
    train_reward       no data.train   -> that curated community (data.demo.source=community) or synthetic
    tune_reward        no data.train   -> the same splits
    score_generations  no generations  -> demo generations drawn in code; no checkpoint -> the reward demo's
    select_pairs       no scores       -> the scoring demo's output (+ the demo regularization set)
    finetune_sd        no data.train   -> the selection demo's output, else a fine-tune set drawn in code
    generate           no prompts      -> the demo prompt sets
    evaluate_t2i       no prompts      -> demo sets (+ the run's held-out prompts); finetune_demo -> the
                                          closed loop's fine-tuned run
    closed_loop        no reward       -> the training job's demo run (the community's triplets)
    compare_rewards    no test         -> the reward demo run's test split and checkpoint
    analyze_prompts    no datasets     -> the simulated community's log + the public prompt sets (PROMPT_SETS)

This is the only module that calls one stage for another's input; the stages below it never do.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from sr_ray.analysis import prompts as prompt_analysis
from sr_ray.analysis.prompts import AnalyzePromptsConfig
from sr_ray.app import closed_loop as loop
from sr_ray.app.closed_loop import ClosedLoopConfig
from sr_ray.core import special_token, storage
from sr_ray.core.config import ConfigError, load_config, preset_path, to_dict
from sr_ray.core.ray_utils import init_ray
from sr_ray.curation import curate as curation
from sr_ray.curation.curate import RULE_KEYS, CurateConfig, rules_of
from sr_ray.demo.community import CommunityConfig, config_hash, simulate
from sr_ray.demo.data import (
    DemoConfig,
    ensure_demo_data,
    ensure_demo_finetune_set,
    ensure_demo_generations,
    ensure_demo_regularization,
)
from sr_ray.demo.prompts import demo_prompt_sets, ensure_community_log, ensure_demo_prompt_files
from sr_ray.diffusion import finetune as sd_finetune
from sr_ray.diffusion import generate as sd_generate
from sr_ray.diffusion.finetune import FinetuneSDConfig
from sr_ray.diffusion.generate import GenerateConfig
from sr_ray.eval import compare as reward_compare
from sr_ray.eval import t2i
from sr_ray.eval.compare import CompareConfig
from sr_ray.eval.t2i import EvaluateT2IConfig, internal_prompts
from sr_ray.generations import score as batch_score
from sr_ray.generations import select
from sr_ray.generations.score import ScoreConfig
from sr_ray.generations.select import SelectConfig
from sr_ray.reward import train, tune
from sr_ray.reward.data import DataConfig
from sr_ray.reward.train import TrainRewardConfig
from sr_ray.reward.tune import TuneRewardConfig

log = logging.getLogger(__name__)

REWARD_DEMO_RUNS = ("sr-reward-demo", "sr-reward-demo-scorer")
"""The training job's demo run, and the quick one trained here when it is absent."""


# ---------------------------------------------------------------- curation

def community_paths(cfg: CurateConfig) -> tuple[str, str]:
    """(folder, curated-triplets folder) of the simulated community ``cfg.community``, cached by parameters."""
    root = str(Path(cfg.demo_cache_dir).expanduser().resolve())
    folder = storage.join(root, f"community-{config_hash(to_dict(cfg.community))}")
    return folder, storage.join(folder, f"triplets-{config_hash(rules_of(cfg))}")


def cached_curation(cfg: CurateConfig, out: str) -> dict[str, Any] | None:
    """The data card of a curation already in ``out`` under the same rules, if there is one."""
    card = storage.join(out, "datacard.json")
    if not storage.exists(card, cfg.s3_endpoint):
        return None
    done = json.loads(storage.read_bytes(card, cfg.s3_endpoint))
    return done if {k: done["config"].get(k) for k in RULE_KEYS} == rules_of(cfg) else None


def curate_dataset(cfg: CurateConfig) -> dict[str, Any]:
    """The curation job: the log given, else the demo community (simulated once) curated once per rule set."""
    if cfg.log is not None:
        return curation.curate(cfg)
    folder, out = community_paths(cfg)
    out = cfg.out or out
    cached = cached_curation(cfg, out)
    if cached is not None:
        log.info("[curate] demo triplets cached in %s", out)
        return cached
    init_ray(cfg.ray_address)
    t = time.perf_counter()
    log_uri = simulate(cfg.community, folder, cfg.s3_endpoint)
    log.info("[curate] simulate community done in %.1fs images=%d", time.perf_counter() - t, cfg.community.images)
    return curation.curate(replace(cfg, log=log_uri, out=out))


# ---------------------------------------------------------------- reward model

def demo_splits(demo: DemoConfig, ray_address: str | None = None) -> dict[str, str]:
    """The demo's triplet splits ``{"train", "val", "test"}``: a curated simulated community, or synthetic."""
    if demo.source == "synthetic":
        return ensure_demo_data(demo)
    summary = curate_dataset(CurateConfig(
        community=CommunityConfig(seed=demo.seed, images=demo.community_images, image_size=demo.image_size),
        max_pairs_per_prompt=demo.max_pairs_per_prompt, rows_per_shard=demo.rows_per_shard, seed=demo.seed,
        demo_cache_dir=str(Path(os.path.expanduser(demo.cache_dir)) / "community"), ray_address=ray_address))
    missing = [s for s in ("train", "val", "test") if s not in summary]
    if missing:
        raise ConfigError(f"the demo community curated to no {missing} triplets; raise data.demo.community_images")
    return {s: summary[s] for s in ("train", "val", "test")}


def with_demo_splits(data: DataConfig, ray_address: str | None) -> DataConfig:
    """``data`` as given when it names a train split, else pointed at the demo's splits."""
    if data.train:
        return data
    splits = demo_splits(data.demo, ray_address)
    return replace(data, train=splits["train"], val=data.val or splits["val"], test=data.test or splits["test"])


def train_reward(cfg: TrainRewardConfig, score_test: bool = True) -> dict[str, Any]:
    """The training job: the splits given, else the demo's."""
    return train.train_reward(replace(cfg, data=with_demo_splits(cfg.data, cfg.run.ray_address)),
                              score_test=score_test)


def tune_reward(cfg: TuneRewardConfig) -> dict[str, Any]:
    """The sweep job: the splits given, else the demo's."""
    data = with_demo_splits(cfg.train.data, cfg.train.run.ray_address)
    return tune.tune_reward(replace(cfg, train=replace(cfg.train, data=data)))


def demo_reward_config() -> TrainRewardConfig:
    """The quick reward-training run behind :func:`demo_checkpoint` (synthetic triplets, tiny CLIP)."""
    cfg = TrainRewardConfig()
    cfg.data.demo.source = "synthetic"
    cfg.data.demo.train, cfg.data.demo.val, cfg.data.demo.test = 1600, 200, 200
    cfg.data.map_num_cpus = 0.5
    cfg.model.name, cfg.model.unfreeze_vision_blocks, cfg.model.unfreeze_text_blocks = "sr-tiny", -1, -1
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.epochs, cfg.optim.weight_decay = 1e-3, 20, 2, 0.05
    cfg.scaling.cpus_per_worker = 0.5
    cfg.run.name = REWARD_DEMO_RUNS[1]
    return cfg


def finished_run(storage_path: str, name: str) -> dict[str, Any] | None:
    """The summary of run ``name`` under ``storage_path`` when it finished with a checkpoint that still exists."""
    path = os.path.join(os.path.abspath(storage_path), name, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    if summary.get("checkpoint") and storage.exists(summary["checkpoint"]):
        log.info("demo reward model: %s (from %s)", summary["checkpoint"], path)
        return summary
    return None


def demo_run() -> dict[str, Any]:
    """The summary of the reward demo run (its ``checkpoint``, its ``splits``): the training job's demo run when
    it has run here, else a quick one trained now (synthetic triplets) or earlier."""
    cfg = demo_reward_config()
    for name in REWARD_DEMO_RUNS:
        summary = finished_run(cfg.run.storage_path, name)
        if summary is not None:
            return summary
    log.info("no demo reward model yet: training one (run %s)", cfg.run.name)
    return train_reward(cfg, score_test=False)


def demo_checkpoint() -> str:
    """The reward demo run's best checkpoint (see :func:`demo_run`)."""
    return demo_run()["checkpoint"]


# ---------------------------------------------------------------- generations

def score_generations(cfg: ScoreConfig) -> dict[str, Any]:
    """The scoring job: the generations and checkpoint given, else the demo's."""
    if cfg.generations is None:
        cfg = replace(cfg, generations=ensure_demo_generations(cfg.demo))
    if cfg.scorer == "social_reward" and not (cfg.checkpoint or cfg.social_reward.checkpoint):
        cfg = replace(cfg, checkpoint=demo_checkpoint())
    return batch_score.score_generations(cfg)


def select_pairs(cfg: SelectConfig) -> dict[str, Any]:
    """The selection job: the scores given, else the scoring demo's (scored first when missing) with the demo
    regularization set."""
    if cfg.scores is None:
        sc = replace(load_config(ScoreConfig, preset_path("score_generations", "demo")), ray_address=cfg.ray_address)
        if not storage.exists(storage.join(sc.out, "_summary.json")):
            log.info("[select] no demo scores in %s yet: running the scoring job's demo first", sc.out)
            score_generations(sc)
        cfg = replace(cfg, scores=sc.out)
        if cfg.regularization is None and cfg.regularization_ratio > 0:
            cfg = replace(cfg, regularization=ensure_demo_regularization(cfg.demo))
    return select.select_pairs(cfg)


# ---------------------------------------------------------------- diffusion

def finetune_sd(cfg: FinetuneSDConfig) -> dict[str, Any]:
    """The fine-tuning job: the set given, else the selection demo's output when it has run here, else a set
    drawn in code (made with the run's special token)."""
    if cfg.data.train is None:
        selected = Path(SelectConfig().out)
        uri = str(selected.resolve()) if any(selected.glob("part-*.parquet")) else \
            ensure_demo_finetune_set(cfg.data.demo, cfg.run.negative_prompt or special_token.DEFAULT)
        cfg = replace(cfg, data=replace(cfg.data, train=uri))
    return sd_finetune.finetune_sd(cfg)


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """The generation job: the prompt files given, else the demo's two sets."""
    if not cfg.prompts:
        cfg = replace(cfg, prompts=list(ensure_demo_prompt_files().values()))
    return sd_generate.generate(cfg)


# ---------------------------------------------------------------- evaluation

def ensure_finetuned(cfg: EvaluateT2IConfig) -> None:
    """With ``finetune_demo``: when ``finetuned`` (``<folder>/finetuned``) holds no pipeline yet, run the closed
    loop's stages up to the fine-tune into ``<folder>`` (the loop's demo preset, the community's reward)."""
    if not (cfg.finetune_demo and cfg.finetuned) or storage.is_s3(cfg.finetuned):
        return
    path = Path(os.path.expanduser(cfg.finetuned)).resolve()
    if (path / "pipeline" / "model_index.json").exists() or (path / "model_index.json").exists():
        return
    if path.name != "finetuned":
        raise ConfigError(f"finetuned={cfg.finetuned}: no pipeline there, and finetune_demo makes one only in a "
                          f"folder named 'finetuned' (the closed loop's <out>/finetuned)")
    lc = replace(load_config(ClosedLoopConfig, preset_path("closed_loop", "demo")), out=str(path.parent),
                 generator=cfg.baseline, ray_address=cfg.ray_address)
    log.info("[evaluate] %s has no fine-tuned pipeline yet: running the closed loop's stages into %s", path,
             path.parent)
    loop.finetuned_run(replace(lc, reward_checkpoint=community_checkpoint(cfg.ray_address)), {})


def evaluation_inputs(cfg: EvaluateT2IConfig) -> EvaluateT2IConfig:
    """The T2I evaluation's inputs: with nothing given, the demo's general set beside the fine-tuning run's
    held-out prompts (both demo sets when it has none), and the reward demo's checkpoint."""
    if not cfg.generations:
        ensure_finetuned(cfg)
        if not cfg.prompts:
            demo = ensure_demo_prompt_files()
            held = internal_prompts(cfg.finetuned, cfg.s3_endpoint)
            cfg = replace(cfg, prompts=[demo["general"]] if held else list(demo.values()))
    if "social_reward" in cfg.metrics and not cfg.social_reward.checkpoint:
        cfg = replace(cfg, social_reward=replace(cfg.social_reward, checkpoint=demo_checkpoint()))
    return cfg


def evaluate_t2i(cfg: EvaluateT2IConfig) -> dict[str, Any]:
    """The T2I evaluation job (see :func:`evaluation_inputs`)."""
    return t2i.evaluate_t2i(evaluation_inputs(cfg))


def community_checkpoint(ray_address: str | None = None) -> str:
    """The checkpoint of the training job's demo run (the simulated community's curated triplets), trained now
    when it is absent."""
    rcfg = load_config(TrainRewardConfig, preset_path("train_reward", "demo"))
    rcfg = replace(rcfg, run=replace(rcfg.run, ray_address=ray_address))
    done = finished_run(rcfg.run.storage_path, rcfg.run.name)
    if done is not None:
        return done["checkpoint"]
    log.info("no reward model of the community yet: training it (run %s)", rcfg.run.name)
    return train_reward(rcfg, score_test=False)["checkpoint"]


def closed_loop(cfg: ClosedLoopConfig) -> dict[str, Any]:
    """The closed loop (:mod:`sr_ray.app.closed_loop`): the reward given, else the community's. The built-in
    generator is pre-trained first, in this process, before the reward's training starts Ray's processes."""
    times = {}
    loop.prepare_generator(cfg, times)
    if not cfg.reward_checkpoint:
        t = time.perf_counter()
        cfg = replace(cfg, reward_checkpoint=community_checkpoint(cfg.ray_address))
        times["reward"] = round(time.perf_counter() - t, 1)
    return loop.closed_loop(cfg, times)


def compare_rewards(cfg: CompareConfig) -> dict[str, Any]:
    """The comparison job: the test sets and checkpoint given, else the reward demo run's test split and
    checkpoint (trained first when absent)."""
    if cfg.test and ("social_reward" not in cfg.scorers or cfg.social_reward.checkpoint):
        return reward_compare.compare_rewards(cfg)
    run = demo_run()
    if not cfg.test:
        if not (run.get("splits") or {}).get("test"):
            raise ConfigError("test: none given and the reward demo run has no test split")
        cfg = replace(cfg, test=[run["splits"]["test"]])
    if "social_reward" in cfg.scorers and not cfg.social_reward.checkpoint:
        cfg = replace(cfg, social_reward=replace(cfg.social_reward, checkpoint=run["checkpoint"]))
    return reward_compare.compare_rewards(cfg)


# ---------------------------------------------------------------- prompt analysis

PUBLIC_PROMPT_SETS = {"parti": "parti_prompts.tsv", "imagereward": "imagereward_test_prompts.tsv"}
"""The two public prompt sets (PartiPrompts; ImageReward's test prompts, from DiffusionDB) the analysis demo
compares with the community. They are not shipped: the job looks for them in $SR_RAY_PROMPT_SETS, then in
../shared/data/prompts beside the working directory and beside the repository."""


def public_prompt_dir() -> Path | None:
    """The first folder holding both public prompt sets, or None."""
    here = Path(__file__).resolve().parents[2]
    places = [os.environ.get("SR_RAY_PROMPT_SETS"), Path.cwd().parent / "shared" / "data" / "prompts",
              here.parent / "shared" / "data" / "prompts"]
    for p in filter(None, places):
        if all((Path(p) / f).is_file() for f in PUBLIC_PROMPT_SETS.values()):
            return Path(p)
    return None


def analysis_datasets(cache_dir: str = "~/.cache/sr-ray/demo") -> list[str]:
    """``name=uri`` of the analysis demo: the community's log and the public sets (else a demo phrasing set)."""
    items = [f"community={ensure_community_log(cache_dir)}"]
    found = public_prompt_dir()
    if found is not None:
        return items + [f"{name}={found / f}" for name, f in PUBLIC_PROMPT_SETS.items()]
    log.warning("[analyze] the public prompt sets (%s) are in none of $SR_RAY_PROMPT_SETS, ../shared/data/prompts: "
                "comparing the community with the demo's 'general' phrasing instead", list(PUBLIC_PROMPT_SETS.values()))
    general = Path(os.path.expanduser(cache_dir)) / "analysis-general.txt"
    general.parent.mkdir(parents=True, exist_ok=True)
    general.write_text("\n".join(demo_prompt_sets(n=200)["general"]) + "\n")
    return items + [f"general={general}"]


def analyze_prompts(cfg: AnalyzePromptsConfig) -> dict[str, Any]:
    """The prompt analysis: the datasets given, else the community's prompts and the public prompt sets."""
    if not cfg.datasets:
        cfg = replace(cfg, datasets=analysis_datasets())
    return prompt_analysis.analyze_prompts(cfg)
