"""Operating the flow: a schedulable deployment (`pipeline deploy`) and the local servers (`pipeline ui`).

`pipeline deploy` serves the `llm-pipeline` flow as a deployment with `flow.serve`: the process polls the
Prefect API for runs of the deployment (created from the UI, by its schedule, or with
`prefect deployment run 'llm-pipeline/<name>'`) and runs each in a subprocess in this working tree.
One run at a time (`limit=1`): runs share the working tree and its params.yaml. For GPU nodes, use a
Prefect work pool and workers instead (README: scale-out).

`pipeline ui` starts `prefect server start` and `mlflow server` on the loopback interface, waits until
both answer, prints their URLs and writes `.pipeline/ui.json`; while it runs, `pipeline` commands started
in this directory use both servers (unless PREFECT_API_URL / MLFLOW_TRACKING_URI say otherwise).
Ctrl-C (SIGINT) or SIGTERM stops both and removes the file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

UI_STATE = Path(".pipeline") / "ui.json"


def serve(
    name: str,
    profile: str,
    overrides: list[str],
    cron: str | None = None,
    interval: float | None = None,
    retries: int = 1,
) -> None:
    """Create/update deployment `llm-pipeline/<name>` and serve its runs until interrupted."""
    from flows.pipeline import pipeline

    pipeline.serve(
        name=name,
        cron=cron,
        interval=interval,
        parameters={"profile": profile, "overrides": overrides, "retries": retries},
        description="The LLM training pipeline (DVC stages run by Prefect); parameters resolve params.yaml.",
        tags=["llm-pipeline", profile],
        limit=1,
        pause_on_shutdown=True,
        print_starting_message=True,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def read_ui_state(root: Path | None = None) -> dict[str, Any] | None:
    """The servers of a running `pipeline ui` in this directory, or None (no file, or its process is gone)."""
    path = (root or Path.cwd()) / UI_STATE
    try:
        state = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(state)


def apply_ui_state(root: Path | None = None) -> dict[str, Any] | None:
    """Point this process at the servers of a running `pipeline ui` (explicit env settings win)."""
    state = read_ui_state(root)
    if state:
        os.environ.setdefault("PREFECT_API_URL", state["prefect_api_url"])
        os.environ.setdefault("MLFLOW_TRACKING_URI", state["mlflow_tracking_uri"])
    return state


def run_ui(
    host: str,
    prefect_port: int,
    mlflow_port: int,
    mlflow_store: str,
    artifacts: Path,
    startup_timeout: float = 300.0,
) -> int:
    """Start both servers, print their URLs once they answer, and stop both on Ctrl-C/SIGTERM."""
    for what, port in (("Prefect", prefect_port), ("MLflow", mlflow_port)):
        if port_in_use(host, port):
            print(
                f"pipeline ui: {what} port {host}:{port} is in use; pick another with --{what.lower()}-port"
            )
            return 2
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
    artifacts.mkdir(parents=True, exist_ok=True)
    commands = {
        "Prefect": [str(bin_dir / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
        "MLflow": [
            str(bin_dir / "mlflow"),
            "server",
            "--host",
            host,
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
            "--backend-store-uri",
            mlflow_store,
            "--default-artifact-root",
            artifacts.resolve().as_uri(),
        ],
    }
    # Own process groups: Ctrl-C in the terminal reaches only this process, which then stops both cleanly.
    procs = {
        what: subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        for what, cmd in commands.items()
    }
    prefect_url = f"http://{host}:{prefect_port}"
    mlflow_url = f"http://{host}:{mlflow_port}"
    health = {"Prefect": f"{prefect_url}/api/health", "MLflow": f"{mlflow_url}/health"}
    stop = {"signal": 0}

    def on_signal(signum: int, frame: Any) -> None:
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    state_path = Path.cwd() / UI_STATE
    rc = 0
    try:
        deadline = time.time() + startup_timeout
        pending = set(health)
        while pending and not stop["signal"]:
            for what in list(pending):
                if procs[what].poll() is not None:
                    print(f"pipeline ui: the {what} server exited with code {procs[what].returncode}")
                    return 1
                if _answers(health[what]):
                    pending.discard(what)
            if time.time() > deadline:
                print(
                    f"pipeline ui: {', '.join(sorted(pending))} did not answer within {startup_timeout:.0f}s"
                )
                return 1
            time.sleep(0.3)
        if stop["signal"]:
            return 0
        state = {
            "pid": os.getpid(),
            "prefect_ui": prefect_url,
            "prefect_api_url": f"{prefect_url}/api",
            "mlflow_tracking_uri": mlflow_url,
        }
        state_path.parent.mkdir(exist_ok=True)
        state_path.write_text(json.dumps(state, indent=2))
        print(f"Prefect UI: {prefect_url}", flush=True)
        print(f"MLflow UI:  {mlflow_url}", flush=True)
        print(f"pipeline commands in {Path.cwd()} now use both ({UI_STATE}); elsewhere:", flush=True)
        print(f"  export PREFECT_API_URL={prefect_url}/api MLFLOW_TRACKING_URI={mlflow_url}", flush=True)
        print("ready; Ctrl-C stops both servers", flush=True)
        while not stop["signal"]:
            for what, proc in procs.items():
                if proc.poll() is not None:
                    print(f"pipeline ui: the {what} server exited with code {proc.returncode}; stopping")
                    rc = 1
                    stop["signal"] = signal.SIGTERM
            time.sleep(0.3)
        return rc
    finally:
        try:
            if json.loads(state_path.read_text()).get("pid") == os.getpid():
                state_path.unlink()
        except (OSError, ValueError):
            pass
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # the group: what Ctrl-C does to a foreground job
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for s, handler in old.items():
            signal.signal(s, handler)
        print("pipeline ui: both servers stopped", flush=True)
