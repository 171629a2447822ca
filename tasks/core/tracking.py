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
import sys
import warnings
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
    """Log a checkpoint as a pyfunc model-from-code (tasks/serve/pyfunc.py) and register a new version.

    The logged code, checkpoint files and tokenizer are hashed into an integrity manifest (a model
    artifact; its sha256 in the model config) and the version is tagged with the manifest's, the code's,
    the weights' and the tokenizer's sha256 (tasks/core/manifest.py); loading checks them.
    """
    import shutil
    import tempfile

    from mlflow.models import infer_signature

    from tasks.core import manifest

    signature = infer_signature(
        INPUT_EXAMPLE,
        ["generated text"],
        params={"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0},
    )
    checkpoint_dir, tokenizer_json = Path(checkpoint_dir), Path(tokenizer_json)
    with tempfile.TemporaryDirectory(prefix="pipeline-log-model-") as tmp:
        # The code is staged without bytecode caches: the model holds exactly the files the manifest lists.
        code_paths = []
        for package in ("models", "tasks"):
            dst = Path(tmp) / "code" / package
            shutil.copytree(REPO_ROOT / package, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            code_paths.append(str(dst))
        files = {"pyfunc.py": SERVING_CODE, f"artifacts/{tokenizer_json.name}": tokenizer_json}
        files.update(
            {f"code/{p.relative_to(Path(tmp) / 'code').as_posix()}": p for p in Path(tmp, "code").rglob("*")}
        )
        files.update(
            {
                f"artifacts/{checkpoint_dir.name}/{p.relative_to(checkpoint_dir).as_posix()}": p
                for p in checkpoint_dir.rglob("*")
            }
        )
        raw = manifest.build({rel: p for rel, p in files.items() if p.is_file()})
        manifest_file = Path(tmp) / Path(manifest.MANIFEST).name
        manifest_file.write_bytes(raw)
        # MLflow imports pyfunc.py from the model directory it is building (to check the input example):
        # no byte-code may land there, or the logged model would hold files the manifest does not list.
        with _no_bytecode():
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(SERVING_CODE),
                artifacts={
                    "checkpoint": str(checkpoint_dir),
                    "tokenizer": str(tokenizer_json),
                    "manifest": str(manifest_file),
                },
                code_paths=code_paths,
                model_config={"manifest_sha256": hashlib.sha256(raw).hexdigest()},
                signature=signature,
                input_example=INPUT_EXAMPLE,
                pip_requirements=serving_requirements(),  # explicit: inferring them loads the model again (slow)
                registered_model_name=registered_name,
            )
    tag_version(registered_name, str(info.registered_model_version), manifest.tags(raw))
    return info


@contextlib.contextmanager
def _no_bytecode() -> Iterator[None]:
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        yield
    finally:
        sys.dont_write_bytecode = writes_bytecode


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


def describe_version(registered_name: str, version: str, text: str) -> Any:
    """Set a version's description (its model card); returns the version as stored."""
    return MlflowClient().update_model_version(registered_name, version, description=text)


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
            f"no registered model named {name!r} in {redact('', tracking_uri())}; "
            f"registered: {', '.join(known) or 'none'}"
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


class ModelIntegrityError(TrackingError):
    """A registered model whose files or integrity tags differ from what was recorded at registration."""


def download_verified(version: Any) -> Path:
    """The registered version's files in a fresh local directory, checked against its integrity manifest
    and tags before anything in them runs (tasks/core/manifest.py); ModelIntegrityError otherwise."""
    import atexit
    import shutil
    import tempfile

    import yaml

    from tasks.core import manifest

    label = f"{version.name} v{version.version}"
    tags = dict(version.tags or {})
    missing = [t for t in (*manifest.TAGS, "manifest.sha256") if not tags.get(t)]
    if missing:
        raise ModelIntegrityError(
            f"{label} has no integrity tags {missing}: it was registered before models carried a manifest, "
            "or the tags were removed; register it again (`dvc repro register`)"
        )
    dst = Path(tempfile.mkdtemp(prefix="pipeline-model-"))
    atexit.register(shutil.rmtree, dst, True)  # the loaded model reads its tokenizer path until exit
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(dst)
        )
    )
    # Byte-code is never taken from the store: loading a version in place (mlflow.pyfunc.load_model on a
    # local store, `mlflow models serve`) writes __pycache__ beside pyfunc.py, and a .pyc there would run
    # instead of the checked source. The copy drops it; the load compiles the checked .py files.
    for cache in sorted(local.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache)
    try:
        manifest.verify(local, tags["manifest.sha256"], "tag manifest.sha256", tags=tags)
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        manifest.expect_loader(mlmodel, tags["manifest.sha256"])
    except manifest.ManifestError as exc:
        raise ModelIntegrityError(f"{label}: {exc}; refusing to load it") from None
    return local


PREDICT_HINT_WARNING = "Type hint used in the model's predict function is not supported"


@contextlib.contextmanager
def _without_predict_hint_warning() -> Iterator[None]:
    """Loading the pyfunc, MLflow warns (in red) that its `model_input: Any` hint gives no schema
    validation: by design, the pyfunc checks every request field itself (tasks/serve/pyfunc.py). MLflow
    resets the warning filters around that check (`simplefilter("once")`), so a filter cannot hold it:
    this drops that one message where it is shown, for the duration of the load."""
    shown = warnings.showwarning

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        if not (issubclass(category, UserWarning) and PREDICT_HINT_WARNING in str(message)):
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def load_registered(ref: str) -> tuple[Any, Any]:
    """Load a registered version through MLflow (pyfunc) after checking its files against the integrity
    manifest and tags recorded at registration; returns (the ChatModel instance, the version)."""
    version = resolve_version(ref)
    local = download_verified(version)
    with _without_predict_hint_warning():
        pyfunc = mlflow.pyfunc.load_model(str(local))
    return pyfunc.unwrap_python_model(), version


def download_run_artifact(run_id: str, artifact_path: str, dst: Path) -> Path:
    setup()
    return Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst))
    )
