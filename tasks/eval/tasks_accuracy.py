"""Held-out accuracy on verifiable tasks (tasks/data/verifiable.py): greedy answers, batched, exact match.

Each problem is asked as a one-turn chat (the user message, then the assistant prompt); the model answers
greedily (`models.generate.generate_batch`, prompts of different lengths in one batch) until its end of
turn or max_new_tokens; the answer is checked by `verifiable.check`. evaluate reports it for every
language model and grpo logs it as `val/accuracy`, on the same held-out problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from models.generate import generate_batch
from tasks.data import verifiable
from tasks.data.chat_tokenizer import ChatTokenizer


def prompt_ids(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """A user message rendered with the chat template, ending with the assistant prompt."""
    return tokenizer.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)[0]


def completion_text(tokenizer: ChatTokenizer, ids: Sequence[int]) -> str:
    """The text of a completion: its tokens before the first end-of-turn / eos / pad."""
    stops = {tokenizer.end_id, tokenizer.eos_id, tokenizer.pad_id}
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(list(ids[:cut]))


@torch.no_grad()
def greedy_answers(
    model: Any,
    tokenizer: ChatTokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """The greedy completion (text) of every prompt, batch_size prompts per generate_batch call."""
    out: list[str] = []
    stops = (tokenizer.end_id, tokenizer.eos_id)
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        gen = generate_batch(
            model,
            ids,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            stop_tokens=stops,
            pad_id=tokenizer.pad_id,
        )
        out += [completion_text(tokenizer, row) for row in gen.rows()]
    return out


def task_accuracy(
    model: Any,
    tokenizer: ChatTokenizer,
    problems: Sequence[verifiable.Problem],
    max_new_tokens: int,
    batch_size: int = 32,
    n_samples: int = 0,
) -> dict[str, Any]:
    """{"accuracy", "accuracy_lenient" (the first number of the answer is right, whatever its format), "n",
    "per_family": {family: accuracy}, "samples": the first n_samples as {prompt, answer, expected,
    correct}}. The model is used as it is (device, dtype, eval mode)."""
    if not problems:
        raise ValueError("task_accuracy: no problems to score")
    answers = greedy_answers(model, tokenizer, [p.prompt for p in problems], max_new_tokens, batch_size)
    correct = [verifiable.check(p.prompt, a) for p, a in zip(problems, answers, strict=True)]
    lenient = [verifiable.check_lenient(p.prompt, a) for p, a in zip(problems, answers, strict=True)]
    by_family: dict[str, list[bool]] = {}
    for p, ok in zip(problems, correct, strict=True):
        by_family.setdefault(p.family, []).append(ok)
    return {
        "accuracy": sum(correct) / len(correct),
        "accuracy_lenient": sum(lenient) / len(lenient),  # the right number, in any format
        "n": len(correct),
        "per_family": {f: sum(v) / len(v) for f, v in sorted(by_family.items())},
        "samples": [
            {"prompt": p.prompt, "answer": a, "expected": p.answer, "correct": ok}
            for p, a, ok in list(zip(problems, answers, correct, strict=True))[:n_samples]
        ],
    }
