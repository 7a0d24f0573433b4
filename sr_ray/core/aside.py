"""CPU work run in a child process while this one goes on: :class:`Aside`.

The closed loop fits the tiny generator (minutes of torch on the CPU) while the reward model trains with Ray:
two jobs that share no input, each leaving cores idle the other can use (Ray's start, data waits). The child
is spawned, not forked: this process may already hold Ray's or torch's threads, which a fork would copy
half-made.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from typing import Any, Callable

from sr_ray.core.logs import setup_logging

log = logging.getLogger(__name__)


def _run(fn: Callable, args: tuple, seconds: Any) -> None:
    setup_logging()  # a spawned child starts with no logging set up
    t = time.perf_counter()
    fn(*args)
    seconds.value = time.perf_counter() - t


class Aside:
    """``fn(*args)`` started now in a spawned child process (``fn`` and ``args`` must pickle: a module-level
    function); :meth:`wait` joins it. The child is a daemon: it dies with this process."""

    def __init__(self, name: str, fn: Callable, *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name, self.seconds = name, ctx.Value("d", -1.0)
        self.proc = ctx.Process(target=_run, args=(fn, args, self.seconds), name=f"sr-ray {name}", daemon=True)
        self.proc.start()
        log.info("[%s] running aside (pid %d) while this process goes on", name, self.proc.pid)

    def wait(self) -> float:
        """Seconds ``fn`` took in the child, once it has ended; raises if it failed (its traceback is on stderr
        above)."""
        self.proc.join()
        if self.proc.exitcode != 0:
            raise RuntimeError(f"{self.name}: its child process (pid {self.proc.pid}) failed with exit code "
                               f"{self.proc.exitcode}; its traceback is printed above")
        return round(self.seconds.value, 1)

    def cancel(self) -> None:
        """Stop the child (when this process fails before it waits)."""
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join()
