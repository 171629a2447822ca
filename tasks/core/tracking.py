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
import logging
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from tasks.core.config import REPO_ROOT  # noqa: E402

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
            f"MLFLOW_TRACKING_URI={uri} is relative; use an absolute path (sqlite:////abs/x.db)"
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
        raise TrackingError(f"MLflow tracking store {uri} is not reachable: {exc}") from exc
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


SECRET_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey", "credential", "auth")


def redact(key: str, value: str) -> str:
    """Never log secrets as params: a key that names one, or a URI with a password in it, is masked."""
    parts = key.lower().split(".")
    # The tokenizer section's *_token fields name vocabulary tokens, not credentials.
    if "tokenizer" not in parts[:2] and any(word in parts[-1] for word in SECRET_WORDS):
        return "***"
    return re.sub(r"(//[^/:@\s]+:)[^@/\s]+@", r"\1***@", value)


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


# ----------------------------------------------------------------------------------------- registry
SERVING_CODE = Path(__file__).parents[1] / "serve" / "pyfunc.py"
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "What does `json.dumps` do?"}]}


def serving_requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{pkg}=={version(pkg).split('+')[0]}"
        for pkg in ("torch", "mlflow", "safetensors", "tokenizers", "numpy")
    ]


def log_chat_model(name: str, registered_name: str, checkpoint_dir: Path, tokenizer_json: Path) -> Any:
    """Log a checkpoint as a pyfunc model-from-code (tasks/serve/pyfunc.py) and register a new version."""
    from mlflow.models import infer_signature

    signature = infer_signature(
        INPUT_EXAMPLE,
        ["generated text"],
        params={"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "seed": 0},
    )
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(SERVING_CODE),
        artifacts={"checkpoint": str(checkpoint_dir), "tokenizer": str(tokenizer_json)},
        code_paths=[str(REPO_ROOT / "models"), str(REPO_ROOT / "tasks")],
        signature=signature,
        input_example=INPUT_EXAMPLE,
        pip_requirements=serving_requirements(),  # explicit: inferring them loads the model again (slow)
        registered_model_name=registered_name,
    )
    return info


def latest_version(registered_name: str, run_id: str) -> Any:
    versions = MlflowClient().search_model_versions(f"name='{registered_name}' and run_id='{run_id}'")
    if not versions:
        raise TrackingError(f"no version of {registered_name} was registered by run {run_id}")
    return max(versions, key=lambda v: int(v.version))


def version_by_alias(registered_name: str, alias: str) -> Any | None:
    try:
        return MlflowClient().get_model_version_by_alias(registered_name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def tag_version(registered_name: str, version: str, tags: Mapping[str, Any]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, str(value)[:5000])


def set_alias(registered_name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(registered_name, alias, version)


# ------------------------------------------------------------------- operating: servers, registry refs
class ModelRefError(TrackingError):
    """A `<name>@<alias>` reference that does not resolve (unknown model, alias or version)."""


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast (one short request, no retries) when the tracking server does not answer.

    MLflow's own client retries an unreachable server for minutes; a pipeline run must fail before its
    first stage instead. Local stores (sqlite, file) always pass.
    """
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status != 200:
                raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {resp.status}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({reason}); start it (`pipeline ui`) "
            "or unset MLFLOW_TRACKING_URI to use the local sqlite store"
        ) from exc


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


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`name@alias` -> (name, alias, None); `name/3` -> (name, None, "3")."""
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ModelRefError(f"model reference {ref!r} is not `<name>@<alias>` or `<name>/<version>`")


def resolve_version(ref: str) -> Any:
    """The registered model version a `name@alias` / `name/version` reference points to, or a clear error."""
    name, alias, number = parse_model_ref(ref)
    c = client()
    try:
        model = c.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        known = sorted(m.name for m in c.search_registered_models(max_results=100))
        raise ModelRefError(
            f"no registered model named {name!r} in {tracking_uri()}; registered: {', '.join(known) or 'none'}"
        ) from exc
    if alias is not None:
        aliases = dict(model.aliases or {})
        if alias not in aliases:
            have = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
            raise ModelRefError(f"registered model {name!r} has no alias {alias!r}; its aliases: {have}")
        number = str(aliases[alias])
    try:
        return c.get_model_version(name, str(number))
    except mlflow.exceptions.MlflowException as exc:
        raise ModelRefError(f"registered model {name!r} has no version {number}") from exc


def load_registered(ref: str) -> tuple[Any, Any]:
    """Load a registered version through MLflow (pyfunc); returns (the ChatModel instance, the version)."""
    version = resolve_version(ref)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    return pyfunc.unwrap_python_model(), version


def download_run_artifact(run_id: str, artifact_path: str, dst: Path) -> Path:
    setup()
    return Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst))
    )
