"""Orchestration overhead: the pipeline through the Prefect flow vs the same stages through plain DVC.

In a fresh temp git+DVC copy of the project (profile tiny by default, `--profile cpu` for `make run`'s),
measured in the same run, alternating:
  - `dvc repro --force`                   every stage, plain DVC (the baseline)
  - `pipeline run --force`                the same stages through the Prefect flow (one task and one
                                          MLflow child run per stage), against a running Prefect server
  - `dvc repro` with nothing to do        the no-op check (goal <= 1 s)
The Prefect server is started once before timing (as `pipeline ui` would have it running); its startup
is reported apart. Both entry points log to the same local sqlite MLflow store. Prints one JSON object.

    .venv/bin/python benchmarks/orchestration.py [--profile tiny|cpu] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name as cpu_model  # noqa: E402
from flows.deploy import free_port  # noqa: E402
from tests.helpers.project import make_project  # noqa: E402


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--repeats", type=int, default=1, help="forced runs of each entry point")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    root = tmp / "project"
    bin_dir = Path(sys.executable).parent
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        GX_ANALYTICS_ENABLED="false",
        TOKENIZERS_PARALLELISM="false",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        PYTHONUNBUFFERED="1",
    )
    env.pop("PREFECT_API_URL", None)
    make_project(root, args.profile)

    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.perf_counter() - start > 600:
                    raise SystemExit("the Prefect server did not start") from None
                time.sleep(0.5)
        server_startup = time.perf_counter() - start
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"

        dvc = str(bin_dir / "dvc")
        pipeline = [sys.executable, "-m", "flows.cli", "run", "--profile", args.profile]
        # Warm-up, not compared: a tiny-profile build pays the cold caches (bytecode, DeepSpeed ops, page
        # cache) for both entry points; then the profile's params are restored, and the forced runs redo all.
        timed([sys.executable, "-m", "flows.cli", "params", "--profile", "tiny"], root, env)
        warmup = timed([dvc, "repro"], root, env)
        timed([sys.executable, "-m", "flows.cli", "params", "--profile", args.profile], root, env)
        dvc_times, flow_times = [], []
        for _ in range(args.repeats):
            dvc_times.append(timed([dvc, "repro", "--force"], root, env))
            flow_times.append(timed([*pipeline, "--force"], root, env))
        noop = [timed([dvc, "repro"], root, env) for _ in range(3)]
        flow_noop = timed(pipeline, root, env)
    finally:
        os.killpg(server.pid, 2)
        server.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)

    dvc_s, flow_s = statistics.median(dvc_times), statistics.median(flow_times)
    overhead = (flow_s - dvc_s) / dvc_s
    print(
        json.dumps(
            {
                "benchmark": "orchestration",
                "profile": args.profile,
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
                "stages": 11,
                "dvc_repro_force_s": [round(t, 2) for t in dvc_times],
                "prefect_flow_force_s": [round(t, 2) for t in flow_times],
                "overhead_pct": round(100 * overhead, 2),
                "overhead_goal_pct": 5.0,
                "overhead_goal_met": overhead <= 0.05,
                "overhead_per_stage_s": round((flow_s - dvc_s) / 11, 3),
                "noop_dvc_repro_s": [round(t, 2) for t in noop],
                "noop_goal_s": 1.0,
                "noop_goal_met": statistics.median(noop) <= 1.0,
                "noop_prefect_flow_s": round(flow_noop, 2),
                "warmup_tiny_build_s": round(warmup, 2),
                "prefect_server_startup_s": round(server_startup, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
