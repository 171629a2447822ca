"""Progress as a person watching a run sees it: a bar with ETA on a terminal, periodic lines with ETA in a
log (Prefect, CI); the arithmetic of rate and ETA; a real training stage under a pseudo-terminal and
under a pipe (which also logs its key curves to MLflow as images)."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tasks.core import progress as progress_module
from tasks.core.progress import Progress, clock
from tests.helpers.workspace import make_workspace

REPO = Path(__file__).resolve().parents[1]


def test_clock_formats():
    assert [clock(s) for s in (0, 7.4, 205, 3723)] == ["0:00", "0:07", "3:25", "1:02:03"]


def test_lines_carry_done_total_rate_and_eta(monkeypatch, caplog):
    ticks = iter(range(100))
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: float(next(ticks)))
    monkeypatch.delenv("PIPELINE_PROGRESS", raising=False)
    caplog.set_level(logging.INFO, logger="tasks.progress")
    with Progress(8, "pretrain", "step", initial=2, stream=io.StringIO(), every_s=0) as p:  # clock: 0
        assert p.mode == "lines"  # not a terminal
        p.update(1)  # clock 1 for the interval check ... then 2 for the line: 1 step in 2 s
        p.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.progress"]
    assert lines[0] == "pretrain: step 3/8 (38%), 0.5 step/s, elapsed 0:02, ETA 0:10"
    assert lines[1] == "pretrain: step 4/8 (50%), 0.5 step/s, elapsed 0:04, ETA 0:08"
    assert lines[-1].startswith("pretrain: step 4/8 (50%)") and len(lines) == 3  # and one at the end


def test_a_fast_loop_prints_nothing_in_a_log_and_off_is_off(caplog):
    caplog.set_level(logging.INFO, logger="tasks.progress")
    with Progress(50, "MMLU", "row", stream=io.StringIO(), every_s=30) as p:
        for _ in range(50):
            p.update(1)
    off = io.StringIO()
    with Progress(5, "x", stream=off, enabled=False) as p:
        p.update(5)
    assert [r for r in caplog.records if r.name == "tasks.progress"] == [] and off.getvalue() == ""


def run_in_pty(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run `cmd` with a pseudo-terminal as stdin/stdout/stderr (as in a person's shell); its output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns, 40 rows
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            proc.kill()
            raise AssertionError(f"no output for {timeout}s:\n{b''.join(chunks).decode()[-3000:]}")
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    make_workspace(root, ["pretrain.train.max_steps=12", "pretrain.train.log_every=4"])
    return root


def stage_env(root: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    env.pop("PIPELINE_PROGRESS", None)
    return {**env, **extra}


def test_a_training_stage_on_a_terminal_shows_a_bar_with_eta(workspace):
    out = run_in_pty([sys.executable, "-m", "tasks.pretrain"], workspace, stage_env(workspace))
    # tqdm: "pretrain:  25%|██▌       | 3/12 [00:01<00:04,  2.10step/s, loss=5.2]"
    bars = re.findall(r"pretrain: +(\d+)%\|[^|]*\| *(\d+)/12 \[(\d\d:\d\d)<(\d\d:\d\d|\?), *([^,\]]+)", out)
    assert bars, out[-3000:]
    assert bars[-1][:2] == ("100", "12")  # the bar reaches the end: percent, done/total, elapsed<ETA
    assert all("step" in rate for *_, rate in bars), bars
    assert "loss=" in out
    assert "tasks.progress" not in out  # no periodic lines on a terminal


def test_a_training_stage_in_a_log_prints_eta_lines_and_logs_its_curves(workspace):
    from mlflow.tracking import MlflowClient

    proc = subprocess.run(
        [sys.executable, "-m", "tasks.pretrain"],
        cwd=workspace,
        env=stage_env(workspace, PIPELINE_PROGRESS_EVERY="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = re.findall(
        r"tasks\.progress: pretrain: step (\d+)/12 \(\d+%\), [\d.e+-]+ step/s, elapsed \d+:\d\d, ETA (\S+)",
        proc.stdout,
    )
    assert [int(n) for n, _ in lines][:3] == [1, 2, 3] and int(lines[-1][0]) == 12, proc.stdout[-3000:]
    assert all(re.fullmatch(r"\d+:\d\d", eta) for _, eta in lines)
    assert "\r" not in proc.stdout + proc.stderr  # no bar redraws in a log
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("llm-pipeline").experiment_id],
        filter_string="attributes.run_name = 'pretrain'",
        order_by=["attributes.start_time DESC"],
    )
    logged = sorted(f.path for f in client.list_artifacts(runs[0].info.run_id, "curves"))
    assert logged == ["curves/pretrain_learning_rate.png", "curves/pretrain_loss.png"]
