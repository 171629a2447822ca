"""The Prefect flow: run the DVC stage graph, one Prefect task (and one MLflow child run) per stage.

The graph is read from dvc.yaml (no second DAG written by hand): stages are ordered by matching each
stage's deps against the other stages' outs. Each stage runs as `dvc repro --single-item <stage>`, so
DVC still decides what is up to date and records dvc.lock; Prefect adds retries, logs and run history.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks import tracking
from tasks.config import dump_params, load_params, resolve_params


def _paths(entries: list[Any]) -> list[str]:
    """dvc.yaml lists entries as plain paths or {path: options}."""
    out: list[Any] = []
    for entry in entries or []:
        out.extend(entry.keys() if isinstance(entry, dict) else [entry])
    return [str(p).rstrip("/") for p in out]


def stage_graph(dvc_yaml: Path) -> dict[str, set[str]]:
    """stage -> the stages it depends on (a dep equal to, inside, or containing another stage's out)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    outs = {name: _paths(spec.get("outs", [])) for name, spec in stages.items()}
    graph: dict[str, set[str]] = {}
    for name, spec in stages.items():
        upstream = set()
        for dep in _paths(spec.get("deps", [])):
            for other, other_outs in outs.items():
                if other != name and any(
                    dep == o or dep.startswith(o + "/") or o.startswith(dep + "/") for o in other_outs
                ):
                    upstream.add(other)
        graph[name] = upstream
    return graph


def stage_order(dvc_yaml: Path) -> list[str]:
    """Topological order of the stages, ties broken by their order in dvc.yaml (stable)."""
    graph = stage_graph(dvc_yaml)
    order: list[str] = []
    pending = list(graph)
    while pending:
        ready = [s for s in pending if graph[s] <= set(order)]
        if not ready:
            raise ValueError(f"{dvc_yaml}: the stage graph has a cycle among {pending}")
        order.append(ready[0])
        pending.remove(ready[0])
    return order


def stage_env() -> dict[str, str]:
    """The stage subprocess environment: this interpreter's bin dir first, so `python -m` is our venv."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@task(name="dvc-stage", task_run_name="{stage}", retries=1, retry_delay_seconds=5)
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


@flow(name="llm-pipeline", log_prints=True)
def pipeline(
    profile: str = "cpu",
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: bool = False,
) -> dict[str, str]:
    """Resolve params (profile + overrides) into params.yaml, then run the DVC stages in graph order."""
    logger = get_run_logger()
    root = Path.cwd()
    params = resolve_params(profile, overrides or [])
    params_path = root / "params.yaml"
    if not params_path.exists() or load_params(params_path) != params:
        dump_params(params, params_path)
    order = stage_order(root / "dvc.yaml")
    unknown = sorted(set(stages or []) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
    selected = [s for s in order if not stages or s in stages]
    results: dict[str, str] = {}
    with tracking.flow_run("pipeline", {"pipeline.profile": profile, "pipeline.flow": "prefect"}) as parent:
        parent.log_params({"profile": profile, "overrides": " ".join(overrides or []), "force": force})
        for stage in selected:
            results[stage] = run_stage(stage, force=force, cwd=str(root))
        rows = "\n".join(f"| {s} | {r} |" for s, r in results.items())
        summary = f"# Pipeline run ({profile})\n\nMLflow parent run `{parent.run_id}`\n\n| stage | result |\n|---|---|\n{rows}\n"
        create_markdown_artifact(summary, key="pipeline-summary", description="stages run by this flow run")
        logger.info("stages: %s", results)
    return results


if __name__ == "__main__":
    pipeline(profile=sys.argv[1] if len(sys.argv) > 1 else "cpu")
