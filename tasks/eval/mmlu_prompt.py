"""The MMLU prompt as data (PROTOCOL) and its rendering under the lm-evaluation-harness template: the
description, the few-shot examples, the question with its options, the continuation of each choice, and the
few-shot policies for prompts longer than the context. tasks/eval/mmlu.py encodes and scores what this renders.

The protocol is written next to every score, so a number can always be traced to the exact prompt, few-shot
selection, tokenization and truncation that produced it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tasks.eval.mmlu_data import MMLUItem

# A prompt is  description + (example + target_delimiter + label + fewshot_delimiter) per shot + example,
# where example = the "example" template with {options} = the "option" template once per (label, choice).
PROTOCOL: dict[str, Any] = {
    "name": "mmlu",
    "reference": "EleutherAI lm-evaluation-harness, mmlu default (hendrycksTest) template",
    "description": "The following are multiple choice questions (with answers) about {subject}.\n\n",
    "subject_format": {"replace": "_", "by": " "},  # "high_school_physics" -> "high school physics"
    "example": "{question}{options}\nAnswer:",
    "option": "\n{label}. {choice}",
    "labels": ["A", "B", "C", "D"],
    "question_strip": True,  # the harness template uses question.strip()
    "target_delimiter": " ",  # between the example and its answer label (a shot's answer, a continuation)
    "fewshot_delimiter": "\n\n",
    "fewshot_split": "dev",
    "fewshot_sampler": "first_n (the first k dev examples in file order)",
    "score": "sum of log-probabilities of the continuation tokens given the context; prediction = argmax",
    "tokenization": (
        "as the harness's _encode_pair for causal models: trailing whitespace of the context moves to the "
        "continuation; context_ids = encode(context); continuation_ids = encode(context + continuation)"
        "[len(context_ids):]; no special tokens except the <|bos|> below"
    ),
    "prepend_bos": True,  # our models are trained with <|bos|> at document start
    "truncation": "left: keep the last max_seq_len+1 tokens of context+continuation, input drops the last",
    "fewshot_policy": "truncate",
    "aggregation": "accuracy: micro-average over items; per subject; per category (micro within category)",
}


def continuations(protocol: Mapping[str, Any] = PROTOCOL) -> list[str]:
    """The scored continuation of each choice: target_delimiter + label (" A" .. " D")."""
    return [protocol["target_delimiter"] + label for label in protocol["labels"]]


PROTOCOL["choices"] = continuations(PROTOCOL)  # recorded with every score


def subject_name(subject: str, protocol: Mapping[str, Any] = PROTOCOL) -> str:
    fmt = protocol["subject_format"]
    return subject.replace(fmt["replace"], fmt["by"])


def format_example(item: MMLUItem, with_answer: bool = False, protocol: Mapping[str, Any] = PROTOCOL) -> str:
    """One question with its options, and its answer label when it is a few-shot example."""
    labels = protocol["labels"]
    if len(labels) != len(item.choices):
        raise ValueError(
            f"protocol has {len(labels)} labels for the {len(item.choices)} choices of {item.where}"
        )
    options = "".join(
        protocol["option"].format(label=label, choice=choice)
        for label, choice in zip(labels, item.choices, strict=True)
    )
    question = item.question.strip() if protocol["question_strip"] else item.question
    text = protocol["example"].format(question=question, options=options)
    return text + (continuations(protocol)[item.answer] if with_answer else "")


def fewshot_prefix(subject: str, shots: Sequence[MMLUItem], protocol: Mapping[str, Any] = PROTOCOL) -> str:
    head = protocol["description"].format(subject=subject_name(subject, protocol))
    return head + "".join(format_example(s, True, protocol) + protocol["fewshot_delimiter"] for s in shots)


def harness_prompt(
    item: MMLUItem, shots: Sequence[MMLUItem], protocol: Mapping[str, Any] = PROTOCOL
) -> tuple[str, list[str]]:
    """(context, the continuation of each choice), rendered from `protocol` (by default exactly as the
    harness builds them)."""
    context = fewshot_prefix(item.subject, shots, protocol) + format_example(item, protocol=protocol)
    return context, continuations(protocol)


FEWSHOT_POLICIES = {
    "truncate": "the harness's behaviour: every item gets k shots; a prompt that does not fit is truncated "
    "from the left",
    "reduce": "an item whose k-shot prompt does not fit gets the largest k' < k (down to 0) that fits, the "
    "first k' dev examples; only a 0-shot prompt that still does not fit is truncated from the left",
}


def check_fewshot_policy(policy: str) -> str:
    if policy not in FEWSHOT_POLICIES:
        raise ValueError(f"fewshot_policy must be one of {', '.join(FEWSHOT_POLICIES)}, got {policy!r}")
    return policy


def protocol(
    k_shot: int, split: str, prepend_bos: bool = True, fewshot_policy: str = "truncate"
) -> dict[str, Any]:
    check_fewshot_policy(fewshot_policy)
    return {
        **PROTOCOL,
        "k_shot": k_shot,
        "split": split,
        "prepend_bos": prepend_bos,
        "fewshot_policy": f"{fewshot_policy}: {FEWSHOT_POLICIES[fewshot_policy]}",
    }
