"""cluster/aws.yaml is a valid Ray cluster launcher config, checked with Ray's own autoscaler schema.

Mirrors what ``ray up`` does before touching AWS: ``prepare_config`` (merge with the provider's
defaults.yaml, fill per-node-type min/max workers) followed by ``validate_config`` (jsonschema
against ray/autoscaler/ray-schema.json plus Ray's extra checks). No network, no AWS credentials,
no Ray runtime is started.
"""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster" / "aws.yaml"


def _load() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _ray_validate(config: dict) -> dict:
    """What `ray up` runs on the file: prepare (fill defaults), then validate. Returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_cluster_yaml_is_valid_ray_config():
    raw = _load()
    prepared = _ray_validate(raw)

    assert raw["cluster_name"] == "sr-ray"
    assert raw["provider"]["type"] == "aws"
    assert raw["provider"]["region"] == "us-west-2"
    assert raw["provider"]["cache_stopped_nodes"] is False
    assert raw["auth"]["ssh_user"] == "ubuntu"
    assert isinstance(raw["max_workers"], int) and isinstance(raw["idle_timeout_minutes"], (int, float))

    node_types = raw["available_node_types"]
    assert set(node_types) == {"head", "cpu_data", "gpu_train"}
    assert raw["head_node_type"] == "head"

    # Head advertises no CPU so no tasks/actors are scheduled on it.
    assert node_types["head"]["resources"]["CPU"] == 0
    assert node_types["head"]["resources"].get("GPU", 0) == 0

    # CPU group for Ray Data, GPU group for training; both autoscale from zero.
    cpu = node_types["cpu_data"]
    assert cpu["resources"].get("GPU", 0) == 0
    assert cpu["max_workers"] > cpu["min_workers"] >= 0

    gpu_groups = {name: nt for name, nt in node_types.items() if nt["resources"].get("GPU", 0) > 0}
    assert list(gpu_groups) == ["gpu_train"]
    gpu = gpu_groups["gpu_train"]
    assert gpu["resources"]["GPU"] > 0
    assert gpu["max_workers"] > gpu["min_workers"] >= 0
    gpu_root = gpu["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
    assert gpu_root >= 200

    # Global max_workers leaves room for every group to reach its max.
    assert raw["max_workers"] >= sum(nt.get("max_workers", 0) for n, nt in node_types.items() if n != "head")

    # Every node gets an instance role (credentials) and a syntactically valid AMI id.
    for name, nt in node_types.items():
        nc = nt["node_config"]
        assert nc["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
        assert nc["ImageId"].startswith("ami-"), name

    # The project is copied and installed on every node (setup_commands run on head and workers).
    assert raw["file_mounts"] == {"~/sr-ray": ".", "/home/ubuntu/.ray/auth_token": "~/.ray/auth_token"}
    setup = raw["setup_commands"]
    assert "pip install -U pip" in setup
    assert "pip install -e ~/sr-ray" in setup
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert "pip install -e ~/sr-ray" in prepared[key]

    assert any("ray start --head" in c and "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
               for c in raw["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in raw["worker_start_ray_commands"])

    # token auth on every `ray start` (head and workers), the token copied the way Ray documents for `ray up`,
    # the dashboard / job API on the head's loopback only (reached through `ray dashboard`'s SSH tunnel)
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in raw[key]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0]
    assert any("export RAY_AUTH_MODE=token" in c for c in raw["initialization_commands"])
    assert "chmod 600 ~/.ray/auth_token" in setup


def test_raw_yaml_matches_ray_schema():
    """The file itself (before defaults are merged in) obeys Ray's JSON schema."""
    import json

    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(_load(), schema)


def test_bad_max_workers_type_rejected():
    config = _load()
    config["available_node_types"]["gpu_train"]["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError, match="'many' is not of type 'integer'") as exc:
        _ray_validate(config)
    assert list(exc.value.path) == ["available_node_types", "gpu_train", "max_workers"]


def test_missing_provider_rejected():
    config = _load()
    del config["provider"]
    # validate_config alone: the schema requires `provider`.
    with pytest.raises(jsonschema.ValidationError, match="provider"):
        validate_config(config)
    # Through prepare_config (as `ray up` does) it fails even earlier, looking up the provider's defaults.
    with pytest.raises(KeyError, match="provider"):
        _ray_validate(config)
