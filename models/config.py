"""Model hyperparameters as a plain dataclass.

No torch import here on purpose: light config code (params.yaml parsing, the CLI) imports this module and
should not pay torch's import time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# RoPE types the model implements. "default" is plain RoPE; "llama3" is Llama 3.1's frequency rescaling
# (low frequencies divided by `factor`, a smooth ramp between low_freq_factor and high_freq_factor).
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # grouped-query attention: each kv head serves n_head // n_kv_head query heads
    d_model: int = 256
    ffn_hidden: int = 0  # 0 -> SwiGLU default: int(8/3 * d_model) rounded up to a multiple of 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # Fields for imported open models (models/hf.py). Their defaults are today's model, and to_dict() leaves
    # a field out while it holds its default, so configs and checkpoints written before them stay
    # byte-identical.
    attn_head_dim: int = 0  # 0 -> d_model // n_head; Qwen3 sets it (head_dim * n_head may differ from D)
    qkv_bias: bool = False  # bias on the q, k, v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's channels of q and k, before RoPE (Qwen3)
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", factor, ...}; None = plain RoPE

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field; called on construction and by from_dict."""
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.ffn_hidden, bool) or not isinstance(self.ffn_hidden, int) or self.ffn_hidden < 0:
            raise ValueError(
                f"ModelConfig.ffn_hidden must be a non-negative integer (0 = SwiGLU default), "
                f"got {self.ffn_hidden!r}"
            )
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        for name in ("tie_embeddings", "qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        hd = self.attn_head_dim
        if isinstance(hd, bool) or not isinstance(hd, int) or hd < 0:
            raise ValueError(
                f"ModelConfig.attn_head_dim must be a non-negative integer (0 = d_model / n_head), got {hd!r}"
            )
        if self.attn_head_dim == 0 and self.d_model % self.n_head != 0:
            raise ValueError(f"ModelConfig.d_model={self.d_model} must be divisible by n_head={self.n_head}")
        check_rope_scaling(self.rope_scaling)
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"ModelConfig.n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head} "
                "(grouped-query attention shares each kv head across an equal number of query heads)"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"ModelConfig.d_model / n_head = head_dim = {self.head_dim} must be even "
                "(RoPE rotates pairs of channels)"
            )

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the SwiGLU MLP, resolved from ffn_hidden.

        SwiGLU has three matrices instead of two, so Llama shrinks the hidden width to 2/3 of the usual
        4*d_model to keep the parameter count; rounding to 64 keeps matmuls tile-friendly.
        """
        if self.ffn_hidden > 0:
            return self.ffn_hidden
        multiple_of = 64
        hidden = int(8 * self.d_model / 3)
        return multiple_of * ((hidden + multiple_of - 1) // multiple_of)

    def to_dict(self) -> dict[str, Any]:
        """Every field, except the open-model fields while they hold their defaults (see above)."""
        d = asdict(self)
        for f in fields(self):
            if f.name in OPTIONAL_FIELDS and d[f.name] == f.default:
                del d[f.name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown} (known: {sorted(known)})")
        return cls(**d)


OPTIONAL_FIELDS = ("attn_head_dim", "qkv_bias", "qk_norm", "rope_scaling")


def check_rope_scaling(rope: Any) -> None:
    """ValueError naming the key unless rope is None, {"rope_type": "default"} or a complete llama3 dict."""
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise ValueError(f"ModelConfig.rope_scaling must be a mapping or null, got {rope!r}")
    kind = rope.get("rope_type")
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"ModelConfig.rope_scaling.rope_type={kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    expected = {"rope_type", *LLAMA3_ROPE_KEYS} if kind == "llama3" else {"rope_type"}
    missing, unknown = sorted(expected - set(rope)), sorted(set(rope) - expected)
    if missing or unknown:
        raise ValueError(
            f"ModelConfig.rope_scaling for rope_type={kind!r}: missing keys {missing}, unknown keys {unknown}"
        )
    for key in LLAMA3_ROPE_KEYS if kind == "llama3" else ():
        value = rope[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise ValueError(f"ModelConfig.rope_scaling.{key} must be a positive number, got {value!r}")
    if kind == "llama3" and not rope["high_freq_factor"] > rope["low_freq_factor"]:
        raise ValueError(
            "ModelConfig.rope_scaling.high_freq_factor must exceed low_freq_factor "
            f"(got {rope['high_freq_factor']} and {rope['low_freq_factor']})"
        )
