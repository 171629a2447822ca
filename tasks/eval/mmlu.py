"""MMLU under the lm-evaluation-harness protocol: data loading, prompts and batched log-likelihood scoring.

The protocol is data (PROTOCOL) and is written next to every score, so a number can always be traced to
the exact prompt, few-shot selection, tokenization and truncation that produced it.

Speed without changing a single log-likelihood (tests/test_mmlu.py checks parity against a direct
`transformers` implementation of the harness prompt):
- when each of " A".." D" is one token, one forward of the context gives all four scores (the harness
  runs four forwards per item);
- the description + k dev examples are the same for every item of a subject, so their keys/values are
  computed once per subject into a KV cache and shared by every batch of that subject;
- rows are sorted by length so batches carry little padding, and the vocabulary projection runs only at
  the positions that are scored.

Prompts longer than the context: fewshot_policy "truncate" (the default, the harness's behaviour) cuts the
k-shot prompt from the left exactly as HFLM._loglikelihood_tokens does; "reduce" first drops few-shot
examples (the last ones first, down to 0) until the prompt fits, and truncates only a 0-shot prompt that
still does not fit. Either way the shots used and the tokens cut are recorded per item.
Checked against lm-eval 0.4.13 itself (benchmarks/lm_eval_parity.py): equal per-item log-likelihoods
(max abs diff 2e-6) and predictions, with and without truncation, single- and multi-token choices.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LETTERS = ("A", "B", "C", "D")

PROTOCOL: dict[str, Any] = {
    "name": "mmlu",
    "reference": "EleutherAI lm-evaluation-harness, mmlu default (hendrycksTest) template",
    "description": "The following are multiple choice questions (with answers) about {subject}.\n\n",
    "subject_format": "subject name with underscores replaced by spaces",
    "example": "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:",
    "question_strip": True,  # the harness template uses question.strip()
    "target_delimiter": " ",
    "fewshot_delimiter": "\n\n",
    "choices": [" A", " B", " C", " D"],
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

# The lm-evaluation-harness grouping (mmlu/_generate_configs.py): 19 stem, 13 humanities,
# 12 social_sciences, 13 other. Note it files anatomy under stem (the MMLU paper says other).
_GROUPS: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    "humanities": (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
    "social_sciences": (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
    "other": (
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ),
}
CATEGORIES: dict[str, str] = {s: cat for cat, subjects in _GROUPS.items() for s in subjects}
SUBJECTS = tuple(sorted(CATEGORIES))
HF_SPLITS = {"dev": "dev", "val": "validation", "validation": "validation", "test": "test"}


class MMLUDataError(ValueError):
    """Malformed or missing MMLU data; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class MMLUItem:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into choices, 0..3
    where: str = ""  # "file:line" or "hf:<path>/<subject>/<split>#row": for error messages and tracing


@dataclass
class MMLUData:
    items: list[MMLUItem]  # target split, grouped by subject, file order within a subject
    shots: dict[str, list[MMLUItem]]  # first k dev examples per subject
    subjects: list[str]
    split: str
    k_shot: int
    source: str
    data_hash: str  # sha256 of the loaded items and shots (independent of file layout)


# ------------------------------------------------------------------------------------------- loading
def _csv_rows(path: Path, subject: str) -> list[MMLUItem]:
    if not path.is_file():
        raise MMLUDataError(f"subject {subject!r}: {path} not found")
    items = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        line = 1  # a quoted field may span lines: report the line where the record starts
        for row in reader:
            where = f"{path}:{line}"
            line = reader.line_num + 1
            if not row:
                continue
            if len(row) != 6:
                raise MMLUDataError(
                    f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}"
                )
            answer = row[5].strip()
            if answer not in LETTERS:
                raise MMLUDataError(f"{where}: answer {answer!r} is not one of A, B, C, D")
            items.append(
                MMLUItem(subject, row[0], (row[1], row[2], row[3], row[4]), LETTERS.index(answer), where)
            )
    if not items:
        raise MMLUDataError(f"{path}: empty split (no rows)")
    return items


def _hf_rows(hf_path: str, subject: str, split: str, data_files: str | None) -> list[MMLUItem]:
    """Rows of one subject from a `datasets` source: the Hub's cais/mmlu (one config per subject), or a
    local builder such as "parquet"/"json" with data_files="<dir>/{subject}_{split}.parquet"."""
    import datasets

    hf_split = HF_SPLITS.get(split, split)
    where = f"hf:{hf_path}/{subject}/{hf_split}"
    try:
        if data_files is None:
            ds = datasets.load_dataset(hf_path, subject, split=hf_split)
        else:
            files = data_files.format(subject=subject, split=split, hf_split=hf_split)
            where = files
            ds = datasets.load_dataset(hf_path, data_files={hf_split: files}, split=hf_split)
    except (FileNotFoundError, ValueError) as exc:  # datasets raises these for unknown configs/files
        raise MMLUDataError(f"subject {subject!r}: cannot load {where}: {exc}") from exc
    items = []
    for i, row in enumerate(ds):
        choices, answer = list(row.get("choices") or []), row.get("answer")
        if len(choices) != 4:
            raise MMLUDataError(f"{where} row {i}: expected 4 choices, got {len(choices)}")
        if isinstance(answer, str) and answer in LETTERS:
            answer = LETTERS.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
            raise MMLUDataError(f"{where} row {i}: answer {answer!r} is not one of 0-3 (A-D)")
        items.append(
            MMLUItem(
                subject,
                str(row["question"]),
                (str(choices[0]), str(choices[1]), str(choices[2]), str(choices[3])),
                answer,
                f"{where}#{i}",
            )
        )
    if not items:
        raise MMLUDataError(f"{where}: empty split (no rows)")
    return items


def parse_source(source: str) -> tuple[str, str]:
    """'hf:cais/mmlu' -> ('hf', 'cais/mmlu'); anything else is a directory in the original CSV layout."""
    return ("hf", source[3:]) if source.startswith("hf:") else ("csv", source)


def list_subjects(source: str, split: str) -> list[str]:
    kind, where = parse_source(source)
    if kind == "hf":
        return list(SUBJECTS)
    directory = Path(where) / split
    if not directory.is_dir():
        raise MMLUDataError(f"MMLU split directory {directory} not found (expected {{subject}}_{split}.csv)")
    subjects = sorted(p.name[: -len(f"_{split}.csv")] for p in directory.glob(f"*_{split}.csv"))
    if not subjects:
        raise MMLUDataError(f"{directory}: no {{subject}}_{split}.csv files")
    return subjects


def load_split(
    source: str, subject: str, split: str, *, hf_path: str | None = None, hf_data_files: str | None = None
) -> list[MMLUItem]:
    kind, where = parse_source(source)
    if kind == "hf":
        return _hf_rows(hf_path or where, subject, split, hf_data_files)
    path = Path(where) / split / f"{subject}_{split}.csv"
    if not path.is_file():
        available = list_subjects(source, split) if (Path(where) / split).is_dir() else []
        raise MMLUDataError(
            f"subject {subject!r} not found: no {path}"
            + (f"; {len(available)} subjects available, e.g. {', '.join(available[:5])}" if available else "")
        )
    return _csv_rows(path, subject)


def load_mmlu(
    source: str,
    split: str = "val",
    subjects: Sequence[str] = (),
    k_shot: int = 5,
    max_items_per_subject: int = 0,
    *,
    hf_path: str | None = None,
    hf_data_files: str | None = None,
) -> MMLUData:
    """Target items of `split` and the first k_shot dev examples of every requested subject."""
    if k_shot < 0:
        raise MMLUDataError(f"k_shot must be >= 0, got {k_shot}")
    if k_shot > 0 and split == "dev":
        raise MMLUDataError("split 'dev' is the few-shot pool; evaluate val or test, or use k_shot=0")
    subjects = list(subjects) or list_subjects(source, split)
    kw = {"hf_path": hf_path, "hf_data_files": hf_data_files}
    items: list[MMLUItem] = []
    shots: dict[str, list[MMLUItem]] = {}
    for subject in subjects:
        rows = load_split(source, subject, split, **kw)
        items += rows[:max_items_per_subject] if max_items_per_subject > 0 else rows
        if k_shot > 0:
            dev = load_split(source, subject, "dev", **kw)
            if len(dev) < k_shot:
                raise MMLUDataError(
                    f"subject {subject!r}: {len(dev)} dev examples, fewer than k_shot={k_shot}"
                )
            shots[subject] = dev[:k_shot]
        else:
            shots[subject] = []
    canon = [
        [dataclasses.astuple(i)[:4] for i in items],
        {s: [dataclasses.astuple(i)[:4] for i in v] for s, v in shots.items()},
    ]
    digest = hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()
    return MMLUData(items, shots, subjects, split, k_shot, source, digest)


# ------------------------------------------------------------------------------------------- prompts
def subject_name(subject: str) -> str:
    return subject.replace("_", " ")


def format_example(item: MMLUItem, with_answer: bool = False) -> str:
    text = item.question.strip() if PROTOCOL["question_strip"] else item.question
    text += "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices, strict=True))
    text += "\nAnswer:"
    return text + (PROTOCOL["target_delimiter"] + LETTERS[item.answer] if with_answer else "")


def fewshot_prefix(subject: str, shots: Sequence[MMLUItem]) -> str:
    head = PROTOCOL["description"].format(subject=subject_name(subject))
    return head + "".join(format_example(s, True) + PROTOCOL["fewshot_delimiter"] for s in shots)


def harness_prompt(item: MMLUItem, shots: Sequence[MMLUItem]) -> tuple[str, list[str]]:
    """(context, the four continuations) exactly as the harness builds them."""
    return fewshot_prefix(item.subject, shots) + format_example(item), list(PROTOCOL["choices"])


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


# ------------------------------------------------------------------------------------------- scoring
@dataclass
class _Row:
    """One model input; targets are (choice, logit position of its first token, its token ids)."""

    item: int
    tokens: list[int]
    targets: list[tuple[int, int, list[int]]]
    prefix_len: int = 0  # leading tokens whose keys/values come from the subject's shared cache


def _rows_for_item(i: int, ctx: list[int], conts: list[list[int]], max_len: int) -> tuple[list[_Row], int]:
    """The model inputs of one item and how many tokens left truncation cut (the most over its choices).

    Left truncation is the harness's (lm_eval/models/huggingface.py, HFLM._loglikelihood_tokens, causal
    backend): ``inp = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]``, i.e. keep the last
    max_len + 1 tokens of context + continuation, BOS included, and feed all but the last.
    """
    if all(len(c) == 1 for c in conts):
        # Logits after the last context token give every single-token continuation at once; this is the
        # harness's input for each of them, since (ctx + [c])[-(max_len + 1):][:-1] == ctx[-max_len:].
        tokens = ctx[-max_len:]
        return [_Row(i, tokens, [(c, len(tokens) - 1, cont) for c, cont in enumerate(conts)])], len(
            ctx
        ) - len(tokens)
    rows, cut = [], 0
    for c, cont in enumerate(conts):
        whole = ctx + cont
        cut = max(cut, len(whole) - (max_len + 1))
        tokens = whole[-(max_len + 1) :][:-1]
        if len(tokens) < len(cont):
            raise ValueError(f"continuation of {len(cont)} tokens does not fit max_seq_len={max_len}")
        rows.append(_Row(i, tokens, [(c, len(tokens) - len(cont), cont)]))
    return rows, cut


def _fits(ctx: list[int], conts: list[list[int]], max_len: int) -> bool:
    return len(ctx) + max(len(c) for c in conts) <= max_len + 1


def encode_requests(
    tokenizer: Any, contexts: Sequence[str], choices: Sequence[str]
) -> list[tuple[list[int], list[list[int]]]]:
    """(context ids, continuation ids per choice) for every context, as the harness's
    TemplateLM._encode_pair does for causal models (lm_eval/api/model.py): trailing whitespace of the
    context moves to the continuation, then continuation_enc = encode(context + continuation)
    [len(encode(context)):]. With a byte-level BPE whose pre-tokenizer splits before " A", this equals
    encode(" A"); it is computed, not assumed."""

    def batch(texts: list[str]) -> list[list[int]]:
        if hasattr(tokenizer, "encode_batch"):
            return list(tokenizer.encode_batch(texts))
        return [tokenizer.encode(t) for t in texts]

    pairs = []
    for ctx in contexts:
        n_spaces = len(ctx) - len(ctx.rstrip())
        pairs.append((ctx[: len(ctx) - n_spaces], ctx[len(ctx) - n_spaces :]))
    ctx_ids = batch([c for c, _ in pairs])
    wholes = batch([c + sp + choice for c, sp in pairs for choice in choices])
    out = []
    for i, ids in enumerate(ctx_ids):
        conts = [wholes[i * len(choices) + c][len(ids) :] for c in range(len(choices))]
        if any(not cont for cont in conts):
            raise ValueError(f"a choice of {list(choices)} encodes to no tokens after context {i}")
        out.append((ids, conts))
    return out


def _common_prefix(rows: list[_Row]) -> int:
    first = rows[0].tokens
    n = min(min(len(r.tokens) for r in rows), min(t[1] for r in rows for t in r.targets))
    for r in rows[1:]:
        k = 0
        while k < n and r.tokens[k] == first[k]:
            k += 1
        n = k
    return n


def _expand_cache(model: Any, prefix_cache: Any, batch: int, total: int, device: Any) -> Any:
    """A batch-sized cache whose first positions hold the (batch-1) prefix keys/values."""
    p = prefix_cache.pos
    cache = model.new_cache(batch, max_len=total, device=device)
    for dst, src in zip(cache.k + cache.v, prefix_cache.k + prefix_cache.v, strict=True):
        dst[:, :, :p] = src[:, :, :p]
    cache.pos = p
    return cache


MIN_SHARED_PREFIX = 16  # below this a shared cache saves less than the copy costs


def score_items(
    model: Any,
    tokenizer: Any,
    items: Sequence[MMLUItem],
    k_shot: int,
    batch_size: int = 16,
    device: Any = "cpu",
    *,
    shots: Mapping[str, Sequence[MMLUItem]] | None = None,
    prepend_bos: bool = True,
    max_seq_len: int | None = None,
    fewshot_policy: str = "truncate",
) -> dict[str, Any]:
    """Log-likelihood of " A".." D" for every item; returns loglikelihoods, predictions and accuracy, and
    per item the number of shots used (`k_used`) and of context tokens cut by left truncation
    (`truncated_tokens`).

    `model(tokens [B,T]) -> logits [B,T,V]`, already on `device`. A model with `new_cache` (our
    Transformer) shares the few-shot prefix through its KV cache; any other callable is run on full rows.
    """
    import torch

    from tasks.eval.perplexity import logits_at, logits_checked

    check_fewshot_policy(fewshot_policy)
    shots = shots or {}
    if k_shot > 0 and any(len(shots.get(it.subject, ())) < k_shot for it in items):
        missing = sorted({it.subject for it in items if len(shots.get(it.subject, ())) < k_shot})
        raise MMLUDataError(f"k_shot={k_shot} but fewer dev examples were given for {missing[:5]}")
    max_len = max_seq_len or model.config.max_seq_len
    bos = [tokenizer.bos_id] if prepend_bos else []
    choices = list(PROTOCOL["choices"])

    # k actually used per item: k for all ("truncate"); under "reduce", the largest k' <= k that fits.
    k_used = [k_shot] * len(items)
    requests: list[Any] = [None] * len(items)
    pending = list(range(len(items)))
    for k in range(k_shot, -1, -1):
        contexts = [harness_prompt(items[i], list(shots.get(items[i].subject, ()))[:k])[0] for i in pending]
        still = []
        for i, (ctx, conts) in zip(pending, encode_requests(tokenizer, contexts, choices), strict=True):
            requests[i], k_used[i] = (bos + ctx, conts), k
            if fewshot_policy == "reduce" and k > 0 and not _fits(bos + ctx, conts, max_len):
                still.append(i)
        pending = still
        if not pending:
            break

    groups: dict[Any, list[_Row]] = defaultdict(list)
    cut_tokens = []
    for i, (it, (ctx, conts)) in enumerate(zip(items, requests, strict=True)):
        rows, cut = _rows_for_item(i, ctx, conts, max_len)
        cut_tokens.append(cut)
        # A truncated context lost its prefix, so it cannot share the subject's cache; items of one subject
        # share the prefix only with items that use the same number of shots.
        groups[None if cut else (it.subject, k_used[i])] += rows
    use_cache = hasattr(model, "new_cache")
    for key, rows in groups.items():
        shared = _common_prefix(rows) if key is not None and use_cache and len(rows) > 1 else 0
        for r in rows:
            r.prefix_len = shared if shared >= MIN_SHARED_PREFIX else 0

    lls = [[0.0] * len(choices) for _ in items]
    pad = getattr(tokenizer, "pad_id", 0)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            for rows in groups.values():
                p = rows[0].prefix_len
                prefix_cache = None
                if p:
                    prefix_cache = model.new_cache(1, max_len=p, device=device)
                    logits_at(model, torch.tensor([rows[0].tokens[:p]], device=device), None, prefix_cache)
                rows = sorted(rows, key=lambda r: -len(r.tokens))  # longest first: memory peaks early
                for start in range(0, len(rows), batch_size):
                    batch = rows[start : start + batch_size]
                    width = len(batch[0].tokens) - p
                    tokens = torch.full((len(batch), width), pad, dtype=torch.long)
                    positions = []
                    for b, r in enumerate(batch):
                        tail = r.tokens[p:]
                        tokens[b, : len(tail)] = torch.tensor(tail)
                        pos = [t[1] - p + j for t in r.targets for j in range(len(t[2]))]
                        positions.append(pos)
                    n = max(len(x) for x in positions)
                    index = torch.tensor([x + [x[-1]] * (n - len(x)) for x in positions], device=device)
                    cache = _expand_cache(model, prefix_cache, len(batch), p + width, device) if p else None
                    targets = [[t for tr in r.targets for t in tr[2]] for r in batch]
                    target = torch.tensor([x + [0] * (n - len(x)) for x in targets], device=device)
                    logp = torch.log_softmax(
                        logits_checked(model, tokens.to(device), index, cache).float(), -1
                    )
                    picked = logp.gather(-1, target[..., None])[..., 0].cpu().tolist()  # one sync per batch
                    for b, r in enumerate(batch):
                        j = 0
                        for choice, _, ids in r.targets:
                            lls[r.item][choice] = sum(picked[b][j : j + len(ids)])
                            j += len(ids)
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return {
        **accuracy(items, lls),
        "n_truncated": sum(c > 0 for c in cut_tokens),
        "n_reduced": sum(k < k_shot for k in k_used),
        "k_used": k_used,
        "truncated_tokens": cut_tokens,
        "mean_k": sum(k_used) / len(k_used) if k_used else float("nan"),
        "fewshot_policy": fewshot_policy,
        "max_seq_len": max_len,
    }


def _argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy's argmax in the harness)."""
    return max(range(len(values)), key=lambda c: (values[c], -c))


def accuracy(items: Sequence[MMLUItem], loglikelihoods: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Predictions (argmax, the first on ties as numpy's argmax in the harness) and accuracies."""
    preds = [_argmax_first(ll) for ll in loglikelihoods]
    by_subject: dict[str, list[int]] = defaultdict(list)
    by_category: dict[str, list[int]] = defaultdict(list)
    for it, pred in zip(items, preds, strict=True):
        hit = int(pred == it.answer)
        by_subject[it.subject].append(hit)
        by_category[CATEGORIES.get(it.subject, "uncategorized")].append(hit)
    hits = [h for v in by_subject.values() for h in v]
    return {
        "loglikelihoods": [list(map(float, ll)) for ll in loglikelihoods],
        "predictions": preds,
        "answers": [it.answer for it in items],
        "n_items": len(hits),
        "acc": sum(hits) / len(hits) if hits else float("nan"),
        "per_subject": {s: {"acc": sum(v) / len(v), "n": len(v)} for s, v in sorted(by_subject.items())},
        "per_category": {c: {"acc": sum(v) / len(v), "n": len(v)} for c, v in sorted(by_category.items())},
    }
