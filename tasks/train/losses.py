"""Post-training losses as pure functions of tensors, named as TRL names their metrics.

Each is written from its paper's formula so a test can check it against a hand computation:
- Bradley-Terry reward loss: -log sigmoid(r_chosen - r_rejected)                     (Ouyang et al. 2022)
- DPO: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))                        (Rafailov et al. 2023)
  with conservative label smoothing eps: (1-eps) * that + eps * -log sigmoid(-beta * ...)
- IPO: ((pi_c - ref_c) - (pi_r - ref_r) - 1/(2 beta))^2                              (Azar et al. 2023)
- PPO: clipped surrogate, clipped value loss, GAE                                   (Schulman et al. 2017)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over masked positions. logits [B,T,V], labels [B,T], mask [B,T] -> [B]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [B, T]
    return (picked * mask).sum(-1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position. logits [B,T,V], labels [B,T] -> [B,T]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair loss [B] for scalar rewards chosen [B], rejected [B]."""
    return -F.logsigmoid(chosen - rejected)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss [B] and the implicit rewards (chosen [B], rejected [B]) from sequence log-probs."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type={loss_type!r}: expected 'sigmoid' or 'ipo'")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens. All [B,T]; returns (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def ppo_losses(
    new_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped policy loss, clipped value loss (scalars) and clip fraction. All inputs [B,T]."""
    ratio = torch.exp(new_logps - old_logps)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    clipfrac = masked_mean(((ratio - 1).abs() > clip_range).float(), mask)
    return masked_mean(pg, mask), masked_mean(vf, mask), clipfrac
