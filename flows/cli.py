"""`pipeline`: the command line.

    pipeline run --profile tiny --set pretrain.train.max_steps=50     # resolve params.yaml, run the flow
    pipeline params --profile cpu                                     # only write params.yaml (then `dvc repro`)
    pipeline ui                                                       # Prefect + MLflow servers on 127.0.0.1
    pipeline deploy --cron "0 3 * * *" --profile cpu                  # a schedulable deployment (serves runs)
    pipeline deploy --pool gpu --profile gpu                          # a deployment on a work pool (workers run it)
    pipeline stages                                                   # the stage order read from dvc.yaml
    pipeline chat pipeline-sft@champion                               # interactive chat, streamed
    pipeline export pipeline-sft@champion out/hf                      # Hugging Face Llama checkpoint
    pipeline replay pipeline-base@champion                            # reproduce it from its lineage

Every check that can fail without doing work (profile, keys, types, source paths, tracking store)
runs before the first stage starts. An error ends with one message saying what failed and what to do
(exit code 2 for bad input, 1 for a failed stage); `pipeline --debug ...` adds the Python traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from tasks.core.config import ConfigError, dump_params, resolve_params


def _clean(exc: BaseException | str) -> str:
    """An error message as printed: URIs without passwords or tokens, secret values masked."""
    from tasks.core.secrets import redact

    return redact("", exc)


def _resolve(args: argparse.Namespace):
    params = resolve_params(args.profile, args.set or [])
    from tasks.ingest import check_sources

    check_sources(params)
    return params


def quiet_console_tracebacks() -> None:
    """Prefect prints a failed task's traceback on the console; `pipeline run` ends with one message
    instead. The traceback stays in the stage's log file and in the Prefect UI: Prefect's API handler
    has formatted the record before the console handler (on the root logger) sees it."""
    import logging

    class NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.exc_info, record.exc_text = None, None
            return True

    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler":
            handler.addFilter(NoTraceback())


def cmd_params(args: argparse.Namespace) -> int:
    from flows.lock import command_line, project_lock

    params = _resolve(args)
    with project_lock(Path.cwd(), command_line(), wait=args.wait):
        dump_params(params, Path("params.yaml"))
    print(f"wrote params.yaml (profile {args.profile}); run `dvc repro` to reproduce")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.lock import command_line, project_lock

    _resolve(args)
    if not 1 <= args.parallel <= 8:  # the flow's own bound, named before anything starts
        raise ConfigError(f"--parallel must be between 1 and 8, got {args.parallel}")
    # The lock before Prefect and MLflow start: a second run in this project is refused in seconds.
    with project_lock(Path.cwd(), command_line(), wait=args.wait):
        return _run_flow(args)


def _run_flow(args: argparse.Namespace) -> int:
    from tasks.core import tracking

    tracking.check_reachable()  # an unreachable tracking server fails here in seconds, before any training
    tracking.setup()
    from flows.pipeline import pipeline

    if not args.debug:
        quiet_console_tracebacks()
    results = pipeline(
        profile=args.profile,
        overrides=args.set or [],
        stages=args.stage or None,
        force=args.force,
        retries=args.retries,
        retry_delay_seconds=args.retry_delay,
        wait_for_lock=args.wait,
        parallel=args.parallel,
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
    if args.pool:
        from flows.deploy import deploy_to_pool

        deployment_id = deploy_to_pool(
            args.name,
            args.pool,
            args.profile,
            args.set or [],
            cron=args.cron,
            interval=args.interval,
            retries=args.retries,
        )
        print(f"deployment llm-pipeline/{args.name} ({deployment_id}) on work pool {args.pool}")
        print(
            f"start a worker (here or on a node with this checkout): prefect worker start --pool {args.pool}"
        )
        print(f"start a run: prefect deployment run 'llm-pipeline/{args.name}' (or Run in the Prefect UI)")
        return 0
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
    from flows.registered import chat

    try:
        return chat(args.model, _generation_params(args), system=args.system)
    except ValueError as exc:  # a generation parameter out of bounds (max_new_tokens, temperature)
        print(f"pipeline: {_clean(exc)}", file=sys.stderr)
        return 2


def cmd_export(args: argparse.Namespace) -> int:
    from flows.registered import export

    export(args.model, Path(args.out_dir), force=args.force)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from flows.registered import replay

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


class _Formatter(argparse.HelpFormatter):
    """Every option's default after its help, where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class _TopFormatter(argparse.RawDescriptionHelpFormatter, _Formatter):
    """The module docstring as written."""


PROFILE_HELP = (
    "conf/profiles/<PROFILE>.yaml: tiny (tests, minutes), cpu (make run), gpu (one GPU, real corpora)"
)
SET_HELP = "override one key on top of the profile, e.g. pretrain.train.max_steps=50 (repeatable)"
MODEL_HELP = "a registered model: <name>@<alias> (e.g. pipeline-sft@champion) or <name>/<version>"
COMMANDS = {  # name: (one line for `pipeline --help`, the description of `pipeline <name> --help`)
    "run": (
        "resolve params.yaml, then run the stage graph as a Prefect flow (MLflow records every stage)",
        "Write params.yaml (profile + overrides, checked before any work), then run the DVC stages in graph "
        "order as the Prefect flow `llm-pipeline`: stages up to date are skipped, a failed stage is retried, "
        "and running it again after a failure resumes where it stopped.",
    ),
    "params": (
        "only write params.yaml (then `dvc repro` or `dvc exp run` reproduces the pipeline)",
        "Resolve the profile and overrides into params.yaml (every key checked) without running anything.",
    ),
    "deploy": (
        "create a Prefect deployment of the flow and serve its runs (from the UI, a schedule or the API)",
        "Create or update the deployment `llm-pipeline/<name>` with these parameters and serve its runs in "
        "this working tree, one at a time, until Ctrl-C. Start runs from the Prefect UI (`pipeline ui`). "
        "With --pool, deploy it to a Prefect work pool instead and return: the pool's workers run it.",
    ),
    "stages": ("print the stage order read from dvc.yaml, with each stage's upstream stages", None),
    "ui": (
        "start the Prefect UI and the MLflow UI on 127.0.0.1 (run history of this project); Ctrl-C stops both",
        "Start `prefect server start` and `mlflow server` on the loopback interface, on this project's "
        "databases (.prefect/prefect.db, mlflow.db); later `pipeline` commands in this directory use them.",
    ),
    "chat": ("interactive terminal chat with a registered model, streamed token by token", None),
    "export": (
        "write a registered model as a Hugging Face checkpoint with its tokenizer and model card",
        "Write the model as a Hugging Face checkpoint (transformers loads it), its tokenizer and a README.md "
        "model card, after checking its integrity manifest.",
    ),
    "replay": (
        "rebuild a registered model from its recorded commit and params (git worktree + dvc repro)",
        None,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The `pipeline` command line: every subcommand and option carries its help."""
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__, formatter_class=_TopFormatter)
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument(
        "--debug", action="store_true", help="on an error, print the Python traceback as well as the message"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Any) -> argparse.ArgumentParser:
        short, long = COMMANDS[name]
        p = sub.add_parser(name, help=short, description=long or short, formatter_class=_Formatter)
        p.set_defaults(fn=fn)
        return p

    for name, fn in (("run", cmd_run), ("params", cmd_params), ("deploy", cmd_deploy)):
        p = command(name, fn)
        p.add_argument("--profile", default="cpu", help=PROFILE_HELP)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
        if name == "run":
            p.add_argument(
                "--stage", action="append", metavar="STAGE", help="run only this stage (repeatable)"
            )
            p.add_argument(
                "--force", action="store_true", help="re-run stages even if DVC finds them up to date"
            )
        if name in ("run", "params"):
            p.add_argument(
                "--wait",
                action="store_true",
                help="if another pipeline command is running in this project, wait for it instead of failing",
            )
        if name in ("run", "deploy"):
            p.add_argument("--retries", type=int, default=1, help="retries of a failed stage")
        if name == "run":
            p.add_argument(
                "--parallel",
                type=int,
                default=1,
                metavar="N",
                help="run up to N stages at once where the graph allows (reward, dpo, grpo after sft); 1: in order",
            )
            p.add_argument(
                "--retry-delay",
                type=float,
                default=5.0,
                help="seconds before the first retry (doubles after)",
            )
        if name == "deploy":
            p.add_argument("--name", default="default", help="the deployment is llm-pipeline/<NAME>")
            p.add_argument(
                "--pool",
                metavar="NAME",
                help="deploy to this Prefect work pool (flow.deploy) and return instead of serving runs; "
                "`prefect worker start --pool NAME` runs them (needs PREFECT_API_URL or `pipeline ui`)",
            )
            when = p.add_mutually_exclusive_group()
            when.add_argument("--cron", help='cron schedule, e.g. "0 3 * * *" (none: runs start from the UI)')
            when.add_argument(
                "--interval",
                type=float,
                help="schedule a run every INTERVAL seconds, the first INTERVAL seconds from now",
            )
    command("stages", cmd_stages)
    p = command("ui", cmd_ui)
    p.add_argument("--host", default="127.0.0.1", help="interface both servers bind to (keep it loopback)")
    p.add_argument("--prefect-port", type=int, default=4200, help="port of the Prefect server and UI")
    p.add_argument("--mlflow-port", type=int, default=5000, help="port of the MLflow server and UI")
    p.add_argument(
        "--mlflow-store", help="MLflow backend store URI (default: the pipeline's, sqlite mlflow.db)"
    )
    p.add_argument(
        "--artifacts", help="artifact root of new experiments (default: mlartifacts/ beside a sqlite store)"
    )
    for name, fn in (("chat", cmd_chat), ("export", cmd_export), ("replay", cmd_replay)):
        p = command(name, fn)
        p.add_argument("model", help=MODEL_HELP)
        if name == "chat":
            p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply, in tokens")
            p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
            p.add_argument(
                "--top-k", type=int, default=0, help="sample among the K likeliest tokens; 0 = off"
            )
            p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
            p.add_argument("--system", help="a system message that starts the conversation")
        if name == "export":
            p.add_argument("out_dir", help="the directory to write (created; see --force)")
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
                help="replay only a commit in the history of this ref (HEAD: the current branch)",
            )
    return parser


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"pipeline {v('llm-pipeline')} (prefect {v('prefect')}, mlflow {v('mlflow')}, dvc {v('dvc')})"


# Errors whose message says what is wrong and where: printed alone (TrackingError covers ModelRefError
# and ModelIntegrityError; StageFailed is a stage of the flow that failed).
CLEAR_ERRORS = {"StageError", "TrackingError", "ReplayError", "ExportError", "StageFailed", "ProjectBusy"}


def quiet_libraries() -> None:
    """No library chatter on everyday commands: MLflow announces creating its tables at INFO."""
    import logging

    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    use_project_history()
    args = build_parser().parse_args(argv)
    quiet_libraries()
    from flows.deploy import apply_ui_state

    if args.command != "ui":
        apply_ui_state()  # a `pipeline ui` running in this directory: use its servers
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"pipeline: config error: {_clean(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipeline: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        names = {c.__name__ for c in type(exc).__mro__}
        if "StageFailed" in names:
            print(f"\npipeline: {_clean(exc.advice())}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
        if names & CLEAR_ERRORS:
            print(f"pipeline: {_clean(exc)}", file=sys.stderr)
            return 2
        # Not an error we anticipated: the message, without the secrets a URI in it may hold.
        hint = "" if args.debug else " (run again with --debug for the traceback)"
        print(f"pipeline: {type(exc).__name__}: {_clean(exc)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
