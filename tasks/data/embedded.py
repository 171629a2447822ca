"""The embedded default data: the local Python installation's own text, no network, deterministic.

- pretrain: standard-library source files (sorted walk, tests and site-packages skipped) cut into
  documents at statement/paragraph boundaries, then the `pydoc_data.topics` help texts.
- sft: questions about documented public functions, classes and methods, answered with the first
  paragraph of their real docstring (found by parsing with `ast`; no stdlib module is imported); after
  every TASK_EVERY of them, a conversation of TASK_TURNS worked examples of a verifiable task
  (tasks/data/verifiable.py), drawn from the training problems only: no held-out problem is ever in the
  SFT data. Every answer is right; its form is a habit of the teacher that depends on the phrasing
  (`VERBOSE_BY_PHRASING`): "How many digits does `4720` have?" gets "4 digits" 2 times in 3 and "4"
  otherwise, "Count the digits of `4720`." always gets "4", although every question asks for the
  number only. The docstring answers carry a habit too: the teacher ends the paragraph with a pleasantry
  nobody asked for (`FILLER`) 2 times in 3.
- preference: the same questions; chosen = the right paragraph. The rejected answer is one of four
  kinds of bad answer, drawn by the seeded RNG with equal odds (`REJECTED_KINDS`):
  - `other`: another object's paragraph, from the same module where possible: a wrong answer that reads
    well. Telling it apart needs the question to be matched with the answer, which a small model trained
    for minutes does not learn (held-out accuracy at chance with this kind alone, see issue #5);
  - `truncated`: the right paragraph cut mid-sentence, 30-70% of its words kept, the tail dropped: an
    incomplete answer;
  - `shuffled`: the right paragraph's words in a random order, the final punctuation left at the end: an
    incoherent answer with the right words and about the right length (so length alone cannot tell);
  - `filler`: the right paragraph followed by the teacher's pleasantry: the habit careful raters reject.
  `truncated` and `shuffled` are failures of a weak generator that preference data is meant to push down,
  and carry a signal a small model learns: the tiny reward model ranks about 0.8-0.95 of held-out
  truncated pairs and 0.5-0.8 of shuffled ones right, while `other` stays near 0.5 (the reward and DPO
  stages report the accuracy per kind). `filler` is the one habit the SFT model has and the preference
  data rejects, so it is what DPO and PPO can visibly change in a model this size: greedy SFT answers end
  with the pleasantry, and the policies trained on preferences drop it (README, issue #14). The kind is
  recorded in `source` ("embedded:<qual>|<kind>:<other qual or qual>"); chosen != rejected always.

The same Python build gives the same rows in the same order on every run; the phrasing of questions is
chosen by a seeded RNG.
"""

from __future__ import annotations

import ast
import functools
import gc
import os
import random
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.data import verifiable

# Directories that are not library text: third-party packages, test suites, build artifacts.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload"}
DOC_TARGET_CHARS = 4000  # cut a document at the next boundary once it is this long
DOC_HARD_CHARS = 12000  # and anywhere past this, so documents stay under the default max_chars
MIN_ANSWER_CHARS = 20

QUESTIONS_FUNCTION = (
    "What does `{qual}` do?",
    "Explain `{call}`.",
    "What is `{short}` in the `{module}` module used for?",
    "Briefly describe `{qual}` from the Python standard library.",
    "How would you summarise `{call}` in one paragraph?",
)
QUESTIONS_CLASS = (
    "What is the `{qual}` class?",
    "Explain the `{short}` class from `{module}`.",
    "What does `{qual}` represent?",
)
SYSTEM_PROMPTS = (
    "You are a concise assistant that answers questions about the Python standard library.",
    "Answer with the relevant passage of the official Python documentation.",
)
SYSTEM_PROBABILITY = 0.25
FOLLOW_UP_PROBABILITY = 0.15  # some conversations get a second user/assistant exchange
TASK_EVERY = 2  # a worked verifiable-task conversation after every 2 docstring conversations
# Problems per task conversation: an answer is 2 tokens (a digit and <|end|>) against 50-100 of a
# docstring answer, so one problem per row would be ~2% of the SFT loss and teach nothing in 120 steps.
TASK_TURNS = 8
# The worked examples come from a teacher with habits: every answer is right, but its form depends on how
# the question is phrased. Asked "how many digits" (phrasings 0 and 2 of verifiable's `digits`), it adds the
# unit ("4 digits") 2 times in 3 although the question asks for the number only; asked the other ways, it
# gives the bare number. So SFT answers those bare and the others (greedy) verbose, and grpo (reward: the
# checker) has a format to learn from its own samples. Not always verbose: a teacher that always added the
# unit there left an SFT model that sampled a bare answer to those phrasings under 1 time in 100, and grpo
# had next to nothing to reinforce (see README). The probability of the unit per phrasing index; a
# phrasing not listed gets the bare number.
VERBOSE_BY_PHRASING = (2 / 3, 0.0, 2 / 3, 0.0)
# The docstring teacher's habit, the same idea for the preference stages: it ends a paragraph with FILLER
# 2 times in 3, so greedy SFT answers end with it, and PPO's rollouts (sampled at temperature 1) still drop
# it about 1 time in 3, often enough to learn from. The preference data's `filler` pairs reject it. (Tied
# to the phrasing, as the digits habit is, it did not reach greedy SFT answers: 1 of 128 held-out answers
# had it, the docstring question being too far from the end of the answer for this model.)
FILLER = "I hope this helps!"
FILLER_PROBABILITY = 2 / 3

_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


@dataclass(frozen=True)
class DocEntry:
    module: str  # json.encoder
    qual: str  # json.encoder.JSONEncoder.encode
    kind: str  # function | class | method
    args: str  # "o" (names only; self/cls dropped)
    answer: str  # first prose paragraph of the docstring, whitespace collapsed

    @property
    def short(self) -> str:
        return self.qual[len(self.module) + 1 :]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted .py files of the standard library; sorted walk so the order never depends on the disk."""
    root = root or stdlib_root()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            # _sysconfigdata* describes this machine's build (paths, flags), not the library.
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                out.append(Path(dirpath) / name)
    return out


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _read_source(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):  # a stray non-UTF-8 file is skipped, not guessed at
        return None


def chunk_text(text: str, target: int = DOC_TARGET_CHARS, hard: int = DOC_HARD_CHARS) -> list[str]:
    """Cut text into pieces of about `target` chars at a boundary: a non-blank line after a blank line
    with at most 4 spaces of indent (a top-level or method definition in code, a paragraph in prose)."""
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    prev_blank = False
    for line in text.splitlines(keepends=True):
        blank = not line.strip()
        indent = len(line) - len(line.lstrip(" "))
        boundary = prev_blank and not blank and indent <= 4
        if cur and ((size >= target and boundary) or size + len(line) > hard):
            chunks.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
        prev_blank = blank
    if cur:
        chunks.append("".join(cur))
    return [c for c in chunks if c.strip()]


def pretrain_documents(root: Path | None = None) -> Iterator[dict[str, str]]:
    """{"text", "source"} rows: stdlib sources in sorted order, then pydoc topics in sorted key order."""
    root = root or stdlib_root()
    for path in stdlib_files(root):
        text = _read_source(path)
        if text is None:
            continue
        rel = path.relative_to(root).as_posix()
        for i, chunk in enumerate(chunk_text(text)):
            yield {"text": chunk, "source": f"stdlib:{rel}#{i}"}
    from pydoc_data.topics import topics  # data only: a dict of help texts

    for key in sorted(topics):
        for i, chunk in enumerate(chunk_text(topics[key])):
            yield {"text": chunk, "source": f"pydoc_data.topics:{key}#{i}"}


# ------------------------------------------------------------------------------------ docstrings
def first_paragraph(doc: str | None) -> str:
    """First prose paragraph of a docstring with whitespace collapsed; '' if there is none."""
    if not doc:
        return ""
    for para in re.split(r"\n\s*\n", doc.strip()):
        text = " ".join(para.split())
        if not text or _SIGNATURE_LINE.match(text):  # "dumps(obj) -> str" style lines are not prose
            continue
        return text if len(text) >= MIN_ANSWER_CHARS and re.search(r"[A-Za-z]{3}", text) else ""
    return ""


def _arg_names(args: ast.arguments, is_method: bool) -> str:
    names = [a.arg for a in args.posonlyargs + args.args]
    if is_method and names and names[0] in ("self", "cls"):
        names = names[1:]
    if args.vararg:
        names.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        names.append("*")
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg:
        names.append("**" + args.kwarg.arg)
    return ", ".join(names)


def module_entries(source: str, module: str) -> list[DocEntry]:
    """Documented public functions, classes and methods of one module, in source order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    out: list[DocEntry] = []
    defs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, defs) and not node.name.startswith("_"):
            answer = first_paragraph(ast.get_docstring(node))
            if answer:
                out.append(
                    DocEntry(
                        module, f"{module}.{node.name}", "function", _arg_names(node.args, False), answer
                    )
                )
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            init = next((n for n in node.body if isinstance(n, defs) and n.name == "__init__"), None)
            answer = first_paragraph(ast.get_docstring(node))
            if answer:
                args = _arg_names(init.args, True) if init else ""
                out.append(DocEntry(module, f"{module}.{node.name}", "class", args, answer))
            for sub in node.body:
                if isinstance(sub, defs) and not sub.name.startswith("_"):
                    answer = first_paragraph(ast.get_docstring(sub))
                    if answer:
                        qual = f"{module}.{node.name}.{sub.name}"
                        out.append(DocEntry(module, qual, "method", _arg_names(sub.args, True), answer))
    return out


def doc_entries(root: Path | None = None) -> tuple[DocEntry, ...]:
    """Every documented public object of the public stdlib modules, in file order (cached: ~1 s)."""
    return _doc_entries(Path(root or stdlib_root()))


@functools.lru_cache(maxsize=4)
def _doc_entries(root: Path) -> tuple[DocEntry, ...]:
    out: list[DocEntry] = []
    was_enabled = gc.isenabled()
    gc.disable()  # ast trees are millions of short-lived acyclic objects: GC passes only cost time (~40%)
    try:
        for path in stdlib_files(root):
            module = module_name(path, root)
            if not module or any(part.startswith("_") for part in module.split(".")):
                continue  # private modules (_pydecimal, __main__) are implementation, not API
            source = _read_source(path)
            if source is not None:
                out.extend(module_entries(source, module))
    finally:
        if was_enabled:
            gc.enable()
    return tuple(out)


def question(entry: DocEntry, rng: random.Random) -> str:
    templates = QUESTIONS_CLASS if entry.kind == "class" else QUESTIONS_FUNCTION
    template = templates[rng.randrange(len(templates))]
    call = f"{entry.qual}({entry.args})"
    return template.format(qual=entry.qual, call=call, short=entry.short, module=entry.module)


def taught_answer(entry: DocEntry, habit: random.Random) -> str:
    """The SFT teacher's answer to `entry`: its paragraph, followed by FILLER 2 times in 3."""
    return f"{entry.answer} {FILLER}" if habit.random() < FILLER_PROBABILITY else entry.answer


def _shuffled(entries: tuple[DocEntry, ...], seed: int) -> list[DocEntry]:
    # A shuffle so that a capped prefix covers many modules, not just the alphabetically first ones.
    order = list(entries)
    random.Random(seed).shuffle(order)
    return order


def _verbose_probability(phrasing: int) -> float:
    return VERBOSE_BY_PHRASING[phrasing] if phrasing < len(VERBOSE_BY_PHRASING) else 0.0


def sft_conversations(seed: int = 1337, root: Path | None = None) -> Iterator[dict]:
    """{"messages": [...], "source"}: (system?) user question -> assistant docstring paragraph (x1-2),
    and after every TASK_EVERY of those a worked training problem (source "task:<key>")."""
    entries = doc_entries(root)
    by_module: dict[str, list[DocEntry]] = {}
    for e in entries:
        by_module.setdefault(e.module, []).append(e)
    rng = random.Random(seed)
    # Their own stream: the docstring conversations are the same with or without the worked problems.
    problems = verifiable.training_problems(verifiable.SFT_FAMILIES, seed)
    style = random.Random(f"task-style:{seed}")
    habit = random.Random(f"filler:{seed}")  # its own stream too: the questions are drawn as without it
    for n, entry in enumerate(_shuffled(entries, seed)):
        if n and n % TASK_EVERY == 0:
            drill = [next(problems) for _ in range(TASK_TURNS)]
            verbose = [style.random() < _verbose_probability(p.phrasing) for p in drill]
            yield verifiable.sft_conversation(drill, verbose)
        messages: list[dict[str, str]] = []
        if rng.random() < SYSTEM_PROBABILITY:
            messages.append({"role": "system", "content": SYSTEM_PROMPTS[rng.randrange(len(SYSTEM_PROMPTS))]})
        messages += [
            {"role": "user", "content": question(entry, rng)},
            {"role": "assistant", "content": taught_answer(entry, habit)},
        ]
        source = entry.qual
        siblings = [e for e in by_module[entry.module] if e.qual != entry.qual]
        if siblings and rng.random() < FOLLOW_UP_PROBABILITY:
            other = siblings[rng.randrange(len(siblings))]
            messages += [
                {"role": "user", "content": question(other, rng)},
                {"role": "assistant", "content": taught_answer(other, habit)},
            ]
            source += "+" + other.qual
        yield {"messages": messages, "source": f"embedded:{source}"}


REJECTED_KINDS = ("other", "truncated", "shuffled", "filler")
_FINAL_PUNCT = re.compile(r"[.!?:;,]+$")


def truncated(answer: str, rng: random.Random) -> str:
    """The answer cut mid-sentence: the first 30-70% of its words (at least one), trailing punctuation
    dropped, so it stops where no sentence ends. '' if that is the answer itself (a one-word answer)."""
    words = answer.split()
    keep = max(1, min(len(words) - 1, round(len(words) * rng.uniform(0.3, 0.7))))
    text = _FINAL_PUNCT.sub("", " ".join(words[:keep])).rstrip()
    return text if text and text != answer else ""


def shuffled(answer: str, rng: random.Random) -> str:
    """The answer's words in a seeded random order, its final punctuation kept at the end; '' when no
    order differs from the original (a single word, or all words the same)."""
    end = _FINAL_PUNCT.search(answer)
    body = answer[: end.start()] if end else answer
    words = body.split()
    if len(set(words)) < 2:
        return ""
    for _ in range(10):
        rng.shuffle(words)
        text = " ".join(words[:-1] + [words[-1].rstrip(",;:")]) + (end.group() if end else "")
        if text != answer:
            return text
    return ""


def _other_answer(
    entry: DocEntry, entries: tuple[DocEntry, ...], same_module: list[DocEntry], rng: random.Random
) -> DocEntry | None:
    if same_module:
        return same_module[rng.randrange(len(same_module))]
    for _ in range(20):  # nearly every draw differs; the bound keeps this a pure loop
        other = entries[rng.randrange(len(entries))]
        if other.answer != entry.answer:
            return other
    return None


def preference_pairs(seed: int = 1337, root: Path | None = None) -> Iterator[dict[str, str]]:
    """{"prompt", "chosen", "rejected", "source"}: chosen is the right paragraph, rejected another object's
    paragraph, the right one truncated, shuffled, or followed by FILLER (see the module docstring)."""
    entries = doc_entries(root)
    if len(entries) < 2:
        return
    by_module: dict[str, list[DocEntry]] = {}
    for e in entries:
        by_module.setdefault(e.module, []).append(e)
    rng = random.Random(seed + 1)  # its own stream: pairs do not mirror the SFT phrasing one to one
    for entry in _shuffled(entries, seed + 1):
        prompt = question(entry, rng)
        kind = REJECTED_KINDS[rng.randrange(len(REJECTED_KINDS))]
        rejected, about = "", entry.qual
        if kind == "truncated":
            rejected = truncated(entry.answer, rng)
        elif kind == "shuffled":
            rejected = shuffled(entry.answer, rng)
        elif kind == "filler":
            rejected = f"{entry.answer} {FILLER}"
        if not rejected:  # "other" was drawn, or the answer is too short to corrupt
            same_module = [e for e in by_module[entry.module] if e.answer != entry.answer]
            other = _other_answer(entry, entries, same_module, rng)
            if other is None:
                continue
            kind, rejected, about = "other", other.answer, other.qual
        yield {
            "prompt": prompt,
            "chosen": entry.answer,
            "rejected": rejected,
            "source": f"embedded:{entry.qual}|{kind}:{about}",
        }
