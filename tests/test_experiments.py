"""DVC experiments on params.yaml: a sweep is `dvc exp run -S key=value`, compared with `dvc exp show`.

A 2-point sweep of pretrain.train.max_steps on the tiny profile, run only up to pretrain (the cheapest
training stage; the data stages run once, the second point reuses them): both experiments are listed with
their params and metrics, the longer one trained more steps, nothing after pretrain ran, and a bad value
set with -S stops the stage naming the key.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.project import make_project

pytestmark = pytest.mark.e2e
STEPS = {"short": 6, "long": 10}


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
    )
    proc = subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("experiments") / "project")
    for name, steps in STEPS.items():
        dvc(project, "exp", "run", "pretrain", "-S", f"pretrain.train.max_steps={steps}", "-n", name)
    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    experiments = {
        rev["name"]: rev["data"]
        for baseline in shown
        for exp in baseline.get("experiments") or []
        for rev in exp["revs"]
    }
    return project, experiments


def test_each_point_is_an_experiment_with_its_params_and_metrics(sweep):
    project, experiments = sweep
    assert set(experiments) == set(STEPS)
    for name, steps in STEPS.items():
        data = experiments[name]
        assert data["params"]["params.yaml"]["data"]["pretrain"]["train"]["max_steps"] == steps
        metrics = data["metrics"]["data/metrics/pretrain.json"]["data"]
        assert {"loss", "val/loss", "lr"} <= set(metrics), metrics
    short, long = (experiments[n]["metrics"]["data/metrics/pretrain.json"]["data"] for n in STEPS)
    assert long["loss"] != short["loss"]  # two different trainings, not one result shown twice


def test_the_sweep_ran_up_to_pretrain_only_and_the_workspace_holds_the_last_point(sweep):
    project, _ = sweep
    with open(project / "data/plots/pretrain.csv") as fh:
        steps = [int(float(row["step"])) for row in csv.DictReader(fh)]
    assert steps[-1] == STEPS["long"]  # the workspace has the last experiment applied
    assert not (project / "data/checkpoints/sft").exists() and not (project / "data/eval").exists()
    # the README's comparison: one row per experiment with the swept key and the validation loss
    table = dvc(
        project,
        "exp",
        "show",
        "--no-pager",
        "--drop",
        ".*",
        "--keep",
        r"Experiment|pretrain\.train\.max_steps|val/loss",
    )
    rows = {m[0]: m[1:] for m in re.findall(r"\[(\w+)\]\s+([\d.]+)\s+(\d+)", table.stdout)}
    assert {name: int(steps) for name, (_, steps) in rows.items()} == STEPS, table.stdout


def test_a_bad_value_set_with_s_stops_the_stage_naming_the_key(sweep):
    project, _ = sweep
    proc = dvc(
        project, "exp", "run", "pretrain", "-S", "pretrain.train.max_steps=0", "-n", "bad", check=False
    )
    assert proc.returncode != 0
    assert "pretrain.train.max_steps" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
