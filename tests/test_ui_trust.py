"""`pipeline ui` answers only its own origin, and its state file is trusted only when it is genuine.

One real `pipeline ui` (Prefect server + MLflow server on free loopback ports, temp PREFECT_HOME and
store). A browser page from another origin gets no CORS grant from either server, and Prefect refuses a
state-changing request without its CSRF token; Prefect's own client (which fetches the token) still
runs a flow against it. `.pipeline/ui.json` is used only when it belongs to the current user, is not
group/world writable, names a live `pipeline ui` process and loopback URLs; otherwise it is ignored with
a warning and the environment is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.deploy import free_port, read_ui_state
from tests.test_operate import Lines, spawn, stop

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui-trust")
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PREFECT_HOME=str(tmp / "prefect-home"),
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )
    env.pop("PREFECT_API_URL", None)
    ports = {"prefect": free_port(), "mlflow": free_port()}
    cmd = [sys.executable, "-m", "flows.cli", "ui", "--prefect-port", str(ports["prefect"])]
    cmd += ["--mlflow-port", str(ports["mlflow"]), "--mlflow-store", f"sqlite:///{tmp / 'mlflow.db'}"]
    proc = spawn([*cmd, "--artifacts", str(tmp / "artifacts")], tmp, env)
    out = Lines(proc)
    try:
        out.wait_for("ready", timeout=300)
        yield {
            "dir": tmp,
            "env": env,
            "ports": ports,
            "state": json.loads((tmp / ".pipeline/ui.json").read_text()),
        }
    finally:
        stop(proc)


def request(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def allow_origin(headers: dict) -> str | None:
    return {k.lower(): v for k, v in headers.items()}.get("access-control-allow-origin")


def test_servers_grant_cors_only_to_their_own_origin(ui):
    for what, path in (
        ("prefect", "/api/health"),
        ("mlflow", "/api/2.0/mlflow/experiments/search?max_results=1"),
    ):
        base = f"http://127.0.0.1:{ui['ports'][what]}"
        status, headers, _ = request(base + path, headers={"Origin": EVIL})
        assert allow_origin(headers) in (None, ""), (what, status, headers)
        preflight = {"Origin": EVIL, "Access-Control-Request-Method": "POST"}
        status, headers, _ = request(base + path, "OPTIONS", preflight)
        assert allow_origin(headers) in (None, ""), (what, status, headers)
        status, headers, _ = request(base + path, headers={"Origin": base})
        assert status == 200 and allow_origin(headers) == base, (what, status, headers)


def test_prefect_refuses_a_state_change_without_csrf_token_but_its_client_runs_flows(ui):
    api = ui["state"]["prefect_api_url"]
    status, _, body = request(f"{api}/flows/", "POST", {"Content-Type": "application/json"}, b'{"name": "x"}')
    assert status == 403 and "CSRF" in body, (status, body)
    script = "from prefect import flow\n@flow\ndef f():\n    return 6 * 7\nprint('result', f())\n"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(ui["env"], PREFECT_API_URL=api),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "result 42" in proc.stdout, proc.stderr[-3000:]


def write_state(root: Path, state: dict, mode: int = 0o600) -> Path:
    path = root / ".pipeline/ui.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(state))
    path.chmod(mode)
    return path


UNTRUSTED = {  # case: (change to the state, file mode, owner uid or None, the warning)
    "world writable": ({}, 0o666, None, "writable by group or others"),
    "group writable": ({}, 0o620, None, "writable by group or others"),
    "owned by another user": ({}, 0o600, 65534, "is owned by uid 65534"),
    "pid of another program": ({"pid": os.getpid()}, 0o600, None, "is not `pipeline ui`"),
    "pid of no process": ({"pid": 2**22 + 7}, 0o600, None, "is not running"),
    "remote MLflow": ({"mlflow_tracking_uri": "http://10.1.2.3:5000"}, 0o600, None, "not a loopback address"),
    "remote Prefect": ({"prefect_api_url": "http://evil.example/api"}, 0o600, None, "not a loopback address"),
}


def test_a_genuine_state_file_is_used(ui):
    assert read_ui_state(ui["dir"]) == ui["state"]


def test_a_pipeline_command_in_its_directory_uses_its_servers(ui):
    """`pipeline run` in the ui's directory, PREFECT_API_URL and MLFLOW_TRACKING_URI unset: its flow run is
    on the ui's Prefect server (a stage dvc.yaml lacks stops it at once, exit 2)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    shutil.copy(REPO / "dvc.yaml", ui["dir"] / "dvc.yaml")
    stage = f"no-such-stage-{os.getpid()}"
    env = {k: v for k, v in ui["env"].items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--stage", stage],
        cwd=ui["dir"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and f"unknown stage(s) {stage}" in proc.stderr, proc.stderr[-3000:]
    with (
        temporary_settings({PREFECT_API_URL: ui["state"]["prefect_api_url"]}),
        get_client(sync_client=True) as c,
    ):
        runs = [r for r in c.read_flow_runs() if r.parameters.get("stages") == [stage]]
    assert [r.state.name for r in runs] == ["Failed"]


@pytest.mark.parametrize("case", list(UNTRUSTED))
def test_an_untrusted_state_file_is_ignored_with_a_warning(ui, tmp_path, capsys, case):
    change, mode, owner, warning = UNTRUSTED[case]
    path = write_state(tmp_path, {**ui["state"], **change}, mode)
    if owner is not None:
        if os.getuid() != 0:
            pytest.skip("changing a file's owner needs root")
        os.chown(path, owner, -1)
    assert read_ui_state(tmp_path) is None
    err = capsys.readouterr().err
    assert f"ignoring {path}" in err and warning in err, err
