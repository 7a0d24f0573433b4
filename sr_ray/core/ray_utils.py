"""Starting or joining Ray the same way in every job."""

from __future__ import annotations

import collections
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from sr_ray.core import storage
from sr_ray.core.errors import ConfigError

log = logging.getLogger(__name__)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(address: str | None = None, *, num_cpus: float | None = None,
             env_vars: dict[str, str] | None = None, **kwargs: Any) -> bool:
    """Join ``address`` or ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local cluster.

    Plain ``ray.init()`` would join whatever cluster ``ray start`` last recorded on
    this machine, and hang for minutes when that cluster is gone; joining an
    existing cluster is therefore explicit (``address=auto`` joins the local one).

    A local cluster gets its dashboard on a free port of 127.0.0.1, and every worker
    is told where it is (``RAY_API_SERVER_ADDRESS``): Ray Train's placement-group
    cleaner asks the State API (served by the dashboard) whether a run's controller
    is alive. Without it, a trial that Tune stops early (ASHA) leaves its training
    workers' CPUs reserved for ever and the next trial's Ray Data never starts (seen
    on 2 CPUs); and without the address, the cleaner asks whichever cluster
    ``ray start`` last recorded on this machine. ``num_cpus``, ``env_vars`` (for
    every worker) and other ``ray.init`` keywords apply to a new local cluster only.

    Ray Data's progress bars are turned off: jobs print their own progress lines, and
    the bars flood non-interactive logs.

    Returns True when the cluster this process is connected to was started by it (a fixed size: nothing
    will add nodes), False when it joined one.
    """
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    started = False
    if ray.is_initialized():
        started = _STARTED_HERE[0]
    else:
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            port = free_port()
            env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", **(env_vars or {})}
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=port, runtime_env={"env_vars": env}, **kwargs)
            started = True
        _STARTED_HERE[0] = started
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1":
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
    return started


_STARTED_HERE = [False]  # whether this driver process started the cluster it is connected to


def _pack(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    """The bundles that do not fit when placed first-fit (largest first) on the nodes' total resources."""
    free = [dict(n) for n in nodes]
    left = []
    for b in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
        node = next((n for n in free if all(n.get(k, 0.0) >= v - 1e-9 for k, v in b.items() if v)), None)
        if node is None:
            left.append(b)
        else:
            for k, v in b.items():
                node[k] = node.get(k, 0.0) - v
    return left


def check_resources(bundles: list[dict[str, float]], what: str, fixed: bool, wait_s: float = 300.0) -> None:
    """The bundles (each Train worker's or one actor's resources) must fit the cluster's nodes together.

    A cluster started here is fixed: a bundle no node can hold is a ConfigError at once (Ray would wait for
    ever, repeating autoscaler messages). On a joined cluster the autoscaler is asked for them
    (``ray.autoscaler.sdk.request_resources``) and the job waits up to ``wait_s`` seconds before the same
    error; the request is withdrawn after.
    """
    import time

    import ray

    def nodes() -> list[dict[str, float]]:
        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    missing = _pack(bundles, nodes())
    if not missing:
        return
    total = {k: sum(n.get(k, 0.0) for n in nodes()) for k in ("CPU", "GPU")}
    shown = ", ".join(f"{n} x {dict(b)}" for b, n in collections.Counter(tuple(b.items()) for b in bundles).items())
    msg = (f"{what} need {shown}, which do not fit this Ray cluster's nodes (CPU {total['CPU']:g}, "
           f"GPU {total['GPU']:g} in all; {len(missing)} of them would wait for ever)")
    if fixed:
        raise ConfigError(msg + "; lower the request or join a bigger cluster (run.ray_address / RAY_ADDRESS)")
    from ray.autoscaler.sdk import request_resources

    log.warning("%s: asking the autoscaler for it and waiting up to %.0f s", msg, wait_s)
    request_resources(bundles=missing)
    try:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if not _pack(bundles, nodes()):
                return
            time.sleep(min(5.0, max(wait_s / 5, 0.1)))
    finally:
        request_resources(bundles=[])
    raise ConfigError(f"{msg}, and no node that could hold it joined within {wait_s:.0f} s")


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive now."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def require_shared_storage(uri: str, key: str, who: str) -> None:
    """On a cluster of several nodes, ``uri`` (which ``who`` read or write, e.g. "Ray Train's workers write
    checkpoints") must be one every node sees; ConfigError naming ``key`` otherwise.

    Ray Train's workers upload checkpoints from their own nodes and Ray Data's tasks write from theirs; a local
    folder exists on one node only, so the files would scatter over the nodes' disks and a restore would find
    none. Object storage passes, and so does a local path on a network filesystem mounted on every node (NFS,
    EFS, Lustre, a FUSE bucket mount); ``SR_RAY_SHARED_STORAGE=1`` vouches for any other shared mount.
    """
    nodes = alive_nodes()
    if nodes < 2 or storage.is_shared(uri) or os.environ.get("SR_RAY_SHARED_STORAGE") == "1":
        return
    raise ConfigError(
        f"{key}={storage.redact(uri)} is a local path, but this Ray cluster has {nodes} nodes and {who} on "
        f"whichever node they are placed: a local folder exists on one node only, so files would scatter over "
        f"the nodes' disks (or not be found) and a run restored on another node would find no checkpoint. Use "
        f"shared storage: s3://bucket/prefix, or a path on a network filesystem mounted on every node (set "
        f"SR_RAY_SHARED_STORAGE=1 when it is one this check cannot recognise)")


def in_ray_worker() -> bool:
    """True inside a Ray task or actor (not in a driver, nor when a test calls a stage in-process)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def worker_prints_to_stderr() -> None:
    """In a Ray worker: send Python-level prints (libraries' banners, e.g. DeepSpeed's op build) to stderr.

    Ray forwards a worker's stdout to the driver's stdout, asynchronously; a job's last
    stdout line must be its JSON summary, so workers keep stdout free.
    """
    import sys

    sys.stdout = sys.stderr


@dataclass
class ActorPoolConfig:
    """An actor pool of a ``map_batches`` stage: the one shape of every pool (generation, batch scoring, the
    T2I evaluation's and the comparison's scorers); each job's subclass sets its defaults and adds its keys."""

    num_actors: int = 1
    """Actors (one GPU each with use_gpu); the pool starts with these."""
    max_actors: int = 0
    """Above num_actors: the pool grows to this many while work is queued (0: a fixed pool of num_actors)."""
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 1.0
    batch_size: int = 8
    """Images per model call."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_actors < 1:
            raise ValueError("batch_size and num_actors must be >= 1")
        if self.max_actors and self.max_actors < self.num_actors:
            raise ValueError("max_actors must be 0 (a fixed pool) or >= num_actors")

    def actor_bundle(self) -> dict[str, float]:
        """One actor's resources."""
        return {"CPU": self.cpus_per_actor, **({"GPU": self.gpus_per_actor} if self.use_gpu else {})}

    def map_kwargs(self) -> dict[str, Any]:
        """``compute``, ``num_cpus`` and ``num_gpus`` of ``Dataset.map_batches`` for this pool."""
        import ray.data

        size = ({"min_size": self.num_actors, "max_size": self.max_actors} if self.max_actors > self.num_actors
                else {"size": self.num_actors})
        return {"compute": ray.data.ActorPoolStrategy(**size), "num_cpus": self.cpus_per_actor,
                "num_gpus": self.gpus_per_actor if self.use_gpu else 0}


@dataclass
class DecodedPoolConfig(ActorPoolConfig):
    """A scorer pool fed by CPU tasks that decode the images (batch scoring, the comparison)."""

    decode_num_cpus: float = 0.25
    """CPUs per image-decoding task."""
    resource_wait_s: float = 300.0
    """On a joined cluster that may grow: how long to wait for the pool's resources."""

    def bundles(self, pools: int = 1) -> list[dict[str, float]]:
        """What must fit before work starts: ``pools`` pools of ``num_actors`` actors and one decode task."""
        return [self.actor_bundle()] * (pools * self.num_actors) + [{"CPU": self.decode_num_cpus}]
