"""Several nodes, and losing one: the jobs on a head and three worker nodes (``tests/multinode.py``, each
scenario in a process of its own with its own ``ray.cluster_utils.Cluster``; S3 is the session's moto server).

What a spot interruption must not do: lose the run, train a batch twice past the checkpoint, score a generation
twice or drop one, or change the curated triplets. Each scenario takes 1-4 minutes on 2 cores: extended suite.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict

import pytest
from conftest import ROOT

pytestmark = pytest.mark.extended


def scenario(name: str, tmp_path, bucket: str, timeout: int = 900) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode.py"), name, str(tmp_path), bucket],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    (tmp_path / f"{name}.log").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def lineage(traces: dict[str, list[dict]], resumed_from: int) -> dict[int, list[dict]]:
    """Per rank, the batches the final model was trained on: the first attempt's up to the restored checkpoint,
    then the restored attempt's."""
    per_rank: dict[int, list[dict]] = defaultdict(list)
    for fname, records in traces.items():
        start = int(re.match(r"from(\d+)-", fname).group(1))
        assert start in (0, resumed_from), f"an attempt started from step {start}: {sorted(traces)}"
        for r in records:
            if (start == 0 and r["step"] <= resumed_from) or start == resumed_from > 0:
                per_rank[r["rank"]].append(r)
    return per_rank


def check_trained_once(traces: dict[str, list[dict]], resumed_from: int, steps: int, ranks: int, rows: int) -> None:
    """The restored attempt began right after the checkpoint; the final model saw every step once per worker and
    every row once (``rows`` per worker per step, one epoch)."""
    restored = [r for f, recs in traces.items() if f.startswith(f"from{resumed_from:06d}-") for r in recs]
    assert min(r["step"] for r in restored) == resumed_from + 1  # nothing before the checkpoint trained again
    per_rank = lineage(traces, resumed_from)
    assert sorted(per_rank) == list(range(ranks))
    for rank, recs in per_rank.items():
        assert sorted(r["step"] for r in recs) == list(range(1, steps + 1)), rank  # every step exactly once
    seen = [(r["epoch"], row) for recs in per_rank.values() for r in recs for row in r["rows"]]
    assert len(seen) == steps * ranks * rows
    assert len(set(seen)) == len(seen), f"{len(seen) - len(set(seen))} rows trained twice in one epoch"


def test_reward_training_spreads_over_nodes_and_survives_losing_one(tmp_path, s3_bucket):
    out = scenario("train", tmp_path, s3_bucket)
    # a local run.storage_path on a multi-node cluster is refused before any training, saying why
    assert out["local_refused"] and "run.storage_path=" in out["local_refused"]
    assert "4 nodes" in out["local_refused"] and "s3://" in out["local_refused"]
    assert not (tmp_path / "runs" / "local" / "checkpoint_manager_snapshot.json").exists()

    spread = out["spread"]  # 2 workers on 2 different nodes, the planned steps, checkpoints on S3
    assert out["spread_worker_nodes"] == 2
    assert spread["steps"] == 960 // 32 and spread["resumed_from_step"] is None
    assert spread["checkpoint"].startswith(f"s3://{s3_bucket}/runs/spread/checkpoint_")
    assert any(k.endswith("/model.pt") and "/checkpoint_" in k for k in out["spread_keys"])
    assert spread["test_pairwise_accuracy"] is not None

    lost = out["lost"]  # a worker's node removed after the first registered checkpoint
    assert out["removed"]["node"] and out["alive_nodes_after"] == 3
    assert lost["steps"] == 960 // 32 and lost["resumed_from_step"] in (5, 10, 15, 20, 25)
    assert lost["checkpoint"].startswith(f"s3://{s3_bucket}/runs/lost/checkpoint_")
    check_trained_once(out["traces"], lost["resumed_from_step"], 960 // 32, ranks=2, rows=16)


def test_scoring_loses_a_node_and_writes_every_generation_once(tmp_path, s3_bucket):
    out = scenario("score", tmp_path, s3_bucket)
    assert out["removed"]["node"], "no scorer's node was removed while the job ran"
    calm, lost = out["calm_rows"], out["lost_rows"]
    ids = [r[0] for r in lost]
    assert len(ids) == len(set(ids)) == out["inputs"] - 2  # every usable generation once; 2 rejects
    assert [r[0] for r in calm] == ids
    assert max(abs(a[1] - b[1]) for a, b in zip(calm, lost)) < 1e-5
    assert out["calm_rejects"] == out["lost_rejects"] and len(out["lost_rejects"]) == 2
    assert out["lost"]["scored"] == out["calm"]["scored"] == out["inputs"] - 2


def test_curation_loses_a_node_and_writes_the_same_triplets(tmp_path, s3_bucket):
    out = scenario("curate", tmp_path, s3_bucket)
    assert out["removed"]["node"], "no node was removed while curation ran"
    for split in ("train", "val", "test"):
        assert out["lost_triplets"][split] == out["calm_triplets"][split], split
    assert sum(len(v) for v in out["lost_triplets"].values()) > 100


def test_sd_finetune_loses_a_node_and_resumes_from_the_deepspeed_checkpoint(tmp_path, s3_bucket):
    out = scenario("finetune", tmp_path, s3_bucket)
    lost = out["lost"]
    assert out["removed"]["node"]
    assert lost["deepspeed"] == "ZeRO-2" and lost["steps"] == 48 // 4
    assert lost["resumed_from_step"] in (2, 4, 6, 8, 10)
    check_trained_once(out["traces"], lost["resumed_from_step"], 48 // 4, ranks=2, rows=2)
