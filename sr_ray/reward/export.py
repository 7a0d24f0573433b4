"""Export a reward checkpoint as a self-contained open_clip model folder (open_clip's Hugging Face hub layout),
which plain open_clip, sr-ray's ``RewardScorer`` and the Hub all load:

    <out>/open_clip_model.safetensors   every weight of the CLIP (not only the trained ones)
    <out>/open_clip_config.json         {"model_cfg": the architecture, "preprocess_cfg": the image preprocessing}
    <out>/README.md                     the model card (base model, data, trained blocks, loss, accuracy, score)
    <out>/sr_ray_reward.json            sr-ray's record: the score's meaning, the generator's special token, the run

    sr-ray export checkpoint=runs/sr-reward-demo out=exported/sr-reward [push_to_hub=org/name]

``checkpoint`` is a checkpoint folder (``model.pt``) or a training run folder (its ``summary.json`` names the
best checkpoint), local or ``s3://``. The export is loaded back (weights compared) before it is reported done.
Load it with ``open_clip.create_model_and_transforms("local-dir:<out>")`` (or ``"hf-hub:org/name"`` once
pushed); the reward is the cosine of the normalised text and image embeddings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import yaml

from sr_ray.core import special_token, storage
from sr_ray.core.errors import ConfigError
from sr_ray.reward.model import ModelConfig, preprocess_cfg
from sr_ray.reward.score import EXPORT_CONFIG, EXPORT_WEIGHTS, MODEL_FILE, load_model, run_checkpoint

log = logging.getLogger(__name__)

WEIGHTS_FILE = EXPORT_WEIGHTS
CONFIG_FILE = EXPORT_CONFIG
RECORD_FILE = "sr_ray_reward.json"


@dataclass
class ExportConfig:
    checkpoint: str | None = None
    """A reward checkpoint folder (model.pt) or a training run folder (its summary.json's best checkpoint)."""
    out: str | None = None
    """The folder to write (local)."""
    push_to_hub: str | None = None
    """A Hugging Face repo id (org/name) to upload the folder to; the token comes from HF_TOKEN or huggingface-cli
    login, never from a config."""
    private: bool = True
    """A new Hub repo is private unless set false."""
    license: str = "apache-2.0"
    """The card's license field (the base model's license binds too)."""
    overwrite: bool = False


def resolve_checkpoint(uri: str) -> tuple[str, str | None]:
    """(checkpoint folder, its run folder or None) for a checkpoint folder or a run folder."""
    best = run_checkpoint(uri)
    if best != uri:  # a run: its summary's best checkpoint
        if storage.exists(storage.join(best, MODEL_FILE)):
            return best, uri
        raise ConfigError(f"checkpoint={storage.redact(uri)}: its summary.json names no checkpoint that exists "
                          f"({best!r})")
    if storage.exists(storage.join(uri, MODEL_FILE)):
        parent = uri.rstrip("/").rsplit("/", 1)[0]
        return uri, parent if storage.exists(storage.join(parent, "summary.json")) else None
    raise ConfigError(f"checkpoint={storage.redact(uri)}: neither a reward checkpoint ({MODEL_FILE}) nor a "
                      f"training run (summary.json naming its checkpoint)")


def open_clip_config(cfg: ModelConfig) -> dict[str, Any]:
    """open_clip's hub config for the architecture: ``model_cfg`` and ``preprocess_cfg``."""
    if cfg.name.startswith("local-dir:"):
        with open(Path(cfg.name[len("local-dir:"):]) / CONFIG_FILE) as f:
            model_cfg = json.load(f)["model_cfg"]
    else:
        model_cfg = open_clip.get_model_config(cfg.name)
    if model_cfg is None:
        raise ConfigError(f"model {cfg.name!r}: no open_clip config to export")
    pcfg = preprocess_cfg(cfg)
    return {"model_cfg": model_cfg, "preprocess_cfg": {k: (list(v) if isinstance(v, tuple) else v)
                                                       for k, v in pcfg.items()}}


def wilson(p: float | None, n: int | None, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson 95% interval of a proportion p over n trials."""
    if p is None or not n:
        return None
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def run_facts(run: str | None) -> dict[str, Any]:
    """What the card says about the training run: its summary and config, when there is one."""
    if run is None:
        return {}
    facts: dict[str, Any] = {"summary": json.loads(storage.read_bytes(storage.join(run, "summary.json")))}
    cfg_uri = storage.join(run, "config.yaml")
    if storage.exists(cfg_uri):
        facts["config"] = yaml.safe_load(storage.read_bytes(cfg_uri))
    return facts


def _accuracy_line(name: str, acc: float | None, n: int | None) -> str:
    if acc is None:
        return f"| {name} | — | — |"
    ci = wilson(acc, n)
    shown = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "—"
    return f"| {name} | {acc:.3f} {shown} | {n or '—'} |"


def model_card(cfg: ModelConfig, facts: dict[str, Any], license_id: str, repo: str | None) -> str:
    """The README.md of the export (Hugging Face model-card front matter + the facts a user needs)."""
    s, c = facts.get("summary", {}), facts.get("config", {})
    loss = c.get("loss", {}) or {"name": s.get("loss")}
    name = repo or "this folder"
    blocks = {"vision": cfg.unfreeze_vision_blocks, "text": cfg.unfreeze_text_blocks}
    shown_blocks = ", ".join(f"{k}: {'all' if v == -1 else f'last {v}'}" for k, v in blocks.items())
    lines = [
        "---", f"license: {license_id}", "library_name: open_clip", "pipeline_tag: zero-shot-image-classification",
        "tags: [reward-model, text-to-image, social-reward, sr-ray]", "---", "",
        "# Social Reward model (sr-ray export)", "",
        "A reward model for text-to-image generation after *Social Reward* (Isajanyan et al., 2024): CLIP fine-tuned "
        "on (prompt, popular image, unpopular image) triplets of a creative community's implicit feedback "
        "(an image users remix is popular).", "",
        "## Use", "", "```python", "import open_clip, torch",
        f"model, _, preprocess = open_clip.create_model_and_transforms('{('hf-hub:' + repo) if repo else 'local-dir:<this folder>'}')",
        f"tokenizer = open_clip.get_tokenizer('{('hf-hub:' + repo) if repo else 'local-dir:<this folder>'}')",
        "with torch.no_grad():",
        "    t = torch.nn.functional.normalize(model.encode_text(tokenizer([prompt])), dim=-1)",
        "    i = torch.nn.functional.normalize(model.encode_image(preprocess(image).unsqueeze(0)), dim=-1)",
        "score = (t * i).sum(-1)  # the reward", "```", "",
        f"or `sr_ray.reward.score.RewardScorer('{name}').score(prompt, images)`.", "",
        "**The score** is the cosine similarity of the L2-normalised prompt and image embeddings, in [-1, 1]. Higher "
        "means the community is more likely to remix (find popular) the image for that prompt. Compare scores of "
        "images for the *same* prompt (best-of-N, pairwise preference): their absolute level varies by prompt.", "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| base model | `{cfg.name}`" + (f", weights `{cfg.pretrained}`" if cfg.pretrained else ", random init") + " |",
        f"| trained blocks | {shown_blocks}; image projection trained: {cfg.train_image_projection} |",
        f"| loss | {loss.get('name')}" + (f", margin {loss['margin']}" if loss.get("name") == "triplet" else "") + " |",
        f"| data | {s.get('train_triplets', '—')} training triplets"
        + "".join(f"; {k}: `{v}`" for k, v in (s.get("splits") or {}).items() if v) + " |",
        "| data rules | the paper's curation (sec. 3): positives are the top 1% of images by remixes-per-view "
        "plus influencer remixes, negatives images seen more than the 99th percentile of views-before-first-remix "
        "and never remixed; split 70/10/20 by prompt; NSFW dropped |",
        f"| steps | {s.get('steps', '—')} (best: {s.get('best_step', '—')}) |", "",
        "## Pairwise accuracy", "", "share of (prompt, popular, unpopular) triplets where the popular image scores "
        "higher; ties count 1/2; 95% Wilson interval over triplets (triplets of one prompt are not independent, "
        "so the prompt-bootstrap interval of `jobs/compare_rewards.py` is wider)", "",
        "| split | accuracy [95% CI] | triplets |", "|---|---|---|",
        _accuracy_line("val", s.get("val_pairwise_accuracy"), None),
        _accuracy_line("test", s.get("test_pairwise_accuracy"), s.get("test_triplets")), "",
        "## For generator fine-tuning", "",
        f"The paper fine-tunes Stable Diffusion on each prompt's best and worst image by this reward, the worst "
        f"with the special token `{special_token.DEFAULT}` appended; generate with it as the negative prompt.", "",
    ]
    return "\n".join(lines)


def write_export(model, cfg: ModelConfig, out: Path, facts: dict[str, Any], ecfg: ExportConfig) -> None:
    """The four files of the export (see the module doc)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.clip.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "producer": "sr-ray"})
    os.chmod(out / WEIGHTS_FILE, 0o644)  # safetensors writes 0600; a model folder is meant to be shared
    (out / CONFIG_FILE).write_text(json.dumps(open_clip_config(cfg), indent=2) + "\n")
    (out / "README.md").write_text(model_card(cfg, facts, ecfg.license, ecfg.push_to_hub))
    s = facts.get("summary", {})
    record = {"score": "cosine(text, image) of L2-normalised embeddings, in [-1, 1]; higher = more popular",
              "special_token": special_token.DEFAULT, "base_model": {"name": cfg.name, "pretrained": cfg.pretrained},
              "model_config": cfg.__dict__, "source_checkpoint": storage.redact(ecfg.checkpoint or ""),
              "val_pairwise_accuracy": s.get("val_pairwise_accuracy"),
              "test_pairwise_accuracy": s.get("test_pairwise_accuracy"), "test_triplets": s.get("test_triplets")}
    (out / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")


def check_export(model, out: Path) -> float:
    """Plain open_clip loads the folder; the largest weight difference to the source model (0 expected)."""
    loaded = open_clip.create_model(f"local-dir:{out}")
    ref = model.clip.state_dict()
    worst = 0.0
    for k, v in loaded.state_dict().items():
        worst = max(worst, float((v.float() - ref[k].float().cpu()).abs().max()) if v.numel() else 0.0)
    if set(loaded.state_dict()) != set(ref):
        raise RuntimeError(f"{out}: open_clip built other weights than the checkpoint's")
    return worst


def push(out: Path, repo: str, private: bool) -> str:
    """Upload the folder to the Hugging Face Hub (token: HF_TOKEN or the cached login)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(out), repo_id=repo, commit_message="sr-ray export")
    return str(getattr(info, "commit_url", info))


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Write (and check, and optionally push) the export; returns the JSON summary."""
    t0 = time.perf_counter()
    if not cfg.checkpoint or not cfg.out:
        raise ConfigError("checkpoint and out are required: sr-ray export checkpoint=<run or checkpoint> out=<dir>")
    if storage.is_s3(cfg.out):
        raise ConfigError("out: write the export to a local folder (push_to_hub uploads it)")
    out = Path(os.path.expanduser(cfg.out))
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"out={out} is not empty (overwrite=true replaces its files)")
    ckpt, run = resolve_checkpoint(cfg.checkpoint)
    model, mcfg = load_model(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    write_export(model, mcfg, out, run_facts(run), cfg)
    diff = check_export(model, out)
    if diff > 0:
        raise RuntimeError(f"{out}: the exported weights differ from the checkpoint's by {diff}")
    summary = {"out": str(out), "checkpoint": storage.redact(ckpt), "run": storage.redact(run) if run else None,
               "files": sorted(p.name for p in out.iterdir()), "params": sum(v.numel() for v in model.parameters()),
               "weights_bytes": (out / WEIGHTS_FILE).stat().st_size, "max_weight_difference": diff,
               "hub": push(out, cfg.push_to_hub, cfg.private) if cfg.push_to_hub else None,
               "wall_s": round(time.perf_counter() - t0, 1)}
    log.info("[export] %s -> %s (%d params); open_clip loads it back with identical weights", ckpt, out,
             summary["params"])
    return summary
