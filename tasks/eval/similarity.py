"""How close an answer is to the true one, without any learned judge: token F1 and ROUGE-L.

The win rate (tasks/eval/winrate.py) is judged by the reward model the PPO policy was trained on, so a
policy can win by pleasing that model. These scores compare each greedy answer with the held-out
prompt's true answer (the preference row's `chosen` text, the object's real docstring paragraph) and
involve no model at all; a person can recompute them by hand.

Words: the text lower-cased, split into runs of letters and digits (`[a-z0-9]+`); punctuation and
markup separate words and are dropped (`Queue.empty()` -> "queue", "empty").
- token F1 (SQuAD's answer F1 on these words): the words both texts share, counted as multisets;
  precision = shared / words of the answer, recall = shared / words of the reference, F1 their harmonic
  mean;
- ROUGE-L F1 (Lin 2004, beta = 1): the same with shared = the length of the longest common subsequence
  of the two word sequences, so word order counts.
Both are 1.0 for two texts with no word at all and 0.0 when exactly one is empty. An answer stopped at
evaluate.max_new_tokens is scored as it is against the whole paragraph: its recall is lower, for every
model alike.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The lower-cased letter/digit runs of text, in order."""
    return _WORD.findall(text.lower())


def _f1(shared: int, n_answer: int, n_reference: int) -> float:
    if n_answer == 0 and n_reference == 0:
        return 1.0
    if shared == 0:
        return 0.0
    precision, recall = shared / n_answer, shared / n_reference
    return 2 * precision * recall / (precision + recall)


def token_f1(answer: str, reference: str) -> float:
    """Harmonic mean of the multiset word overlap's precision and recall."""
    a, r = words(answer), words(reference)
    shared = sum((Counter(a) & Counter(r)).values())
    return _f1(shared, len(a), len(r))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row of O(len(b)) memory)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1: precision and recall of the longest common word subsequence."""
    a, r = words(answer), words(reference)
    return _f1(lcs_length(a, r), len(a), len(r))


@dataclass
class Similarity:
    answer_f1: float  # mean token F1 (nan for no answers)
    answer_rouge_l: float  # mean ROUGE-L F1
    f1: list[float]  # per answer
    rouge_l: list[float]


def answer_similarity(answers: Sequence[str], references: Sequence[str]) -> Similarity:
    """Mean token F1 and ROUGE-L over paired answers and references, and the per-answer scores."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} reference answers")
    f1 = [token_f1(a, r) for a, r in zip(answers, references, strict=True)]
    rl = [rouge_l(a, r) for a, r in zip(answers, references, strict=True)]
    n = len(f1)
    return Similarity(sum(f1) / n if n else float("nan"), sum(rl) / n if n else float("nan"), f1, rl)
