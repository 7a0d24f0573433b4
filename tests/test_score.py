"""Scoring API and CLI on a checkpoint saved from a tiny model."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from sr_ray.core.images import COLOURS, draw, encode_png
from sr_ray.reward.model import ModelConfig, RewardModel, build_clip, image_transform, preprocess_cfg, tokenizer
from sr_ray.reward.score import RewardScorer, load_model, save_model


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig(name="sr-tiny")
    model = RewardModel(build_clip(cfg))
    save_model(tmp_path, model, cfg)
    return tmp_path, model, cfg


def test_score_matches_the_model(checkpoint, tmp_path):
    path, model, cfg = checkpoint
    rng = np.random.default_rng(0)
    imgs = [draw(c, "circle", rng) for c in list(COLOURS)[:3]]
    files = []
    for i, im in enumerate(imgs):
        f = tmp_path / f"{i}.png"
        im.save(f)
        files.append(str(f))
    prompts = ["a red cat", "a green cat", "a red cat"]
    got = RewardScorer(str(path), device="cpu", batch_size=2).score(prompts, [files[0], encode_png(imgs[1]), imgs[2]])
    tf, tok = image_transform(preprocess_cfg(cfg)), tokenizer(cfg)
    model.eval()
    with torch.no_grad():
        t = model.encode_text(tok(prompts))
        i = model.encode_image(torch.stack([tf(im) for im in imgs]))
    assert np.allclose(got, RewardModel.score(t, i).numpy(), atol=1e-5)


def test_load_model_round_trip(checkpoint):
    path, model, cfg = checkpoint
    loaded, lcfg = load_model(str(path))
    assert lcfg == cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_cli_prints_one_score_per_image(checkpoint, tmp_path):
    path, _, _ = checkpoint
    rng = np.random.default_rng(0)
    files = []
    for i, c in enumerate(["red", "blue"]):
        f = tmp_path / f"{c}.png"
        draw(c, "square", rng).save(f)
        files.append(str(f))
    out = subprocess.run([sys.executable, "-m", "sr_ray", "score", "--checkpoint", str(path), "--prompt",
                          "a red kite", *files], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("red.png") and lines[1].endswith("blue.png")
    assert all(-1.0 <= float(line.split()[0]) <= 1.0 for line in lines)
    bad = subprocess.run([sys.executable, "-m", "sr_ray", "score", "--checkpoint", str(tmp_path / "none"),
                          "--prompt", "x", files[0]], capture_output=True, text=True)
    assert bad.returncode == 2 and "not an sr-ray reward checkpoint" in bad.stderr
