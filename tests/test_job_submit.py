"""`ray job submit` of the training job to a `ray start --head` on this machine (dashboard, token auth)."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port, small_overrides

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head(tmp_path):
    """A separate head node with the dashboard (job server), in its own process group."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=bin_dir + os.pathsep + os.environ["PATH"])
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    # Own ports for every agent: the session's Ray cluster (other tests) already holds the defaults
    # (e.g. the dashboard agent's 52365), and a head whose agent cannot bind accepts no job.
    agent_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    proc = subprocess.Popen([str(Path(bin_dir) / "ray"), "start", "--head", f"--port={port}", *agent_ports,
                             f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", "--disable-usage-stats", "--block"],
                            env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        assert time.time() < deadline, "dashboard did not come up in 120 s: " + (tmp_path / "head.log").read_text()[-2000:]
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 under token auth: the server is up
            break
        except OSError:
            assert proc.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(1)
    yield url, env
    # SIGKILL the whole group (head, raylet, GCS, dashboard): SIGTERM takes ~15 s to wind down
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def submit(url: str, env: dict, job: str, args: list[str], timeout: int) -> dict:
    """``ray job submit --working-dir . -- python <job> <args>``; asserts success, returns the job's JSON summary."""
    deadline = time.time() + 120
    while True:
        out = subprocess.run(["ray", "job", "submit", "--address", url, "--working-dir", ".", "--",
                              "python", job, *args],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        # the dashboard answers before the node's job agent is up: Ray says to try again later
        if "No available agent" not in out.stderr + out.stdout or time.time() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


@pytest.mark.extended  # ~2 min on 2 cores (a second Ray head): the default suite stays under its 12 minutes
def test_ray_job_submit_runs_the_training_job(ray_head, tmp_path, demo_cache):
    url, env = ray_head
    summary = submit(url, env, "jobs/train_reward.py", small_overrides(tmp_path, demo_cache, "submitted"), 600)
    assert summary["steps"] == 10 and summary["checkpoint"].startswith(str(tmp_path / "runs" / "submitted"))
    assert Path(tmp_path, "runs", "submitted", "summary.json").is_file()


@pytest.mark.extended  # ~2 min: the DeepSpeed CPU op may be built on first use
def test_ray_job_submit_runs_the_stable_diffusion_fine_tune(ray_head, tmp_path):
    """The fine-tuning job as users submit it: DeepSpeed ZeRO-2 over 2 Ray Train workers on the head's 2 CPUs."""
    url, env = ray_head
    over = [f"run.storage_path={tmp_path / 'runs'}", "run.name=sd-submitted", "optim.max_steps=4",
            "run.checkpoint_every_steps=2", "run.sample_steps=2", "data.demo.prompts=24"]
    summary = submit(url, env, "jobs/finetune_sd.py", over, 900)
    assert summary["steps"] == 4 and summary["deepspeed"] == "ZeRO-2" and summary["workers"] == 2
    assert Path(summary["pipeline"], "model_index.json").is_file()
    assert summary["run_dir"] == str(tmp_path / "runs" / "sd-submitted")
