"""One pipeline command at a time per project (flows/lock.py): a second one is refused naming the first,
or waits with --wait; the lock dies with its holder; two real `pipeline run`s in one directory leave
params.yaml and dvc.lock describing what the one that ran produced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.lock import LOCK_FILE, ProjectBusy, project_lock
from tests.helpers.project import make_project

HOLD = """
import sys, time
from pathlib import Path
from flows.lock import project_lock
with project_lock(Path(sys.argv[1]), "pipeline run --profile holder-test"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(root: Path, seconds: float) -> subprocess.Popen:
    """A separate process holding the project's lock for `seconds`; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_naming_the_first(tmp_path):
    holder = hold_lock(tmp_path, 60)
    try:
        with (
            pytest.raises(
                ProjectBusy, match=rf"pid {holder.pid}, started .*pipeline run --profile holder-test"
            ),
            project_lock(tmp_path, "second"),
        ):
            pytest.fail("the body ran while another process held the lock")
    finally:
        holder.kill()
        holder.wait()


def test_wait_queues_behind_the_holder(tmp_path):
    holder = hold_lock(tmp_path, 2)
    start = time.monotonic()
    with project_lock(tmp_path, "waiter", wait=True):
        waited = time.monotonic() - start  # the body runs only once the holder's 2 s are over
    assert waited > 1.5
    holder.wait()


def test_a_killed_holder_releases_the_lock(tmp_path):
    holder = hold_lock(tmp_path, 600)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with project_lock(tmp_path, "after the kill"):
        assert (tmp_path / LOCK_FILE).is_file()


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with project_lock(tmp_path, "outer"), project_lock(tmp_path, "inner (the flow inside `pipeline run`)"):
        pass
    with project_lock(tmp_path, "again"):  # released by the outer exit
        pass


@pytest.mark.e2e
def test_two_pipeline_runs_in_one_directory(tmp_path):
    """The first runs; the second, started while the first holds the lock, is refused before it writes
    params.yaml; afterwards dvc.lock matches the outputs and params.yaml is the first run's."""
    project = make_project(tmp_path / "project")
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
    )
    env.pop("PREFECT_API_URL", None)
    stages = ["--stage", "ingest", "--stage", "validate", "--stage", "tokenizer"]
    first = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", *stages],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lock = project / LOCK_FILE
    deadline = time.time() + 120
    while not (lock.is_file() and f'"pid": {first.pid}' in lock.read_text()):
        assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
        time.sleep(0.2)
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--profile",
            "tiny",
            "--set",
            "tokenizer.vocab_size=300",
            *stages,
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.poll() is None, "the first run ended before the second was tried: the test proves nothing"
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"pid {first.pid}" in second.stderr and "--wait" in second.stderr
    out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out[-3000:]
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["tokenizer"]["vocab_size"] != 300  # the refused run wrote nothing
    status = subprocess.run(
        ["dvc", "status", "ingest", "validate", "tokenizer"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
