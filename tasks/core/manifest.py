"""The integrity manifest of a logged model: the sha256 of every file that runs or is loaded.

At registration (tasks/core/registry.py `log_chat_model`) the serving code (`pyfunc.py` and the `code/`
tree), the checkpoint files and tokenizer.json are hashed into `artifacts/manifest.json`, a file of the
logged model. The manifest's own sha256 goes into the model's config (MLmodel `model_config`, which the
pyfunc sees when it loads) and, with the code, weights and tokenizer hashes, onto the registered version
as tags. `verify` checks a model directory against it before anything in it is used: every listed file
present with its hash, no unlisted file beside them. Standard library only: the pyfunc runs it first.
What this can and cannot catch: README, "What you can trust".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "artifacts/manifest.json"
# Files MLflow writes itself around the model; they describe it, nothing in them is executed or loaded
# as weights (the code loader and its file are checked through `expect_loader`).
METADATA = {
    "MLmodel",
    "conda.yaml",
    "python_env.yaml",
    "requirements.txt",
    "input_example.json",
    "serving_input_example.json",
    "registered_model_meta",
}
# Registered-version tags: tag -> the manifest entry it names (with "manifest.sha256" for the manifest).
TAGS = {
    "sha256.code": "pyfunc.py",
    "sha256.weights": "model.safetensors",
    "sha256.tokenizer": "tokenizer.json",
}


class ManifestError(ValueError):
    """A model directory that does not match what was recorded at registration."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(files: dict[str, Path]) -> bytes:
    """The manifest of {path in the model directory: local source file}, as the bytes to store."""
    hashes = {rel: sha256_file(src) for rel, src in sorted(files.items())}
    return (json.dumps({"format": 1, "files": hashes}, indent=1, sort_keys=True) + "\n").encode()


def entry(files: dict[str, str], basename: str) -> str:
    """The one manifest path that ends in `basename` outside code/ (the file a tag names)."""
    found = [rel for rel in files if rel.rsplit("/", 1)[-1] == basename and not rel.startswith("code/")]
    if len(found) > 1 and len({files[rel] for rel in found}) == 1:
        # an open model's checkpoint carries the very tokenizer.json that is also the tokenizer artifact:
        # identical copies, the tag names the outermost
        found = [min(found, key=lambda rel: (rel.count("/"), rel))]
    if len(found) != 1:
        raise ManifestError(f"the manifest lists {len(found)} files named {basename}, expected one")
    return found[0]


def tags(manifest: bytes) -> dict[str, str]:
    """The registered-version tags recording this manifest."""
    files = json.loads(manifest)["files"]
    out = {tag: files[entry(files, name)] for tag, name in TAGS.items()}
    out["manifest.sha256"] = hashlib.sha256(manifest).hexdigest()
    return out


def verify(
    model_dir: Path,
    manifest_sha256: str,
    recorded_in: str,
    tags: dict[str, str] | None = None,
    ignore_pycache: bool = False,
) -> dict[str, Any]:
    """Check model_dir against its manifest, the manifest against `manifest_sha256` (from `recorded_in`:
    a registry tag or MLmodel) and, when given, the version's `tags` against the manifest.

    Raises ManifestError naming the first file or tag that differs, a missing file, or a file that is not
    in the manifest. `ignore_pycache`: bytecode Python wrote while loading this directory (the pyfunc
    checks itself after MLflow imported pyfunc.py); a check before loading refuses any __pycache__.
    """
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not path.is_file():
        raise ManifestError(
            f"{model_dir} has no {MANIFEST}: the model was registered without an integrity manifest "
            "(or it was removed); register it again"
        )
    raw = path.read_bytes()
    got = hashlib.sha256(raw).hexdigest()
    if got != manifest_sha256:
        raise ManifestError(
            f"{MANIFEST} (sha256 {got[:16]}...) does not match {recorded_in} ({str(manifest_sha256)[:16]}...): "
            "one of them was changed after registration"
        )
    files: dict[str, str] = json.loads(raw)["files"]
    for tag, basename in TAGS.items() if tags is not None else ():
        rel = entry(files, basename)
        value = (tags or {}).get(tag)
        if value != files[rel]:
            raise ManifestError(
                f"tag {tag} ({str(value)[:16]}...) does not match {rel} in {MANIFEST} "
                f"({files[rel][:16]}...): one of them was changed after registration"
            )
    for rel, want in sorted(files.items()):
        if not (model_dir / rel).is_file():
            raise ManifestError(f"{rel} was changed after registration: it is missing from {model_dir}")
        have = sha256_file(model_dir / rel)
        if have != want:
            raise ManifestError(
                f"{rel} was changed after registration: sha256 {have[:16]}..., recorded {want[:16]}..."
            )
    for p in sorted(model_dir.rglob("*")):
        if not p.is_file() and not p.is_symlink():
            continue
        rel = p.relative_to(model_dir).as_posix()
        if rel in files or rel == MANIFEST or rel in METADATA:
            continue
        if ignore_pycache and "__pycache__" in rel.split("/") and rel.endswith(".pyc"):
            continue
        raise ManifestError(f"{rel} was changed after registration: it is not in the manifest")
    return {"format": 1, "files": files}


def expect_loader(mlmodel: dict[str, Any], manifest_sha256: str) -> None:
    """The MLmodel file must load pyfunc.py as model-from-code, with the manifest recorded at registration."""
    flavor = (mlmodel.get("flavors") or {}).get("python_function") or {}
    loader = flavor.get("loader_module")
    code_file = str(flavor.get("model_code_path", "")).replace("\\", "/").rsplit("/", 1)[-1]
    if (
        loader != "mlflow.pyfunc.loaders.code_model"
        or code_file != "pyfunc.py"
        or flavor.get("code") != "code"
    ):
        raise ManifestError(
            f"MLmodel was changed after registration: loader {loader!r}, code {code_file!r}, "
            "expected mlflow.pyfunc.loaders.code_model loading pyfunc.py with code/"
        )
    recorded = (flavor.get("config") or {}).get("manifest_sha256")  # MLflow stores model_config here
    if recorded != manifest_sha256:
        raise ManifestError(
            f"MLmodel was changed after registration: its manifest_sha256 {recorded!r} is not {manifest_sha256}"
        )
