"""Checkpoints as a directory: model.safetensors + config.json. Never pickle.

    config.json = {"model": ModelConfig.to_dict(), "kind": "causal_lm" | "scalar_head" | "policy_value", **meta}

Writes are atomic at the directory level: everything goes into a temp dir beside the target, then renames
put it in place, so a killed process leaves the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.config import ModelConfig
from models.heads import PolicyWithValue, ScalarHeadModel
from models.llama import Transformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
KINDS = ("causal_lm", "scalar_head", "policy_value")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt, or does not match the model it is loaded into."""


def model_kind(model: nn.Module) -> str:
    if isinstance(model, Transformer):
        return "causal_lm"
    if isinstance(model, ScalarHeadModel):
        return "scalar_head"
    if isinstance(model, PolicyWithValue):
        return "policy_value"
    raise TypeError(f"cannot checkpoint a {type(model).__name__}: expected one of the models.* modules")


def build_model(kind: str, config: ModelConfig) -> nn.Module:
    if kind == "causal_lm":
        return Transformer(config)
    if kind == "scalar_head":
        return ScalarHeadModel(Transformer(config))
    if kind == "policy_value":
        return PolicyWithValue(Transformer(config))
    raise CheckpointError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")


# ---------------------------------------------------------------------- atomic directory writes


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside out_dir; on success it replaces out_dir, on error it is removed.

    A directory cannot be swapped in one rename over a non-empty one, so an existing out_dir is first
    moved aside, the new one renamed into place, then the old one deleted. A kill between the two renames
    leaves the previous checkpoint intact at .<name>.old-*.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():  # the data must be on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------- tied weights


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{alias: canonical} for state-dict entries sharing storage (tied weights); canonical = first in
    sorted order. safetensors refuses shared tensors, so only the canonical one is written."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for key in sorted(state):
        t = state[key]
        ident = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape))
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
    return aliases


# ---------------------------------------------------------------------- save / load


def save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    config: ModelConfig,
    meta: dict[str, Any] | None = None,
    files: dict[str, Path] | None = None,
) -> Path:
    """model.safetensors + config.json (+ `files`, copied under their names, e.g. a tokenizer), atomically."""
    meta = dict(meta or {})
    clash = sorted({"model", "kind"} & set(meta))
    if clash:
        raise ValueError(f"meta may not override the reserved config.json keys {clash}")
    kind = model_kind(model)
    state = model.state_dict()
    aliases = _aliases(state)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in aliases}
    payload = {"model": config.to_dict(), "kind": kind, **meta}
    json.dumps(payload)  # fail before touching the disk if meta is not JSON-serialisable
    with atomic_dir(Path(out_dir)) as tmp:
        _save_weights(tensors, tmp / WEIGHTS_FILE, Path(out_dir) / WEIGHTS_FILE)
        write_json(tmp / CONFIG_FILE, payload)
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
    return Path(out_dir)


def _save_weights(tensors: dict[str, torch.Tensor], tmp: Path, final: Path) -> None:
    """safetensors' save_file, its I/O errors as an OSError naming `final` (the file the user will look for):
    safetensors reports a full disk as a SafetensorError that names no file."""
    try:
        # One metadata key only: safetensors writes metadata from a Rust HashMap, whose order is random per
        # map, so two keys made identical weights hash differently run to run. The kind is in config.json.
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    except SafetensorError as exc:
        full = "os error 28" in str(exc) or "No space left" in str(exc)
        code = errno.ENOSPC if full else errno.EIO
        raise OSError(code, os.strerror(code), str(final)) from exc


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint config not found: {cfg_path}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint config {cfg_path}: {e}") from e
    if not isinstance(cfg, dict) or "model" not in cfg or "kind" not in cfg:
        raise CheckpointError(f"{cfg_path} lacks the 'model' and 'kind' keys of a checkpoint config")
    return cfg


def refuse_pickle(path: Path) -> None:
    """Name a pickle (torch.save zip or raw pickle) where safetensors belong; never unpickle it.

    safetensors begins with an 8-byte header length and then the JSON header's `{`; a torch.save file is a
    zip ("PK") and a raw pickle starts with the PROTO opcode 0x80. Only the first bytes are read.
    """
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[8:9] != b"{" and (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(
            f"{path} is a pickle (torch.save) file, not safetensors: refused without loading it, since "
            "unpickling can run arbitrary code; re-save the weights with safetensors"
        )


def load_checkpoint(
    path: Path, *, kind: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the module described by path/config.json and load path/model.safetensors into it, strictly;
    an adapter checkpoint (models/adapters.py) is loaded as its base with the adapters merged.

    Returns (model in eval mode, the config.json dict). Any mismatch raises CheckpointError.
    """
    path = Path(path)
    cfg = read_checkpoint_config(path)
    if kind is not None and cfg["kind"] != kind:
        raise CheckpointError(f"{path / CONFIG_FILE} holds a {cfg['kind']!r} checkpoint, expected {kind!r}")
    try:
        config = ModelConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid model config in {path / CONFIG_FILE}: {e}") from e
    if "adapter" in cfg:  # LoRA adapters + a pointer to their base: merged into a plain model
        from models.adapters import load_adapter_checkpoint

        merged = load_adapter_checkpoint(path, cfg)
        return merged.to(device).eval(), cfg
    model = build_model(cfg["kind"], config)

    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights_path}")
    refuse_pickle(weights_path)
    try:
        loaded = load_file(str(weights_path))  # to CPU, into the CPU-built module; moved after
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError, on a bad file
        raise CheckpointError(f"cannot read {weights_path} (truncated or corrupt?): {e}") from e
    load_state_strict(model, loaded, source=weights_path)
    model.to(device)
    model.eval()
    return model, cfg


def load_state_strict(model: nn.Module, loaded: dict[str, torch.Tensor], *, source: Path | str) -> None:
    """Check loaded tensors against model's state dict (tied aliases excluded), then load them.

    Names the file and the first offending keys; torch's own message for a shape mismatch is long and
    names no file.
    """
    expected = model.state_dict()
    aliases = _aliases(expected)
    want = {k: v for k, v in expected.items() if k not in aliases}
    missing = sorted(set(want) - set(loaded))
    unexpected = sorted(set(loaded) - set(want))
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    shapes = [
        f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(want[k].shape)}"
        for k in sorted(set(want) & set(loaded))
        if loaded[k].shape != want[k].shape
    ]
    if shapes:
        problems.append(f"shape mismatch {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    full = dict(loaded)
    for alias, canonical in aliases.items():
        full[alias] = loaded[canonical]  # the tie already exists in the fresh module; fill both names
    model.load_state_dict(full, strict=True)


def state_dict_hash(model: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state-dict tensor in sorted key order."""
    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(state[key].shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
