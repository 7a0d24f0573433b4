"""Curation throughput: sr-ray's Ray Data job against a single-process pandas
implementation of the same rules (:mod:`sr_ray.bench.curate_reference`), on the same
simulated log, in one run; rows/s at several log sizes and the peak memory of both.

Both select triplets and write them in the authors' form (``pack=false``: image
bytes are not fetched, so the simulated log needs no images). Each side runs in
its own process; memory is the peak summed RSS of that process and, for Ray, of
every Ray process it started (raylet, GCS, workers), sampled every 0.2 s.
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


@dataclass
class BenchCurateConfig:
    sizes: list[int] = field(default_factory=lambda: [100_000, 300_000, 1_000_000])
    """Log rows per measurement."""
    work_dir: str = "/tmp/sr-ray-bench-curate"
    num_cpus: int | None = None
    """CPUs of the local Ray cluster (default: all)."""
    seed: int = 0


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


def bench_curate(cfg: BenchCurateConfig) -> dict:
    import shutil

    rows = []
    for n in cfg.sizes:
        base = os.path.join(cfg.work_dir, f"n{n}")
        log = os.path.join(base, "community", "log")
        if not os.path.exists(os.path.join(base, "community", "community.json")):
            t = time.perf_counter()
            simulate(CommunityConfig(images=n, seed=cfg.seed, write_images=False, chunk_images=100_000),
                     os.path.join(base, "community"))
            print(f"[bench] simulated {n:,} rows in {time.perf_counter() - t:.1f}s", flush=True)
        sides = {}
        for kind in ("pandas", "ray"):
            out = os.path.join(base, f"out-{kind}")
            shutil.rmtree(out, ignore_errors=True)
            sides[kind] = _run_side(kind, log, out, cfg.num_cpus)
            print(f"[bench] {n:,} rows, {kind}: {sides[kind]['wall_s']:.1f}s, peak {sides[kind]['peak_rss_gib']} GiB",
                  flush=True)
        assert sides["pandas"]["triplets"] == sides["ray"]["triplets"], "the two implementations disagree"
        rows.append({"rows": n, "triplets": sum(sides["ray"]["triplets"].values()),
                     "pandas_s": round(sides["pandas"]["wall_s"], 1), "ray_s": round(sides["ray"]["wall_s"], 1),
                     "pandas_rows_per_s": round(n / sides["pandas"]["wall_s"]),
                     "ray_rows_per_s": round(n / sides["ray"]["wall_s"]),
                     "speedup": round(sides["pandas"]["wall_s"] / sides["ray"]["wall_s"], 3),
                     "pandas_peak_gib": sides["pandas"]["peak_rss_gib"], "ray_peak_gib": sides["ray"]["peak_rss_gib"]})
    first, last = rows[0], rows[-1]
    growth = {"rows_ratio": last["rows"] / first["rows"], "ray_time_ratio": round(last["ray_s"] / first["ray_s"], 2),
              "pandas_time_ratio": round(last["pandas_s"] / first["pandas_s"], 2),
              "ray_mem_ratio": round(last["ray_peak_gib"] / first["ray_peak_gib"], 2),
              "pandas_mem_ratio": round(last["pandas_peak_gib"] / first["pandas_peak_gib"], 2)}
    return {"cpus": cfg.num_cpus or os.cpu_count(), "sizes": rows, "growth": growth}


def format_table(r: dict) -> str:
    lines = [f"curation on {r['cpus']} CPUs: sr-ray (Ray Data) vs single-process pandas, same rules, same log",
             f"{'rows':>10s} {'triplets':>9s} {'pandas s':>9s} {'ray s':>7s} {'pandas rows/s':>14s} "
             f"{'ray rows/s':>11s} {'ray/pandas':>10s} {'pandas GiB':>11s} {'ray GiB':>8s}"]
    for x in r["sizes"]:
        lines.append(f"{x['rows']:>10,} {x['triplets']:>9,} {x['pandas_s']:>9.1f} {x['ray_s']:>7.1f} "
                     f"{x['pandas_rows_per_s']:>14,} {x['ray_rows_per_s']:>11,} {x['speedup']:>9.2f}x "
                     f"{x['pandas_peak_gib']:>11.2f} {x['ray_peak_gib']:>8.2f}")
    g = r["growth"]
    lines.append(f"from {r['sizes'][0]['rows']:,} to {r['sizes'][-1]['rows']:,} rows ({g['rows_ratio']:.0f}x): "
                 f"time x{g['ray_time_ratio']} (ray) vs x{g['pandas_time_ratio']} (pandas); "
                 f"peak memory x{g['ray_mem_ratio']} (ray) vs x{g['pandas_mem_ratio']} (pandas)")
    return "\n".join(lines)
