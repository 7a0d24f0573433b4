"""No shipped cluster definition exposes Ray's dashboard / job API beyond loopback without token auth.

Whoever reaches the job API (port 8265) can submit a job, that is run any code on the cluster. Every cluster
definition under ``cluster/`` is read as what it starts:

- a Ray cluster launcher config (``ray up``): every ``ray start`` command; its dashboard host comes from
  ``--dashboard-host`` (Ray's default is 127.0.0.1); token auth from ``RAY_AUTH_MODE=token`` on the command or
  exported by the config's ``initialization_commands``;
- a KubeRay ``RayCluster`` / ``RayJob`` / ``RayService``: KubeRay starts the head with
  ``--dashboard-host=0.0.0.0`` (the dashboard Service needs it) unless ``rayStartParams`` says otherwise; token
  auth from ``authOptions.mode: token`` or ``RAY_AUTH_MODE=token`` on every Ray container.
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from conftest import ROOT

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}


def definitions() -> list[tuple[str, dict]]:
    """(file name, document) of every cluster definition shipped under cluster/."""
    out = []
    for path in sorted((ROOT / "cluster").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and ("head_start_ray_commands" in doc or doc.get("kind") in KUBERAY_KINDS):
                out.append((str(path.relative_to(ROOT)), doc))
    return out


def launcher_problems(name: str, cfg: dict) -> list[str]:
    exported = any(re.search(r"export\s+RAY_AUTH_MODE=token\b", c) for c in cfg.get("initialization_commands", []))
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cfg.get(key, []):
            if "ray start" not in cmd:
                continue
            token = exported or bool(re.search(r"\bRAY_AUTH_MODE=token\s+ray start", cmd))
            host = re.search(r"--dashboard-host[= ](\S+)", cmd)
            exposed = "--head" in cmd and (host.group(1) if host else "127.0.0.1") not in LOOPBACK
            if not token:
                problems.append(f"{name}: {key}: `ray start` without RAY_AUTH_MODE=token: {cmd}")
            if exposed and not token:
                problems.append(f"{name}: {key}: dashboard / job API on {host.group(1)} without token auth")
    return problems


def ray_cluster_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    return [s for s in (spec, spec.get("rayClusterSpec"), spec.get("rayClusterConfig")) if s and "headGroupSpec" in s]


def kuberay_problems(name: str, doc: dict) -> list[str]:
    problems = []
    specs = ray_cluster_specs(doc)
    if not specs:
        problems.append(f"{name}: {doc['kind']} {doc['metadata']['name']} defines no Ray cluster to check")
    for spec in specs:
        auth = (spec.get("authOptions") or {}).get("mode") == "token"
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        host = str(spec["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "0.0.0.0"))
        for group in groups:
            for c in group["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                if not (auth or env.get("RAY_AUTH_MODE") == "token"):
                    problems.append(f"{name}: container {c['name']}: no token auth (authOptions.mode: token or "
                                    f"RAY_AUTH_MODE=token)" + (f"; dashboard on {host}" if host not in LOOPBACK else ""))
    return problems


def problems_of(name: str, doc: dict) -> list[str]:
    return kuberay_problems(name, doc) if doc.get("kind") in KUBERAY_KINDS else launcher_problems(name, doc)


def test_every_shipped_cluster_definition_requires_the_token():
    docs = definitions()
    names = {n for n, _ in docs}
    assert "cluster/aws.yaml" in names
    assert any(n.startswith("cluster/kuberay/") for n in names), "no KubeRay manifest found"
    assert [p for n, d in docs for p in problems_of(n, d)] == []


def test_the_check_catches_an_open_dashboard():
    """The head the launcher config shipped with before (dashboard on 0.0.0.0, no token) is caught, and so is a
    KubeRay cluster with its auth removed."""
    aws = yaml.safe_load((ROOT / "cluster/aws.yaml").read_text())
    old = copy.deepcopy(aws)
    old["initialization_commands"] = []
    old["head_start_ray_commands"] = ["ray stop", "ulimit -n 65536; ray start --head --port=6379 "
                                      "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0"]
    found = launcher_problems("old aws.yaml", old)
    assert any("dashboard / job API on 0.0.0.0 without token auth" in p for p in found)
    assert any("worker_start_ray_commands" in p for p in launcher_problems("no token", {
        **aws, "initialization_commands": [], "worker_start_ray_commands": ["ray start --address=$RAY_HEAD_IP:6379"]}))

    name, doc = next((n, d) for n, d in definitions() if d.get("kind") == "RayCluster")
    bare = copy.deepcopy(doc)
    bare["spec"].pop("authOptions", None)
    for group in [bare["spec"]["headGroupSpec"], *bare["spec"].get("workerGroupSpecs", [])]:
        for c in group["template"]["spec"]["containers"]:
            c["env"] = [e for e in c.get("env", []) if e["name"] not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")]
    found = kuberay_problems(name, bare)
    assert found and all("no token auth" in p for p in found) and "dashboard on 0.0.0.0" in found[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_loopback_dashboard_still_needs_the_token_on_every_node(host):
    cfg = {"head_start_ray_commands": [f"ray start --head --dashboard-host={host}"],
           "worker_start_ray_commands": ["RAY_AUTH_MODE=token ray start --address=h:6379"]}
    found = launcher_problems("x", cfg)
    assert len(found) == 1 and "without RAY_AUTH_MODE=token" in found[0]  # not reported as exposed
