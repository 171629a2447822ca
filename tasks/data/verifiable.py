"""Verifiable tasks: problems with exactly one right answer that a checker computes, split by problem.

A problem family generates problems from a seeded RNG; each problem has a canonical key (the problem
itself, not its phrasing: "38+47" for both "What is 47 + 38?" and "Compute 38 + 47.", since a+b and
b+a are one problem), a prompt (one of the family's phrasings) and an answer. The held-out split is a
function of the key alone (`is_heldout`: sha256 of the key), so every stage that asks agrees without
sharing state: ingest puts only training problems in the SFT conversations, grpo samples its prompts
from training problems, and evaluate and grpo's `val/accuracy` score held-out problems only.

The checker (`check`) parses the problem back from the prompt (the truth is recomputed, never looked up)
and the answer from the completion: the completion must be the number and nothing else, surrounding
whitespace allowed. Accuracy is the exact match of that parsed answer.

Families (`FAMILIES`): `add_small` / `sub_small` (operands 0-19), `add` / `sub` (0-99), `add3` (0-999);
a difference is never negative (b <= a). `SFT_FAMILIES` are the ones whose worked examples the embedded
SFT data carries; its teacher answers some phrasings (`Problem.phrasing`) with the bare number and the
others with the unit (`Problem.verbose_answer`, "4 digits"), which the checker refuses
(tasks/data/embedded.py).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

HELDOUT_PERCENT = 20  # of the problems of every family, by the hash of their key
INSTRUCTION = " Reply with the number only."  # every phrasing ends with it: the answer format is asked for
SFT_FAMILIES = ("digits",)


@dataclass(frozen=True)
class Family:
    name: str
    op: str  # "+", "-", "max", "min" (of a and b), "first", "last" (digit of a; b is 0)
    hi: int  # operands are in 0..hi
    phrasings: tuple[str, ...]  # with {a} (and {b}); the instruction is appended
    unit: str = ""  # what the answer counts ("digit"): the verbose answer is "4 digits"

    @property
    def unary(self) -> bool:
        return self.op in ("first", "last", "digits", "copy")

    def answer(self, a: int, b: int) -> int:
        if self.op == "digits":
            return len(str(a))
        if self.op == "copy":
            return a
        if self.unary:
            return int(str(a)[0 if self.op == "first" else -1])
        return {"+": a + b, "-": a - b, "max": max(a, b), "min": min(a, b)}[self.op]

    def key(self, a: int, b: int) -> str:
        """The canonical problem: operands sorted for a symmetric operation; no family name, so families
        whose ranges overlap (add_small, add) put one problem on one side of the split."""
        if self.unary:
            return f"{self.op}({a})"
        if self.op != "-":
            a, b = min(a, b), max(a, b)
        return f"{a}{self.op}{b}" if self.op in "+-" else f"{self.op}({a},{b})"

    def valid(self, a: int, b: int) -> bool:
        in_range = 0 <= a <= self.hi and 0 <= b <= self.hi
        if self.unary:
            return in_range and b == 0
        if self.op == "-":
            return in_range and b <= a  # differences stay >= 0
        return in_range and (self.op == "+" or a != b)  # a comparison has a strictly larger side


_ADD = ("What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?", "Add {a} and {b}.")
_SUB = ("What is {a} - {b}?", "Compute {a} - {b}.", "{a} - {b} = ?", "Subtract {b} from {a}.")
# Numbers in backticks: tokenized as the answer is (no leading space), so the answer can be copied.
_MAX = (
    "Which is larger, `{a}` or `{b}`?",
    "What is the larger of `{a}` and `{b}`?",
    "Pick the larger number: `{a}` or `{b}`.",
    "Of `{a}` and `{b}`, which is greater?",
)
_LAST = (
    "What is the last digit of `{a}`?",
    "Which digit does `{a}` end with?",
    "Give the final digit of `{a}`.",
    "`{a}`: what is its last digit?",
)
_FIRST = (
    "What is the first digit of `{a}`?",
    "Which digit does `{a}` start with?",
    "Give the leading digit of `{a}`.",
    "`{a}`: what is its first digit?",
)
_DIGITS = (
    "How many digits does `{a}` have?",
    "Count the digits of `{a}`.",
    "`{a}`: how many digits long is it?",
    "What is the number of digits in `{a}`?",
)
_COPY = (
    "Repeat the number `{a}`.",
    "Say `{a}` back to me.",
    "Copy this number: `{a}`.",
    "Write `{a}` again.",
)
_MIN = (
    "Which is smaller, `{a}` or `{b}`?",
    "What is the smaller of `{a}` and `{b}`?",
    "Pick the smaller number: `{a}` or `{b}`.",
    "Of `{a}` and `{b}`, which is less?",
)
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("add_small", "+", 19, _ADD),
        Family("sub_small", "-", 19, _SUB),
        Family("add", "+", 99, _ADD),
        Family("sub", "-", 99, _SUB),
        Family("add3", "+", 999, _ADD),
        Family("max", "max", 999, _MAX),
        Family("min", "min", 999, _MIN),
        Family("last", "last", 9999, _LAST),
        Family("first", "first", 9999, _FIRST),
        Family("digits", "digits", 99999, _DIGITS, unit="digit"),
        Family("copy", "copy", 9999, _COPY),
    )
}


@dataclass(frozen=True)
class Problem:
    family: str
    a: int
    b: int
    prompt: str  # the user message

    @property
    def key(self) -> str:
        return FAMILIES[self.family].key(self.a, self.b)

    @property
    def answer(self) -> str:
        return str(FAMILIES[self.family].answer(self.a, self.b))

    @property
    def phrasing(self) -> int:
        """Which of its family's phrasings the prompt is (an index), read back from the text."""
        for i, pattern in enumerate(_FAMILY_PATTERNS[self.family]):
            if pattern.match(self.prompt):
                return i
        raise ValueError(f"{self.family}: {self.prompt!r} is none of the family's phrasings")

    @property
    def verbose_answer(self) -> str:
        """The answer with its unit ("4 digits"): right, but not the format the question asks for."""
        unit = FAMILIES[self.family].unit
        return f"{self.answer} {unit}{'' if self.answer == '1' else 's'}" if unit else self.answer


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown task family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def is_heldout(key: str) -> bool:
    """True for the held-out problems: a function of the canonical key only."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100 < HELDOUT_PERCENT


def make_problem(name: str, a: int, b: int, phrasing: int = 0) -> Problem:
    fam = family(name)
    if not fam.valid(a, b):
        raise ValueError(f"{name}: operands {a}, {b} outside the family's range")
    template = fam.phrasings[phrasing % len(fam.phrasings)]
    return Problem(name, a, b, template.format(a=a, b=b) + INSTRUCTION)


def draw(names: Sequence[str], rng: random.Random, heldout: bool) -> Problem:
    """One problem of the training (heldout=False) or held-out split, family, operands and phrasing drawn
    by `rng`. Rejection sampling: about 1 in 5 draws is held out, so this ends fast either way."""
    if not names:
        raise ValueError("no task family given")
    while True:
        fam = family(names[rng.randrange(len(names))])
        a, b = rng.randint(0, fam.hi), 0 if fam.unary else rng.randint(0, fam.hi)
        if fam.op == "digits":  # as many 1-digit as 5-digit numbers: the count, not the range, is uniform
            n = rng.randint(1, len(str(fam.hi)))
            a = rng.randint(0 if n == 1 else 10 ** (n - 1), min(fam.hi, 10**n - 1))
        if fam.op == "-" and b > a:
            a, b = b, a
        if not fam.valid(a, b):
            continue
        if is_heldout(fam.key(a, b)) == heldout:
            return make_problem(fam.name, a, b, rng.randrange(len(fam.phrasings)))


def heldout_problems(names: Sequence[str], n: int, seed: int = 0) -> list[Problem]:
    """n distinct held-out problems (fewer only if the families hold fewer), the same list for the same
    arguments: the evaluation set of evaluate and of grpo's val/accuracy."""
    rng = random.Random(f"heldout:{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n and misses < 1000:  # 1000 repeats in a row: the held-out space is exhausted
        p = draw(names, rng, heldout=True)
        if p.key in seen:
            misses += 1
            continue
        misses = 0
        seen.add(p.key)
        out.append(p)
    return out


def training_problems(names: Sequence[str], seed: int) -> Iterator[Problem]:
    """An endless seeded stream of training (never held-out) problems."""
    rng = random.Random(f"train:{seed}")
    while True:
        yield draw(names, rng, heldout=False)


# ------------------------------------------------------------------------------------------ checker
_NUMBER = re.compile(r"^\s*(-?\d+)\s*$")


def _phrasing_pattern(template: str) -> re.Pattern[str]:
    body = re.escape(template + INSTRUCTION).replace(r"\{a\}", r"(?P<a>\d+)").replace(r"\{b\}", r"(?P<b>\d+)")
    return re.compile(r"^\s*" + body + r"\s*$")


_FAMILY_PATTERNS = {f.name: [_phrasing_pattern(t) for t in f.phrasings] for f in FAMILIES.values()}
_PATTERNS = [(FAMILIES[name], p) for name, patterns in _FAMILY_PATTERNS.items() for p in patterns]


def parse_problem(prompt: str) -> Problem | None:
    """The problem a prompt states (one of the families' phrasings), or None."""
    for fam, pattern in _PATTERNS:
        match = pattern.match(prompt)
        if match:
            a, b = int(match["a"]), int(match["b"]) if "b" in match.groupdict() else 0
            if fam.valid(a, b):
                return Problem(fam.name, a, b, prompt)
    return None


def parse_answer(completion: str) -> int | None:
    """The integer a completion answers with: the whole completion, surrounding whitespace allowed."""
    match = _NUMBER.match(completion)
    return int(match[1]) if match else None


def check(prompt: str, completion: str) -> bool:
    """Exact match of the parsed answer with the answer recomputed from the parsed problem."""
    problem = parse_problem(prompt)
    answer = parse_answer(completion)
    return problem is not None and answer is not None and str(answer) == problem.answer


_FIRST_NUMBER = re.compile(r"-?\d+")


def check_lenient(prompt: str, completion: str) -> bool:
    """The first number in the completion is the right answer, whatever surrounds it ("4 digits"): the
    skill without the format, reported next to `check` to tell the two apart."""
    problem = parse_problem(prompt)
    match = _FIRST_NUMBER.search(completion)
    return problem is not None and match is not None and str(int(match[0])) == problem.answer


def sft_conversation(problems: Sequence[Problem], verbose: Sequence[bool] = ()) -> dict:
    """A worked-examples drill for SFT: each problem asked and answered, one exchange after the other; the
    answer is right, in the checked format, or verbose ("4 digits") where `verbose` says so.
    source: "task:<key>+<key>+..." (the keys say which problems it holds)."""
    messages = []
    for i, problem in enumerate(problems):
        answer = problem.verbose_answer if i < len(verbose) and verbose[i] else problem.answer
        messages.append({"role": "user", "content": problem.prompt})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "source": "task:" + "+".join(p.key for p in problems)}
