"""Starting or joining Ray the same way in every job."""

from __future__ import annotations

import os
import socket
from typing import Any


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(address: str | None = None, *, num_cpus: float | None = None,
             env_vars: dict[str, str] | None = None, **kwargs: Any) -> None:
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
    """
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            port = free_port()
            env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", **(env_vars or {})}
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=port, runtime_env={"env_vars": env}, **kwargs)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1":
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False


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
