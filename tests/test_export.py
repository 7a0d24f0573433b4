"""Export: an open_clip / Hugging Face model folder that plain open_clip and RewardScorer load with the same
scores, from a checkpoint or a run; and no arbitrary-pickle loading anywhere in sr-ray."""

import ast
import json
import shutil
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from conftest import ROOT
from PIL import Image

from sr_ray.core import storage
from sr_ray.core.config import ConfigError
from sr_ray.reward.export import CONFIG_FILE, WEIGHTS_FILE, ExportConfig, export, wilson
from sr_ray.reward.score import RewardScorer


def pictures(n: int = 6):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def open_clip_scores(folder, prompts, imgs) -> np.ndarray:
    """The reward as a user computes it with plain open_clip and nothing of sr-ray."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tok = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        t = torch.nn.functional.normalize(model.encode_text(tok(prompts)), dim=-1)
        i = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(x) for x in imgs])), dim=-1)
    return (t * i).sum(-1).numpy()


def fake_run(tmp_path, checkpoint) -> str:
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "checkpoint_000003")
    (run / "summary.json").write_text(json.dumps({
        "checkpoint": str(run / "checkpoint_000003"), "val_pairwise_accuracy": 0.7, "test_pairwise_accuracy": 0.69,
        "test_triplets": 1000, "train_triplets": 5000, "loss": "triplet", "steps": 40, "best_step": 30}))
    (run / "config.yaml").write_text("loss:\n  name: triplet\n  margin: 0.3\n")
    return str(run)


def test_open_clip_and_reward_scorer_load_the_export_with_the_same_scores(tmp_path, checkpoint, s3_bucket):
    run = fake_run(tmp_path, checkpoint)
    out = tmp_path / "export"
    s = export(ExportConfig(checkpoint=run, out=str(out)))  # a run folder: its summary's checkpoint
    assert s["checkpoint"].endswith("checkpoint_000003") and s["max_weight_difference"] == 0.0
    assert set(s["files"]) == {WEIGHTS_FILE, CONFIG_FILE, "README.md", "sr_ray_reward.json"}
    from safetensors.torch import load_file

    ref = RewardScorer(checkpoint, device="cpu")
    weights = load_file(str(out / WEIGHTS_FILE))
    assert set(weights) == set(ref.model.clip.state_dict())  # every weight, not only the trained ones
    prompts = ["a red cat", "a blue house", "a red cat", "a green tree", "a red cat", "x"]
    imgs = pictures()
    expected = ref.score(prompts, imgs)
    assert open_clip_scores(out, prompts, imgs) == pytest.approx(expected, abs=1e-5)
    assert RewardScorer(str(out), device="cpu").score(prompts, imgs) == pytest.approx(expected, abs=1e-6)
    card = (out / "README.md").read_text()
    assert "library_name: open_clip" in card and "license: apache-2.0" in card and "t@y quality" in card
    lo, hi = wilson(0.69, 1000)
    assert f"0.690 [{lo:.3f}, {hi:.3f}]" in card and "triplet, margin 0.3" in card and "cosine similarity" in card
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["model_cfg"] == open_clip.get_model_config("sr-tiny") and cfg["preprocess_cfg"]["size"] == 32
    for f in out.iterdir():  # the folder on S3 loads too
        storage.write_bytes(f"s3://{s3_bucket}/export/{f.name}", f.read_bytes())
    assert RewardScorer(f"s3://{s3_bucket}/export", device="cpu").score(prompts, imgs) == pytest.approx(expected, abs=1e-6)


def test_export_from_a_checkpoint_and_its_refusals(tmp_path, checkpoint):
    out = tmp_path / "e"
    r = subprocess.run([sys.executable, "jobs/export.py", f"checkpoint={checkpoint}", f"out={out}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["run"] is None and s["hub"] is None and s["params"] > 0 and (out / "README.md").is_file()
    with pytest.raises(ConfigError, match="is not empty"):
        export(ExportConfig(checkpoint=checkpoint, out=str(out)))
    assert export(ExportConfig(checkpoint=checkpoint, out=str(out), overwrite=True))["max_weight_difference"] == 0.0
    with pytest.raises(ConfigError, match="neither a reward checkpoint"):
        export(ExportConfig(checkpoint=str(tmp_path), out=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match="checkpoint and out are required"):
        export(ExportConfig(checkpoint=checkpoint))


def unsafe_loads(source: str) -> list[str]:
    """Calls that may unpickle arbitrary objects: torch.load without weights_only=True, pickle/dill/cloudpickle
    loads, and numpy/pandas loaders with allow_pickle=True or read_pickle."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
        if owner == "torch" and node.func.attr == "load" and not safe:
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if owner in ("pickle", "dill", "cloudpickle", "joblib") and node.func.attr in ("load", "loads"):
            found.append(f"line {node.lineno}: {owner}.{node.func.attr}")
        if node.func.attr == "read_pickle":
            found.append(f"line {node.lineno}: read_pickle")
        if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is True:
            found.append(f"line {node.lineno}: allow_pickle=True")
    return found


def test_no_arbitrary_pickle_is_loaded_anywhere():
    found = [f"{f.relative_to(ROOT)} {w}" for f in sorted([*(ROOT / "sr_ray").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")])
             for w in unsafe_loads(f.read_text())]
    assert not found, found
    # the check itself catches what it should
    assert unsafe_loads("torch.load(Path(d) / 'x', map_location='cpu')") == ["line 1: torch.load without weights_only=True"]
    assert unsafe_loads("torch.load(f, weights_only=False)") and unsafe_loads("pickle.loads(b)")
    assert unsafe_loads("np.load(f, allow_pickle=True)") and not unsafe_loads("torch.load(f, weights_only=True)")
