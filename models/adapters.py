"""LoRA adapter checkpoints: the adapters and a pointer (path + sha256) to the frozen base they were trained on.

    data/checkpoints/<model>/adapter.safetensors   P.lora_A.weight [r, in], P.lora_B.weight [out, r] for each
                                                    adapted linear layer P, plus tensors trained in full (a
                                                    reward head), keyed like the model's state dict
    data/checkpoints/<model>/config.json           {"model", "kind", "adapter": {"rank", "alpha",
                                                    "target_modules", "base": {"path", "format", "sha256"}}, ...}

Loading merges: the base is loaded (a pipeline checkpoint, itself possibly an adapter checkpoint, or a
Hugging Face folder), its hash checked against the pointer, and every adapted weight becomes
W + (alpha / rank) * B @ A, which is what peft's LoRA layer computes (lora_B(lora_A(x)) * scaling).
Everything that loads checkpoints (later stages, evaluate, register, export) therefore sees a plain model.
Pure PyTorch, like the rest of models/: the training side (peft) lives in tasks/train/lora.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    atomic_dir,
    load_checkpoint,
    model_kind,
    refuse_pickle,
    write_json,
)
from models.config import ModelConfig
from models.heads import PolicyWithValue, ScalarHeadModel
from models.llama import Transformer

ADAPTER_FILE = "adapter.safetensors"
BASE_FORMATS = ("checkpoint", "hf")


# ---------------------------------------------------------------------------------------------- hashes


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_sha256(folder: Path) -> str:
    """sha256 over (relative path, sha256) of every file in folder, sorted; hidden entries (.cache, .git)
    are left out (snapshot_download keeps its bookkeeping in .cache)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def weights_sha256(path: Path) -> str:
    """What a model's weights depend on: model.safetensors of a checkpoint; the adapters and their base's
    hash for an adapter checkpoint; every file of a Hugging Face folder."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file():
        cfg = json.loads((path / CONFIG_FILE).read_text())
        if "kind" in cfg:
            return sha256_file(path / WEIGHTS_FILE)
    if (path / ADAPTER_FILE).is_file():
        base = json.loads((path / CONFIG_FILE).read_text())["adapter"]["base"]["sha256"]
        return hashlib.sha256(f"{sha256_file(path / ADAPTER_FILE)}\0{base}".encode()).hexdigest()
    if (path / CONFIG_FILE).is_file():
        return folder_sha256(path)
    raise CheckpointError(f"{path} holds no model (no {WEIGHTS_FILE}, {ADAPTER_FILE} or config.json)")


def base_pointer(path: Path, fmt: str) -> dict[str, str]:
    if fmt not in BASE_FORMATS:
        raise ValueError(f"base format {fmt!r} is not one of {BASE_FORMATS}")
    return {"path": str(path), "format": fmt, "sha256": weights_sha256(path)}


# ---------------------------------------------------------------------------------------------- save


def save_adapter_checkpoint(
    out_dir: Path,
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    kind: str,
    adapter: dict[str, Any],
    meta: dict[str, Any] | None = None,
    files: dict[str, Path] | None = None,
) -> Path:
    """Write adapter.safetensors + config.json (+ `files`, copied by name) atomically. `adapter` holds
    rank, alpha, target_modules and base (see base_pointer)."""
    meta = dict(meta or {})
    clash = sorted({"model", "kind", "adapter"} & set(meta))
    if clash:
        raise ValueError(f"meta may not override the reserved config.json keys {clash}")
    missing = sorted({"rank", "alpha", "target_modules", "base"} - set(adapter))
    if missing:
        raise ValueError(f"adapter description lacks {missing}")
    payload = {"model": config.to_dict(), "kind": kind, "adapter": adapter, **meta}
    json.dumps(payload)  # fail before touching the disk if it is not JSON-serialisable
    with atomic_dir(Path(out_dir)) as tmp:
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(cpu, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, payload)
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------- load


def _load_base(base: dict[str, Any], where: Path) -> Transformer:
    path = Path(base.get("path", ""))
    if base.get("format") not in BASE_FORMATS or not base.get("sha256"):
        raise CheckpointError(f"{where}: adapter base pointer {base!r} lacks path, format or sha256")
    if not path.exists():
        raise CheckpointError(f"{where}: the base model {path} of these adapters is missing")
    actual = weights_sha256(path)
    if actual != base["sha256"]:
        raise CheckpointError(
            f"{where}: the base model {path} changed since the adapters were trained on it "
            f"(sha256 {actual[:12]}, adapters expect {base['sha256'][:12]}); re-run the stage"
        )
    if base["format"] == "hf":
        from models.hf import import_hf

        return import_hf(path)
    model, _ = load_checkpoint(path, kind="causal_lm")
    assert isinstance(model, Transformer)
    return model


def merge_adapters(model: nn.Module, tensors: dict[str, torch.Tensor], scaling: float, where: Path) -> None:
    """W += scaling * B @ A for every adapted layer; other tensors (heads trained in full) are copied in."""
    state = model.state_dict()
    lora = {k for k in tensors if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    unknown = sorted(k for k in set(tensors) - lora if k not in state)
    pairs = {k.rsplit(".lora_", 1)[0] for k in lora}
    unpaired = sorted(p for p in pairs if {f"{p}.lora_A.weight", f"{p}.lora_B.weight"} - lora)
    if unknown or unpaired:
        raise CheckpointError(f"{where}: tensors {unknown or unpaired} match no layer of the base model")
    with torch.no_grad():
        for prefix in sorted(pairs):
            layer = model.get_submodule(prefix)
            a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
            if not isinstance(layer, nn.Linear) or (b.shape[0], a.shape[1]) != tuple(layer.weight.shape):
                raise CheckpointError(f"{where}: adapter {prefix} does not fit the base layer")
            delta = scaling * (b.double() @ a.double())  # [out, in], summed in float64 then rounded once
            layer.weight.add_(delta.to(layer.weight.dtype))
        for key in sorted(set(tensors) - lora):
            if tensors[key].shape != state[key].shape:
                raise CheckpointError(
                    f"{where}: {key} has shape {tuple(tensors[key].shape)}, model {tuple(state[key].shape)}"
                )
            state[key].copy_(tensors[key])


def load_adapter_checkpoint(path: Path, cfg: dict[str, Any]) -> nn.Module:
    """The merged model of an adapter checkpoint (cfg: its config.json), in eval mode on CPU."""
    path = Path(path)
    adapter = cfg["adapter"]
    if not isinstance(adapter, dict) or not {"rank", "alpha", "base"} <= set(adapter):
        raise CheckpointError(f"{path / CONFIG_FILE}: 'adapter' lacks rank, alpha or base")
    weights = path / ADAPTER_FILE
    if not weights.is_file():
        raise CheckpointError(f"adapter weights not found: {weights}")
    refuse_pickle(weights)
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise CheckpointError(f"cannot read {weights} (truncated or corrupt?): {e}") from e
    base = _load_base(adapter["base"], path)
    if base.config.to_dict() != cfg["model"]:
        raise CheckpointError(f"{path}: the model config differs from its base's {adapter['base']['path']}")
    kind = cfg["kind"]
    heads = {"causal_lm": None, "scalar_head": ScalarHeadModel, "policy_value": PolicyWithValue}
    if kind not in heads:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}")
    head = heads[kind]
    model: nn.Module = base if head is None else head(base)
    if head is not None and not any(k.startswith("value_head.") for k in tensors):
        raise CheckpointError(f"{weights} lacks the value_head a {kind} checkpoint needs")
    merge_adapters(model, tensors, float(adapter["alpha"]) / int(adapter["rank"]), path)
    assert model_kind(model) == kind
    return model.eval()
