"""Aside: a function run in a spawned child process while the caller goes on (the closed loop fits the tiny
generator this way while the reward trains)."""

import os
import time

import pytest

from sr_ray.core.aside import Aside
from sr_ray.diffusion.components import model_prepared
from sr_ray.diffusion.tiny import tiny_generator_file, tiny_vae_file


def write_pid_after(path: str, delay: float) -> None:
    time.sleep(delay)
    with open(path, "w") as f:
        f.write(str(os.getpid()))


def fail() -> None:
    raise ValueError("the fit went wrong")


def test_runs_in_another_process_while_the_caller_goes_on(tmp_path):
    out = tmp_path / "pid"
    t0 = time.perf_counter()
    job = Aside("writer", write_pid_after, str(out), 1.0)
    assert time.perf_counter() - t0 < 1.0 and not out.exists()  # started, not waited for
    seconds = job.wait()
    assert 1.0 <= seconds < 5.0
    assert int(out.read_text()) not in (os.getpid(), 0)


def test_a_failure_in_the_child_is_raised_with_its_name(capfd):
    job = Aside("generator", fail)
    with pytest.raises(RuntimeError, match=r"generator: its child process \(pid \d+\) failed with exit code 1"):
        job.wait()
    assert "the fit went wrong" in capfd.readouterr().err  # the child's traceback reaches the job's log


def test_cancel_stops_the_child(tmp_path):
    job = Aside("slow", write_pid_after, str(tmp_path / "pid"), 60.0)
    t0 = time.perf_counter()
    job.cancel()
    assert time.perf_counter() - t0 < 10 and not job.proc.is_alive() and not (tmp_path / "pid").exists()


def test_model_prepared_follows_the_tiny_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not model_prepared("tiny") and not model_prepared("tiny-pretrained")
    tiny_vae_file().parent.mkdir(parents=True)
    tiny_vae_file().touch()
    assert model_prepared("tiny") and not model_prepared("tiny-pretrained")
    tiny_generator_file().touch()
    assert model_prepared("tiny-pretrained")
    assert model_prepared("stabilityai/stable-diffusion-2-1-base")  # nothing to fit: loaded as it is
