"""The whole tiny pipeline in a temp git+DVC repo: through `dvc repro`, then through the Prefect flow.

Checks the outputs of every stage, that a second `dvc repro` skips everything, and the MLflow records:
one run per stage from `dvc repro`; one parent run with 11 child runs from the flow; registered models
with aliases and lineage tags.

The three steps build on each other (the kill needs the repro's dvc.lock, the forced flow re-run resumes
what the kill left), so each step is a module fixture that records what its test checks at the moment it
ran; every test requests the steps it needs and passes alone or in any order.
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


@pytest.fixture(scope="module")
def repro(project) -> dict:
    """Step 1: `dvc repro` twice (the second must skip everything), with what it left recorded before any
    later step can change it."""
    start = time.time()
    sh(["dvc", "repro"], project)
    first = time.time() - start
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    start = time.time()
    again = sh(["dvc", "repro"], project).stdout
    metrics = {s: json.loads((project / f"data/metrics/{s}.json").read_text()) for s in ("reward", "dpo")}
    runs = stage_runs(mlflow_client(project))
    return {
        "first_s": first,
        "second_s": time.time() - start,
        "lock": lock,
        "again": again,
        "metrics": metrics,
        "runs": [(r.data.tags.get("pipeline.stage"), r.info.status) for r in runs],
        "outs": lock_outs(project),
    }


@pytest.fixture(scope="module")
def killed(project, repro, prefect_harness) -> dict:
    """Step 2: the flow (forced re-run) killed -9 with its whole process group while pretrain trains, after
    its first resume checkpoint is complete; what the project holds right after the kill."""
    from prefect.settings import PREFECT_API_URL

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
    return {
        "step": json.loads((state / tag / "state.json").read_text())["step"],
        "outs": lock_outs(project),
        "status": json.loads(sh(["dvc", "status", "--json"], project).stdout or "{}"),
    }


def mlflow_client(root: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return MlflowClient()


def stage_runs(client) -> list:
    exp = client.get_experiment_by_name("llm-pipeline")
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_dvc_repro_runs_every_stage_then_skips_them(project, repro):
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
    assert sorted(repro["lock"]) == sorted(STAGES)
    assert "Data and pipelines are up to date." in repro["again"], repro["again"]
    print(f"\ndvc repro tiny: first {repro['first_s']:.1f}s, no-op {repro['second_s']:.2f}s")

    # Regression guards, not proof of learning: on 60 held-out pairs chance is 0.5 +- 0.065 (one standard
    # deviation), so these bounds only catch a collapse (a margin <= 0, accuracy well below what was measured:
    # reward 0.633, DPO 0.75, deterministic on one CPU). That the stages learn these pairs is shown on 300
    # held-out pairs in test_posttrain::test_stages_learn_the_embedded_default_preferences.
    reward, dpo = repro["metrics"]["reward"], repro["metrics"]["dpo"]
    assert reward["val/pairs"] == 60 and reward["val/accuracy"] >= 0.55 and reward["val/margin"] > 0, reward
    assert dpo["val/rewards/accuracies"] > 0.5 and dpo["val/rewards/margins"] > 0, dpo

    dag = sh(["dvc", "dag"], project).stdout
    assert all(stage in dag for stage in STAGES)
    metrics = sh(["dvc", "metrics", "show", "--json"], project).stdout
    assert "val/loss" in metrics and "mmlu" in metrics

    assert sorted(stage for stage, _ in repro["runs"]) == sorted(STAGES)
    assert all(status == "FINISHED" for _, status in repro["runs"])
    client = mlflow_client(project)
    for model in MODELS:
        version = client.get_model_version(f"pipeline-{model}", "1")  # the repro's (a later flow adds v2)
        assert version.tags["champion.decision"].startswith("promoted: no champion yet")
        assert version.tags["tokenizer_fingerprint"]
        assert version.tags["git.commit"] != "unknown"


def test_flow_killed_mid_stage_leaves_outputs_intact(repro, killed):
    """kill -9 of the whole flow (flow process, `dvc repro`, the stage) while pretrain trains: the outputs
    DVC recorded stay intact and the newest resume checkpoint is complete. The flow test's re-run resumes
    from it and must end with byte-identical weights to the uninterrupted `dvc repro` run."""
    assert killed["step"] in (10, 20)
    assert killed["outs"] == repro["outs"]
    # Every output still matches what dvc.lock recorded: nothing half-written was left behind
    assert killed["status"] == {}, killed["status"]


def test_prefect_flow_runs_each_stage_as_a_task_and_child_run(
    project, repro, killed, prefect_harness, monkeypatch
):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline

    for key, value in project_env(project).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(project)
    before = repro["outs"]
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
    # pretrain resumed from the checkpoint the killed flow left (the `killed` step), and its state was cleared
    assert json.loads((project / "data/metrics/pretrain.json").read_text())["resumed_from_step"] in (10, 20)
    assert not (project / "data/state/pretrain").exists()

    # Determinism: the forced re-run through Prefect produced byte-identical datasets, tokenizer, shards and
    # checkpoints of every training stage (same dvc.lock hashes) as the `dvc repro` run. Evaluate and
    # register outputs hold timings and run ids, so they are left out.
    after = lock_outs(project)
    for stage in STAGES[: STAGES.index("evaluate")]:
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
