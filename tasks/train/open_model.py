"""Starting a stage from an open model: `<stage>.init` = pipeline | init/<folder> | hf:<org>/<name>@<revision>
| models:/<name>@<alias> | models:/<name>/<version>.

A folder under init/ holds a Hugging Face model as save_pretrained writes it (config.json, model.safetensors
or shards + index, tokenizer.json, tokenizer_config.json with the chat template). init/ is a DVC dep of
the stages that read it, so replacing a model there re-runs them. `hf:` ids are downloaded with
huggingface_hub.snapshot_download at the pinned revision into init/hub/<org>--<name>@<revision>/ (files
only: model weights in safetensors, config, tokenizer; never pickles).

`open_model` checks everything it can before reading a weight: the architecture (models/hf.py names what
is unsupported), the tokenizer and chat template, and that every token id has an embedding row. The
lineage it returns (source, folder content sha256, model_type) goes into the checkpoint's config.json.
Every checkpoint of that line carries the model's tokenizer files; `stage_tokenizer` finds them.

`models:/<name>@<alias>` starts from a version of the project's MLflow registry: resolved to its version
number, downloaded and checked against its integrity manifest and tags (tasks/core/registry.py
download_verified) before anything in it is read, and its checkpoint (merged, with the tokenizer it was
trained with) copied into init/registry/<name>-v<version>/, where LoRA adapters trained on it find their
base. DVC does not see the registry: when the alias moves, `dvc repro --force sft` (or pin a version).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.llama import Transformer
from tasks.core import paths
from tasks.core.config import INIT_DIR, ConfigError
from tasks.core.stage import StageError
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.data.hf_chat import HFChatTokenizer, carried_tokenizer, check_vocab

log = logging.getLogger(__name__)

HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]  # no *.bin, *.pt: never pickles


@dataclass
class OpenModel:
    model: Transformer
    tokenizer: ChatTokenizer  # an HFChatTokenizer, or the pipeline's own for a registered model
    folder: Path
    lineage: dict[str, Any]
    base_format: str = "hf"  # how LoRA adapters trained on it point to their base (models/adapters.py)


def hub_folder(init: str) -> Path:
    """init/hub/<org>--<name>@<revision> for hf:<org>/<name>@<revision>."""
    repo, revision = init[len("hf:") :].split("@", 1)
    return Path(INIT_DIR) / "hub" / f"{repo.replace('/', '--')}@{revision.replace('/', '--')}"


def resolve_init(init: str, key: str) -> Path | None:
    """The local folder of `init` (downloading a hf: id at its revision first); None for `pipeline`."""
    if init == "pipeline":
        return None
    if init.startswith("hf:"):
        folder = hub_folder(init)
        if not (folder / "config.json").is_file():
            repo, revision = init[len("hf:") :].split("@", 1)
            from huggingface_hub import snapshot_download

            log.info("downloading %s at revision %s into %s", repo, revision, folder)
            try:
                snapshot_download(repo, revision=revision, local_dir=folder, allow_patterns=HUB_FILES)
            except Exception as exc:  # no network, unknown id or revision: name the key
                raise ConfigError(f"{key}={init!r}: cannot download it: {exc}") from exc
        return folder
    folder = Path(init)
    if not folder.is_dir():
        raise ConfigError(f"{key}={init!r}: no such folder (copy the Hugging Face model folder there)")
    return folder


def registered_model(init: str, key: str) -> tuple[Path, dict[str, Any]]:
    """models:/<name>@<alias> (or /<version>): the verified version's checkpoint in
    init/registry/<name>-v<version>/ (with its tokenizer), and what identifies it."""
    import shutil

    from tasks.core import registry, tracking
    from tasks.core.io import atomic_path

    ref = init[len("models:/") :]
    try:
        version = registry.resolve_version(ref)
        local = registry.download_verified(version)  # the integrity check, before anything is read
    except tracking.TrackingError as exc:
        raise StageError(f"{key}={init!r}: {exc}") from exc
    checkpoints = [d for d in (local / "artifacts").iterdir() if (d / "config.json").is_file()]
    if len(checkpoints) != 1:
        raise StageError(f"{key}={init!r}: {version.name} v{version.version} holds no single checkpoint")
    kind = json.loads((checkpoints[0] / "config.json").read_text()).get("kind", "causal_lm")
    if kind != "causal_lm":  # before anything is written
        raise StageError(f"{key}={init!r} is a {kind} model, not a causal language model to fine-tune")
    folder = Path(INIT_DIR) / "registry" / f"{version.name}-v{version.version}"
    with atomic_path(folder) as tmp:
        shutil.copytree(checkpoints[0], tmp)
        if not (tmp / "tokenizer.json").is_file():  # the pipeline's own tokenizer, carried along
            shutil.copy2(local / "artifacts" / "tokenizer.json", tmp / "tokenizer.json")
    tags = dict(version.tags or {})
    ident = {
        "registered_model": version.name,
        "version": str(version.version),
        "manifest_sha256": tags.get("manifest.sha256", ""),
    }
    origin = {k[len("init.") :]: v for k, v in tags.items() if k.startswith("init.")}
    if origin:  # where the registered model's own line started (its register lineage tags)
        ident["origin"] = origin
    return folder, ident


def check_context(init: str, key: str, seq_len: int, max_seq_len: int) -> None:
    """The stage's seq_len must fit the model's context, before any training step."""
    if seq_len > max_seq_len:
        raise StageError(f"{key}={init!r}: seq_len={seq_len} exceeds the model's context {max_seq_len}")


def base_lineage(init: str, folder: Path, tokenizer: ChatTokenizer, model_type: Any) -> dict[str, Any]:
    """What identifies the start: the init string, its local folder and content hash, its model type and
    the tokenizer's fingerprint (config.json `init`, register's init.* tags)."""
    from models.adapters import folder_sha256

    return {
        "source": init,
        "folder": str(folder),
        "sha256": folder_sha256(folder),
        "model_type": model_type,
        "tokenizer_fingerprint": tokenizer.fingerprint,
    }


def open_registered(init: str, key: str, seq_len: int) -> OpenModel:
    """A registered causal LM as the start, with the tokenizer it was trained with."""
    from models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_config

    folder, ident = registered_model(init, key)
    try:
        meta = read_checkpoint_config(folder)
        tokenizer = carried_tokenizer(folder)
        assert tokenizer is not None  # registered_model copies it
        tokenizer.check_fingerprint(str(meta.get("tokenizer_fingerprint")), str(folder))
        model, _ = load_checkpoint(folder, kind="causal_lm")
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        raise StageError(f"{key}={init!r}: {exc}") from exc
    assert isinstance(model, Transformer)
    check_vocab(tokenizer, model.config.vocab_size, key)
    check_context(init, key, seq_len, model.config.max_seq_len)
    model_type = ident.get("origin", {}).get("model_type") or "pipeline"
    lineage = {**base_lineage(init, folder, tokenizer, model_type), **ident, "model_type": model_type}
    log.info(
        "%s: %s (%s v%s, %d parameters)",
        key,
        init,
        ident["registered_model"],
        ident["version"],
        model.num_params(),
    )
    return OpenModel(model, tokenizer, folder, lineage, base_format="checkpoint")


def open_model(init: str, key: str, seq_len: int) -> OpenModel | None:
    """The model and tokenizer `init` names, checked before any weight is read; None for `pipeline`."""
    from models.hf import config_from_hf, import_hf, read_hf_config

    if init.startswith("models:"):
        return open_registered(init, key, seq_len)
    folder = resolve_init(init, key)
    if folder is None:
        return None
    try:
        raw = read_hf_config(folder)
        config = config_from_hf(raw, folder / "config.json")
        tokenizer = HFChatTokenizer.load(folder)
        check_vocab(tokenizer, config.vocab_size, key)
    except (ValueError, FileNotFoundError) as exc:
        raise StageError(f"{key}={init!r}: {exc}") from exc
    check_context(init, key, seq_len, config.max_seq_len)
    lineage = base_lineage(init, folder, tokenizer, raw.get("model_type"))
    model = import_hf(folder)
    log.info("%s: %s (%s, %d parameters)", key, init, raw.get("model_type"), model.num_params())
    return OpenModel(model, tokenizer, folder, lineage)


def tokenizer_files(folder: Path) -> dict[str, Path]:
    """The tokenizer files a checkpoint trained with this folder's tokenizer carries along."""
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    return {n: folder / n for n in names if (folder / n).is_file()}


def tokenizer_files_of(tokenizer: Any) -> dict[str, Path] | None:
    """The tokenizer files every checkpoint trained with this tokenizer carries: an open model's (or the
    copy a line started from a registered model carries); None for data/tokenizer/ itself."""
    if Path(tokenizer.path).resolve() == paths.TOKENIZER_JSON.resolve():
        return None
    return tokenizer_files(Path(tokenizer.path).parent)


def stage_tokenizer(name: str) -> ChatTokenizer:
    """The tokenizer data/checkpoints/<name>/ was trained with: the copy it carries when its line started
    from an open or registered model, else data/tokenizer/."""
    return carried_tokenizer(paths.checkpoint(name)) or ChatTokenizer.load(paths.TOKENIZER_JSON)


def export_merged(checkpoint: Path, out_dir: Path) -> Path:
    """A stage checkpoint as a Hugging Face folder: LoRA adapters merged into their base, with the
    tokenizer it was trained with (the open model's, or data/tokenizer/) and its chat template, so that
    transformers' AutoModelForCausalLM and AutoTokenizer load it. Causal LMs only."""
    from models.checkpoint import load_checkpoint
    from models.hf import export_hf

    checkpoint = Path(checkpoint)
    model, meta = load_checkpoint(checkpoint)
    if not isinstance(model, Transformer):
        raise StageError(
            f"{checkpoint} holds a {meta['kind']} model; only a causal LM exports to Hugging Face"
        )
    tokenizer = carried_tokenizer(checkpoint) or ChatTokenizer.load(paths.TOKENIZER_JSON)
    tokenizer.check_fingerprint(str(meta.get("tokenizer_fingerprint")), str(checkpoint))
    bos = tokenizer.bos_id if tokenizer.specials.bos else None
    return export_hf(
        model,
        Path(out_dir),
        tokenizer.path,
        bos_id=bos,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        chat_template=tokenizer.chat_template,
    )
