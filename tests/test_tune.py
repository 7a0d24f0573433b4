"""The Ray Tune sweep: config checks before Ray, a real sweep on 2 CPUs, ASHA stops, resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from sr_ray.app.defaults import tune_reward  # the job: fills in the demo splits
from sr_ray.core.config import ConfigError, load_config, to_dict
from sr_ray.reward.tune import TuneRewardConfig, check_search, concurrency

JOB = ROOT / "jobs" / "tune_reward.py"


def sweep_overrides(tmp_path: Path, demo_cache: str, name: str, lrs: list[float], epochs: int = 2,
                    train: int = 480) -> list[str]:
    """A small sweep over the learning rate of the tiny CLIP on synthetic demo triplets."""
    return [
        "train.data.demo.source=synthetic", f"train.data.demo.cache_dir={demo_cache}",
        f"train.data.demo.train={train}", "train.data.demo.val=96", "train.data.demo.test=96",
        "train.data.demo.rows_per_shard=160", f"train.optim.epochs={epochs}", "train.optim.warmup_steps=3",
        "train.run.log_every_steps=5", "train.scaling.max_failures=0",
        "search=" + json.dumps({"optim.lr": {"grid": lrs}}),
        f"storage_path={tmp_path / 'sweeps'}", f"name={name}", f"scheduler.max_t={epochs}",
    ]


def load_tune_config(overrides: list[str]) -> TuneRewardConfig:
    return load_config(TuneRewardConfig, JOB.parent / "configs" / "tune_reward" / "demo.yaml", overrides)


def no_ray(monkeypatch):
    import sr_ray.core.ray_utils

    monkeypatch.setattr(sr_ray.core.ray_utils, "init_ray", lambda *a, **k: pytest.fail("Ray was started"))


@pytest.mark.parametrize("search, message", [
    ({"loss.nme": {"grid": ["triplet"]}}, "loss.nme"),                      # unknown key
    ({"optim.lr": {"gird": [1e-3]}}, "search.optim.lr"),                    # unknown kind
    ({"loss.name": {"grid": ["triplet", "hinge"]}}, "hinge"),               # bad value
    ({"optim.lr": {"loguniform": [1e-4]}}, "[low, high]"),                  # malformed range
    ({"model.unfreeze_text_blocks": {"choice": ["two"]}}, "unfreeze_text_blocks"),  # wrong type
])
def test_bad_search_space_is_rejected_before_any_trial(monkeypatch, capsys, search, message):
    from jobs.tune_reward import main

    no_ray(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(["search=" + json.dumps(search)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "config error" in err and message in err, err


def test_concurrency_fits_the_cluster():
    cfg = load_tune_config([])  # demo: 0.25 CPU per trial + one 0.25-CPU worker, 1 CPU kept for Ray Data
    assert concurrency(cfg, {"CPU": 2.0}) == 2
    assert concurrency(cfg, {"CPU": 8.0}) == 14
    half = load_tune_config(["trial_cpus=0.5", "train.scaling.cpus_per_worker=0.5"])
    assert concurrency(half, {"CPU": 2.0}) == 1
    assert concurrency(load_tune_config(["max_concurrent_trials=3"]), {"CPU": 2.0}) == 3  # explicit: kept
    gpu = load_tune_config(["train.scaling.use_gpu=true", "train.scaling.num_workers=4", "trial_cpus=1",
                            "train.scaling.cpus_per_worker=4", "data_cpus=8"])
    assert concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 2  # GPUs bind before CPUs (64-8)/17 = 3
    with pytest.raises(ConfigError, match="no trial fits"):
        concurrency(half, {"CPU": 1.0})


def test_shipped_paper_sweep_is_table7_over_the_paper_training_job():
    from sr_ray.core.config import to_dict
    from sr_ray.reward.train import TrainRewardConfig

    sweep = load_config(TuneRewardConfig, JOB.parent / "configs" / "tune_reward" / "paper.yaml")
    check_search(sweep)
    assert sweep.search["loss.name"] == {"grid": ["triplet", "infonce", "supcon", "bce", "rce"]}
    train = to_dict(load_config(TrainRewardConfig, JOB.parent / "configs" / "train_reward" / "paper.yaml"))
    assert to_dict(sweep.train) == train  # the trials train exactly the paper's reward job


@pytest.mark.extended  # ~5 min on 2 cores: run by .ci/run after the default suite
def test_sweep_ranks_every_trial_and_asha_stops_the_hopeless(ray_cluster, tmp_path, demo_cache, capsys):
    """4 trials, two at a time on 2 CPUs; the two near-zero learning rates are stopped after one epoch."""
    from jobs.tune_reward import main

    lrs = [2e-3, 1e-3, 1e-7, 1e-8]
    summary = main(sweep_overrides(tmp_path, demo_cache, "asha", lrs))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))

    sdir = Path(summary["sweep_dir"])
    with open(sdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["optim.lr"]) for r in rows) == sorted(lrs)  # every trial's config in the table
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    accs = [float(r["val_pairwise_accuracy"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    status = {float(r["optim.lr"]): r["status"] for r in rows}
    assert status[1e-7] == status[1e-8] == "stopped early", status
    assert {int(r["validations"]) for r in rows if float(r["optim.lr"]) < 1e-6} == {1}
    assert summary["stopped_early"] >= 2 and summary["errored"] == 0
    assert summary["best_config"]["optim.lr"] in (2e-3, 1e-3)
    assert summary["best_val_pairwise_accuracy"] == accs[0] >= 0.75
    assert summary["best_test_pairwise_accuracy"] >= 0.7
    assert Path(summary["best_checkpoint"]).is_dir()
    assert [t["trial_id"] for t in summary["trials"]] == [r["trial_id"] for r in rows]

    # Table 7: every trial with a checkpoint scored on test (demo.yaml: score_test=all), the loss's best row
    assert all(r["test_pairwise_accuracy"] for r in rows if r["checkpoint"])
    t7 = (sdir / "table7.md").read_text()
    assert "| triplet |" in t7 and "| 69.7 |" in t7 and summary["table7"][0]["trial_id"] == rows[0]["trial_id"]
    assert summary["table7"][0]["test_ci_low"] <= summary["table7"][0]["test"] <= summary["table7"][0]["test_ci_high"]
    md = (sdir / "results.md").read_text()
    assert all(r["trial_id"] in md for r in rows) and "stopped early" in md
    assert (sdir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one log dir for TensorBoard: Tune's per-trial scalars and each trial's own training curves
    assert len(list((sdir / "tune").glob("*/events.out.tfevents.*"))) == 4
    assert len(list((sdir / "trials").glob("*/tensorboard/events.out.tfevents.*"))) == 4


def finished_trials(tune_dir: Path) -> list[str]:
    """Trials Tune's saved experiment state records as TERMINATED (what a restore will not rerun)."""
    out = []
    for state in tune_dir.glob("experiment_state-*.json"):
        try:
            trials = [json.loads(t[0]) for t in json.loads(state.read_text())["trial_data"]]
        except (ValueError, KeyError):
            continue  # being written
        out += [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]
    return out


@pytest.mark.extended
def test_killed_sweep_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path, demo_cache):
    """Kill the sweep's driver (and its local Ray) once its first trial is recorded finished; run it again."""
    over = sweep_overrides(tmp_path, demo_cache, "resume", [2e-3, 1e-3, 5e-4], epochs=1, train=320)
    over += ["scheduler.name=fifo", "max_concurrent_trials=1"]
    proc = subprocess.Popen([sys.executable, str(JOB), *over], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tune_dir = tmp_path / "sweeps" / "resume" / "tune"
    deadline = time.time() + 400
    finished = None
    while time.time() < deadline and finished is None:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        finished = next(iter(finished_trials(tune_dir)), None)
        time.sleep(1)
    assert finished, "Tune recorded no finished trial within 400 s"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    trial_run = tmp_path / "sweeps" / "resume" / "trials" / finished
    before = sorted(p.name for p in trial_run.rglob("*"))
    time.sleep(2)

    summary = tune_reward(load_tune_config(over))
    assert len(summary["trials"]) == 3 and summary["errored"] == 0
    assert all(t["status"] == "finished" for t in summary["trials"]), summary["trials"]
    assert sorted(p.name for p in trial_run.rglob("*")) == before  # the finished trial did not train again
    assert finished in {t["trial_id"] for t in summary["trials"]}


def test_best_checkpoint_is_one_that_train_kept(tmp_path):
    """Equal best scores: Train keeps the newest checkpoint, so that is the one to report (the older is gone)."""
    import pandas as pd

    from sr_ray.reward.tune import _best_checkpoint

    kept = tmp_path / "checkpoint_2"
    kept.mkdir()
    hist = pd.DataFrame({"step": [10, 20, 30], "val_pairwise_accuracy": [0.9, 0.9, 0.8],
                         "checkpoint_path": [str(tmp_path / "checkpoint_1"), str(kept), str(tmp_path / "c3")]})
    assert _best_checkpoint(hist, None) == str(kept)
    assert _best_checkpoint(hist.drop(columns="checkpoint_path"), None) is None


def test_swept_values_take_the_training_fields_types():
    """YAML reads 1e-3 as a string; the trials, table and plot must see the float the training job uses."""
    from sr_ray.reward.tune import param_space

    cfg = load_tune_config(["search=" + json.dumps({"optim.lr": {"grid": ["2e-3", "1e-7"]},
                                                     "model.unfreeze_text_blocks": {"choice": ["1", 2]}})])
    space = param_space(cfg)
    assert space["optim.lr"] == {"grid_search": [2e-3, 1e-7]}
    assert space["model.unfreeze_text_blocks"].categories == [1, 2]


def test_best_checkpoint_on_s3_gets_its_scheme_back(s3_endpoint, s3_bucket):
    """Tune reports an S3 checkpoint as bucket/key; the summary needs an s3:// URI that scoring can open."""
    import pandas as pd

    from sr_ray.core import storage
    from sr_ray.reward.tune import _best_checkpoint

    storage.write_bytes(f"s3://{s3_bucket}/trials/t1/checkpoint_b/model.pt", b"x", s3_endpoint)
    hist = pd.DataFrame({"step": [5, 10], "val_pairwise_accuracy": [0.7, 0.8],
                         "checkpoint_path": [f"{s3_bucket}/trials/t1/checkpoint_a", f"{s3_bucket}/trials/t1/checkpoint_b"]})
    assert _best_checkpoint(hist, s3_endpoint, s3=True) == f"s3://{s3_bucket}/trials/t1/checkpoint_b"


def test_table7_keeps_each_losss_best_trial_beside_the_papers_figure():
    from sr_ray.reward.train import TrainRewardConfig
    from sr_ray.reward.tune import table7, table7_markdown

    base = to_dict(TrainRewardConfig())
    rows = [  # best first, as the sweep sorts them
        {"trial_id": "a", "loss.name": "infonce", "optim.lr": 1e-3, "val_pairwise_accuracy": 0.8,
         "test_pairwise_accuracy": 0.79, "test_ci_low": 0.75, "test_ci_high": 0.83},
        {"trial_id": "b", "loss.name": "triplet", "optim.lr": 3e-4, "val_pairwise_accuracy": 0.7,
         "test_pairwise_accuracy": 0.71, "test_ci_low": 0.66, "test_ci_high": 0.76},
        {"trial_id": "c", "loss.name": "infonce", "optim.lr": 1e-5, "val_pairwise_accuracy": 0.6},
        {"trial_id": "d", "loss.name": "bce", "optim.lr": 1e-5, "val_pairwise_accuracy": None},
    ]
    t7 = table7(rows, ["loss.name", "optim.lr"], base)
    assert [(t["loss"], t["trial_id"], t["lr"], t["paper_test"]) for t in t7] == [
        ("infonce", "a", 1e-3, 68.5), ("triplet", "b", 3e-4, 69.7)]
    md = table7_markdown(t7)
    assert "| infonce | 80.0 | 79.0 [75.0, 83.0] | 0.001 | 2+2 | 68.5 |" in md
