"""A Prefect work pool and worker run the flow, as on GPU nodes: deploy, worker, a run from the API.

A tiny project in a temp git+DVC repo, a Prefect server of the test's own (`prefect server start`, free
loopback port, own database), `prefect work-pool create --type process`, `pipeline deploy --pool` (which
is flow.from_source(...).deploy: a deployment on the pool, nothing served by the command), a
`prefect worker start --pool` subprocess started outside the project, and a flow run created through the
REST API as the UI's Run button does (`POST /deployments/{id}/create_flow_run`, custom parameters: only
the `ingest` stage). The run must reach COMPLETED with its MLflow parent run (and the stage's child run)
in the project's own store, the default a worker's flow run finds by itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.project import make_project
from tests.test_cli_paths import own_prefect_server

pytestmark = pytest.mark.e2e


REPO = Path(__file__).resolve().parents[1]


def test_no_module_in_flows_shadows_a_top_level_module():
    """A worker loads flows/pipeline.py by path and puts flows/ first on sys.path (Prefect's
    load_script_as_module): a flows/models.py was imported as `models` there, and every worker run crashed
    with a circular import of tasks.core.config. No flows/ module may share a top-level module's name."""
    import importlib.util

    project = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()}  # flows, tasks, models
    for path in sorted((REPO / "flows").glob("*.py")):
        if path.stem == "__init__":
            continue
        assert path.stem not in project, f"{path} shadows the {path.stem} package for a flow loaded by path"
        found = importlib.util.find_spec(path.stem)
        assert found is None, f"{path} shadows the installed module {path.stem} ({found.origin})"


def api(url: str, method: str = "GET", body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def command(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_worker_of_a_process_pool_runs_a_deployment_started_through_the_api(tmp_path):
    project = make_project(tmp_path / "project")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # As on a worker host: no PYTHONPATH (the code is the checkout the pull step enters) and no
    # MLFLOW_TRACKING_URI (the project's own mlflow.db is the default).
    env.pop("PYTHONPATH", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    pipeline = [sys.executable, "-m", "flows.cli"]

    # Without a server a deployment would vanish with the temporary one: refused, naming what to set.
    no_server = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    refused = command([*pipeline, "deploy", "--profile", "tiny", "--pool", "p"], project, no_server)
    assert refused.returncode == 2 and "needs a Prefect server" in refused.stderr, refused.stderr[-2000:]

    with own_prefect_server(tmp_path, env) as api_url:
        env.update(PREFECT_API_URL=api_url, PREFECT_HOME=str(tmp_path / "prefect-home"))
        pool = "cpu-pool"
        missing = command([*pipeline, "deploy", "--profile", "tiny", "--pool", pool], project, env)
        assert missing.returncode == 2, missing.stdout[-2000:] + missing.stderr[-2000:]
        assert f"prefect work-pool create {pool} --type process" in missing.stderr, missing.stderr[-2000:]

        created = command(["prefect", "work-pool", "create", pool, "--type", "process"], tmp_path, env)
        assert created.returncode == 0, created.stdout[-2000:] + created.stderr[-2000:]
        deployed = command(
            [*pipeline, "deploy", "--profile", "tiny", "--name", "nightly", "--pool", pool], project, env
        )
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
        assert f"prefect worker start --pool {pool}" in deployed.stdout, deployed.stdout
        deployment = api(f"{api_url}/deployments/name/llm-pipeline/nightly")
        assert deployment["work_pool_name"] == pool
        assert deployment["parameters"] == {"profile": "tiny", "overrides": [], "retries": 1}
        assert deployment["global_concurrency_limit"]["limit"] == 1, "runs share the working tree"
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(project.resolve())}}
        ]

        # The UI's Run -> Custom run: a flow run of the deployment with parameters of its own.
        run = api(
            f"{api_url}/deployments/{deployment['id']}/create_flow_run",
            "POST",
            {"parameters": {"stages": ["ingest"]}},
        )
        worker_log = tmp_path / "worker.log"
        with worker_log.open("w") as out:
            worker = subprocess.Popen(
                ["prefect", "worker", "start", "--pool", pool, "--limit", "1"],
                cwd=tmp_path,  # not the project: the deployment's pull step enters it
                env=dict(env, PREFECT_WORKER_QUERY_SECONDS="2"),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.time() + 600
            while True:
                state = api(f"{api_url}/flow_runs/{run['id']}")["state"]
                if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                assert worker.poll() is None, f"the worker exited:\n{worker_log.read_text()[-4000:]}"
                assert time.time() < deadline, f"still {state['type']}:\n{worker_log.read_text()[-4000:]}"
                time.sleep(2)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)  # the worker and any flow run process it started
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        assert state["type"] == "COMPLETED", f"{state}\n{worker_log.read_text()[-4000:]}"
        assert api(f"{api_url}/flow_runs/{run['id']}")["parameters"]["stages"] == ["ingest"]

    # The run worked in the project and recorded into its store: parent run tagged with this flow run.
    assert (project / "data/raw/pretrain.parquet").exists() and not (project / "data/validated").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llm-pipeline")
    assert experiment is not None, "no llm-pipeline experiment in the project's mlflow.db"
    parents = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{run['id']}'")
    assert [(p.info.run_name, p.info.status) for p in parents] == [("pipeline", "FINISHED")]
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
    )
    assert [c.info.run_name for c in children] == ["ingest"]
