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
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run as prefect_flow_run
from pydantic import Field

from tasks.core import tracking
from tasks.core.config import ConfigError, dump_params, load_params, resolve_params
from tasks.core.stages import stage_order

# Typed flow parameters: the Prefect UI renders them as a form; the API validates them on run creation.
# (No `from __future__ import annotations` in this module: Prefect resolves these annotations at run time.)
Profile = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9_-]+$", description="conf/profiles/<profile>.yaml: tiny, cpu, gpu")
]
Override = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*=.*$", description="KEY=VALUE")]
StageName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
Retries = Annotated[int, Field(ge=0, le=10, description="retries of a failed stage")]
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


@task(name="dvc-stage", task_run_name="{stage}", retries=1, retry_delay_seconds=backoff(1, 5.0))
def run_stage(stage: str, force: bool = False, cwd: str = ".") -> str:
    """`dvc repro --single-item <stage>`, its output streamed into the Prefect log line by line."""
    logger = get_run_logger()
    dvc = str(Path(sys.executable).parent / "dvc")
    cmd = [dvc, "repro", "--single-item", stage] + (["--force"] if force else [])
    logger.info("running %s", " ".join(cmd[1:]))
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    skipped = False
    for line in proc.stdout:
        line = line.rstrip()
        skipped = skipped or "didn't change, skipping" in line
        logger.info("%s", line)
    if proc.wait() != 0:
        raise RuntimeError(f"stage {stage!r} failed (dvc exit code {proc.returncode}); see the log above")
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
    registered = root / "data" / "registry" / "registered.json"
    if results.get("register") in ("ran", "skipped") and registered.exists():
        for model, info in json.loads(registered.read_text()).items():
            link = tracking.model_version_url(info["name"], info["version"])
            name = f"{info['name']} v{info['version']}"
            champion = " (champion)" if info.get("champion") else ""
            lines.append(f"- {model}: [{name}]({link}){champion}" if link else f"- {model}: {name}{champion}")
    return tracking.redact("", "\n".join(lines) + "\n")  # URIs and errors may carry credentials


@flow(name="llm-pipeline", log_prints=True, validate_parameters=True)
def pipeline(
    profile: Profile = "cpu",
    overrides: list[Override] | None = None,
    stages: list[StageName] | None = None,
    force: bool = False,
    retries: Retries = 1,
    retry_delay_seconds: RetryDelay = 5.0,
) -> dict[str, str]:
    """Resolve params (profile + overrides) into params.yaml, then run the DVC stages in graph order.

    profile: conf/profiles/<profile>.yaml; overrides: KEY=VALUE settings on top of it; stages: run only
    these (empty: all); force: re-run stages even if DVC finds them up to date; retries and
    retry_delay_seconds: how often a failed stage is retried, with exponential backoff.
    """
    logger = get_run_logger()
    root = Path.cwd()
    params = resolve_params(profile, overrides or [])
    order = stage_order(root / "dvc.yaml")
    unknown = sorted(set(stages or []) - set(order))
    if unknown:  # before params.yaml is written: bad input changes nothing
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(order)}")
    params_path = root / "params.yaml"
    if not params_path.exists() or load_params(params_path) != params:
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
            for stage in selected:
                start = time.time()
                try:
                    results[stage] = stage_task(stage, force=force, cwd=str(root))
                except Exception as exc:
                    results[stage] = "failed"
                    error = f"stage `{stage}`: {exc}"
                    raise
                finally:
                    seconds[stage] = time.time() - start
        finally:
            for stage in selected:
                results.setdefault(stage, "not run")
            parent.log_metrics({f"seconds.{s}": t for s, t in seconds.items()})
            summary = summary_markdown(root, profile, results, seconds, parent.run_id, experiment_id, error)
            create_markdown_artifact(
                summary, key="pipeline-summary", description="stages, key metrics and links of this run"
            )
        logger.info("stages: %s", results)
    return results
