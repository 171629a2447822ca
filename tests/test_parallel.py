"""Stages side by side: `parallel=2` runs the stages that depend only on finished ones at the same time.

A hand-made DVC project shaped like the pipeline's fan-out (sft -> reward, dpo -> evaluate), each stage a
small script that records when its command ran, goes through the Prefect flow (the session's test server)
and real `dvc repro --single-item` processes in one workspace: reward and dpo overlap in time, evaluate
starts after both, and dvc.lock records every stage (DVC holds its repo lock only around a stage's command;
the flow waits for it with `dvc --wait-for-lock`). A failure beside a running stage lets that one finish
and starts nothing new.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

STAGE = """
import sys, time
name, seconds = sys.argv[1], float(sys.argv[2])
start = time.time()
time.sleep(seconds)
if len(sys.argv) > 3:
    print(f"stage {name} failed: {sys.argv[3]}")
    sys.exit(3)
open(f"{name}.txt", "w").write(f"{start} {time.time()}")
"""


def make_fanout(root: Path, fail: str | None = None) -> dict[str, str]:
    """dvc.yaml: sft (2 s); reward (8 s) and dpo (4 s) after sft; evaluate after both. `fail` names a stage
    whose command fails after its sleep."""
    (root / "stage.py").write_text(STAGE)

    def stage(name: str, seconds: float, deps: list[str]) -> dict:
        cmd = f"{sys.executable} stage.py {name} {seconds}" + (" out-of-luck" if name == fail else "")
        return {"cmd": cmd, "deps": ["stage.py", *deps], "outs": [f"{name}.txt"]}

    stages = {
        "sft": stage("sft", 2, []),
        "reward": stage("reward", 8, ["sft.txt"]),
        "dpo": stage("dpo", 4, ["sft.txt"]),  # ends first: results still list it in graph order
        "evaluate": stage("evaluate", 0, ["reward.txt", "dpo.txt"]),
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=root, env=env, check=True)
    return env


def window(root: Path, name: str) -> tuple[float, float]:
    start, end = (float(x) for x in (root / f"{name}.txt").read_text().split())
    return start, end


def test_independent_stages_run_side_by_side_and_dvc_locks_them_all(
    prefect_harness, mlflow_store, tmp_path, monkeypatch
):
    from flows.pipeline import pipeline

    env = make_fanout(tmp_path)
    monkeypatch.chdir(tmp_path)
    results = pipeline(profile="tiny", parallel=2, retries=0)
    assert list(results.items()) == [("sft", "ran"), ("reward", "ran"), ("dpo", "ran"), ("evaluate", "ran")]
    (reward_start, reward_end), (dpo_start, dpo_end) = window(tmp_path, "reward"), window(tmp_path, "dpo")
    assert max(reward_start, dpo_start) < min(reward_end, dpo_end), "reward and dpo ran at the same time"
    assert window(tmp_path, "evaluate")[0] >= max(reward_end, dpo_end), "evaluate waited for both"
    assert window(tmp_path, "sft")[1] <= min(reward_start, dpo_start), "both waited for sft"
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"sft", "reward", "dpo", "evaluate"}
    status = subprocess.run(["dvc", "status"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout + status.stderr

    # Only sft and evaluate: evaluate depends on sft through reward and dpo, so it still waits for it.
    results = pipeline(profile="tiny", stages=["sft", "evaluate"], force=True, parallel=2, retries=0)
    assert results == {"sft": "ran", "evaluate": "ran"}
    assert window(tmp_path, "evaluate")[0] >= window(tmp_path, "sft")[1], "evaluate waited for sft"


def test_a_failure_beside_a_running_stage_lets_it_finish_and_starts_nothing_new(
    prefect_harness, mlflow_store, tmp_path, monkeypatch
):
    from flows.pipeline import StageFailed, pipeline

    make_fanout(tmp_path, fail="dpo")
    monkeypatch.chdir(tmp_path)
    state = pipeline(profile="tiny", parallel=2, retries=0, return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="stage `dpo` failed: out-of-luck"):
        state.result()
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"sft", "reward"}, "reward finished after the failure and is locked"
    assert not (tmp_path / "evaluate.txt").exists()


def test_parallel_out_of_range_is_a_config_error_before_anything_runs(tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--profile", "tiny", "--parallel", "0"]) == 2
    assert "--parallel must be between 1 and 8, got 0" in capsys.readouterr().err
    assert not (tmp_path / "params.yaml").exists()
