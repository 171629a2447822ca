"""The MLflow model registry: register a chat model, tag and alias versions, resolve and load them safely.

`log_chat_model` logs a checkpoint as a pyfunc model-from-code with an integrity manifest and registers a
version; `resolve_version` turns `<name>@<alias>` or `<name>/<version>` into a version;
`download_verified` / `load_registered` give its files or its loaded pyfunc only after the manifest and
the version's tags match (tasks/core/manifest.py). Runs and metrics stay in tasks/core/tracking.py; both
modules are the only ones that import MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from tasks.core.config import REPO_ROOT
from tasks.core.secrets import redact
from tasks.core.tracking import TrackingError, client, tracking_uri

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


class ModelRefError(TrackingError):
    """A `<name>@<alias>` reference that does not resolve (unknown model, alias or version)."""


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
