"""The paper's loop in miniature (sec. 4.3, Tables 5-6): a generator fine-tuned on its own best generations, as
the community's reward model ranks them, then evaluated against itself before.

``closed_loop(cfg)`` runs, each stage into a folder of ``out`` and skipped when it is already there:

1. ``generator``: the baseline generator (``tiny-pretrained``: pre-trained once per machine on generic
   captioned pictures, no community taste in them);
2. ``reward``: ``reward_checkpoint``; the job (:func:`sr_ray.app.defaults.closed_loop`) gives the reward model
   trained on the simulated community's curated triplets (the training job's demo run, trained when absent);
3. ``prompts``: new prompts as the community writes them, split as select_pairs will split them into
   ``train_prompts`` to fine-tune on and ``internal_prompts`` held out, plus the demo's general set;
4. ``generate``: ``images_per_prompt`` images per prompt from the baseline;
5. ``score``: every image scored by the reward (``selection=random``: by the ``random`` scorer: the ablation);
6. ``select``: the best image per prompt (and, with ``select.worst``, the worst with the special token), as many
   regularization pictures; the internal prompts held out (``internal.jsonl``);
7. ``finetune``: U-Net and text encoder fine-tuned on that set (Ray Train, DeepSpeed ZeRO-2);
8. ``evaluate``: baseline vs fine-tuned on the internal and general prompts under the six metrics:
   Tables 5-6 with bootstrap intervals, the grids (``<out>/eval``).

The summary (and ``<out>/closed_loop.json``) holds every stage's seconds and the headline: the fine-tuned
model's Social Reward win-rate over the baseline on each prompt set, with its interval.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import pyarrow.dataset as pads

from sr_ray.core import identity, storage
from sr_ray.core.config import ConfigError, load_config, preset_path, to_dict
from sr_ray.demo.community import draw_prompts
from sr_ray.demo.data import ensure_demo_regularization
from sr_ray.demo.prompts import demo_prompt_sets
from sr_ray.diffusion import finetune as sd_finetune
from sr_ray.diffusion import generate as sd_generate
from sr_ray.diffusion.components import TINY_PRETRAINED, prepare_model
from sr_ray.diffusion.finetune import FinetuneSDConfig
from sr_ray.diffusion.generate import GenComputeConfig, GenerateConfig, SamplingConfig
from sr_ray.diffusion.tiny import tiny_generator_file
from sr_ray.eval import t2i
from sr_ray.eval.t2i import EvaluateT2IConfig
from sr_ray.generations import score as batch_score
from sr_ray.generations import select
from sr_ray.generations.score import ScoreConfig
from sr_ray.generations.select import SelectConfig

log = logging.getLogger(__name__)

NO_TOKEN = "finetuned-no-token"
"""The fine-tuned model evaluated without the special token as negative prompt."""
SELECTIONS = {"reward": "social_reward", "random": "random"}
"""How the fine-tune set is chosen -> the scorer that ranks the baseline's images."""


def _preset(cls, job: str):
    return load_config(cls, preset_path(job, "demo"))


@dataclass
class ClosedLoopConfig:
    out: str = "./runs/closed-loop"
    generator: str = "tiny-pretrained"
    """The baseline generator: tiny-pretrained (built in code, pre-trained once per machine), a diffusers
    directory or a hub id."""
    reward_checkpoint: str | None = None
    """The reward model that ranks the generations and scores the evaluation; none (the job, not this function):
    the training job's demo run (the simulated community's curated triplets), trained first when it is absent."""
    selection: str = "reward"
    """reward: the best and worst image per prompt by the reward (the paper); random: by a random score (the
    ablation: fine-tuning on the generator's own images with no reward behind the choice)."""
    train_prompts: int = 96
    """Community prompts whose best and worst images make the fine-tune set."""
    internal_prompts: int = 48
    """Community prompts held out of the fine-tune set (the paper's internal evaluation prompts)."""
    general_prompts: int = 48
    """Prompts of the demo's general set (another phrasing)."""
    images_per_prompt: int = 8
    """Baseline images per training prompt, among which the reward picks."""
    seed: int = 0
    """Seed of the prompts, the sampling noise, the selection and the fine-tune."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(images_per_prompt=8, steps=10))
    """How the baseline draws the images to select from (``images_per_prompt`` above wins)."""
    generation: GenComputeConfig = field(default_factory=lambda: GenComputeConfig(batch_size=32, prompts_per_shard=16))
    select: SelectConfig = field(default_factory=lambda: _preset(SelectConfig, "select_pairs"))
    """The selection (scores, regularization, out, val_prompts and seed are set by the loop); ``select.worst=false``:
    the best images only, and the fine-tuned model is sampled without the token (nothing taught it)."""
    finetune: FinetuneSDConfig = field(default_factory=lambda: _preset(FinetuneSDConfig, "finetune_sd"))
    """The fine-tune (model, data.train, run.name and run.storage_path are set by the loop)."""
    evaluate: EvaluateT2IConfig = field(default_factory=lambda: _preset(EvaluateT2IConfig, "evaluate_t2i"))
    """The evaluation (baseline, finetuned, prompts, out and the reward checkpoint are set by the loop)."""
    also_without_token: bool = True
    """Evaluate the fine-tuned model a second time without the special token as negative prompt (model
    ``finetuned-no-token``), beside the paper's way (``finetuned``: the token as negative prompt); only when the
    fine-tune set has worst rows (``select.worst``)."""
    regularization: str | None = None
    """Regularization pictures (caption + image); none: the demo's generic set."""
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r}: one of {sorted(SELECTIONS)}")
        if min(self.train_prompts, self.internal_prompts, self.images_per_prompt) < 1 or self.general_prompts < 0:
            raise ValueError("train_prompts, internal_prompts and images_per_prompt must be >= 1, "
                             "general_prompts >= 0")
        if self.images_per_prompt < 2:
            raise ValueError("images_per_prompt must be >= 2: the best and the worst are two images")


def split_prompts(cfg: ClosedLoopConfig, share: float, exclude: set[str]) -> tuple[list[str], list[str]]:
    """(training prompts, internal prompts): new community prompts, each on the side select_pairs will put it
    (a seeded hash of the prompt), until both counts are reached; prompts in ``exclude`` are skipped."""
    sides: dict[bool, list[str]] = {False: [], True: []}
    wanted = {False: cfg.train_prompts, True: cfg.internal_prompts}
    seen = set(exclude)
    for p in draw_prompts(cfg.seed):
        held = select.held_out(cfg.seed, p, share)
        if p not in seen and len(sides[held]) < wanted[held]:
            sides[held].append(p)
        seen.add(p)
        if all(len(sides[k]) == wanted[k] for k in sides):
            break
    return sides[False], sides[True]


def reward_train_prompts(checkpoint: str) -> set[str]:
    """The prompts the reward model trained on (its run's train split), when they can be found: the loop's
    prompts avoid them, so the reward ranks images of prompts it has never seen."""
    summary = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "summary.json")
    try:
        with open(summary) as f:
            train = json.load(f)["splits"]["train"]
        return set(pads.dataset(train, format="parquet").to_table(columns=["prompt"]).column("prompt").to_pylist())
    except (OSError, KeyError, ValueError, TypeError):
        return set()


def write_prompts(cfg: ClosedLoopConfig, share: float, checkpoint: str) -> dict[str, str]:
    """``<out>/prompts/community.txt`` (training + internal prompts) and ``general.txt``; {name: file}."""
    folder = os.path.join(cfg.out, "prompts")
    os.makedirs(folder, exist_ok=True)
    train, internal = split_prompts(cfg, share, reward_train_prompts(checkpoint))
    files = {"community": os.path.join(folder, "community.txt"), "general": os.path.join(folder, "general.txt")}
    order = [p for p in itertools.chain.from_iterable(itertools.zip_longest(train, internal)) if p]
    general = demo_prompt_sets(n=cfg.general_prompts, seed=cfg.seed)["general"] if cfg.general_prompts else []
    for name, prompts in (("community", order), ("general", general)):
        with open(files[name], "w") as f:
            f.write("\n".join(prompts) + "\n")
    return files


def generate_stage(cfg: ClosedLoopConfig, prompts: str) -> str:
    """The baseline's ``images_per_prompt`` images per community prompt (resumes by shard)."""
    out = os.path.join(cfg.out, "generations")
    sampling = replace(cfg.sampling, images_per_prompt=cfg.images_per_prompt, seed=cfg.seed, negative_for=[])
    sd_generate.generate(GenerateConfig(models={"baseline": cfg.generator}, prompts=[prompts], sampling=sampling,
                                        compute=cfg.generation, out=out, ray_address=cfg.ray_address))
    return os.path.join(out, "baseline")


def score_stage(cfg: ClosedLoopConfig, generations: str, checkpoint: str) -> str:
    out = os.path.join(cfg.out, "scores")
    if not storage.exists(os.path.join(out, "_summary.json")):
        sc = _preset(ScoreConfig, "score_generations")
        batch_score.score_generations(replace(sc, generations=generations, checkpoint=checkpoint, out=out,
                                              scorer=SELECTIONS[cfg.selection], ray_address=cfg.ray_address))
    return out


def select_stage(cfg: ClosedLoopConfig, scores: str, share: float) -> str:
    out = os.path.join(cfg.out, "finetune-set")
    sel = cfg.select
    reg = cfg.regularization or ensure_demo_regularization(sel.demo)
    select.select_pairs(replace(sel, scores=scores, regularization=reg, out=out, val_prompts=share, seed=cfg.seed,
                                ray_address=cfg.ray_address))
    return out


def finetune_stage(cfg: ClosedLoopConfig, fset: str) -> str:
    """The fine-tuning run's folder (``<out>/finetuned``), its pipeline written at the end."""
    run = os.path.join(os.path.abspath(cfg.out), "finetuned")
    if storage.exists(os.path.join(run, "pipeline", "model_index.json")):
        return run
    ft = cfg.finetune
    ft = replace(ft, model=replace(ft.model, name=cfg.generator), data=replace(ft.data, train=os.path.abspath(fset)),
                 optim=replace(ft.optim, seed=cfg.seed),
                 run=replace(ft.run, name="finetuned", storage_path=os.path.abspath(cfg.out),
                             ray_address=cfg.ray_address))
    sd_finetune.finetune_sd(ft)
    return run


def evaluate_stage(cfg: ClosedLoopConfig, run: str, general: str, checkpoint: str) -> dict[str, Any]:
    ev = cfg.evaluate
    token = cfg.select.worst  # without worst rows the token means nothing to the fine-tuned model
    more = {NO_TOKEN: run} if cfg.also_without_token and token else {}
    ev = replace(ev, baseline=cfg.generator, finetuned=run, models={**ev.models, **more},
                 prompts=[general] if cfg.general_prompts else [],
                 max_prompts=0, finetune_demo=False, out=os.path.join(cfg.out, "eval"), ray_address=cfg.ray_address,
                 sampling=replace(ev.sampling, seed=cfg.seed + 1,
                                  negative_for=[m for m in ev.sampling.negative_for if m != NO_TOKEN and token]),
                 social_reward=replace(ev.social_reward, checkpoint=checkpoint))
    return t2i.evaluate_t2i(ev)


def _timed(times: dict[str, float], name: str, fn: Callable, *args):
    t = time.perf_counter()
    out = fn(*args)
    times[name] = round(time.perf_counter() - t, 1)
    log.info("[closed loop] %s done in %.1fs", name, times[name])
    return out


def headline(ev: dict[str, Any]) -> dict[str, Any]:
    """{"<prompt set>/<model>": [win-rate, low, high]} of each fine-tuned model's Social Reward over the
    baseline's."""
    return {k.rsplit("/", 1)[0]: v for k, v in ev.get("win_rates", {}).items() if k.endswith("/social_reward")}


LOOP_RECORD = "_closed_loop.json"
OPERATIONAL = ("out", "ray_address", "generation.", "finetune.scaling.", "finetune.run.log_every_steps",
               "evaluate.generation.", "evaluate.scoring.", "evaluate.grid_prompts")
"""Keys a re-run into the same ``out`` may change (the folder itself, where and how fast it runs, how it
reports)."""


def check_out(cfg: ClosedLoopConfig) -> None:
    """Record what ``out`` is made from; a re-run with other settings (whose finished stages would be reused) is
    refused, naming the keys."""
    keys = {k: v for k, v in identity.flatten(to_dict(cfg)).items() if not k.startswith(OPERATIONAL)}
    if cfg.generator == TINY_PRETRAINED:  # the built-in's weights change with its recipe, its name does not
        keys["generator_weights"] = tiny_generator_file().name
    uri = os.path.join(cfg.out, LOOP_RECORD)
    old = identity.read_record(uri)
    if old is None:
        identity.write_record(uri, keys)
        return
    changed = identity.differing_keys(old, keys)
    if changed:
        raise ConfigError(f"out={cfg.out} holds a closed loop run with other settings ({identity.describe(changed)}"
                          f"); its finished stages would be reused: give another out, or delete it")


def prepare_generator(cfg: ClosedLoopConfig, times: dict[str, float]) -> None:
    """Fit (once per machine) what the built-in generator needs, timed as "generator" unless done before."""
    if "generator" not in times:
        _timed(times, "generator", prepare_model, cfg.generator)


def finetuned_run(cfg: ClosedLoopConfig, times: dict[str, float]) -> tuple[str, dict[str, str]]:
    """Stages 1 and 3-7 (see the module; 2, the reward, is given): (the fine-tuning run's folder, the prompt
    files); their seconds in ``times``."""
    if not cfg.reward_checkpoint:
        raise ConfigError("reward_checkpoint: required (a reward run's checkpoint that ranks the generations); the "
                          "job (sr-ray closed_loop) trains the community's when none is given")
    if storage.is_s3(cfg.out):
        raise ConfigError("out: the closed loop keeps its stages in a local folder (each stage alone takes s3://)")
    check_out(cfg)
    share = cfg.internal_prompts / (cfg.internal_prompts + cfg.train_prompts)
    prepare_generator(cfg, times)
    files = _timed(times, "prompts", write_prompts, cfg, share, cfg.reward_checkpoint)
    gens = _timed(times, "generate", generate_stage, cfg, files["community"])
    scores = _timed(times, "score", score_stage, cfg, gens, cfg.reward_checkpoint)
    fset = _timed(times, "select", select_stage, cfg, scores, share)
    return _timed(times, "finetune", finetune_stage, cfg, fset), files


def closed_loop(cfg: ClosedLoopConfig, times: dict[str, float] | None = None) -> dict[str, Any]:
    """Run (or resume) every stage; returns the JSON summary (also ``<out>/closed_loop.json``). ``times``: the
    seconds of stages run before (the job's generator and reward), counted in ``wall_s``."""
    t0, times = time.perf_counter(), dict(times or {})
    before = sum(times.values())
    run, files = finetuned_run(cfg, times)
    ev = _timed(times, "evaluate", evaluate_stage, cfg, run, files["general"], cfg.reward_checkpoint)
    summary = {"out": os.path.abspath(cfg.out), "selection": cfg.selection, "generator": cfg.generator,
               "reward_checkpoint": cfg.reward_checkpoint,
               "prompts": {"train": cfg.train_prompts, "internal": cfg.internal_prompts,
                           "general": cfg.general_prompts},
               "social_reward_win_rate": headline(ev), "table5": ev["table5"], "win_rates": ev["win_rates"],
               "grids": ev["grids"], "stage_s": times,
               "wall_s": round(time.perf_counter() - t0 + before, 1)}
    storage.write_bytes(os.path.join(cfg.out, "closed_loop.json"), json.dumps(summary, indent=1).encode())
    return summary
