"""LoRA on a training stage, through peft: adapters injected into the model in place, base frozen.

    add_adapters(model, stage cfg, base)  -> Adapters: peft LoRA layers on the target linear layers of the
                                             model's Transformer; everything else frozen except heads
                                             (a reward or value head learns in full); optional bf16 base
    adapters_disabled(model)              -> context: the frozen base alone (the DPO/PPO reference, no copy)
    Adapters.tensors(trained state)       -> what the checkpoint keeps: the adapters (+ heads), keyed like
                                             models/adapters.py reads them

The model keeps its class (a Transformer, ScalarHeadModel, PolicyWithValue): peft only swaps its nn.Linear
layers for LoRA layers, so the loop, the objectives and resume work on it unchanged. The checkpoint
written by train_stage holds adapters only plus a pointer (path + sha256) to the base; loading it merges
them (models/adapters.py), so later stages, evaluate, register and export see a plain model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.llama import Transformer
from tasks.core.config import ConfigError, LoRAConfig, TrainConfig

ADAPTER_NAME = "default"  # peft's name for the one adapter


@dataclass
class Adapters:
    """What train_stage needs to write an adapter checkpoint."""

    cfg: LoRAConfig
    base: dict[str, str]  # models.adapters.base_pointer: path, format, sha256
    prefix: str = ""  # the saved model's keys are the trained model's minus this prefix (rlhf: transformer.)
    full: list[str] = field(default_factory=list)  # trained in full and kept (reward head), saved-model keys

    def describe(self) -> dict[str, Any]:
        return {
            "rank": self.cfg.rank,
            "alpha": self.cfg.alpha,
            "dropout": self.cfg.dropout,
            "target_modules": list(self.cfg.target_modules),
            "base": self.base,
        }

    def tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapters (+ full heads) of a trained state dict, renamed as the checkpoint keeps them:
        `P.lora_A.default.weight` -> `P.lora_A.weight`, the prefix dropped."""
        out = {}
        tag = f".{ADAPTER_NAME}.weight"
        for key, value in state.items():
            if not key.startswith(self.prefix):
                continue
            name = key[len(self.prefix) :]
            if (".lora_A." in name or ".lora_B." in name) and name.endswith(tag):
                out[name[: -len(tag)] + ".weight"] = value.float()
            elif name in self.full:
                out[name] = value.float()
        if not any(k.endswith(".lora_A.weight") for k in out):
            raise ValueError("the trained state holds no LoRA adapters")
        return out


def transformer_of(model: nn.Module) -> Transformer:
    inner = model if isinstance(model, Transformer) else getattr(model, "transformer", None)
    if not isinstance(inner, Transformer):
        raise TypeError(
            f"LoRA needs a Transformer or a model with a .transformer, got {type(model).__name__}"
        )
    return inner


def add_adapters(
    model: nn.Module,
    cfg: LoRAConfig,
    train: TrainConfig,
    base: dict[str, str],
    *,
    where: str,
    prefix: str = "",
    keep: tuple[str, ...] = (),
) -> Adapters:
    """Inject LoRA into `model`'s Transformer in place and freeze it; parameters named in `keep` (trained
    model's names, e.g. value_head.weight) stay trainable. ConfigError naming the key, before any change,
    when a target matches no layer or base_bf16 is asked without bf16 compute."""
    import peft

    inner = transformer_of(model)
    linear = {name.rsplit(".", 1)[-1] for name, m in inner.named_modules() if isinstance(m, nn.Linear)}
    unmatched = [t for t in cfg.target_modules if t not in linear]
    if unmatched:
        raise ConfigError(
            f"{where}.lora.target_modules: {unmatched} match no linear layer of the model "
            f"(it has {', '.join(sorted(linear))})"
        )
    if cfg.base_bf16 and not train.bf16:
        raise ConfigError(
            f"{where}.lora.base_bf16=true needs {where}.train.bf16=true: a bf16 base computes under bf16 autocast"
        )
    model.requires_grad_(False)
    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # a float is fine: scaling = alpha / r
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    # lora_A's random init from train.seed (and the caller's RNG stream untouched): same seed, same adapters
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        peft.inject_adapter_in_model(peft_cfg, inner, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        if name in keep:
            p.requires_grad_(True)
    if cfg.base_bf16:
        # The frozen matrices in bf16 (half their memory); adapters, heads and 1-D gains stay fp32.
        for p in model.parameters():
            if not p.requires_grad and p.dim() >= 2:
                p.data = p.data.to(torch.bfloat16)
    full = [k[len(prefix) :] for k in keep if k.startswith(prefix)]
    return Adapters(cfg, base, prefix=prefix, full=full)


def lora_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model alone while inside: every LoRA layer passes its input through the frozen layer."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to disable")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdaptersOff(nn.Module):
    """A reference model that is the policy's own frozen base: forward runs `policy` with its adapters
    disabled. It holds no parameters of its own (the policy is not registered as a submodule, so it is
    neither copied nor moved nor saved with it, and requires_grad_ on it cannot freeze the adapters)."""

    policy: Transformer

    def __init__(self, policy: Transformer) -> None:
        super().__init__()
        self.__dict__["policy"] = policy

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with adapters_disabled(self.policy):
            return self.policy(*args, **kwargs)

    @property
    def config(self) -> Any:
        return self.policy.config


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def base_of(path: Path | str, fmt: str) -> dict[str, str]:
    from models.adapters import base_pointer

    return base_pointer(Path(path), fmt)
