"""Run history survives the run: what `pipeline run` records without any server is what `pipeline ui` shows.

In a temp project, with no PREFECT_HOME, PREFECT_API_URL or MLFLOW_TRACKING_URI set (a user's shell after
`make run`): `pipeline run --stage ingest` (Prefect's temporary server), then `pipeline deploy` (stopped
once it serves), then `pipeline ui`. Prefect's API then holds the flow run, its task run, its logs, the
summary artifact and the deployment, all in <project>/.prefect/prefect.db; MLflow's server holds the
parent run and its child from <project>/mlflow.db.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from flows.deploy import free_port
from tests.helpers.project import make_project
from tests.test_operate import Lines, spawn, stop

pytestmark = pytest.mark.e2e


def user_env() -> dict[str, str]:
    """The environment of a user's shell: no Prefect home, API or MLflow store chosen."""
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONUNBUFFERED="1",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    for key in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("history") / "project")
    env = user_env()
    cli = [sys.executable, "-m", "flows.cli"]
    run = subprocess.run(
        [*cli, "run", "--profile", "tiny", "--stage", "ingest"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    deploy = spawn([*cli, "deploy", "--profile", "tiny", "--name", "history"], project, env)
    Lines(deploy).wait_for("is being served", timeout=300)
    assert stop(deploy) is not None
    ports = {"prefect": free_port(), "mlflow": free_port()}
    ui = spawn(
        [*cli, "ui", "--prefect-port", str(ports["prefect"]), "--mlflow-port", str(ports["mlflow"])],
        project,
        env,
    )
    out = Lines(ui)
    try:
        out.wait_for("ready", timeout=300)
        yield {"project": project, "ports": ports, "out": out, "ui": ui}
    finally:
        stop(ui)


def ui_alive(history) -> None:
    """Before a test talks to the servers: `pipeline ui` still runs, or its output says why not (a CI run
    once saw both ports refuse connections after "ready", with nothing else to go on)."""
    if history["ui"].poll() is not None:
        raise AssertionError(
            f"pipeline ui exited with {history['ui'].returncode}; output:\n{''.join(history['out'].lines)[-4000:]}"
        )


@pytest.fixture
def prefect(history):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ui_alive(history)
    api = f"http://127.0.0.1:{history['ports']['prefect']}/api"
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def test_the_database_lives_in_the_project(history):
    project = history["project"]
    assert (project / ".prefect" / "prefect.db").stat().st_size > 0
    assert (project / "mlflow.db").stat().st_size > 0


def test_pipeline_ui_shows_the_flow_run_its_task_runs_logs_and_summary(prefect):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    runs = prefect.read_flow_runs()
    assert len(runs) == 1, [r.name for r in runs]
    run = runs[0]
    assert prefect.read_flow(run.flow_id).name == "llm-pipeline"
    assert run.state is not None and run.state.is_completed()
    assert run.parameters["profile"] == "tiny" and run.parameters["stages"] == ["ingest"]
    tasks = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert [(t.name, t.state_type.value) for t in tasks] == [("ingest", "COMPLETED")]
    logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    text = "\n".join(entry.message for entry in logs)
    assert "repro --single-item ingest" in text and "tasks.ingest" in text, text[-2000:]
    arts = prefect.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
    )
    assert [a.key for a in arts] == ["pipeline-summary"]
    assert "| ingest | ran |" in arts[0].data


def test_pipeline_ui_shows_the_deployment(prefect):
    dep = prefect.read_deployment_by_name("llm-pipeline/history")
    assert dep.parameters["profile"] == "tiny"


def test_pipeline_ui_serves_the_same_mlflow_store(history):
    ui_alive(history)
    url = f"http://127.0.0.1:{history['ports']['mlflow']}/api/2.0/mlflow/runs/search"
    body = json.dumps({"experiment_ids": ["1"], "max_results": 50}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        runs = json.load(resp)["runs"]
    names = {r["info"]["run_name"]: r for r in runs}
    assert set(names) == {"pipeline", "ingest"}, sorted(names)
    tags = {t["key"]: t["value"] for t in names["ingest"]["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == names["pipeline"]["info"]["run_id"]
    artifacts = history["project"] / "mlartifacts"
    assert names["ingest"]["info"]["artifact_uri"].startswith(artifacts.as_uri())
