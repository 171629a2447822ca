"""The one place stages talk to MLflow.

A stage opens `stage_run(stage, params)`; it gets an MLflow run tagged with the stage, the profile and
the git commit. When the Prefect flow runs the stage it passes its parent run id through the
environment (PIPELINE_PARENT_RUN_ID), so the stage's run becomes a child of the flow's run; a stage run
by plain `dvc repro` creates a top-level run of its own. Both entry points give the same records.

The tracking URI is always absolute: MLFLOW_TRACKING_URI if set (a server URI works the same), else a
sqlite file at the repository root, with artifacts beside it in mlartifacts/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from tasks.core.config import REPO_ROOT  # noqa: E402
from tasks.core.secrets import redact, redact_tree  # noqa: E402  (redact is re-exported)

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "PIPELINE_PARENT_RUN_ID"
EXPERIMENT_ENV = "PIPELINE_EXPERIMENT"
DEFAULT_EXPERIMENT = "llm-pipeline"


class TrackingError(RuntimeError):
    pass


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={redact('', uri)} is relative; use an absolute path (sqlite:////abs/x.db)"
        )
    return uri


def _artifact_root() -> str | None:
    # A server decides its own artifact root; a local store keeps artifacts beside the database.
    uri = tracking_uri()
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        db_dir = Path(uri.split(":///", 1)[1]).parent if uri.startswith("sqlite:") else REPO_ROOT
        return (db_dir / "mlartifacts").as_uri()
    return None


def setup() -> str:
    """Point MLflow at the tracking store, check it answers, and select the experiment. Returns its id."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    client = MlflowClient()
    try:
        exp = client.get_experiment_by_name(name)
    except Exception as exc:  # an unreachable server surfaces here, before any training starts
        raise TrackingError(redact("", f"MLflow tracking store {uri} is not reachable: {exc}")) from exc
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=_artifact_root())
        except mlflow.exceptions.MlflowException:  # created concurrently by another stage
            existing = client.get_experiment_by_name(name)
            if existing is None:
                raise
            exp_id = existing.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_info(cwd: Path | None = None) -> dict[str, str]:
    cwd = cwd or Path.cwd()

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


class Tracker:
    """Thin handle on the active run; every stage logs through it."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.run_id: str = run.info.run_id

    def log_params(self, params: Any, prefix: str = "") -> None:
        flat = {k: redact(k, str(v))[:6000] for k, v in flatten(params, prefix).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)

    def log_curves(self, stage: str, csv_path: Path) -> list[str]:
        """The stage's key curves (tasks/core/curves.py) as PNG images under `curves/` of this run; the
        artifact paths logged. A missing or empty CSV logs nothing."""
        import tempfile

        from tasks.core.curves import draw_charts

        if not Path(csv_path).exists():
            return []
        with tempfile.TemporaryDirectory() as tmp:
            pngs = draw_charts(stage, Path(csv_path), Path(tmp))
            for png in pngs:
                mlflow.log_artifact(str(png), artifact_path="curves")
        return [f"curves/{png.name}" for png in pngs]

    def log_params_file(self, params_file: Path, artifact: str) -> str:
        """Store a params YAML as `artifact` (secrets redacted) with its sha256 beside it in
        `<artifact>.sha256`; returns that sha256 (of the bytes stored), which replay checks."""
        import tempfile

        import yaml

        raw = Path(params_file).read_bytes()
        data = yaml.safe_load(raw)
        clean = redact_tree(data)
        if clean != data:  # only rewrite when something was redacted: the bytes stay the user's otherwise
            raw = yaml.safe_dump(clean, sort_keys=False).encode()
        sha = hashlib.sha256(raw).hexdigest()
        name = Path(artifact).name
        folder = str(Path(artifact).parent) if Path(artifact).parent != Path(".") else None
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(raw)
            (Path(tmp) / f"{name}.sha256").write_text(sha + "\n")
            mlflow.log_artifact(str(Path(tmp) / name), artifact_path=folder)
            mlflow.log_artifact(str(Path(tmp) / f"{name}.sha256"), artifact_path=folder)
        return sha


@contextlib.contextmanager
def stage_run(stage: str, params: Any = None, profile: str | None = None) -> Iterator[Tracker]:
    """An MLflow run for one stage (a child of the flow's run when PIPELINE_PARENT_RUN_ID is set)."""
    setup()
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {"pipeline.stage": stage, **git_info()}
    if profile:
        tags["pipeline.profile"] = profile
    nested = mlflow.active_run() is not None  # in-process under the flow run (tests); stages are subprocesses
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=nested, tags=tags) as run:
        tracker = Tracker(run)
        if params is not None:
            tracker.log_params(params)
        yield tracker


@contextlib.contextmanager
def flow_run(name: str, tags: Mapping[str, Any]) -> Iterator[Tracker]:
    """The parent run of one pipeline (flow) run; stages started inside inherit it via the environment."""
    setup()
    with mlflow.start_run(run_name=name, tags={**git_info(), **{k: str(v) for k, v in tags.items()}}) as run:
        previous = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        try:
            yield Tracker(run)
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous


def client() -> MlflowClient:
    setup()
    return MlflowClient()


# ---------------------------------------------------------------------------- operating: servers, links


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast (one short request, no retries) when the tracking server does not answer.

    MLflow's own client retries an unreachable server for minutes; a pipeline run must fail before its
    first stage instead. Local stores (sqlite, file) always pass.
    """
    import http.client
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status != 200:
                raise TrackingError(
                    redact("", f"MLflow tracking server {uri} answered /health with HTTP {resp.status}")
                )
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:  # or malformed
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            redact(
                "",
                f"MLflow tracking server {uri} is not reachable ({reason}); start it (`pipeline ui`) "
                "or unset MLFLOW_TRACKING_URI to use the local sqlite store",
            )
        ) from None  # the chained exception would print the URI (and its password) again


def run_url(run_id: str, experiment_id: str | None = None) -> str | None:
    """The MLflow UI address of a run when the tracking store is a server, else None."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    if experiment_id is None:
        experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(name: str, version: str | int) -> str | None:
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/models/{name}/versions/{version}"


def download_run_artifact(run_id: str, artifact_path: str, dst: Path) -> Path:
    setup()
    return Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst))
    )
