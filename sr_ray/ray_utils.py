"""Starting or joining Ray the same way in every job."""

from __future__ import annotations

import os


def init_ray(address: str | None = None) -> None:
    """Join ``address`` or ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local cluster.

    Plain ``ray.init()`` would join whatever cluster ``ray start`` last recorded on
    this machine, and hang for minutes when that cluster is gone; joining an
    existing cluster is therefore explicit (``address=auto`` joins the local one).
    Ray Data's progress bars are turned off: jobs print their own progress lines,
    and the bars flood non-interactive logs.
    """
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", include_dashboard=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") == "1":
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
