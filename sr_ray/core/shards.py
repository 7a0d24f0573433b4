"""Collect rows streaming back from Ray Data into shards, commit each the moment it is complete, report progress.

Batch scoring (a shard per input file) and generation (a shard per chunk of prompts) both iterate a Ray
Dataset whose rows carry the name of the shard they belong to. :class:`ShardCollector` groups them, calls the
job's ``commit(shard, parts)`` when a shard's last row is back (the job writes it atomically, so a killed run
resumes from its finished shards), logs rows, rate and ETA every few seconds, and names the shards whose rows
never all came back. For resume tests it can SIGKILL its own process right after a given number of commits: a
kill timed from outside races the commits, which come in bursts of a few milliseconds when batches are small.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable, Sequence

import pyarrow as pa

log = logging.getLogger(__name__)


class ShardCollector:
    """``need``: {shard: rows expected}; ``key``: the column naming a row's shard; ``columns``: the columns kept
    (all when empty); ``tag``/``unit``: the progress line's prefix and what a row is; ``extra``: more text for it;
    ``kill_after``: fault injection, SIGKILL this process once that many shards are committed (0: never)."""

    def __init__(self, need: dict[str, int], commit: Callable[[str, list[pa.Table]], None], key: str,
                 tag: str, unit: str = "rows", every_s: float = 10.0, columns: Sequence[str] = (),
                 extra: Callable[[], str] | None = None, kill_after: int = 0):
        self.need, self.commit, self.key, self.columns = dict(need), commit, key, list(columns)
        self.kill_after = kill_after
        self.tag, self.unit, self.every_s, self.extra = tag, unit, every_s, extra
        self.parts: dict[str, list[pa.Table]] = {}
        self.total, self.rows, self.committed = sum(self.need.values()), 0, 0
        self.t0 = self.last = time.perf_counter()

    def add(self, batch: pa.Table) -> None:
        """Take one batch of rows; commit every shard it completes."""
        import pyarrow.compute as pc

        for shard in batch[self.key].unique().to_pylist():
            if shard not in self.need:
                raise RuntimeError(f"Ray Data returned rows of {shard}, which is not an input shard")
            part = batch.filter(pc.equal(batch[self.key], shard))
            self.parts.setdefault(shard, []).append(part.select(self.columns) if self.columns else part)
            self.need[shard] -= len(part)
            self.rows += len(part)
            if self.need[shard] == 0:
                self.commit(shard, self.parts.pop(shard))
                self.committed += 1
                if self.committed == self.kill_after:
                    log.warning("[%s] fault injection: SIGKILL after %d committed shard(s)", self.tag, self.committed)
                    os.kill(os.getpid(), signal.SIGKILL)
        self.log()

    def rate(self) -> float:
        return self.rows / max(time.perf_counter() - self.t0, 1e-9)

    def log(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.rate()
        more = f"  {self.extra()}" if self.extra else ""
        log.info("[%s] %d/%d %s (%.0f%%)  %.2f %s/s%s  eta %.0fs", self.tag, self.rows, self.total, self.unit,
                 100 * self.rows / max(self.total, 1), rate, self.unit, more,
                 (self.total - self.rows) / max(rate, 1e-9))

    def check_complete(self, what: str) -> None:
        """Every shard committed, else a RuntimeError naming those short of rows (rows missing)."""
        short = {s: n for s, n in self.need.items() if n}
        if short:
            raise RuntimeError(f"rows missing from {what} (shard: rows still expected): {short}")
