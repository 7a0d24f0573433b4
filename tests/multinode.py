"""Multi-node runs on one machine: a head and worker "nodes" (``ray.cluster_utils.Cluster``: separate raylets, each
with its own CPUs and a ``node`` custom resource), jobs run against it, nodes removed mid-run.

The test session's own Ray cluster has one node, so each scenario runs in a process of its own, started by
``tests/test_multinode.py``:

    python tests/multinode.py {train,score,curate,finetune} <work dir> <s3 bucket>

S3 is the session's moto server (``AWS_ENDPOINT_URL`` in the environment; every raylet inherits it). The last
stdout line is one JSON object of what the scenario saw; the test asserts on it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sr_ray.core import storage  # noqa: E402
from sr_ray.core.ray_utils import alive_nodes, free_port  # noqa: E402

log = logging.getLogger("multinode")


def start_cluster(workers: int, cpus: float = 2.0):
    """A head without CPUs (as on the shipped clusters: the driver only) and ``workers`` nodes of ``cpus`` CPUs."""
    import ray
    from ray.cluster_utils import Cluster

    dash = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"  # Train's placement-group cleaner asks it
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash})
    for i in range(workers):
        cluster.add_node(num_cpus=cpus, resources={f"node{i}": 1.0})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    CLUSTERS.append(cluster)
    return cluster


CLUSTERS: list = []  # shut down by main(), whatever the scenario did


def actor_nodes(class_part: str) -> set[str]:
    """Node ids of the alive actors whose class name contains ``class_part``."""
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if class_part in (a.class_name or "")}


def task_nodes() -> set[str]:
    """Node ids of the tasks running now."""
    from ray.util.state import list_tasks

    return {t.node_id for t in list_tasks(filters=[("state", "=", "RUNNING")], limit=10000) if t.node_id}


class NodeKiller(threading.Thread):
    """Once ``ready()`` holds, remove (no graceful shutdown: a lost spot instance) a worker node among ``busy()``
    (node ids that run the work); records which and when."""

    def __init__(self, cluster, ready: Callable[[], bool], busy: Callable[[], set[str]], timeout: float = 900):
        super().__init__(daemon=True)
        self.cluster, self.ready, self.busy, self.timeout = cluster, ready, busy, timeout
        self.removed: dict[str, Any] = {}

    def run(self) -> None:
        deadline = time.time() + self.timeout
        while time.time() < deadline and not self.removed:
            try:
                if self.ready():
                    busy = self.busy()
                    node = next((n for n in self.cluster.worker_nodes if n.node_id in busy), None)
                    if node is not None:
                        self.removed = {"node": node.node_id, "busy": sorted(busy), "t": time.time()}
                        log.warning("removing node %s (busy: %s)", node.node_id, sorted(busy))
                        self.cluster.remove_node(node, allow_graceful=False)
            except Exception as e:  # the State API can hiccup while nodes change: look again
                log.warning("node killer: %s", e)
            time.sleep(0.3)


class ActorNodes(threading.Thread):
    """Records the nodes that ran an actor of ``class_part`` until :meth:`stop`."""

    def __init__(self, class_part: str):
        super().__init__(daemon=True)
        self.class_part, self.nodes, self.done = class_part, set(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            try:
                self.nodes |= actor_nodes(self.class_part)
            except Exception as e:
                log.warning("actor nodes: %s", e)

    def stop(self) -> set[str]:
        self.done.set()
        self.join()
        return self.nodes


def s3_keys(prefix_uri: str) -> list[str]:
    import boto3

    bucket, _, prefix = prefix_uri[len("s3://"):].partition("/")
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def upload(local: str, uri: str) -> str:
    storage.upload_dir(local, uri)
    return uri


def rows_of(uri: str, columns: list[str] | None = None) -> list[list]:
    """Every row (of ``columns``, default all) of the Parquet data files under ``uri``, sorted."""
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(uri)
    out = []
    for path in storage.list_files(uri):  # paths in fs
        with fs.open_input_file(path) as fh:
            t = pq.read_table(fh, columns=columns)
        out.extend(zip(*(t.column(c).to_pylist() for c in t.column_names)))
    return sorted((list(r) for r in out), key=repr)


def traces(run: str) -> dict[str, list[dict]]:
    """``run.trace_batches``' files of a run on S3: {file name: its records}."""
    bucket = run[len("s3://"):].split("/", 1)[0]
    return {k.rsplit("/", 1)[1]: [json.loads(line) for line in
                                  storage.read_bytes(f"s3://{bucket}/{k}").decode().splitlines()]
            for k in s3_keys(f"{run}/_batches/") if k.endswith(".jsonl")}


# ---------------------------------------------------------------- scenarios

def train_scenario(work: Path, bucket: str) -> dict[str, Any]:
    """Reward training on 3 one-CPU nodes: a local storage path refused; 2 workers SPREAD, undisturbed; the same
    with the node of one worker removed after the first checkpoint (every batch traced)."""
    from conftest import load_train_config, small_overrides

    from sr_ray.core.errors import ConfigError
    from sr_ray.demo.data import DemoConfig, ensure_demo_data
    from sr_ray.reward.train import train_reward

    cache = str(work / "demo")
    splits = ensure_demo_data(DemoConfig(source="synthetic", cache_dir=cache, train=960, val=64, test=64,
                                         rows_per_shard=160))
    data = [f"data.{s}={upload(p, f's3://{bucket}/triplets/{s}')}" for s, p in splits.items()]
    runs = f"s3://{bucket}/runs"
    spread = ["scaling.num_workers=2", "scaling.placement_strategy=SPREAD", "scaling.cpus_per_worker=0.5",
              "data.map_num_cpus=0.25"]
    cluster = start_cluster(3)
    out: dict[str, Any] = {"nodes": 4}
    try:
        train_reward(load_train_config(small_overrides(work, cache, "local", train=960) + data + spread))
        out["local_refused"] = None
    except ConfigError as e:
        out["local_refused"] = str(e)

    over = small_overrides(work, cache, "spread", train=960) + data + spread + [f"run.storage_path={runs}"]
    watcher = ActorNodes("RayTrainWorker")
    watcher.start()
    out["spread"] = train_reward(load_train_config(over))
    out["spread_worker_nodes"] = len(watcher.stop())
    out["spread_keys"] = s3_keys(f"{runs}/spread/")

    over = small_overrides(work, cache, "lost", train=960) + data + spread + [
        f"run.storage_path={runs}", "run.val_every_steps=5", "run.trace_batches=true", "scaling.max_failures=2"]
    killer = NodeKiller(cluster, lambda: any(k.endswith("checkpoint_manager_snapshot.json")
                                             for k in s3_keys(f"{runs}/lost/")), lambda: actor_nodes("RayTrainWorker"))
    killer.start()
    out["lost"] = train_reward(load_train_config(over))
    out["removed"] = killer.removed
    out["alive_nodes_after"] = alive_nodes()
    out["traces"] = traces(f"{runs}/lost")
    return out


def score_scenario(work: Path, bucket: str) -> dict[str, Any]:
    """Batch scoring of 6 generation files by 2 scorer actors on 3 nodes: undisturbed, then with the node of a
    scorer removed once the first shard is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from sr_ray.core.config import load_config
    from sr_ray.demo.data import make_generations
    from sr_ray.generations.score import ScoreConfig, score_generations
    from sr_ray.reward.model import ModelConfig, RewardModel, build_clip
    from sr_ray.reward.score import save_model

    torch.manual_seed(1)
    (work / "reward").mkdir(parents=True)
    save_model(work / "reward", RewardModel(build_clip(ModelConfig(name="sr-tiny"))), ModelConfig(name="sr-tiny"))
    gen = make_generations(240, 4, 32, 0, 2)
    (work / "gen").mkdir()
    n = len(gen["prompt"])
    for i in range(6):
        part = {k: v[i * n // 6:(i + 1) * n // 6] for k, v in gen.items()}
        pq.write_table(pa.table(part), work / "gen" / f"part-{i}.parquet")
    base = [f"checkpoint={upload(str(work / 'reward'), f's3://{bucket}/reward')}",
            f"generations={upload(str(work / 'gen'), f's3://{bucket}/gen')}", "compute.num_actors=2",
            "compute.max_actors=2", "compute.cpus_per_actor=0.5", "compute.decode_num_cpus=0.25",
            "compute.batch_size=16", "block_rows=32"]
    cluster = start_cluster(3)
    out: dict[str, Any] = {"inputs": n}
    out["calm"] = score_generations(load_config(ScoreConfig, None, base + [f"out=s3://{bucket}/scores-calm"]))
    lost = f"s3://{bucket}/scores-lost"
    killer = NodeKiller(cluster, lambda: bool(storage.exists(lost) and storage.list_files(lost)),
                        lambda: actor_nodes("MapWorker"))
    killer.start()
    out["lost"] = score_generations(load_config(ScoreConfig, None, base + [f"out={lost}"]))
    out["removed"] = killer.removed
    for name in ("calm", "lost"):
        out[f"{name}_rows"] = rows_of(f"s3://{bucket}/scores-{name}", ["generation_id", "score"])
        out[f"{name}_rejects"] = rows_of(f"s3://{bucket}/scores-{name}/_rejects")
    return out


def curate_scenario(work: Path, bucket: str) -> dict[str, Any]:
    """Curation of a simulated community's log (authors' form, no images) on 3 nodes: undisturbed, then with a
    node running curation tasks removed once the first shard is written (the whole job takes seconds: a timer
    can miss it), while most of the ~380 shards are still to write."""
    from sr_ray.core.config import load_config
    from sr_ray.curation.curate import CurateConfig, curate
    from sr_ray.demo.prompts import ensure_community_log

    logs = upload(ensure_community_log(str(work / "community"), images_n=100_000), f"s3://{bucket}/log")
    base = [f"log={logs}", "pack=false", "rows_per_shard=100", "batch_rows=8192"]
    cluster = start_cluster(3)
    out: dict[str, Any] = {"calm": curate(load_config(CurateConfig, None, base + [f"out=s3://{bucket}/cur-calm"]))}
    killer = NodeKiller(cluster, lambda: bool(s3_keys(f"s3://{bucket}/cur-lost/_shards/")), task_nodes)
    killer.start()
    out["lost"] = curate(load_config(CurateConfig, None, base + [f"out=s3://{bucket}/cur-lost"]))
    out["removed"] = killer.removed
    for name in ("calm", "lost"):
        out[f"{name}_triplets"] = {s: rows_of(f"s3://{bucket}/cur-{name}/{s}") for s in ("train", "val", "test")}
    return out


def finetune_scenario(work: Path, bucket: str) -> dict[str, Any]:
    """SD fine-tuning (DeepSpeed ZeRO-2) on 2 workers SPREAD over 3 nodes; the node of one worker removed after
    the first checkpoint."""
    from test_finetune import ft_config, write_set

    data = upload(write_set(work / "set-s3", rows=48, bad=0), f"s3://{bucket}/ftset")
    runs = f"s3://{bucket}/ft-runs"
    cfg = ft_config(work, "lost", f"data.train={data}", f"run.storage_path={runs}", "run.checkpoint_every_steps=2",
                    "scaling.max_failures=2", "run.save_pipeline=false", "run.sample_every_steps=-1",
                    "scaling.num_workers=2", "scaling.placement_strategy=SPREAD", "scaling.cpus_per_worker=0.5",
                    "run.trace_batches=true")
    cluster = start_cluster(3)
    killer = NodeKiller(cluster, lambda: any(k.endswith("checkpoint_manager_snapshot.json")
                                             for k in s3_keys(f"{runs}/lost/")), lambda: actor_nodes("RayTrainWorker"))
    killer.start()
    from sr_ray.diffusion.finetune import finetune_sd

    out: dict[str, Any] = {"lost": finetune_sd(cfg), "removed": killer.removed}
    out["traces"] = traces(f"{runs}/lost")
    return out


SCENARIOS = {"train": train_scenario, "score": score_scenario, "curate": curate_scenario,
             "finetune": finetune_scenario}


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    name, work, bucket = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # Ray and the jobs print to stdout: keep it for the JSON line
    try:
        out = SCENARIOS[name](work, bucket)
    finally:
        import ray

        ray.shutdown()
        for cluster in CLUSTERS:
            cluster.shutdown()
    print(json.dumps(out, default=str), file=results, flush=True)
    sys.stderr.flush()
    # Past this point only Ray's exit handlers run, and after a node was removed on purpose one of them sets
    # status 1 (seen with the whole result printed): the scenario's own failures raise above.
    os._exit(0)


if __name__ == "__main__":
    main()
