"""`mlflow models serve` on a free loopback port, for the serving tests and benchmarks/serving.py."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time
from pathlib import Path

from flows.deploy import free_port


def serve_model(
    uri: str, env: dict[str, str], log: Path, timeout: float = 180
) -> tuple[subprocess.Popen, int]:
    """Start the server in its own process group (uvicorn and its workers with it); return once /ping
    answers 200. Its output goes to `log`, whose tail is in the error when it does not start."""
    port = free_port()
    cmd = [
        "mlflow",
        "models",
        "serve",
        "-m",
        uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_server(proc)
            raise RuntimeError(f"mlflow models serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group; SIGKILL after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
