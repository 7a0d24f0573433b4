"""Curation throughput: sr-ray's Ray job against two single-machine implementations of the
same rules on the same simulated log, in one run: pandas (:mod:`sr_ray.bench.curate_reference`,
the whole log in one DataFrame) and DuckDB (:mod:`sr_ray.bench.curate_duckdb`, embedded SQL
over the same Parquet: what a user with one big machine would pick). Per side and log size:
wall time, rows/s and peak memory; per side, the fixed cost and the marginal rows/s of the
line through the smallest and the largest size (wall = fixed + rows / marginal).

All sides select triplets and write them in the authors' form (``pack=false``: image bytes
are not fetched, so the simulated log needs no images); the benchmark asserts that they
select the same number of triplets per split. Each side runs in its own process, its wall
time counts its imports (and for Ray, starting the local cluster); memory is the peak summed
RSS of that process and, for Ray, of every Ray process it started (raylet, GCS, workers),
sampled every 0.2 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil

from sr_ray.demo.community import CommunityConfig, simulate

SIDES = ("pandas", "duckdb", "ray")


@dataclass
class BenchCurateConfig:
    sizes: list[int] = field(default_factory=lambda: [1_000_000, 10_000_000])
    """Log rows per measurement (simulated once each, cached under ``work_dir``)."""
    work_dir: str = "/tmp/sr-ray-bench-curate"
    num_cpus: int | None = None
    """CPUs of the local Ray cluster and DuckDB's threads (default: all)."""
    sides: list[str] = field(default_factory=lambda: list(SIDES))
    """Which implementations to run (of pandas, duckdb, ray)."""
    seed: int = 0
    repeats: int = 1
    """Runs of each side at each size: the table shows the fastest (a shared machine's noise only ever adds time)
    and the highest peak memory."""

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError("sizes must be one or more positive row counts")
        if self.repeats < 1:
            raise ValueError("repeats must be >= 1")
        unknown = [s for s in self.sides if s not in SIDES]
        if unknown or not self.sides:
            raise ValueError(f"sides must be some of {list(SIDES)}, got {self.sides}")


def _peak_rss(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for ``proc``; return (exit code, peak summed RSS in GiB of it and its descendants)."""
    peak = 0
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [p] + p.children(recursive=True)
            peak = max(peak, sum(q.memory_info().rss for q in procs if q.is_running()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        time.sleep(0.2)
    return proc.returncode, peak / 2**30


def _child(kind: str, log: str, out: str, num_cpus: int | None) -> dict:
    """Run one side in this process (called in a fresh interpreter)."""
    t0 = time.perf_counter()
    if kind == "pandas":
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        from sr_ray.bench.curate_reference import curate_pandas
        from sr_ray.curation.curate import CurateConfig

        df = pd.read_parquet(log)
        pairs, counts = curate_pandas(df, CurateConfig(pack=False))
        for s in ("train", "val", "test"):
            os.makedirs(f"{out}/{s}", exist_ok=True)
            part = pairs[pairs.split == s].rename(columns={"pos_uri": "pos_path", "neg_uri": "neg_path"})
            pq.write_table(pa.Table.from_pandas(part.drop(columns="split"), preserve_index=False),
                           f"{out}/{s}/part-00000.parquet")
        triplets = counts["triplets"]
    elif kind == "duckdb":
        from sr_ray.bench.curate_duckdb import curate_duckdb_to
        from sr_ray.curation.curate import CurateConfig

        triplets = curate_duckdb_to(log, CurateConfig(pack=False), out, threads=num_cpus)["triplets"]
    else:
        import ray

        from sr_ray.curation.curate import CurateConfig, curate

        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        s = curate(CurateConfig(log=log, out=out, pack=False, rows_per_shard=100_000, overwrite=True))
        triplets = s["counts"]["triplets"]
    return {"wall_s": time.perf_counter() - t0, "triplets": triplets}


def _run_side(kind: str, log: str, out: str, num_cpus: int | None) -> dict:
    code = ("import json, sys; from sr_ray.bench.curate import _child; "
            f"print('RESULT', json.dumps(_child({kind!r}, {log!r}, {out!r}, {num_cpus!r})))")
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    out_lines: list[str] = []
    reader = threading.Thread(target=lambda: out_lines.extend(proc.stdout.read().splitlines()))
    reader.start()
    rc, peak = _peak_rss(proc)
    reader.join()
    res = [ln for ln in out_lines if ln.startswith("RESULT ")]
    if rc != 0 or not res:
        raise RuntimeError(f"{kind} side failed (exit {rc})")
    r = json.loads(res[-1][len("RESULT "):])
    r["peak_rss_gib"] = round(peak, 2)
    return r


def _simulated_log(cfg: BenchCurateConfig, n: int) -> str:
    base = os.path.join(cfg.work_dir, f"n{n}", "community")
    if not os.path.exists(os.path.join(base, "community.json")):
        t = time.perf_counter()
        simulate(CommunityConfig(images=n, seed=cfg.seed, write_images=False, chunk_images=100_000), base)
        print(f"[bench] simulated {n:,} rows in {time.perf_counter() - t:.1f}s", flush=True)
    return os.path.join(base, "log")


def fit_line(sizes: list[int], walls: list[float]) -> dict:
    """Fixed cost (s) and marginal rows/s of the line through the smallest and the largest size."""
    (n0, t0), (n1, t1) = min(zip(sizes, walls)), max(zip(sizes, walls))
    if n1 == n0:
        return {"fixed_s": None, "marginal_rows_per_s": None}
    slope = (t1 - t0) / (n1 - n0)
    return {"fixed_s": round(t0 - slope * n0, 1), "marginal_rows_per_s": round(1 / slope) if slope > 0 else None}


def bench_curate(cfg: BenchCurateConfig) -> dict:
    import shutil

    rows = []
    for n in sorted(cfg.sizes):
        log = _simulated_log(cfg, n)
        sides = {}
        for kind in cfg.sides:
            out = os.path.join(cfg.work_dir, f"n{n}", f"out-{kind}")
            runs = []
            for _ in range(cfg.repeats):
                shutil.rmtree(out, ignore_errors=True)
                runs.append(_run_side(kind, log, out, cfg.num_cpus))
                print(f"[bench] {n:,} rows, {kind}: {runs[-1]['wall_s']:.1f}s, peak {runs[-1]['peak_rss_gib']} GiB",
                      flush=True)
            sides[kind] = {**min(runs, key=lambda r: r["wall_s"]), "peak_rss_gib": max(r["peak_rss_gib"] for r in runs)}
        first = next(iter(sides.values()))["triplets"]
        assert all(s["triplets"] == first for s in sides.values()), \
            f"the implementations disagree: { {k: s['triplets'] for k, s in sides.items()} }"
        rows.append({"rows": n, "triplets": sum(first.values()), "sides": {
            k: {"wall_s": round(s["wall_s"], 2), "rows_per_s": round(n / s["wall_s"]), "peak_gib": s["peak_rss_gib"]}
            for k, s in sides.items()}})
    fits = {k: fit_line([r["rows"] for r in rows], [r["sides"][k]["wall_s"] for r in rows]) for k in cfg.sides}
    return {"cpus": cfg.num_cpus or os.cpu_count(), "repeats": cfg.repeats, "sizes": rows, "fit": fits}


def format_table(r: dict) -> str:
    sides = list(r["fit"])
    best = f", fastest of {r['repeats']} runs" if r.get("repeats", 1) > 1 else ""
    lines = [f"curation on {r['cpus']} CPUs: {', '.join(sides)} - same rules, same simulated log (authors' form){best}",
             f"{'rows':>11s} {'triplets':>10s}  {'side':<7s} {'wall s':>7s} {'rows/s':>10s} {'peak GiB':>9s}"]
    for x in r["sizes"]:
        for i, k in enumerate(sides):
            s = x["sides"][k]
            head = f"{x['rows']:>11,} {x['triplets']:>10,}" if i == 0 else " " * 22
            lines.append(f"{head}  {k:<7s} {s['wall_s']:>7.1f} {s['rows_per_s']:>10,} {s['peak_gib']:>9.2f}")
    lo, hi = r["sizes"][0]["rows"], r["sizes"][-1]["rows"]
    lines.append(f"wall = fixed + rows / marginal, through {lo:,} and {hi:,} rows:")
    lines.append(f"{'side':<7s} {'fixed s':>8s} {'marginal rows/s':>16s}")
    for k, f in r["fit"].items():
        fixed = "-" if f["fixed_s"] is None else f"{f['fixed_s']:.1f}"
        marg = "-" if f["marginal_rows_per_s"] is None else f"{f['marginal_rows_per_s']:,}"
        lines.append(f"{k:<7s} {fixed:>8s} {marg:>16s}")
    return "\n".join(lines)
