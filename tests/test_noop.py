"""The no-op promise: after `dvc repro`, the commands a user runs in between change nothing DVC tracks.

A tiny project is built once with `dvc repro`; then the test runs what a person runs between two
pipeline runs (imports of every module as the test suite does, `pipeline params` with the same profile,
`pipeline stages`, `pipeline export`, `pipeline chat` for one message, `pipeline ui` started and stopped,
an editor's swap and backup files) and requires `dvc status` to report nothing and `dvc repro` to run no
stage. Before .dvcignore listed byte-code caches, the imports alone made DVC retrain every model stage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.deploy import free_port
from tests.helpers.project import make_project

pytestmark = pytest.mark.e2e

PROFILE = "tiny"


def run(
    cmd: list[str], cwd: Path, env: dict[str, str], stdin: str | None = None, timeout: float = 600
) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A tiny project after one complete `dvc repro`, and the environment of a user's shell in it."""
    root = tmp_path_factory.mktemp("noop")
    project = make_project(root / "project", profile=PROFILE)
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PREFECT_HOME=str(root / "prefect-home"),
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
        PYTHONUNBUFFERED="1",
    )
    env.pop("PREFECT_API_URL", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's shell writes byte-code caches: that is the point
    run(["dvc", "repro"], project, env, timeout=1200)
    return project, env


def dvc_is_clean(project: Path, env: dict[str, str]) -> None:
    status = run(["dvc", "status"], project, env)
    assert "Data and pipelines are up to date" in status, status
    repro = run(["dvc", "repro"], project, env)
    assert "Running stage" not in repro, repro


def start_and_stop_ui(project: Path, env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "ui",
            "--prefect-port",
            str(free_port()),
            "--mlflow-port",
            str(free_port()),
        ],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not (project / ".pipeline/ui.json").exists():
            assert proc.poll() is None and time.time() < deadline, "pipeline ui did not start"
            time.sleep(0.5)
        assert json.loads((project / ".pipeline/ui.json").read_text())["prefect_api_url"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)


def test_commands_between_runs_leave_dvc_up_to_date(built, tmp_path):
    project, env = built
    dvc_is_clean(project, env)
    python = sys.executable
    # What the test suite and tools do to a checkout: import every module (writes __pycache__ next to it).
    modules = [
        ".".join(p.relative_to(project).with_suffix("").parts)
        for package in ("tasks", "models", "flows")
        for p in sorted((project / package).rglob("*.py"))
        if p.name != "__init__.py"
    ]
    import_all = [python, "-c", "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"]

    def editor_scratch() -> None:
        for scratch in (
            "models/.llama.py.swp",
            "models/llama.py~",
            "tasks/.#ingest.py",
            "data/checkpoints/.DS_Store",
        ):
            (project / scratch).write_text("editor scratch\n")

    steps = [
        ("importing every module", lambda: run([*import_all, *modules], project, env)),
        ("editor swap and backup files", editor_scratch),
        (
            "pipeline params (same profile)",
            lambda: run([python, "-m", "flows.cli", "params", "--profile", PROFILE], project, env),
        ),
        ("pipeline stages", lambda: run([python, "-m", "flows.cli", "stages"], project, env)),
        (
            "pipeline export",
            lambda: run(
                [python, "-m", "flows.cli", "export", "pipeline-sft@champion", str(tmp_path / "export")],
                project,
                env,
            ),
        ),
        (
            "pipeline chat",
            lambda: run(
                [python, "-m", "flows.cli", "chat", "pipeline-sft@champion", "--max-new-tokens", "4"],
                project,
                env,
                stdin="What does json.dumps do?\n",
            ),
        ),
        ("pipeline ui started and stopped", lambda: start_and_stop_ui(project, env)),
    ]
    for name, action in steps:
        action()
        status = run(["dvc", "status"], project, env)
        assert "Data and pipelines are up to date" in status, f"after {name}, dvc status reports:\n{status}"
    assert (project / "models/__pycache__").is_dir()  # the caches were written, and DVC ignored them
    dvc_is_clean(project, env)


def test_a_source_change_is_still_seen(built):
    """The ignore rules must not hide real changes: an edited model source re-runs the model stages."""
    project, env = built
    llama = project / "models/llama.py"
    original = llama.read_text()
    try:
        llama.write_text(original + "\n# an edit\n")
        status = run(["dvc", "status"], project, env)
        assert "modified:" in status and "models" in status, status
    finally:
        llama.write_text(original)
    dvc_is_clean(project, env)
