"""The Prefect flow: run the DVC stage graph, one Prefect task (and one MLflow child run) per stage.

The graph is read from dvc.yaml (no second DAG written by hand): stages are ordered by matching each
stage's deps against the other stages' outs. Each stage runs as `dvc repro --single-item <stage>`, so
DVC still decides what is up to date and records dvc.lock; Prefect adds retries, logs and run history.

The flow's parameters are typed (pydantic constraints), so the Prefect UI shows them as a form and the
API refuses a bad value when a run is created, before anything starts. A stage that fails is retried
with exponential backoff; a stage that still fails ends the flow run, and DVC has already locked every
stage before it, so the next run skips those and continues from the failed one. Each flow run ends with
a markdown artifact (`pipeline-summary`): the stage table, key metrics and links.
"""

import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run as prefect_flow_run
from pydantic import Field

from flows.lock import project_lock
from tasks.core import tracking
from tasks.core.config import ConfigError, Params, dump_params, load_params, resolve_params
from tasks.core.stages import stage_graph, stage_order

# Typed flow parameters: the Prefect UI renders them as a form; the API validates them on run creation.
# (No `from __future__ import annotations` in this module: Prefect resolves these annotations at run time.)
Profile = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9_-]+$", description="conf/profiles/<profile>.yaml: tiny, cpu, gpu")
]
Override = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*=.*$", description="KEY=VALUE")]
StageName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
Retries = Annotated[int, Field(ge=0, le=10, description="retries of a failed stage")]
Parallel = Annotated[
    int, Field(ge=1, le=8, description="stages run at once where the graph allows (1: one after another)")
]
RetryDelay = Annotated[
    float, Field(ge=0, le=3600, description="seconds before the first retry; doubles for each further retry")
]


def stage_env() -> dict[str, str]:
    """The stage subprocess environment: this interpreter's bin dir first, so `python -m` is our venv."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def backoff(retries: int, first_delay: float) -> list[float]:
    """Exponential backoff: the delay before retry i (0-based) is first_delay * 2**i."""
    return [first_delay * 2**i for i in range(retries)]


class StageFailed(RuntimeError):
    """A stage of the flow failed: which one, why (the stage's own error line) and where its log is."""

    def __init__(self, stage: str, cause: str, log_path: str) -> None:
        self.stage, self.cause, self.log_path = stage, cause, log_path
        super().__init__(f"stage `{stage}` failed: {cause} (log: {log_path})")

    def advice(self) -> str:
        """What `pipeline run` ends with: one paragraph, what failed and what to do."""
        return (
            f"stage `{self.stage}` failed: {self.cause.rstrip('.')}. Its log: {self.log_path} (also in the "
            "Prefect UI, `pipeline ui`). The stages before it are done and locked in dvc.lock: fix the cause "
            "and run `pipeline run` again; it skips them and resumes from this stage (a training stage from "
            "its last checkpoint)."
        )

    def __reduce__(self) -> tuple:  # Prefect may pickle a task's exception
        return (StageFailed, (self.stage, self.cause, self.log_path))


def failure_cause(lines: list[str], returncode: int) -> str:
    """The line that says why a stage failed: its own `stage <name> failed: ...` log line, else the last
    line before DVC's closing error (e.g. a SystemExit message), else DVC's error."""
    for line in reversed(lines):
        match = re.search(r"stage \S+ failed: (.*)", line)
        if match:
            return match.group(1).strip()[:400]
    own = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("ERROR: failed to reproduce")]
    dvc = [ln.strip() for ln in lines if ln.startswith("ERROR:")]
    return (own or dvc or [f"dvc repro exited with code {returncode}"])[-1][:400]


def stage_log(cwd: str, stage: str) -> Path:
    return Path(cwd) / ".pipeline" / "logs" / f"{stage}.log"


@task(name="dvc-stage", task_run_name="{stage}", retries=1, retry_delay_seconds=backoff(1, 5.0))
def run_stage(stage: str, force: bool = False, cwd: str = ".", beside_others: bool = False) -> str:
    """`dvc repro --single-item <stage>`, its output streamed into the Prefect log line by line and into
    .pipeline/logs/<stage>.log (the last attempt's). `beside_others`: other stages run at the same time in
    this workspace; DVC holds its repo lock only before and after a stage's command, and gives up after 3 s
    (`Unable to acquire lock`), so this one waits for it (`dvc --wait-for-lock`)."""
    logger = get_run_logger()
    dvc = str(Path(sys.executable).parent / "dvc")
    wait = ["--wait-for-lock"] if beside_others else []
    cmd = [dvc, *wait, "repro", "--single-item", stage] + (["--force"] if force else [])
    logger.info("running %s", " ".join(cmd[1:]))
    log_path = stage_log(cwd, stage)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    skipped = False
    lines: deque[str] = deque(maxlen=200)  # the tail: where the cause is
    with open(log_path, "w") as log_file:
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            line = line.rstrip()
            lines.append(line)
            skipped = skipped or "didn't change, skipping" in line
            logger.info("%s", line)
    if proc.wait() != 0:
        shown = os.path.relpath(log_path) if log_path.is_relative_to(Path.cwd()) else str(log_path)
        raise StageFailed(stage, failure_cause(list(lines), proc.returncode), shown)
    return "skipped" if skipped else "ran"


KEY_METRICS = ("loss", "acc", "ppl", "bpb", "margin", "win", "reward", "kl", "rows", "tokens", "seconds")


def key_metrics(root: Path, stages: list[str], per_stage: int = 8) -> list[tuple[str, str, float]]:
    """(stage, metric, value) rows from data/metrics/<stage>.json, the numeric leaves whose names look key."""
    rows: list[tuple[str, str, float]] = []
    for stage in stages:
        path = root / "data" / "metrics" / f"{stage}.json"
        if not path.exists():
            continue
        try:
            flat = tracking.flatten(json.loads(path.read_text()))
        except ValueError:
            continue
        numeric = {
            k: float(v) for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        chosen = [k for k in numeric if any(word in k.lower() for word in KEY_METRICS)] or list(numeric)
        rows.extend((stage, k, numeric[k]) for k in chosen[:per_stage])
    return rows


def summary_markdown(
    root: Path,
    profile: str,
    results: dict[str, str],
    seconds: dict[str, float],
    parent_run_id: str,
    experiment_id: str,
    error: str | None = None,
) -> str:
    """The flow run's report: stage table, key metrics, links (MLflow UI links when it is a server)."""
    lines = [f"# llm-pipeline run: profile `{profile}`", ""]
    if error:
        lines += [
            f"**Failed:** {error}",
            "",
            "Stages locked by DVC before the failure are skipped by the next run.",
            "",
        ]
    lines += ["| stage | result | seconds |", "|---|---|---:|"]
    lines += [f"| {s} | {r} | {seconds.get(s, 0.0):.1f} |" for s, r in results.items()]
    metrics = key_metrics(root, [s for s, r in results.items() if r in ("ran", "skipped")])
    if metrics:
        lines += [
            "",
            "## Key metrics (data/metrics/*.json)",
            "",
            "| stage | metric | value |",
            "|---|---|---:|",
        ]
        lines += [f"| {s} | {k} | {v:.4g} |" for s, k, v in metrics]
    lines += ["", "## Links", ""]
    url = tracking.run_url(parent_run_id, experiment_id)
    lines.append(
        f"- MLflow parent run: [{parent_run_id}]({url})"
        if url
        else f"- MLflow parent run: `{parent_run_id}` ({tracking.tracking_uri()})"
    )
    report = root / "data" / "eval" / "report.html"
    if results.get("evaluate") in ("ran", "skipped") and report.exists():
        lines.append(
            f"- Run report (stages, curves, evaluation, sample answers): [{report}]({report.resolve().as_uri()}),"
            " also the `eval/report.html` artifact of the evaluate run in MLflow"
        )
    registered = root / "data" / "registry" / "registered.json"
    if results.get("register") in ("ran", "skipped") and registered.exists():
        for model, info in json.loads(registered.read_text()).items():
            link = tracking.model_version_url(info["name"], info["version"])
            name = f"{info['name']} v{info['version']}"
            champion = " (champion)" if info.get("champion") else ""
            lines.append(f"- {model}: [{name}]({link}){champion}" if link else f"- {model}: {name}{champion}")
    return tracking.redact("", "\n".join(lines) + "\n")  # URIs and errors may carry credentials


def run_side_by_side(
    selected: list[str],
    upstream: dict[str, set[str]],
    stage_task: Any,
    parallel: int,
    force: bool,
    root: Path,
    results: dict[str, str],
    seconds: dict[str, float],
) -> None:
    """Run `selected` (in graph order) with up to `parallel` stages at once: a stage is submitted as soon
    as every selected stage it depends on, directly or through unselected ones, has finished, the earliest
    in graph order first. After a failure nothing new starts; the stages running finish, then the first
    failure is raised (its stage "failed", the rest "not run"). Fills `results` and `seconds` as they end."""

    def before(stage: str) -> set[str]:  # everything upstream: `--stage pretrain --stage dpo` skips sft
        seen, todo = set(), list(upstream.get(stage, ()))
        while todo:
            other = todo.pop()
            if other not in seen:
                seen.add(other)
                todo.extend(upstream.get(other, ()))
        return seen & set(selected)

    needs = {stage: before(stage) for stage in selected}
    pending = list(selected)
    running: dict[str, tuple[Any, float]] = {}  # stage -> (future, start)
    failure: BaseException | None = None
    while pending or running:
        done = {s for s, result in results.items() if result in ("ran", "skipped")}
        while failure is None and len(running) < parallel:
            ready = [s for s in pending if needs[s] <= done]
            if not ready:
                break
            stage = ready[0]  # pending keeps graph order: with parallel=1 this is stage_order
            pending.remove(stage)
            future = stage_task.submit(stage, force=force, cwd=str(root), beside_others=True)
            running[stage] = (future, time.time())
        if not running:  # a failure: what has not started stays "not run"
            break
        finished = next(as_completed([future for future, _ in running.values()]))
        stage = next(s for s, (future, _) in running.items() if future is finished)
        seconds[stage] = time.time() - running.pop(stage)[1]
        try:
            results[stage] = finished.result()
        except Exception as exc:
            results[stage] = "failed"
            failure = failure or exc
    if failure is not None:
        raise failure


def _current_params(path: Path) -> Params | None:
    """The params in params.yaml, or None when it no longer loads (written by an older version): rewrite it."""
    try:
        return load_params(path)
    except ConfigError:
        return None


@flow(name="llm-pipeline", log_prints=True, validate_parameters=True)
def pipeline(
    profile: Profile = "cpu",
    overrides: list[Override] | None = None,
    stages: list[StageName] | None = None,
    force: bool = False,
    retries: Retries = 1,
    retry_delay_seconds: RetryDelay = 5.0,
    wait_for_lock: bool = False,
    parallel: Parallel = 1,
) -> dict[str, str]:
    """Resolve params (profile + overrides) into params.yaml, then run the DVC stages in graph order.

    profile: conf/profiles/<profile>.yaml; overrides: KEY=VALUE settings on top of it; stages: run only
    these (empty: all); force: re-run stages even if DVC finds them up to date; retries and
    retry_delay_seconds: how often a failed stage is retried, with exponential backoff; wait_for_lock:
    queue behind another pipeline command running in this project instead of failing at once; parallel:
    how many stages may run at once, each as soon as the stages it depends on are done (reward, dpo and
    grpo need only sft).
    """
    with project_lock(Path.cwd(), f"flow run {prefect_flow_run.id} (profile {profile})", wait=wait_for_lock):
        return _run_pipeline(profile, overrides, stages, force, retries, retry_delay_seconds, parallel)


def _run_pipeline(
    profile: str,
    overrides: list[str] | None,
    stages: list[str] | None,
    force: bool,
    retries: int,
    retry_delay_seconds: float,
    parallel: int = 1,
) -> dict[str, str]:
    logger = get_run_logger()
    root = Path.cwd()
    params = resolve_params(profile, overrides or [])
    order = stage_order(root / "dvc.yaml")
    unknown = sorted(set(stages or []) - set(order))
    if unknown:  # before params.yaml is written: bad input changes nothing
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(order)}")
    params_path = root / "params.yaml"
    if not params_path.exists() or _current_params(params_path) != params:
        dump_params(params, params_path)
    selected = [s for s in order if not stages or s in stages]
    stage_task = run_stage.with_options(
        retries=retries, retry_delay_seconds=backoff(retries, retry_delay_seconds) or 0
    )
    results: dict[str, str] = {}
    seconds: dict[str, float] = {}
    tags = {
        "pipeline.profile": profile,
        "pipeline.flow": "prefect",
        "prefect.flow_run_id": prefect_flow_run.id,
    }
    with tracking.flow_run("pipeline", tags) as parent:
        parent.log_params({"profile": profile, "overrides": " ".join(overrides or []), "force": force})
        experiment_id = parent.run.info.experiment_id
        error: str | None = None
        try:
            if parallel > 1:
                upstream = stage_graph(root / "dvc.yaml")
                try:
                    run_side_by_side(selected, upstream, stage_task, parallel, force, root, results, seconds)
                except Exception as exc:
                    error = str(exc) if isinstance(exc, StageFailed) else f"a stage failed: {exc}"
                    raise
            else:
                for stage in selected:
                    start = time.time()
                    try:
                        results[stage] = stage_task(stage, force=force, cwd=str(root))
                    except Exception as exc:
                        results[stage] = "failed"
                        error = str(exc) if isinstance(exc, StageFailed) else f"stage `{stage}`: {exc}"
                        raise
                    finally:
                        seconds[stage] = time.time() - start
        finally:
            in_order = {stage: results.get(stage, "not run") for stage in selected}  # side by side: by end
            results.clear()
            results.update(in_order)
            parent.log_metrics({f"seconds.{s}": t for s, t in seconds.items()})
            summary = summary_markdown(root, profile, results, seconds, parent.run_id, experiment_id, error)
            create_markdown_artifact(
                summary, key="pipeline-summary", description="stages, key metrics and links of this run"
            )
        logger.info("stages: %s", results)
    return results
