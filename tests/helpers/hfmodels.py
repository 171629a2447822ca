"""Tiny open models made locally with transformers' own config and model classes, saved as save_pretrained
writes them (config.json + model.safetensors, or shards + index), for the bring-your-own-model tests.

No hub: every family is a random model of a few thousand parameters, with non-trivial norm gains and biases
so that a wrong mapping of either cannot hide behind ones and zeros.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # below the test sequence length: the scaling matters
}
# family name -> (config class, model class, config overrides)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama3-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE},
    ),
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "smollm2": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True, "rms_norm_eps": 1e-5}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}
SIZES = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def hf_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A random transformers causal LM of `family` (fp32, eval)."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**SIZES, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.1)
    return model


def save_hf(model: Any, out: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def hf_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def reload_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of `folder` loaded back by transformers' AutoModelForCausalLM."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf_logits(model, tokens)
