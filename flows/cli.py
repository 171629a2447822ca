"""`pipeline`: the command line.

    pipeline run --profile tiny --set pretrain.train.max_steps=50     # resolve params.yaml, run the flow
    pipeline params --profile cpu                                     # only write params.yaml (then `dvc repro`)
    pipeline ui                                                       # Prefect + MLflow servers on 127.0.0.1
    pipeline deploy --cron "0 3 * * *" --profile cpu                  # a schedulable deployment (serves runs)
    pipeline stages                                                   # the stage order read from dvc.yaml
    pipeline chat pipeline-sft@champion                               # interactive chat, streamed
    pipeline export pipeline-sft@champion out/hf                      # Hugging Face Llama checkpoint
    pipeline replay pipeline-base@champion                            # reproduce it from its lineage

Every check that can fail without doing work (profile, keys, types, source paths, tracking store)
runs before the first stage starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tasks.core.config import ConfigError, dump_params, resolve_params


def _clean(exc: BaseException) -> str:
    """An error message as printed: URIs without passwords or tokens, secret values masked."""
    from tasks.core.secrets import redact

    return redact("", exc)


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
    from tasks.core import tracking

    tracking.check_reachable()  # an unreachable tracking server fails here in seconds, before any training
    tracking.setup()
    from flows.pipeline import pipeline

    results = pipeline(
        profile=args.profile,
        overrides=args.set or [],
        stages=args.stage or None,
        force=args.force,
        retries=args.retries,
        retry_delay_seconds=args.retry_delay,
    )
    print("stages:", ", ".join(f"{k}={v}" for k, v in results.items()))
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from tasks.core.stages import stage_graph, stage_order

    graph = stage_graph(Path("dvc.yaml"))
    for stage in stage_order(Path("dvc.yaml")):
        print(f"{stage:10s} <- {', '.join(sorted(graph[stage])) or '(source)'}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Start a Prefect server and an MLflow server on the loopback interface; Ctrl-C stops both."""
    from flows.deploy import run_ui
    from tasks.core import tracking

    store = args.mlflow_store or tracking.tracking_uri()
    artifacts = args.artifacts
    if artifacts is None:  # where the pipeline's own runs keep theirs: beside a sqlite store
        db = Path(store.split(":///", 1)[1]) if store.startswith("sqlite:///") else None
        artifacts = db.parent / "mlartifacts" if db else Path("mlartifacts")
    return run_ui(args.host, args.prefect_port, args.mlflow_port, store, Path(artifacts))


def cmd_deploy(args: argparse.Namespace) -> int:
    _resolve(args)
    from tasks.core import tracking

    tracking.check_reachable()
    from flows.deploy import serve

    serve(
        args.name, args.profile, args.set or [], cron=args.cron, interval=args.interval, retries=args.retries
    )
    return 0


def _generation_params(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }


def cmd_chat(args: argparse.Namespace) -> int:
    from flows.models import chat

    try:
        return chat(args.model, _generation_params(args), system=args.system)
    except ValueError as exc:  # a generation parameter out of bounds (max_new_tokens, temperature)
        print(f"pipeline: {_clean(exc)}", file=sys.stderr)
        return 2


def cmd_export(args: argparse.Namespace) -> int:
    from flows.models import export

    export(args.model, Path(args.out_dir), force=args.force)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from flows.models import replay

    workdir = Path(args.workdir) if args.workdir else None
    return 0 if replay(args.model, workdir, keep=args.keep, trusted_ref=args.trusted_ref) else 1


def use_project_history() -> None:
    """Keep Prefect's run history in the project: PREFECT_HOME defaults to <project>/.prefect (Prefect's
    database is $PREFECT_HOME/prefect.db), so the temporary server of a `pipeline run` without
    PREFECT_API_URL and a later `pipeline ui` read and write the same database, as MLflow's mlflow.db.
    Must run before prefect is imported (its settings are read then); explicit settings win."""
    from tasks.core.config import REPO_ROOT

    os.environ.setdefault("PREFECT_HOME", str(REPO_ROOT / ".prefect"))
    # A first run migrates a new database before the temporary server answers: Prefect's 20 s default
    # is too short on a loaded 2-core machine (measured: timed out at load 10).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network beyond the registry


def main(argv: list[str] | None = None) -> int:
    use_project_history()
    parser = argparse.ArgumentParser(
        prog="pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("run", cmd_run), ("params", cmd_params), ("deploy", cmd_deploy)):
        p = sub.add_parser(name)
        p.add_argument("--profile", default="cpu", help="conf/profiles/<profile>.yaml (tiny, cpu, gpu)")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override, e.g. pretrain.train.lr=3e-4"
        )
        if name == "run":
            p.add_argument("--stage", action="append", help="run only these stages (repeatable)")
            p.add_argument("--force", action="store_true", help="re-run stages even if up to date")
        if name in ("run", "deploy"):
            p.add_argument("--retries", type=int, default=1, help="retries of a failed stage (default 1)")
        if name == "run":
            p.add_argument(
                "--retry-delay", type=float, default=5.0, help="seconds before the first retry (doubles)"
            )
        if name == "deploy":
            p.add_argument("--name", default="default", help="deployment name: llm-pipeline/<name>")
            when = p.add_mutually_exclusive_group()
            when.add_argument("--cron", help='cron schedule, e.g. "0 3 * * *"')
            when.add_argument("--interval", type=float, help="schedule every N seconds")
        p.set_defaults(fn=fn)
    p = sub.add_parser("stages")
    p.set_defaults(fn=cmd_stages)
    p = sub.add_parser("ui")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--mlflow-store", help="backend store URI (default: the pipeline's, sqlite mlflow.db)")
    p.add_argument(
        "--artifacts", help="artifact root of new experiments (default: mlartifacts/ beside a sqlite store)"
    )
    p.set_defaults(fn=cmd_ui)
    for name, fn, helptext in (
        ("chat", cmd_chat, "interactive chat with a registered model, streamed"),
        ("export", cmd_export, "write a registered model as a Hugging Face Llama checkpoint"),
        ("replay", cmd_replay, "reproduce a registered model from its lineage (git worktree + dvc repro)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "model", help="<registered name>@<alias> (e.g. pipeline-sft@champion) or <name>/<version>"
        )
        if name == "chat":
            p.add_argument("--max-new-tokens", type=int, default=128)
            p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
            p.add_argument("--top-k", type=int, default=0, help="0 = off")
            p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
            p.add_argument("--system", help="a system message that starts the conversation")
        if name == "export":
            p.add_argument("out_dir")
            p.add_argument(
                "--force",
                action="store_true",
                help="replace a non-empty OUT_DIR that is not a previous export (never /, $HOME or a repo)",
            )
        if name == "replay":
            p.add_argument("--workdir", help="where to make the temporary worktree (default: system temp)")
            p.add_argument("--keep", action="store_true", help="keep the worktree afterwards")
            p.add_argument(
                "--trusted-ref",
                default="HEAD",
                help="replay only a commit in the history of this ref (default HEAD: the current branch)",
            )
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    from flows.deploy import apply_ui_state

    if args.command != "ui":
        apply_ui_state()  # a `pipeline ui` running in this directory: use its servers
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"pipeline: config error: {_clean(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Errors that say what is wrong (TrackingError covers ModelRefError and ModelIntegrityError);
        # printed without a traceback and without the secrets a URI in them may hold.
        if {c.__name__ for c in type(exc).__mro__} & {
            "StageError",
            "TrackingError",
            "ReplayError",
            "ExportError",
        }:
            print(f"pipeline: {_clean(exc)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
