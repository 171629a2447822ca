"""Reward functions for RL on text, by name: fn(prompt, completion) -> float (TRL's `reward_funcs`).

`REWARDS` maps a name to a factory taking a `RewardContext` (what a reward may need besides the text:
the tokenizer, a loader of the reward model); grpo.rewards names the ones a run adds up, weighted by
grpo.reward_weights. Rule-based rewards check the completion with tasks/data/verifiable.py; the reward
model is one more entry, scoring through rollouts.score_with_reward_model.

- correct:      1.0 if the checked answer is right (exact match), else 0.0
- format:       1.0 if the completion is a bare number (the asked format), else 0.0
- reward_model: the reward model's score of the one-turn chat (prompt, completion)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tasks.data import verifiable
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.train.rollouts import response_batch, score_with_reward_model

TextReward = Callable[[str, str], float]


@dataclass
class RewardContext:
    tokenizer: ChatTokenizer
    load_reward_model: Callable[[], Any]  # called only by rewards that need it


def correct(prompt: str, completion: str) -> float:
    return 1.0 if verifiable.check(prompt, completion) else 0.0


def answer_format(prompt: str, completion: str) -> float:
    return 1.0 if verifiable.parse_answer(completion) is not None else 0.0


def reward_model_score(ctx: RewardContext) -> TextReward:
    model = ctx.load_reward_model()
    tok = ctx.tokenizer

    def score(prompt: str, completion: str) -> float:
        ids, _ = tok.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        response = tok.encode(completion) + [tok.end_id]
        batch = response_batch([ids], [response], tok.pad_id)
        with torch.no_grad():
            return float(score_with_reward_model(model, batch)[0])

    return score


REWARDS: dict[str, Callable[[RewardContext], TextReward]] = {
    "correct": lambda ctx: correct,
    "format": lambda ctx: answer_format,
    "reward_model": reward_model_score,
}


def check_names(names: Sequence[str], where: str) -> None:
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"{where}: unknown reward(s) {unknown}; known: {', '.join(REWARDS)}")


def combined(names: Sequence[str], weights: Sequence[float], ctx: RewardContext) -> TextReward:
    """The weighted sum of the named rewards (weights empty = 1.0 each)."""
    check_names(names, "rewards")
    fns = [REWARDS[n](ctx) for n in names]
    w = list(weights) or [1.0] * len(fns)

    def total(prompt: str, completion: str) -> float:
        return sum(wi * fn(prompt, completion) for wi, fn in zip(w, fns, strict=True))

    return total
