"""Operating the flow: a schedulable deployment (`pipeline deploy`) and the local servers (`pipeline ui`).

`pipeline deploy` serves the `llm-pipeline` flow as a deployment with `flow.serve`: the process polls the
Prefect API for runs of the deployment (created from the UI, by its schedule, or with
`prefect deployment run 'llm-pipeline/<name>'`) and runs each in a subprocess in this working tree.
One run at a time (`limit=1`): runs share the working tree and its params.yaml. `pipeline deploy --pool
NAME` deploys to a Prefect work pool instead (flow.deploy) and returns; workers of the pool
(`prefect worker start --pool NAME`, on this host or GPU nodes with the same checkout) run the flow runs.

`pipeline ui` starts `prefect server start` and `mlflow server` on the loopback interface (CORS only for
each server's own origin, Prefect's CSRF protection on), waits until both answer, prints their URLs and
writes `.pipeline/ui.json` (mode 600); while it runs, `pipeline` commands started in this directory use
both servers (unless PREFECT_API_URL / MLFLOW_TRACKING_URI say otherwise), if the file is the current
user's, not group/world writable, names a live `pipeline ui` process and loopback URLs.
Ctrl-C (SIGINT) or SIGTERM stops both and removes the file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

UI_STATE = Path(".pipeline") / "ui.json"


def deployment_settings(
    profile: str, overrides: list[str], cron: str | None, interval: float | None, retries: int
) -> dict[str, Any]:
    """What a served and a work-pool deployment share: schedule, flow parameters, description, tags.
    The first interval run is one interval from now, stated rather than left to Prefect's default anchor
    (the deploy time); `prefect deployment run` starts one at once."""
    from prefect.schedules import Interval

    first = datetime.now(UTC) + timedelta(seconds=interval) if interval else None
    return {
        "cron": cron,
        "schedule": Interval(interval, anchor_date=first) if interval else None,
        "parameters": {"profile": profile, "overrides": overrides, "retries": retries},
        "description": "The LLM training pipeline (DVC stages run by Prefect); parameters resolve params.yaml.",
        "tags": ["llm-pipeline", profile],
    }


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
        **deployment_settings(profile, overrides, cron, interval, retries),
        limit=1,
        pause_on_shutdown=True,
        print_starting_message=True,
    )


def deploy_to_pool(
    name: str,
    pool: str,
    profile: str,
    overrides: list[str],
    cron: str | None = None,
    interval: float | None = None,
    retries: int = 1,
) -> str:
    """Create/update deployment `llm-pipeline/<name>` on Prefect work pool `pool` (flow.deploy) and return
    its id; nothing is served here. A worker of the pool (`prefect worker start --pool <pool>`) runs each
    flow run in a subprocess whose working directory is this project's (the deployment's pull step), so
    every worker host needs this checkout at the same path, with the venv and `dvc pull`ed data.

    Needs a Prefect server (PREFECT_API_URL, or a `pipeline ui` running here): a temporary one would vanish
    with this command, and no worker could see the deployment. A missing pool is a ConfigError naming the
    command that creates it."""
    from prefect import Flow
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import pipeline
    from tasks.core.config import ConfigError

    if not PREFECT_API_URL.value():
        raise ConfigError(
            "pipeline deploy --pool needs a Prefect server that its workers poll: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api) or run `pipeline ui` in this directory first"
        )
    root = Path.cwd().resolve()
    if not (root / "flows" / "pipeline.py").is_file():
        raise ConfigError(f"{root} holds no flows/pipeline.py: run pipeline deploy --pool in the project")
    remote = pipeline.from_source(source=str(root), entrypoint="flows/pipeline.py:pipeline")
    assert isinstance(remote, Flow)  # called from sync code, from_source returns the flow, not a coroutine
    try:
        deployment_id = remote.deploy(
            name=name,
            work_pool_name=pool,
            **deployment_settings(profile, overrides, cron, interval, retries),
            # runs share this working tree and its params.yaml: one at a time (the project lock would
            # fail a second one at once)
            concurrency_limit=1,
            print_next_steps=False,
            ignore_warnings=True,
        )
    except (ValueError, ObjectNotFound) as exc:
        if "Could not find work pool" not in str(exc) and not isinstance(exc, ObjectNotFound):
            raise
        raise ConfigError(
            f"work pool {pool!r} does not exist on {PREFECT_API_URL.value()}: create it with "
            f"`prefect work-pool create {pool} --type process`"
        ) from exc
    return str(deployment_id)


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


def _command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # no /proc (macOS): ps prints the arguments joined by spaces
        proc = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
        return proc.stdout.split()


def _is_pipeline_ui(argv: list[str]) -> bool:
    """`.../pipeline ui ...` or `python -m flows.cli ui ...`."""
    return any(
        (Path(a).name == "pipeline" or a == "flows.cli") and argv[i + 1 : i + 2] == ["ui"]
        for i, a in enumerate(argv)
    )


def _loopback(url: Any) -> bool:
    import ipaddress
    import urllib.parse

    host = urllib.parse.urlsplit(str(url)).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _untrusted(path: Path, state: Any) -> str | None:
    """Why a ui.json must not steer this process (None: trust it)."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    keys = ("pid", "prefect_ui", "prefect_api_url", "mlflow_tracking_uri")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        return f"it does not hold {', '.join(keys)}"
    try:
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, OverflowError):
        return f"its process {state['pid']} is not running (a stale file: remove it)"
    if not _is_pipeline_ui(_command_line(int(state["pid"]))):
        return f"its process {state['pid']} is not `pipeline ui`"
    remote = [k for k in keys[1:] if not _loopback(state[k])]
    if remote:
        return f"{', '.join(f'{k}={state[k]}' for k in remote)} is not a loopback address"
    return None


def read_ui_state(root: Path | None = None) -> dict[str, Any] | None:
    """The servers of a running `pipeline ui` in this directory, or None (no file, or a file not to trust:
    another owner, group/world writable, its process gone or not `pipeline ui`, URLs off loopback; a
    warning says which)."""
    path = (root or Path.cwd()) / UI_STATE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        state = json.loads(path.read_text())
        why = _untrusted(path, state)
    except (OSError, ValueError) as exc:
        why = f"it cannot be read ({exc})"
    if why is not None:
        print(f"pipeline: ignoring {path}: {why}", file=sys.stderr)
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
    prefect_url = f"http://{host}:{prefect_port}"
    mlflow_url = f"http://{host}:{mlflow_port}"
    env = dict(
        os.environ,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        # A web page from another origin must not drive the API through the user's browser: CORS only
        # for the UI's own origin, and a CSRF token (which Prefect's UI and client fetch) for any change.
        PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS=prefect_url,
        PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED="true",
        # The UI's pages call the API at this URL; Prefect derives it from its settings (port 4200), not
        # from --port: on any other port the pages could not reach their own server.
        PREFECT_UI_API_URL=f"{prefect_url}/api",
    )
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
            "--cors-allowed-origins",
            mlflow_url,
        ],
    }
    # Own process groups: Ctrl-C in the terminal reaches only this process, which then stops both cleanly.
    procs = {
        what: subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        for what, cmd in commands.items()
    }
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
        # A health answer proves a server on the port, not that it is ours: one that lost the port to another
        # process between the check above and its bind exits instead. Say so rather than "ready".
        exited = [what for what, proc in procs.items() if proc.poll() is not None]
        if exited:
            print(
                f"pipeline ui: the {', '.join(exited)} server exited with code(s) "
                f"{', '.join(str(procs[w].returncode) for w in exited)} after its port answered"
            )
            return 1
        state = {
            "pid": os.getpid(),
            "prefect_ui": prefect_url,
            "prefect_api_url": f"{prefect_url}/api",
            "mlflow_tracking_uri": mlflow_url,
        }
        state_path.parent.mkdir(exist_ok=True)
        fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # readers trust it only when no one else can write it
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(state, indent=2))
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
