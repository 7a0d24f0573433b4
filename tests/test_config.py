"""Config: defaults -> YAML -> dotted overrides; unknown keys fail before Ray starts."""

from pathlib import Path

import pytest

from sr_ray.app.registry import JOBS, resolve
from sr_ray.core.config import PRESET_DIR, ConfigError, load_config, preset_path, to_dict
from sr_ray.reward.train import TrainRewardConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(PRESET_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(PRESET_DIR)))
def test_every_shipped_preset_loads_with_its_jobs_config(path):
    from sr_ray.reward.tune import TuneRewardConfig, check_search

    cls, fn, _ = resolve(path.parent.name)  # a preset folder is named after a registered job
    cfg = load_config(cls, path)
    assert to_dict(cfg) and callable(fn)
    if cls is TuneRewardConfig:
        check_search(cfg)  # every swept key and value is a valid training setting


def test_every_job_resolves_and_its_script_runs_it():
    for name in JOBS:
        cls, fn, table = resolve(name)
        assert cls.__name__.endswith("Config") and callable(fn), name
        script = (ROOT / "jobs" / f"{name}.py").read_text()
        assert f'run("{name}", argv, __doc__)' in script, name


def test_a_preset_composes_another_with_its_own_keys_over_it(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("train:\n  preset: train_reward/paper\n  optim: {lr: 1.0e-4}\nname: mine\n")
    from sr_ray.reward.tune import TuneRewardConfig

    cfg = load_config(TuneRewardConfig, f)
    paper = load_config(TrainRewardConfig, preset_path("train_reward", "paper"))
    assert cfg.train.optim.lr == 1e-4 and cfg.name == "mine"
    cfg.train.optim.lr = paper.optim.lr
    assert to_dict(cfg.train) == to_dict(paper)  # the rest is the preset's
    f.write_text("train:\n  preset: train_reward/nosuch\n")
    with pytest.raises(ConfigError, match=r"no preset 'nosuch' for train_reward \(presets: \['demo', 'paper', "
                                          r"'recommended'\]\)"):
        load_config(TuneRewardConfig, f)
    f.write_text("train:\n  preset: paper\n")
    with pytest.raises(ConfigError, match="preset: 'paper' is not of the form <job>/<name>"):
        load_config(TuneRewardConfig, f)


def test_config_takes_a_presets_name_and_the_cli_lists_jobs(capsys):
    import subprocess
    import sys

    from sr_ray.app.cli import parse_job_args

    cfg = parse_job_args(TrainRewardConfig, ["--config", "paper", "optim.epochs=2"], None, "", "train_reward")
    assert cfg.model.name == "ViT-L-14-quickgelu" and cfg.optim.epochs == 2
    with pytest.raises(SystemExit) as e:
        parse_job_args(TrainRewardConfig, ["--config", "papr"], None, "", "train_reward")
    assert e.value.code == 2 and "no preset 'papr' for train_reward" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "sr_ray", "jobs"], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in JOBS) and "[presets: demo, paper, recommended]" in out
    bad = subprocess.run([sys.executable, "-m", "sr_ray", "trian_reward"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no job 'trian_reward'" in bad.stderr


def test_paper_yaml_is_the_authors_recipe():
    """scripts/train.sh + src/train_pair_pos_neg.py of Picsart-AI-Research/Social-Reward (31ccd0e)."""
    import inspect

    import torch

    from sr_ray.reward.train import lr_factor, param_groups

    cfg = load_config(TrainRewardConfig, ROOT / "jobs/configs/train_reward/paper.yaml")
    assert (cfg.model.name, cfg.model.pretrained) == ("ViT-L-14-quickgelu", "openai")
    assert (cfg.model.unfreeze_vision_blocks, cfg.model.unfreeze_text_blocks) == (3, 2)
    assert cfg.model.train_image_projection is False
    assert (cfg.loss.name, cfg.loss.margin) == ("triplet", 0.3)
    assert (cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.lr) == (32, 10, 3e-5)
    # AdamW(params, lr=...) and nothing else: torch's defaults, one group, no schedule, no clipping, fp32
    defaults = {k: v.default for k, v in inspect.signature(torch.optim.AdamW).parameters.items()}
    assert tuple(cfg.optim.betas) == defaults["betas"] and cfg.optim.eps == defaults["eps"]
    assert cfg.optim.weight_decay == defaults["weight_decay"] == 0.01
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    assert len(param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_1d)) == 1
    assert [lr_factor(s, 1000, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio, cfg.optim.schedule)
            for s in (0, 500, 999)] == [1.0, 1.0, 1.0]
    assert cfg.optim.grad_clip == 0 and cfg.scaling.precision == "fp32"


def test_recommended_yaml_differs_from_the_paper_only_in_the_recipe():
    paper = to_dict(load_config(TrainRewardConfig, ROOT / "jobs/configs/train_reward/paper.yaml"))
    ours = to_dict(load_config(TrainRewardConfig, ROOT / "jobs/configs/train_reward/recommended.yaml"))
    assert ours["model"]["name"] == paper["model"]["name"] and ours["loss"] == paper["loss"]
    assert ours["data"] == paper["data"] and ours["optim"]["batch_size"] == 32
    assert ours["model"]["train_image_projection"] and ours["optim"]["schedule"] == "cosine"


def test_dotted_overrides_and_types():
    cfg = load_config(TrainRewardConfig, None, [
        "data.train=s3://b/triplets/train", "data.val=/x/val", "data.test=/x/test", "run.name=r1",
        "run.storage_path=s3://b/runs", "model.name=ViT-B-32", "optim.lr=3e-4", "optim.epochs=2",
        "scaling.use_gpu=true", "optim.betas=[0.9, 0.95]", "data.demo.train=10",
    ])
    assert cfg.data.train == "s3://b/triplets/train" and cfg.data.test == "/x/test"
    assert cfg.run.name == "r1" and cfg.run.storage_path == "s3://b/runs" and cfg.model.name == "ViT-B-32"
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 2 and cfg.scaling.use_gpu is True and cfg.optim.betas == [0.9, 0.95]
    assert cfg.data.demo.train == 10


@pytest.mark.parametrize("item,match", [
    ("optim.lrr=1", r"unknown config key optim.lrr \(did you mean optim.lr\?\)"),
    ("bogus.x=1", "unknown config key bogus"),
    ("optim.epochs=two", "optim.epochs: expected an integer"),
    ("scaling.use_gpu=maybe", "scaling.use_gpu: expected true/false"),
    ("loss.name=hinge", "loss.name='hinge' is not one of"),
    ("noequals", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(item, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainRewardConfig, None, [item])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  nmae: ViT-B-32\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key model.nmae \(did you mean model.name\?\)"):
        load_config(TrainRewardConfig, bad)


def test_job_rejects_unknown_key_before_ray_starts(monkeypatch, capsys):
    import sr_ray.reward.train
    from jobs import train_reward  # noqa: F401  (jobs/ is importable from the repo root)

    monkeypatch.setattr(sr_ray.reward.train, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises(SystemExit) as e:
        train_reward.main(["model.nmae=ViT-B-32"])
    assert e.value.code == 2
    assert "unknown config key model.nmae" in capsys.readouterr().err


def test_job_rejects_bad_data_uri_before_ray_starts(monkeypatch, tmp_path):
    import sr_ray.reward.train
    from jobs import train_reward

    monkeypatch.setattr(sr_ray.reward.train, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises(SystemExit) as e:
        train_reward.main([f"data.train={tmp_path}/nope", f"run.storage_path={tmp_path}"])
    assert "data.train=" in str(e.value.code) and "no such file or folder" in str(e.value.code)
