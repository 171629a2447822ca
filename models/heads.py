"""Scalar heads on the transformer trunk: the reward model (Bradley-Terry) and the PPO policy+value model.

Both keep the whole Transformer (lm_head included) so they can be initialised from a causal-LM checkpoint
by plain state-dict loading, and so models/checkpoint.py can rebuild them from a ModelConfig alone.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.llama import Transformer, optimizer_groups


def _value_head(d_model: int) -> nn.Linear:
    # Small init like the trunk's matrices, zero bias: initial values are ~0, so a reward model starts at a
    # Bradley-Terry loss of log 2 and a PPO value loss starts at the plain return scale.
    head = nn.Linear(d_model, 1)
    nn.init.normal_(head.weight, mean=0.0, std=0.02)
    nn.init.zeros_(head.bias)
    return head


class ScalarHeadModel(nn.Module):
    """Transformer trunk + linear head giving one scalar per token."""

    def __init__(self, transformer: Transformer) -> None:
        super().__init__()
        self.transformer = transformer
        self.value_head = _value_head(transformer.config.d_model)

    @property
    def config(self) -> ModelConfig:
        return self.transformer.config

    def forward(self, tokens: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.transformer.hidden_states(tokens, doc_ids=doc_ids)  # [B, T, D]
        return self.value_head(h).squeeze(-1)  # [B, T]

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (the Transformer's estimate, models/llama.py) of what runs: the trunk and
        the value head, not the lm_head, which this model keeps for loading but never calls."""
        unused_lm_head = self.transformer.lm_head.weight.numel()
        return self.transformer.flops_per_token(seq_len) - 6 * unused_lm_head + 6 * _numel(self.value_head)

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        return optimizer_groups(self, weight_decay)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# The name used in some notes; the same class.
ScalarHead = ScalarHeadModel


class PolicyWithValue(nn.Module):
    """PPO actor-critic sharing one trunk: logits from lm_head, values from a scalar head."""

    def __init__(self, transformer: Transformer) -> None:
        super().__init__()
        self.transformer = transformer
        self.value_head = _value_head(transformer.config.d_model)

    @property
    def config(self) -> ModelConfig:
        return self.transformer.config

    def forward(
        self, tokens: torch.Tensor, *, doc_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.transformer.hidden_states(tokens, doc_ids=doc_ids)  # [B, T, D]
        logits = self.transformer.lm_head(h)  # [B, T, V]
        values = self.value_head(h).squeeze(-1)  # [B, T]
        return logits, values

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: the Transformer's (lm_head included) and the value head's."""
        return self.transformer.flops_per_token(seq_len) + 6 * _numel(self.value_head)

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        return optimizer_groups(self, weight_decay)


def last_token_values(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values [B, T], lengths [B] (count of real tokens, right padding) -> values[b, lengths[b] - 1], [B].

    For a reward model the last real token has read the whole sequence, so its value scores it.
    """
    if values.dim() != 2 or lengths.shape != values.shape[:1]:
        raise ValueError(
            f"expected values [B, T] and lengths [B], got {tuple(values.shape)} and {tuple(lengths.shape)}"
        )
    T = values.size(1)
    if bool(((lengths < 1) | (lengths > T)).any()):
        raise ValueError(f"lengths must be in 1..{T}, got {lengths.tolist()}")
    idx = (lengths.to(device=values.device, dtype=torch.long) - 1)[:, None]  # [B, 1]
    return values.gather(1, idx).squeeze(1)  # [B]
