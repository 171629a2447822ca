"""The flow's retries of a failed stage wait with exponential backoff: retry i after delay * 2**i.

A hand-made DVC project whose one stage always fails runs through the Prefect flow (the session's test
server) with retries=3 and a first delay of 0.25 s; Prefect's own record of the task run (each
AwaitingRetry state and the time it schedules the next attempt for) shows delays 0.25, 0.5 and 1.0 s,
four attempts, then the failure naming the stage.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.pipeline import backoff

REPO = Path(__file__).resolve().parents[1]


def test_backoff_doubles_from_the_first_delay():
    assert backoff(0, 5.0) == []
    assert backoff(3, 0.25) == [0.25, 0.5, 1.0]
    assert backoff(4, 5.0) == [5.0, 10.0, 20.0, 40.0]


def test_a_failing_stage_is_retried_after_growing_delays(prefect_harness, tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import StageFailed, pipeline

    fail = f"{sys.executable} -c \"import sys; print('stage ingest failed: out of luck'); sys.exit(3)\""
    stage = {"cmd": fail, "outs": ["out.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": stage}}))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True)
    monkeypatch.chdir(tmp_path)
    state = pipeline(profile="tiny", retries=3, retry_delay_seconds=0.25, return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="stage `ingest` failed: out of luck"):
        state.result()

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as prefect:
        (task_run,) = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        history = sorted(prefect.read_task_run_states(task_run.id), key=lambda s: s.timestamp)
    waits = [s for s in history if s.name == "AwaitingRetry"]
    delays = [(s.state_details.scheduled_time - s.timestamp).total_seconds() for s in waits]
    assert delays == pytest.approx([0.25, 0.5, 1.0], abs=0.05), delays
    assert task_run.run_count == 4 and history[-1].is_failed()
