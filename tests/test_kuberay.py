"""cluster/kuberay/*.yaml, cluster/Dockerfile and .dockerignore, checked offline (no Kubernetes, no Docker, no Ray).

What is checked, and why:

- every RayCluster / RayJob / RayService validates against KubeRay's own CRD schema (the CRDs are read from
  ``shared/data/kuberay`` beside the repository, never copied into it; the schema tests skip when they are absent).
  The CRDs' OpenAPI v3 schemas go through a small adapter to JSON Schema: ``x-kubernetes-int-or-string`` accepts an
  int or a string, ``x-kubernetes-preserve-unknown-fields`` allows unknown keys, ``nullable`` allows null, and every
  object schema that lists ``properties`` (and says nothing else about other keys) refuses unknown ones: Kubernetes
  would silently prune a misspelled field (``minReplica``), which is worse than an error. A broken copy must fail,
  with its path named, so the validator is known to be able to fail. (CEL rules, ``x-kubernetes-validations``, are
  not evaluated.)
- every RayJob's entrypoint is the command line a user runs, ``python jobs/<job>.py [--config FILE] key=value ...``,
  and it loads with that job's own config loader (an unknown key is a ConfigError; a test shows a misspelled key is
  caught); every storage path in it is ``s3://`` (on several nodes a local path exists on one pod only).
- token auth (``authOptions.mode: token``) on every cluster, no literal credentials or tokens in any container's env,
  S3 access through the IRSA ServiceAccount that every pod template names.
- the cluster's shape: a head with no GPU and ``num-cpus: "0"``, worker groups that autoscale, a GPU group that asks
  for ``nvidia.com/gpu``; requests = limits; ``/dev/shm`` in memory.
- the RayService serves what ``cluster/serve_config.yaml`` serves (same import path, same args keys, args that
  ``sr_ray.serve.ServeConfig`` accepts).
- the Dockerfile's base image carries the Ray of pyproject.toml's pin, installs the repository, and is the image
  every manifest runs, with the working directory the manifests use.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from sr_ray.app.registry import JOBS, default_preset, resolve
from sr_ray.core.config import ConfigError, from_dict, load_config
from sr_ray.serve import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
MAIN_JOBS = ("train_reward", "tune_reward", "score_generations", "finetune_sd")
# The storage keys each job's entrypoint must give explicitly (the presets hold placeholders or local paths).
STORAGE_KEYS = {
    "train_reward": ("data.train", "data.val", "data.test", "run.storage_path"),
    "tune_reward": ("train.data.train", "train.data.val", "train.data.test", "storage_path"),
    "score_generations": ("checkpoint", "generations", "out"),
    "finetune_sd": ("data.train", "run.storage_path"),
}
STORAGE_NAMES = {"train", "val", "test", "storage_path", "out", "output", "input", "checkpoint", "generations",
                 "image_root", "cache_dir"}
AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
CRD_ENV = "SR_RAY_KUBERAY_CRDS"


# ---------------------------------------------------------------------------------------------------- helpers
def load(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def documents(*kinds: str) -> list[tuple[str, dict]]:
    """(file name, document) of every manifest of these kinds."""
    return [(p.name, d) for p in MANIFESTS for d in load(p) if d.get("kind") in kinds]


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        doc["kind"]]


def ray_pods(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of the head and every worker group."""
    spec = cluster_spec(doc)
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    return pods + [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]


def all_pods(doc: dict) -> list[tuple[str, dict]]:
    """Every pod template: the Ray pods and a RayJob's submitter."""
    submitter = doc["spec"].get("submitterPodTemplate") if doc["kind"] == "RayJob" else None
    return ray_pods(doc) + ([("submitter", submitter["spec"])] if submitter else [])


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def ray_pin() -> Version:
    text = (ROOT / "pyproject.toml").read_text()
    pins = [Requirement(r) for r in re.findall(r'"(ray\[[^"]*\]==[^"]+)"', text)]
    assert len(pins) == 1, "pyproject.toml pins ray exactly once"
    (spec,) = pins[0].specifier
    return Version(spec.version)


def dockerfile() -> dict:
    """The base image, the tag the header says to build, WORKDIR, USER, the torch index and the RUN lines."""
    text = DOCKERFILE.read_text()
    instr = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", instr, re.MULTILINE))
    return {"from": re.findall(r"^FROM\s+(\S+)", instr, re.MULTILINE),
            "tag": re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.", text),
            "workdir": re.findall(r"^WORKDIR\s+(\S+)", instr, re.MULTILINE),
            "user": re.findall(r"^USER\s+(\S+)", instr, re.MULTILINE),
            "runs": re.findall(r"^RUN\s+(.*)$", instr, re.MULTILINE),
            "args": args}


# ------------------------------------------------------------------------------------- CRD -> JSON Schema
def crd_dir() -> Path:
    """KubeRay's CRDs: $SR_RAY_KUBERAY_CRDS, else shared/data/kuberay beside the repository (a clean clone's
    shared/ copy), else /work/shared/data/kuberay; skip when none holds them."""
    if os.environ.get(CRD_ENV):
        path = Path(os.environ[CRD_ENV])
        if not path.is_dir():
            pytest.fail(f"{CRD_ENV}={path} is not a folder of KubeRay CRDs")
        return path
    tried = [ROOT.parent / "shared" / "data" / "kuberay", Path("/work/shared/data/kuberay")]
    for path in tried:
        if list(path.glob("ray.io_*.yaml")):
            return path
    pytest.skip(f"KubeRay CRDs not found (set {CRD_ENV}; tried {', '.join(map(str, tried))})")


def to_json_schema(node):
    """A Kubernetes structural (OpenAPI v3) schema as JSON Schema, strict about unknown keys."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        elif not key.startswith("x-kubernetes-") and key not in ("nullable", "format", "default", "description"):
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]  # a pattern, if any, applies to strings only
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and \
            not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # Kubernetes would prune an unknown (misspelled) field silently
    return out


@pytest.fixture(scope="module")
def validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a validator of KubeRay's schema for it (the served versions the manifests use)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the three CRDs are 60,000 lines
    wanted = {(d["apiVersion"], d["kind"]) for _, d in documents(*RAY_KINDS)}
    out = {}
    for path in sorted(crd_dir().glob("ray.io_*.yaml")):
        with open(path) as f:
            crds = [d for d in yaml.load_all(f, Loader=loader) if d and d.get("kind") == "CustomResourceDefinition"]
        for crd in crds:
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if (f"{group}/{version['name']}", kind) in wanted and version.get("served"):
                    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
                    out[(f"{group}/{version['name']}", kind)] = jsonschema.Draft202012Validator(schema)
    assert set(out) == wanted, f"no CRD schema for {sorted(wanted - set(out))} in {crd_dir()}"
    return out


def schema_errors(validators, doc: dict) -> list[str]:
    validator = validators[(doc["apiVersion"], doc["kind"])]
    return [f"{e.json_path}: {e.message}" for e in sorted(validator.iter_errors(doc), key=lambda e: e.json_path)]


# ----------------------------------------------------------------------------------------- entrypoints
def parse_entrypoint(entrypoint: str) -> tuple[str, Path | None, list[str]]:
    """``python jobs/<job>.py [--config FILE] key=value ...`` -> (job, config file or None, overrides)."""
    argv = shlex.split(entrypoint)
    assert len(argv) >= 2 and argv[0] == "python", f"not `python jobs/<job>.py ...`: {entrypoint!r}"
    script = re.fullmatch(r"jobs/(\w+)\.py", argv[1])
    assert script, f"not a jobs/<job>.py script: {argv[1]!r}"
    rest, config = argv[2:], None
    if rest[:1] == ["--config"]:
        assert len(rest) >= 2, "--config without a file"
        config, rest = ROOT / rest[1], rest[2:]
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    assert not bad, f"only key=value overrides may follow: {bad}"
    return script.group(1), config, rest


def load_entrypoint(entrypoint: str):
    """The job's config, built the way jobs/<job>.py builds it (ConfigError on an unknown key or a bad value)."""
    job, config, overrides = parse_entrypoint(entrypoint)
    assert job in JOBS, f"{job} is not a registered job ({sorted(JOBS)})"
    assert (ROOT / "jobs" / f"{job}.py").is_file(), f"jobs/{job}.py does not exist"
    assert config is None or config.is_file(), f"--config {config} does not exist"
    cls, _, _ = resolve(job)
    return job, overrides, load_config(cls, config or default_preset(job), overrides)


def local_storage(overrides: list[str]) -> list[str]:
    """The overrides naming storage that is not s3://."""
    bad = []
    for item in overrides:
        key, value = item.split("=", 1)
        storage = key.split(".")[-1] in STORAGE_NAMES or key.startswith("data.")
        if storage and "/" in value and not value.startswith("s3://"):
            bad.append(item)
    return bad


def dotted(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def rayjobs() -> list[tuple[str, dict]]:
    return documents("RayJob")


# ---------------------------------------------------------------------------------------------------- tests
def test_manifests_parse_and_are_the_expected_set():
    names = {p.name for p in MANIFESTS}
    expected = {"raycluster.yaml", "rayservice-reward.yaml", "serviceaccount.yaml"} | {
        f"rayjob-{job.replace('_', '-')}.yaml" for job in MAIN_JOBS}
    assert expected <= names, f"missing: {sorted(expected - names)}"
    for path in MANIFESTS:
        docs = load(path)
        assert docs, f"{path.name} is empty"
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), path.name
            if doc["kind"] in RAY_KINDS:
                assert doc["apiVersion"] == "ray.io/v1", path.name
                # KubeRay: a RayCluster name is <= 53 characters, a RayJob's / RayService's <= 47; DNS-1035 labels
                limit = 53 if doc["kind"] == "RayCluster" else 47
                assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), path.name
                assert len(doc["metadata"]["name"]) <= limit, path.name


@pytest.mark.parametrize("name,doc", documents(*RAY_KINDS), ids=[n for n, _ in documents(*RAY_KINDS)])
def test_manifest_validates_against_kuberay_crd(validators, name, doc):
    assert schema_errors(validators, doc) == [], name


def test_validator_catches_unknown_key_and_bad_type(validators):
    (_, doc), *_ = documents("RayCluster")
    typo = copy.deepcopy(doc)
    group = typo["spec"]["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")  # a typo Kubernetes would prune silently
    errors = schema_errors(validators, typo)
    assert any(e.startswith("$.spec.workerGroupSpecs[0]:") and "'minReplica'" in e for e in errors), errors
    assert any("'minReplicas' is a required property" in e for e in errors), errors

    bad_type = copy.deepcopy(doc)
    bad_type["spec"]["workerGroupSpecs"][0]["replicas"] = "many"
    errors = schema_errors(validators, bad_type)
    assert any(e.startswith("$.spec.workerGroupSpecs[0].replicas:") for e in errors), errors

    bad_quantity = copy.deepcopy(doc)  # an int-or-string quantity still has to look like one
    bad_quantity["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "8GB"
    errors = schema_errors(validators, bad_quantity)
    assert any(".resources.limits.memory:" in e for e in errors), errors


def test_one_rayjob_per_main_job_that_cleans_up_after_itself():
    by_job = {}
    for name, doc in rayjobs():
        job, _, _ = parse_entrypoint(doc["spec"]["entrypoint"])
        assert name == f"rayjob-{job.replace('_', '-')}.yaml", f"{name} runs {job}"
        by_job[job] = doc
        spec = doc["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["ttlSecondsAfterFinished"] > 0, name
        assert "runtimeEnvYAML" not in spec, f"{name}: the code is in the image, no working_dir upload"
    assert sorted(by_job) == sorted(MAIN_JOBS)


@pytest.mark.parametrize("name,doc", rayjobs(), ids=[n for n, _ in rayjobs()])
def test_rayjob_entrypoint_loads_with_the_jobs_own_loader(name, doc):
    job, overrides, cfg = load_entrypoint(doc["spec"]["entrypoint"])
    assert not local_storage(overrides), f"{name}: storage must be s3://: {local_storage(overrides)}"
    given = {item.split("=", 1)[0] for item in overrides}
    missing = [k for k in STORAGE_KEYS[job] if k not in given]
    assert not missing, f"{name}: give {missing} explicitly (s3://...)"
    for key in STORAGE_KEYS[job]:
        assert str(dotted(cfg, key)).startswith("s3://"), f"{name}: {key}={dotted(cfg, key)!r}"


def test_entrypoint_check_catches_a_misspelled_key_and_a_local_path():
    (_, doc), *_ = [(n, d) for n, d in rayjobs() if "train_reward" in d["spec"]["entrypoint"]]
    entrypoint = doc["spec"]["entrypoint"]
    assert "run.storage_path=" in entrypoint
    with pytest.raises(ConfigError, match=r"run\.storage_pth"):
        load_entrypoint(entrypoint.replace("run.storage_path=", "run.storage_pth="))
    with pytest.raises(AssertionError, match="not a jobs/<job>.py script"):
        parse_entrypoint(entrypoint.replace("jobs/train_reward.py", "train_reward.py"))
    _, _, overrides = parse_entrypoint(entrypoint.replace("s3://YOUR-BUCKET/sr-ray/runs", "./runs"))
    assert local_storage(overrides) == ["run.storage_path=./runs"]


def test_every_s3_path_uses_one_placeholder_bucket():
    texts = [doc["spec"]["entrypoint"] for _, doc in rayjobs()]
    texts += [doc["spec"]["serveConfigV2"] for _, doc in documents("RayService")]
    buckets = {m for text in texts for m in re.findall(r"s3://([^/\s]+)", text)}
    assert len(buckets) == 1, f"one bucket placeholder to replace, found {sorted(buckets)}"


def test_token_auth_on_and_no_literal_secrets():
    docs = documents(*RAY_KINDS)
    assert {d["kind"] for _, d in docs} == set(RAY_KINDS)
    for name, doc in docs:
        spec = cluster_spec(doc)
        # KubeRay creates the token Secret and injects RAY_AUTH_MODE=token + RAY_AUTH_TOKEN (secretKeyRef) into
        # containers[0] of every Ray pod, the autoscaler and the submitter (ray-operator common/pod.go,
        # rayjob_controller.go); it refuses token auth below Ray 2.52.0, and rayVersion must be the image's Ray.
        assert spec["authOptions"]["mode"] == "token", name
        assert Version(spec["rayVersion"]) == ray_pin() >= Version("2.52.0"), name
        for where, pod in ray_pods(doc):
            assert len(pod["containers"]) == 1, f"{name} {where}: one (Ray) container, the one KubeRay configures"
        for where, pod in all_pods(doc):
            for c in containers(pod):
                for env in c.get("env", []):
                    if env["name"] == "RAY_AUTH_MODE":
                        assert env.get("value") == "token", f"{name} {where}: RAY_AUTH_MODE={env.get('value')}"
                    if env["name"] == "RAY_AUTH_TOKEN" or env["name"] in AWS_SECRETS:
                        assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), \
                            f"{name} {where}: {env['name']} must come from a Secret, never a literal"
    for path in MANIFESTS:
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name}: an AWS access key id"
        assert not re.search(r"aws_secret_access_key|AWS_SECRET_ACCESS_KEY", text), path.name


def test_every_pod_uses_the_irsa_service_account():
    (_, sa), *others = documents("ServiceAccount")
    assert not others, "one ServiceAccount"
    arn = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", arn), arn
    for name, doc in documents(*RAY_KINDS):
        for where, pod in all_pods(doc):
            assert pod.get("serviceAccountName") == sa["metadata"]["name"], f"{name} {where}"


def test_head_runs_no_work_and_workers_autoscale():
    for name, doc in documents(*RAY_KINDS):
        spec = cluster_spec(doc)
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0, name
        assert spec["autoscalerOptions"]["upscalingMode"] in ("Default", "Aggressive", "Conservative"), name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", f"{name}: no work on the head"
        assert head["rayStartParams"].get("num-gpus", "0") == "0", name
        (head_ctr,) = head["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in str(head_ctr["resources"]), f"{name}: a GPU on the head"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        for group_name, g in groups.items():
            assert 0 <= g["minReplicas"] < g["maxReplicas"], f"{name} {group_name}: does not autoscale"
            assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], name
        gpu_groups = {n: g for n, g in groups.items() if n.startswith("gpu-")}
        assert gpu_groups, f"{name}: no GPU group"
        for group_name, g in gpu_groups.items():
            pod = g["template"]["spec"]
            (ctr,) = pod["containers"]
            assert int(ctr["resources"]["limits"]["nvidia.com/gpu"]) >= 1, f"{name} {group_name}"
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), f"{name} {group_name}"
        if doc["kind"] != "RayService":  # training clusters: Ray Data on CPU pods, training on GPU pods
            assert set(groups) == {"cpu-data", "gpu-train"}, name
            assert "nvidia.com/gpu" not in str(groups["cpu-data"]["template"]), name


def test_ray_pods_have_guaranteed_resources_and_shm():
    for name, doc in documents(*RAY_KINDS):
        for where, pod in all_pods(doc):
            for c in pod["containers"]:
                res = c["resources"]
                assert res["requests"] == res["limits"], f"{name} {where}: requests != limits"
        for where, pod in ray_pods(doc):
            shm = [v for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
            mounts = {m["name"] for m in pod["containers"][0].get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
            assert {v["name"] for v in shm} & mounts, f"{name} {where}: /dev/shm is not an in-memory emptyDir"


def test_rayservice_serves_the_serve_config_app():
    with open(ROOT / "cluster" / "serve_config.yaml") as f:
        reference = yaml.safe_load(f)
    (name, doc), *others = documents("RayService")
    assert not others
    served = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert served["http_options"] == {"host": "0.0.0.0", "port": 8000}, name
    assert served["proxy_location"] == reference["proxy_location"]
    (app,), (ref_app,) = served["applications"], reference["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == \
        (ref_app["name"], ref_app["route_prefix"], ref_app["import_path"])
    assert sorted(app["args"]) == sorted(ref_app["args"]), "the same args keys as cluster/serve_config.yaml"
    assert app["args"]["checkpoint"].startswith("s3://"), app["args"]["checkpoint"]

    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder), app["import_path"]
    cfg = from_dict(ServeConfig, app["args"])  # strict: an unknown or mistyped arg is a ConfigError
    assert cfg.use_gpu and cfg.max_replicas >= cfg.min_replicas
    head = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"], "the serve Service targets the head's port"


def test_dockerfile_builds_the_image_every_manifest_runs():
    d = dockerfile()
    (base,) = d["from"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cu\d+)", base)
    assert m, f"FROM {base}: expected rayproject/ray:<ray>-py<python>-cu<cuda>"
    assert Version(m.group(1)) == ray_pin(), f"FROM {base}: the image's Ray must be pyproject's pin {ray_pin()}"
    assert d["args"]["TORCH_INDEX_URL"].endswith("/" + m.group(4)), "torch wheels for the base image's CUDA"
    text = (ROOT / "pyproject.toml").read_text()
    for pkg, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        (req,) = [Requirement(r) for r in re.findall(rf'"({pkg}[<>=!~][^"]*)"', text)]
        assert Version(d["args"][arg]) in req.specifier, f"{arg}={d['args'][arg]} vs pyproject's {req}"
    assert d["user"][-1] == "ray", "run as the base image's ray user"
    assert any(re.search(r"pip install (--no-deps )?\.(\s|$)", r) for r in d["runs"]), "pip install . of the repo"
    (tag,) = d["tag"]
    (workdir,) = d["workdir"]
    for name, doc in documents(*RAY_KINDS):
        for where, pod in all_pods(doc):
            for c in pod["containers"]:
                assert c["image"] == tag, f"{name} {where}: {c['image']} is not the image cluster/Dockerfile builds"
        for where, pod in ray_pods(doc):
            assert pod["containers"][0]["workingDir"] == workdir, f"{name} {where}: jobs/ resolves in {workdir}"


def test_dockerignore_keeps_local_state_out_and_the_package_in():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)

    for path in (".git", ".venv", "runs", "sr_ray/__pycache__", "sr_ray.egg-info", ".pytest_cache"):
        assert ignored(path), f".dockerignore should exclude {path}"
    for path in ("pyproject.toml", "README.md", "sr_ray", "jobs", "jobs/configs", "cluster"):
        assert not ignored(path), f".dockerignore must not exclude {path} (the image needs it)"
