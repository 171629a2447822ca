"""`pipeline`: the command line.

    pipeline run --profile tiny --set pretrain.train.max_steps=50     # resolve params.yaml, run the flow
    pipeline params --profile cpu                                     # only write params.yaml (then `dvc repro`)
    pipeline ui                                                       # Prefect + MLflow servers on 127.0.0.1
    pipeline stages                                                   # the stage order read from dvc.yaml

Every check that can fail without doing work (profile, keys, types, source paths, tracking store)
runs before the first stage starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks.config import ConfigError, dump_params, resolve_params


def _resolve(args: argparse.Namespace):
    params = resolve_params(args.profile, args.set or [])
    from tasks.ingest import check_sources

    check_sources(params)
    return params


def cmd_params(args: argparse.Namespace) -> int:
    dump_params(_resolve(args), Path("params.yaml"))
    print(f"wrote params.yaml (profile {args.profile}); run `dvc repro` to reproduce")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _resolve(args)
    from tasks import tracking

    tracking.setup()  # an unreachable tracking server fails here, before any training
    from flows.pipeline import pipeline

    results = pipeline(
        profile=args.profile, overrides=args.set or [], stages=args.stage or None, force=args.force
    )
    print("stages:", ", ".join(f"{k}={v}" for k, v in results.items()))
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from flows.pipeline import stage_graph, stage_order

    graph = stage_graph(Path("dvc.yaml"))
    for stage in stage_order(Path("dvc.yaml")):
        print(f"{stage:10s} <- {', '.join(sorted(graph[stage])) or '(source)'}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Start a Prefect server and an MLflow server on the loopback interface; Ctrl-C stops both."""
    from tasks import tracking

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    procs = [
        subprocess.Popen(
            [
                str(bin_dir / "prefect"),
                "server",
                "start",
                "--host",
                args.host,
                "--port",
                str(args.prefect_port),
            ],
            env=env,
        ),
        subprocess.Popen(
            [
                str(bin_dir / "mlflow"),
                "server",
                "--host",
                args.host,
                "--port",
                str(args.mlflow_port),
                "--backend-store-uri",
                tracking.tracking_uri(),
                "--default-artifact-root",
                str(Path("mlartifacts").resolve().as_uri()),
            ],
            env=env,
        ),
    ]
    print(
        f"Prefect UI: http://{args.host}:{args.prefect_port}   MLflow UI: http://{args.host}:{args.mlflow_port}"
    )
    print(
        f"Point runs at them: export PREFECT_API_URL=http://{args.host}:{args.prefect_port}/api "
        f"MLFLOW_TRACKING_URI=http://{args.host}:{args.mlflow_port}"
    )
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("run", cmd_run), ("params", cmd_params)):
        p = sub.add_parser(name)
        p.add_argument("--profile", default="cpu", help="conf/profiles/<profile>.yaml (tiny, cpu, gpu)")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override, e.g. pretrain.train.lr=3e-4"
        )
        if name == "run":
            p.add_argument("--stage", action="append", help="run only these stages (repeatable)")
            p.add_argument("--force", action="store_true", help="re-run stages even if up to date")
        p.set_defaults(fn=fn)
    p = sub.add_parser("stages")
    p.set_defaults(fn=cmd_stages)
    p = sub.add_parser("ui")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.set_defaults(fn=cmd_ui)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"pipeline: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ in {"StageError", "TrackingError"}:
            print(f"pipeline: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
