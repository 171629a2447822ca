"""Model hyperparameters as a plain dataclass.

No torch import here on purpose: light config code (params.yaml parsing, the CLI) imports this module and
should not pay torch's import time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


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
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"ModelConfig.d_model={self.d_model} must be divisible by n_head={self.n_head}")
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
        return self.d_model // self.n_head

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
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown} (known: {sorted(known)})")
        return cls(**d)
