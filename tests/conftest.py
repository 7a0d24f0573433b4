"""Shared fixtures: one local Ray cluster per session (2 CPUs), a
real S3-compatible server (moto) on 127.0.0.1, tiny demo data, small configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# moto accepts any credentials; set them before Ray starts so every worker inherits them. The secret is
# recognizable: tests grep logs, configs, summaries, TensorBoard files and S3 objects for it (never there).
FAKE_SECRET = "sr-ray-FAKE-SECRET-8f3e1c"
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = FAKE_SECRET
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)

from sr_ray.core.ray_utils import free_port  # noqa: E402,F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so tests can import jobs/ entry points


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1; AWS_ENDPOINT_URL points at it for this process and Ray's workers."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint, tmp_path_factory):
    import ray

    from sr_ray.core.ray_utils import init_ray

    # the jobs' own local start (dashboard on a free port: Train's placement-group cleaner needs its State API)
    # tests/ on the workers' path: scorers named by import path (tests/plugin_scorers.py) load in actors
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    # JIT-built torch extensions (DeepSpeed's ops) in a folder of this session: a test can see what was built
    os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path_factory.mktemp("torch_extensions"))
    init_ray(num_cpus=2, env_vars={"AWS_ENDPOINT_URL": s3_endpoint, "PYTHONPATH": path,
                                   "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_bucket(s3_endpoint):
    import uuid

    import boto3

    name = f"sr-ray-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    """A reward checkpoint of the tiny CLIP with random weights (seeded), for the scoring tests."""
    import torch

    from sr_ray.reward.model import ModelConfig, RewardModel, build_clip
    from sr_ray.reward.score import save_model

    path = tmp_path_factory.mktemp("reward")
    torch.manual_seed(1)
    cfg = ModelConfig(name="sr-tiny")
    save_model(path, RewardModel(build_clip(cfg)), cfg)
    return str(path)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("demo-cache"))


def small_overrides(tmp_path: Path, demo_cache: str, name: str = "t", train: int = 320, val: int = 64,
                    test: int = 64, epochs: int = 1) -> list[str]:
    """CLI overrides for a fast run on synthetic demo triplets (a few seconds of training)."""
    return [
        "data.demo.source=synthetic", f"data.demo.cache_dir={demo_cache}", f"data.demo.train={train}", f"data.demo.val={val}",
        f"data.demo.test={test}", "data.demo.rows_per_shard=160", f"optim.epochs={epochs}",
        f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}", "run.log_every_steps=5",
        "scaling.max_failures=0",
    ]


def load_train_config(overrides: list[str]):
    from sr_ray.core.config import load_config
    from sr_ray.reward.train import TrainRewardConfig

    return load_config(TrainRewardConfig, ROOT / "jobs/configs/train_reward/demo.yaml", overrides)


def pytest_collection_modifyitems(config, items):
    """Every test that starts Ray (the ``ray_cluster`` fixture) or belongs to the extended suite is ``slow``, so
    ``pytest -m "not slow"`` is the fast inner loop (unit tests); the default suite still runs them all."""
    slow = pytest.mark.slow
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()) or item.get_closest_marker("extended"):
            item.add_marker(slow)
