"""Rollouts for RL objectives: sample responses from a policy, score them with a reward function, shape
per-token rewards (KL penalty + terminal reward), and cache rollouts on disk for resumption.

Used by PPO (tasks/rlhf.py) and by evaluate's win rate; written so that another objective (GRPO: G
responses per prompt, any reward function) reuses the same pieces.

A sampled Batch, B rows (prompt + response, right padded with pad_id), T = the longest row:
    tokens  [B, T]    long   prompt ids followed by response ids
    mask    [B, T-1]  float  1 at label position t (the prediction of tokens[:, t+1]) of a response token
    lengths [B]       long   real tokens of each row (prompt + response)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from models.generate import generate, generate_batch
from models.heads import last_token_values
from tasks.core.io import atomic_write_bytes
from tasks.core.stage import StageError
from tasks.data import chat_data

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
RewardFn = Callable[[Batch], torch.Tensor]  # a sampled Batch -> one score per row [B]


# ------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class Sampling:
    """How responses are decoded. temperature 0 is greedy; top_k None samples from the whole vocabulary."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    stop: tuple[int, ...]  # a row ends at (and keeps) the first of these it samples
    pad_id: int


def response_batch(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int) -> Batch:
    """tokens [B,T], mask [B,T-1] (response label positions), lengths [B] of prompt + response rows."""
    seqs, masks = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        seqs.append(list(prompt) + list(response))
        masks.append([False] * (len(prompt) - 1) + [True] * len(response))
    tokens = chat_data.pad(seqs, pad_id)
    mask = chat_data.pad(masks, 0, fill=0)[:, : tokens.shape[1] - 1].float()
    return {"tokens": tokens, "mask": mask, "lengths": torch.tensor([len(s) for s in seqs])}


def clipped(batch: Batch, stop: Sequence[int]) -> torch.Tensor:
    """bool [B]: the row's response does not end with a stop token (cut at max_new_tokens)."""
    last = batch["tokens"].gather(1, (batch["lengths"] - 1)[:, None].to(batch["tokens"].device))[:, 0]
    return ~torch.isin(last, torch.tensor(list(stop), device=last.device))


@torch.no_grad()
def sample_responses(
    policy: Any, prompts: Sequence[list[int]], sampling: Sampling, seed: int, n_per_prompt: int = 1
) -> Batch:
    """n_per_prompt responses to every prompt, all rows in one batched generation (models.generate.
    generate_batch: left padding, attention mask through the KV cache); rows are prompt-major (row r answers
    prompt r // n_per_prompt) and row r samples with its own generator seeded seed * 1000 + r, exactly as
    it would alone, so a rollout is a function of (policy, prompts, seed). A response keeps its stop token
    and ends before any pad_id it sampled; an empty one becomes [stop[0]]."""
    device = next(policy.parameters()).device
    rows = [p for p in prompts for _ in range(n_per_prompt)]
    generators = [torch.Generator(device=device).manual_seed(seed * 1000 + j) for j in range(len(rows))]
    out = generate_batch(
        policy,
        rows,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        stop_tokens=sampling.stop,
        pad_id=sampling.pad_id,
        generator=generators,
    )
    responses = []
    for response in out.rows():
        if sampling.pad_id in response:  # a sampled pad would end the row when it is read back
            response = response[: response.index(sampling.pad_id)]
        responses.append(response or [sampling.stop[0]])
    return response_batch(rows, responses, sampling.pad_id)


@torch.no_grad()
def greedy_responses(
    model: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    stop: Sequence[int],
    pad_id: int,
    batch_size: int = 8,
) -> list[list[int]]:
    """The greedy response to every prompt, up to and including its first stop token. Only prompts of equal
    length are generated together, so no row carries padding and each sees exactly its own tokens."""
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for length, idx in sorted(by_length.items()):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            tokens = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)  # [b, P]
            gen = generate(
                model, tokens, max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=stop, pad_id=pad_id
            )[:, length:].tolist()  # [b, n]
            for i, row in zip(chunk, gen, strict=True):
                response = []
                for t in row:
                    response.append(t)
                    if t in stop:
                        break
                out[i] = response
    return out


# -------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_with_reward_model(reward_model: Any, batch: Batch) -> torch.Tensor:
    """The reward model's value at the last real token of every row (it has read the whole row) -> [B].
    The reward model is moved to the batch's device."""
    tokens = batch["tokens"]  # [B, T]
    reward_model.to(tokens.device)
    values = reward_model(tokens)  # [B, T]
    return last_token_values(values.float(), batch["lengths"].to(tokens.device))  # [B]


def score_responses(
    reward_fn: RewardFn,
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    pad_id: int,
    device: Any,
    batch_size: int = 8,
) -> list[float]:
    """reward_fn on prompt + response rows, batch_size rows at a time (right padding: with causal
    attention a row's score does not see the padding) -> one float per prompt."""
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = response_batch(
            prompts[start : start + batch_size], responses[start : start + batch_size], pad_id
        )
        out += reward_fn({k: v.to(device) for k, v in chunk.items()}).cpu().tolist()
    return out


# ------------------------------------------------------------------------------------ reward shaping
def shaped_rewards(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    lengths: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef * KL, plus the sequence score on the last response token.

    logps, ref_logps, mask [B, T-1] (label space), scores [B], lengths [B] (prompt + response tokens)
    -> rewards [B, T-1], kl [B, T-1] (the per-token KL estimate logp - ref_logp on response tokens).
    """
    kl = (logps - ref_logps) * mask  # [B, T-1]
    rewards = -kl_coef * kl
    last = (lengths - 2).clamp_min(0)  # label index of the last response token, [B]
    rewards[torch.arange(len(last)), last] += scores
    return rewards, kl


class KLController:
    """The per-token KL penalty coefficient. Fixed, or adaptive as in Ziegler et al. (2019) / TRL:
    e = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + e * n_samples / horizon."""

    def __init__(self, value: float, adaptive: bool, target: float, horizon: int) -> None:
        if adaptive and (target <= 0 or horizon <= 0):
            raise StageError(
                f"adaptive KL needs rlhf.target_kl > 0 and a horizon > 0, got {target}, {horizon}"
            )
        self.value, self.adaptive, self.target, self.horizon = value, adaptive, target, horizon

    def update(self, current_kl: float, n_samples: int) -> float:
        if self.adaptive:
            error = max(-0.2, min(0.2, current_kl / self.target - 1))
            self.value *= 1 + error * n_samples / self.horizon
        return self.value


def sampling_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The logits of the distribution responses are sampled from: divided by the sampling temperature (top-k
    truncation is not modelled). PPO's ratio, its KL to the reference and its entropy are about that
    distribution; at temperature 1 (or 0, greedy) the logits are returned as they are."""
    return logits if temperature <= 0 or temperature == 1 else logits.float() / temperature


def policy_autocast(bf16: bool, device: torch.device) -> torch.autocast:
    """The precision the training loop computes the loss in (bf16 autocast on CPU): a rollout's log-probs
    computed under it match the loss's, so at the first epoch the new/old ratio is exactly 1."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and device.type == "cpu")


# ---------------------------------------------------------------------------------------------- cache
class RolloutCache:
    """Rollouts on disk, one file per (rank, step): <directory>/rollout-rank<r>-step<step>.safetensors.

    A file holds the rollout's tensors and any scalars saved with it (float64), so a resumed run continues
    on exactly the rollout, and the state, it was using."""

    def __init__(self, directory: Path, rank: int) -> None:
        self.directory, self.rank = Path(directory), rank

    def path(self, step: int) -> Path:
        return self.directory / f"rollout-rank{self.rank}-step{step:08d}.safetensors"

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob(f"rollout-rank{self.rank}-step*.safetensors"))

    def save(self, step: int, rollout: Batch, scalars: Mapping[str, float]) -> None:
        tensors = {k: v.contiguous() for k, v in rollout.items()}
        tensors |= {k: torch.tensor(v, dtype=torch.float64) for k, v in scalars.items()}
        atomic_write_bytes(self.path(step), save(tensors))

    def load(self, step: int) -> Batch:
        path = self.path(step)
        if not path.exists():
            raise StageError(f"resuming at a rollout of step {step}, but its cache {path} is missing")
        return load_file(str(path))

    def clear(self) -> None:
        """Drop this rank's rollouts (of an earlier attempt)."""
        for old in self._files():
            old.unlink()

    def means(self, key: str) -> dict[int, float]:
        """The mean of tensor `key` in every cached rollout, by the step that made it."""
        return {int(p.stem.rsplit("step", 1)[1]): float(load_file(str(p))[key].mean()) for p in self._files()}
