"""The whole tiny pipeline in a temp git+DVC repo: through `dvc repro`, then through the Prefect flow.

Checks the outputs of every stage, that a second `dvc repro` skips everything, and the MLflow records:
one run per stage from `dvc repro`; one parent run with 11 child runs from the flow; registered models
with aliases and lineage tags.
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
import yaml

from tasks.core import stages
from tests.helpers.project import make_project

REPO = Path(__file__).resolve().parents[1]
STAGES = list(stages.STAGES)
MODELS = stages.models()

pytestmark = pytest.mark.e2e


def sh(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=project_env(cwd), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def project_env(root: Path) -> dict[str, str]:
    return dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        PYTHONUNBUFFERED="1",
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("e2e") / "project")


def mlflow_client(root: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return MlflowClient()


def stage_runs(client) -> list:
    exp = client.get_experiment_by_name("llm-pipeline")
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_dvc_repro_runs_every_stage_then_skips_them(project):
    start = time.time()
    sh(["dvc", "repro"], project)
    first = time.time() - start
    for path in (
        "data/raw/pretrain.parquet",
        "data/validated/sft.parquet",
        "data/reports/validation",
        "data/tokenizer/tokenizer.json",
        "data/tokens/train.bin",
        "data/eval",
        "data/registry/registered.json",
        *[f"data/checkpoints/{m}/model.safetensors" for m in MODELS],
    ):
        assert (project / path).exists(), path
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert sorted(lock) == sorted(STAGES)

    start = time.time()
    again = sh(["dvc", "repro"], project)
    second = time.time() - start
    assert "Data and pipelines are up to date." in again.stdout, again.stdout
    print(f"\ndvc repro tiny: first {first:.1f}s, no-op {second:.2f}s")

    # The embedded preference pairs are learnable (tasks/data/embedded.py): held-out figures above chance.
    # Deterministic on one CPU (byte-identical checkpoints); measured here: reward 0.633, DPO 0.75 on 60 pairs.
    reward = json.loads((project / "data/metrics/reward.json").read_text())
    assert reward["val/pairs"] == 60 and reward["val/accuracy"] >= 0.55 and reward["val/margin"] > 0, reward
    dpo = json.loads((project / "data/metrics/dpo.json").read_text())
    assert dpo["val/rewards/accuracies"] > 0.5 and dpo["val/rewards/margins"] > 0, dpo

    dag = sh(["dvc", "dag"], project).stdout
    assert all(stage in dag for stage in STAGES)
    metrics = sh(["dvc", "metrics", "show", "--json"], project).stdout
    assert "val/loss" in metrics and "mmlu" in metrics

    client = mlflow_client(project)
    runs = stage_runs(client)
    assert sorted(r.data.tags["pipeline.stage"] for r in runs) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)
    for model in MODELS:
        version = client.get_model_version_by_alias(f"pipeline-{model}", "champion")
        assert version.tags["tokenizer_fingerprint"]
        assert version.tags["git.commit"] != "unknown"


def test_flow_killed_mid_stage_leaves_outputs_intact(project, prefect_harness):
    """kill -9 of the whole flow (flow process, `dvc repro`, the stage) while pretrain trains: the outputs
    DVC recorded stay intact and the newest resume checkpoint is complete. The next test's re-run resumes
    from it and must end with byte-identical weights to the uninterrupted `dvc repro` run."""
    from prefect.settings import PREFECT_API_URL

    before = lock_outs(project)
    state = project / "data/state/pretrain"
    env = dict(project_env(project), PREFECT_API_URL=str(PREFECT_API_URL.value()))
    cmd = [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--force", "--retries", "0"]
    log = project / "killed-flow.log"
    with log.open("w") as out:
        flow = subprocess.Popen(
            cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + 600
        while not (state / "latest").exists():  # the first checkpoint (step 10 of 30) is complete
            assert flow.poll() is None, log.read_text()[-4000:]
            assert time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.02)
        os.killpg(flow.pid, signal.SIGKILL)  # the flow's whole process group: flow, dvc, the stage
        flow.wait()
        while time.time() < deadline:  # until dvc and the stage are gone too (reaped by init)
            try:
                os.killpg(flow.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    tag = (state / "latest").read_text().strip()
    assert json.loads((state / tag / "state.json").read_text())["step"] in (10, 20)
    assert lock_outs(project) == before
    # Every output still matches what dvc.lock recorded: nothing half-written was left behind
    status = json.loads(sh(["dvc", "status", "--json"], project).stdout or "{}")
    assert status == {}, status


def test_prefect_flow_runs_each_stage_as_a_task_and_child_run(project, prefect_harness, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline

    for key, value in project_env(project).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(project)
    before = lock_outs(project)
    state = pipeline(profile="tiny", force=True, return_state=True)
    assert state.is_completed(), state
    results = state.result()
    assert list(results) == STAGES and set(results.values()) == {"ran"}

    client = mlflow_client(project)
    runs = stage_runs(client)
    flow_run_id = str(state.state_details.flow_run_id)
    parents = [r for r in runs if r.data.tags.get("prefect.flow_run_id") == flow_run_id]
    assert len(parents) == 1 and parents[0].data.tags["pipeline.flow"] == "prefect"
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["pipeline.stage"] for r in children) == sorted(STAGES)
    for model in MODELS:
        versions = client.search_model_versions(f"name='pipeline-{model}'")
        assert len(versions) == 2  # one from dvc repro, one from the flow
        assert str(client.get_model_version_by_alias(f"pipeline-{model}", "candidate").version) == "2"
        latest = client.get_model_version(f"pipeline-{model}", "2")
        assert latest.tags["champion.decision"]

    import anyio

    async def task_runs():
        async with get_client() as prefect:
            flow_run_id = state.state_details.flow_run_id
            return await prefect.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )

    names = sorted(t.name for t in anyio.run(task_runs))
    assert names == sorted(STAGES)
    registered = json.loads((project / "data/registry/registered.json").read_text())
    assert sorted(registered) == sorted(MODELS)
    # pretrain resumed from the checkpoint the killed flow left (previous test), and its state was cleared
    assert json.loads((project / "data/metrics/pretrain.json").read_text())["resumed_from_step"] in (10, 20)
    assert not (project / "data/state/pretrain").exists()

    # Determinism: the forced re-run through Prefect produced byte-identical datasets, tokenizer, shards and
    # checkpoints of every training stage (same dvc.lock hashes) as the `dvc repro` run. Evaluate and
    # register outputs hold timings and run ids, so they are left out.
    after = lock_outs(project)
    for stage in STAGES[: STAGES.index("rlhf") + 1]:
        assert after[stage] == before[stage], (
            f"{stage} is not deterministic: {before[stage]} != {after[stage]}"
        )


def lock_outs(root: Path) -> dict[str, dict[str, str]]:
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {
        # Data Docs HTML carries its build time; metrics JSON and loss-curve CSVs carry timings (tokens/s).
        # Everything else, checkpoints included, must match byte for byte.
        name: {
            o["path"]: o["md5"]
            for o in spec.get("outs", [])
            if not (
                o["path"].startswith(("data/metrics", "data/plots")) or o["path"] == "data/reports/validation"
            )
        }
        for name, spec in stages.items()
    }
