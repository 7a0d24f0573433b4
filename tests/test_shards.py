"""The shared machinery of the output-writing jobs: shard collection and the same-settings record."""

import pyarrow as pa
import pytest

from sr_ray.core import identity
from sr_ray.core.config import ConfigError
from sr_ray.core.shards import ShardCollector


def test_a_shard_is_committed_when_its_last_row_is_back_and_missing_rows_are_named():
    commits = []
    c = ShardCollector({"a": 3, "b": 2, "c": 1}, lambda s, parts: commits.append((s, pa.concat_tables(parts))),
                       key="shard", tag="t", columns=["x"])
    c.add(pa.table({"shard": ["a", "b", "a"], "x": [1, 2, 3], "drop": [0, 0, 0]}))
    assert commits == [] and c.rows == 3
    c.add(pa.table({"shard": ["b", "a"], "x": [4, 5], "drop": [0, 0]}))
    assert [s for s, _ in commits] == ["b", "a"] and c.committed == 2
    assert commits[1][1].column_names == ["x"] and commits[1][1]["x"].to_pylist() == [1, 3, 5]
    with pytest.raises(RuntimeError, match=r"rows missing from the output .*'c': 1"):
        c.check_complete("the output")
    with pytest.raises(RuntimeError, match="rows of z, which is not an input shard"):
        c.add(pa.table({"shard": ["z"], "x": [9], "drop": [0]}))
    c.add(pa.table({"shard": ["c"], "x": [6], "drop": [0]}))
    c.check_complete("the output")
    assert c.committed == 3 and c.rows == c.total == 6


def test_fault_injection_kills_the_process_right_after_the_nth_commit(tmp_path):
    """kill_after=2: the process dies by SIGKILL inside the add() that commits the second shard, not later."""
    import signal
    import subprocess
    import sys

    code = f"""
import pyarrow as pa
from sr_ray.core.shards import ShardCollector
log = open({str(tmp_path / "log")!r}, "a")
c = ShardCollector({{"a": 1, "b": 1, "c": 1}}, lambda s, parts: (log.write(s + "\\n"), log.flush()), key="shard",
                   tag="t", kill_after=2)
c.add(pa.table({{"shard": ["a"]}}))
c.add(pa.table({{"shard": ["b", "c"]}}))
log.write("survived\\n")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "log").read_text().split() == ["a", "b"]


def test_one_folder_holds_one_set_of_settings(tmp_path):
    out = str(tmp_path / "out")
    assert identity.same_settings(out, "_s.json", {"margin": 0.1, "inputs": {"scores": "a"}}, "a set") is None
    before = identity.same_settings(out, "_s.json", {"margin": 0.1, "inputs": {"scores": "a"}}, "a set")
    assert before == {"margin": 0.1, "inputs": {"scores": "a"}}
    with pytest.raises(ConfigError, match=r"holds a set made with other settings or inputs \(inputs.scores differ\)"):
        identity.same_settings(out, "_s.json", {"margin": 0.1, "inputs": {"scores": "b"}}, "a set")
    # keys of the record the caller keeps apart (generation's per-model fingerprints) are not compared
    identity.write_record(f"{out}/_s.json", {**before, "models": {"m": 1}})
    assert identity.same_settings(out, "_s.json", {"margin": 0.1, "inputs": {"scores": "a"}}, "a set")["models"]
    assert identity.same_settings(str(tmp_path / "new"), "_s.json", {"k": 1}, "x", write=False) is None
    assert not (tmp_path / "new").exists()
