"""Post-training losses as pure functions of tensors, named as TRL names their metrics.

Each is written from its paper's formula so a test can check it against a hand computation:
- Bradley-Terry reward loss: -log sigmoid(r_chosen - r_rejected)                     (Ouyang et al. 2022)
- DPO: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))                        (Rafailov et al. 2023)
  with conservative label smoothing eps: (1-eps) * that + eps * -log sigmoid(-beta * ...)
- IPO: ((pi_c - ref_c) - (pi_r - ref_r) - 1/(2 beta))^2                              (Azar et al. 2023)
- PPO: clipped surrogate, clipped value loss, GAE                                   (Schulman et al. 2017)
- GRPO: group-relative advantages (r - mean_group) / (std_group + eps), the clipped ratio loss and the k3
  KL estimate exp(ref - logp) - (ref - logp) - 1 to the reference                     (Shao et al. 2024)
  aggregated per sequence then over the batch (`grpo`), over all tokens (`dapo`, Yu et al. 2025) or by a
  constant max length (`dr_grpo`, Liu et al. 2025, which also drops the std scaling)
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


GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [B] (B = groups * group_size, rows of a group adjacent) -> advantages [B] and the std of each
    group [B / group_size]. advantage = r - mean(group), divided by (std(group) + eps) when `scale` (the
    std is the unbiased one, as TRL computes it); scale=False is Dr. GRPO's unscaled advantage."""
    grouped = rewards.float().view(-1, group_size)  # [groups, G]
    std = grouped.std(dim=1)  # [groups]
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (std[:, None] + eps)
    return advantages.flatten(), std


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) on tokens sampled from the policy (Schulman 2020):
    exp(ref - logp) - (ref - logp) - 1, >= 0, unbiased. Shapes [B,T] -> [B,T]."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    loss_type: str = "grpo",
    max_completion_length: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a batch: logps, old_logps, ref_logps, mask [B,T] (mask: completion tokens),
    advantages [B] (one per completion, every token of it shares it).

    per token: -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A) + beta * k3(logp, ref_logp)
    aggregation (loss_type): grpo = mean over each completion's tokens, then over completions;
    dapo = sum over all tokens / number of tokens; dr_grpo = sum over all tokens / (B * max_completion_length).
    Returns the loss and detached stats: kl (mean k3 per completion token, 0 when beta is 0 and no
    reference is given) and clip_ratio (fraction of tokens whose clipped term is the active one).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo loss_type={loss_type!r}: expected one of {', '.join(GRPO_LOSS_TYPES)}")
    if loss_type == "dr_grpo" and max_completion_length < 1:
        raise ValueError("grpo loss_type 'dr_grpo' needs max_completion_length >= 1")
    if beta != 0 and ref_logps is None:
        raise ValueError(f"grpo beta={beta} needs the reference log-probs")
    mask = mask.float()
    adv = advantages.float()[:, None]  # [B, 1]
    ratio = torch.exp(logps - old_logps)  # [B, T]
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)  # [B, T]
    kl = kl_k3(logps, ref_logps) if ref_logps is not None else torch.zeros_like(logps)
    if beta != 0:
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp_min(1)
    else:
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    with torch.no_grad():
        # the clipped term is active where the ratio left the range in the direction the advantage pushes
        is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
        stats = {"kl": masked_mean(kl.detach(), mask), "clip_ratio": masked_mean(is_clipped.float(), mask)}
    return loss, stats
