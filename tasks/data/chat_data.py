"""Conversations and preference pairs as token ids, shared by sft, reward, dpo, rlhf and evaluate.

Everything here is deterministic: a fixed held-out split by a seeded permutation, batches drawn by a
generator seeded from (seed, step, micro_step). Two batch layouts for SFT:
- right padding (`lm_batch`): with causal attention a pad after the sequence cannot leak into it;
- packing (`pack` + `packed_batch`): several conversations per row, with `doc_ids` so that attention is
  block-diagonal (models.llama) and positions restart at each conversation: no leak across examples.
Preference pairs are padded (`pair_batch`) or packed the same way (`packed_pair_batch`, dpo.packing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from tasks.core import paths
from tasks.core.config import RLHFConfig
from tasks.core.stage import StageError
from tasks.data.chat_tokenizer import ChatTokenizer

IGNORE = -100


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # True where the token is an assistant (trained) token


@dataclass
class Packed:
    ids: list[int]
    mask: list[bool]
    doc: list[int]  # which conversation of the row each token belongs to (0, 1, ...)


@dataclass
class Pair:
    prompt: list[int]  # rendered prompt ending with <|assistant|>
    chosen: list[int]  # response ids (ending with <|end|>)
    rejected: list[int]
    kind: str = ""  # how the rejected answer was made, when the source says (embedded: other|truncated|...)
    group: str = ""  # the pairs sharing an object share a group (`pair_groups`); "" = the pair alone
    overlap: float = 0.5  # the name-overlap rule's verdict (`name_overlap`): 1 right, 0 wrong, 0.5 tie


# Embedded pairs record the kind of rejected answer in `source`: "embedded:<qual>|<kind>:<qual>".
_KIND = re.compile(r"^embedded:[^|]*\|(\w+):")
# ... and the objects it is about: the question's and the rejected paragraph's (the same for truncated/shuffled).
_OBJECTS = re.compile(r"^embedded:([^|]*)\|\w+:(.*)$")


def rejected_kind(source: object) -> str:
    match = _KIND.match(source) if isinstance(source, str) else None
    return match.group(1) if match else ""


def pair_groups(sources: Sequence[object]) -> list[str]:
    """A group label per preference row: rows linked by an object share one. A row links the object it
    asks about and the object whose paragraph its rejected answer is, and links chain (A-B in one row,
    B-C in another: A, B and C in one group). Split by these groups, no object's paragraph is a chosen or
    a rejected answer on both sides, so held-out accuracy measures what the model generalises, not what it
    memorised. A row whose source names no object (not embedded data) is a group of its own ("#<row>")."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    objects = []
    for source in sources:
        match = _OBJECTS.match(source) if isinstance(source, str) else None
        objects.append(match.groups() if match else None)
        if match:
            a, b = root(match.group(1)), root(match.group(2))
            if a != b:
                parent[max(a, b)] = min(a, b)  # the smallest name is the root: labels do not depend on order
    return [root(o[0]) if o else f"#{i}" for i, o in enumerate(objects)]


def split(
    n: int, val_fraction: float, seed: int, groups: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/val indices; val gets at least one item when n >= 2.

    Without `groups`, a seeded permutation of the rows. With `groups` (one label per row, `pair_groups`),
    whole groups: a seeded permutation of the labels, each group taken into val while it fits in the
    round(n * val_fraction) rows val gets (so val has exactly that many rows when small groups can fill
    it); no group is on both sides. Rows that are all groups of their own get the row split itself."""
    n_val = min(n - 1, max(1, int(round(n * val_fraction)))) if n >= 2 else 0
    if groups is not None and len(groups) == n and len(set(groups)) == n:
        groups = None  # every row a group of its own (no source names an object): exactly the row split
    if groups is None:
        order = np.random.default_rng(seed).permutation(n)
        return np.sort(order[n_val:]), np.sort(order[:n_val])
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group labels for {n} rows")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    labels = sorted(members)
    val: list[int] = []
    for j in np.random.default_rng(seed).permutation(len(labels)):
        rows = members[labels[j]]
        if len(val) + len(rows) <= n_val:
            val += rows
        if len(val) == n_val:
            break
    if not val and n >= 2:  # every group is larger than val's share: the smallest, if it leaves training rows
        smallest = min(labels, key=lambda g: (len(members[g]), g))
        val = members[smallest] if len(members[smallest]) < n else []
    held = np.zeros(n, dtype=bool)
    held[val] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def rlhf_split(
    cfg: RLHFConfig, prompt_lengths: Sequence[int], max_seq_len: int, groups: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """The preference rows the rlhf stage samples rollouts from and those it holds out, given each row's
    chat prompt length: the prompts that leave rlhf.max_new_tokens for a response in max_seq_len, split
    by rlhf.val_fraction and rlhf.split_seed (not rlhf.train.seed: runs of other seeds hold out the same
    prompts). The stage and evaluate (which must not score a policy on prompts it trained on) both call
    this, so the split has one definition. With `groups` (`pair_groups` of the rows), by group, as the
    reward and dpo stages split."""
    room = max_seq_len - cfg.max_new_tokens
    fitting = [i for i, length in enumerate(prompt_lengths) if length <= room]
    fit_groups = None if groups is None else [groups[i] for i in fitting]
    train, val = split(len(fitting), cfg.val_fraction, cfg.split_seed, fit_groups)
    return [fitting[j] for j in train], [fitting[j] for j in val]


def read_rows(dataset: str) -> list[dict]:
    path = paths.validated(dataset)
    if not path.exists():
        raise StageError(f"{path} not found; run the validate stage first")
    return pq.read_table(path).to_pylist()


def sft_examples(tokenizer: ChatTokenizer, seq_len: int) -> list[Example]:
    out = []
    for i, row in enumerate(read_rows("sft")):
        messages = row["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            last = messages[-1]["role"] if messages else "nothing (empty conversation)"
            raise StageError(
                f"{paths.validated('sft')} row {i}: conversation does not end with an assistant turn "
                f"(it ends with {last}); SFT trains on assistant replies, so each conversation must end "
                "with one"
            )
        try:
            ids, mask = tokenizer.render_chat(messages)
        except ValueError as exc:
            raise StageError(f"{paths.validated('sft')} row {i}: {exc}") from exc
        out.append(Example(ids[: seq_len + 1], mask[: seq_len + 1]))
    return out


_WORD = re.compile(r"[a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")  # fooBar, JSONEncoder


def name_words(prompt: str) -> set[str]:
    """The words of every `quoted` name in a question, camelCase and snake_case split, lower-cased:
    "What does `json.JSONEncoder.encode` do?" -> {json, encoder, encode}."""
    names = re.findall(r"`([^`]+)`", prompt)
    return {w for name in names for w in _WORD.findall(_CAMEL.sub(" ", name).lower())}


def name_overlap(prompt: str, chosen: str, rejected: str) -> float:
    """The baseline a reward model must beat on `other` pairs, with no model: the answer holding more of
    the question's name words (`name_words`) is the right one. 1.0 if that is `chosen`, 0.0 if it is
    `rejected`, 0.5 on a tie (a tie is a coin flip, as a model's equal rewards would be)."""
    words = name_words(prompt)
    hits = [len(words & set(_WORD.findall(text.lower()))) for text in (chosen, rejected)]
    return 0.5 if hits[0] == hits[1] else float(hits[0] > hits[1])


def preference_pairs(tokenizer: ChatTokenizer, seq_len: int) -> list[Pair]:
    """Every validated preference row as token ids, with its kind, its group (`pair_groups`) and the
    name-overlap baseline's verdict on it."""
    out = []
    rows = read_rows("preference")
    groups = pair_groups([row.get("source") for row in rows])
    for i, row in enumerate(rows):
        where = f"{paths.validated('preference')} row {i}"
        for side in ("chosen", "rejected"):
            if not isinstance(row.get(side), str) or not row[side].strip():
                raise StageError(f"{where}: empty {side} response; a preference pair needs two answers")
        if row["chosen"].strip() == row["rejected"].strip():
            raise StageError(
                f"{where}: chosen == rejected ({row['chosen'][:60]!r}); such a pair carries no preference"
            )
        prompt, _ = tokenizer.render_chat(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True
        )
        chosen = tokenizer.encode(row["chosen"]) + [tokenizer.end_id]
        rejected = tokenizer.encode(row["rejected"]) + [tokenizer.end_id]
        # Keep at least a quarter of the context for the responses: truncate the prompt from the left.
        keep_prompt = max(1, seq_len - max(len(chosen), len(rejected)))
        keep_prompt = max(keep_prompt, seq_len // 4)
        prompt = prompt[-keep_prompt:]
        room = seq_len - len(prompt)
        kind = rejected_kind(row.get("source"))
        overlap = name_overlap(row["prompt"], row["chosen"], row["rejected"])
        out.append(Pair(prompt, chosen[:room], rejected[:room], kind, groups[i], overlap))
    return out


def pad(seqs: Sequence[Sequence[int]], pad_id: int, fill: int | None = None) -> torch.Tensor:
    """Right-pad to the longest sequence -> LongTensor [B, T]."""
    width = max(len(s) for s in seqs)
    value = pad_id if fill is None else fill
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def lm_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """x [B,T] inputs, y [B,T] targets with IGNORE on non-assistant and pad positions."""
    xs = [e.ids[:-1] for e in examples]
    ys = [[t if m else IGNORE for t, m in zip(e.ids[1:], e.mask[1:], strict=True)] for e in examples]
    return {"x": pad(xs, pad_id), "y": pad(ys, pad_id, fill=IGNORE)}


def pack(examples: list[Example], seq_len: int) -> list[Packed]:
    """Greedy packing in the given order: conversations are appended to a row of at most seq_len + 1
    tokens (inputs and shifted targets) until the next one does not fit."""
    rows: list[Packed] = []
    current = Packed([], [], [])
    for e in examples:
        if current.ids and len(current.ids) + len(e.ids) > seq_len + 1:
            rows.append(current)
            current = Packed([], [], [])
        doc = current.doc[-1] + 1 if current.doc else 0
        current.ids += e.ids
        current.mask += e.mask
        current.doc += [doc] * len(e.ids)
    if current.ids:
        rows.append(current)
    return rows


def packed_batch(rows: list[Packed], pad_id: int) -> dict[str, torch.Tensor]:
    """x [B,T], y [B,T] (IGNORE off assistant tokens, on pads and across a conversation boundary), and
    doc_ids [B,T] for block-diagonal attention; pads get their own id (-1), never a conversation's."""
    xs = [r.ids[:-1] for r in rows]
    ys = [
        [
            t if m and d == d_next else IGNORE
            for t, m, d, d_next in zip(r.ids[1:], r.mask[1:], r.doc[:-1], r.doc[1:], strict=True)
        ]
        for r in rows
    ]
    docs = [r.doc[:-1] for r in rows]
    return {"x": pad(xs, pad_id), "y": pad(ys, pad_id, fill=IGNORE), "doc_ids": pad(docs, -1, fill=-1)}


def pair_batch(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows: tokens [2B,T], response mask in label space [2B,T-1], lengths [2B]."""
    seqs, masks = [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            response = getattr(p, side)
            seqs.append(p.prompt + response)
            masks.append([False] * (len(p.prompt) - 1) + [True] * len(response))
    tokens = pad(seqs, pad_id)
    mask = pad(masks, 0, fill=0)[:, : tokens.shape[1] - 1].float()
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return {"tokens": tokens, "mask": mask, "lengths": lengths}


def packed_pair_batch(pairs: list[Pair], pad_id: int, width: int) -> dict[str, torch.Tensor]:
    """The 2B sequences of `pair_batch` (chosen rows then rejected rows; sequence j) packed first-fit
    decreasing into rows as wide as the longest of them (at most width + 1 tokens), so a batch costs about
    its real tokens instead of 2B times the longest. x [R,W] inputs, y [R,W] targets (IGNORE on pads), doc_ids [R,W] (block-diagonal attention,
    positions restarting per sequence; -1 on pads), seq [R,W]: the sequence j whose response token the
    target at that position is, -1 elsewhere (prompt, a sequence's last token, pads), lengths [2B].

    Summing the target log-probs by `seq` gives sequence j's response log-prob of `pair_batch` (the same
    tokens at the same positions, attention restricted to the sequence): tests/test_losses.py checks it."""
    seqs, n_prompt = [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            seqs.append(p.prompt + getattr(p, side))
            n_prompt.append(len(p.prompt))
    longest = max(len(s) for s in seqs)
    if longest > width + 1:
        raise ValueError(f"a pair sequence of {longest} tokens exceeds width + 1 = {width + 1}")
    # Rows no wider than the padded layout's (the longest sequence): packing then only removes rows, and
    # attention, quadratic in the row width, never costs more than padded.
    width = longest - 1
    # First-fit decreasing: longest first, each into the first row with room (ties keep sequence order).
    rows: list[list[int]] = []  # sequence indices per row
    room: list[int] = []
    for j in sorted(range(len(seqs)), key=lambda j: -len(seqs[j])):
        r = next((r for r, left in enumerate(room) if left >= len(seqs[j])), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(width + 1)
        rows[r].append(j)
        room[r] -= len(seqs[j])
    xs, ys, docs, owners = [], [], [], []
    for row in rows:
        ids, doc, owner = [], [], []  # owner: per token, the sequence whose response the NEXT token is
        for d, j in enumerate(row):
            n = len(seqs[j])
            ids += seqs[j]
            doc += [d] * n
            # token i (0-based) predicts token i+1, a response token when i+1 >= prompt length; the last
            # token of a sequence predicts the next sequence's first token: no owner.
            owner += [j if n_prompt[j] <= i + 1 < n else -1 for i in range(n)]
        xs.append(ids[:-1])
        ys.append([t if o >= 0 else IGNORE for t, o in zip(ids[1:], owner[:-1], strict=True)])
        docs.append(doc[:-1])
        owners.append(owner[:-1])
    return {
        "x": pad(xs, pad_id),
        "y": pad(ys, pad_id, fill=IGNORE),
        "doc_ids": pad(docs, -1, fill=-1),
        "seq": pad(owners, -1, fill=-1),
        "lengths": torch.tensor([len(s) for s in seqs], dtype=torch.long),
    }


def preference_prompts(tokenizer: ChatTokenizer) -> tuple[list[dict], list[list[int]], list[str]]:
    """The validated preference rows, each row's chat prompt as token ids (ready for generation) and its
    group (`pair_groups`): what rlhf samples and holds out, and evaluate's win rate reads, in one place, so
    the two splits line up."""
    rows = read_rows("preference")
    prompts = [
        tokenizer.render_chat([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)[0]
        for row in rows
    ]
    return rows, prompts, pair_groups([row.get("source") for row in rows])


def accuracy_by_kind(wins: list[float], kinds: list[str], prefix: str) -> dict[str, float]:
    """{prefix/<kind>: mean win} for each kind of rejected answer present; {} when no pair has a kind."""
    by_kind: dict[str, list[float]] = {}
    for win, kind in zip(wins, kinds, strict=True):
        if kind:
            by_kind.setdefault(kind, []).append(win)
    return {f"{prefix}/{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())}


def sample(n: int, k: int, seed: int, step: int, micro_step: int) -> np.ndarray:
    """k indices for (step, micro_step) on this rank. Seeded by the global micro index micro*world + rank, so
    N ranks with grad_accum A see exactly the batches of 1 rank with grad_accum N*A."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    return np.random.default_rng([seed, step, micro_step * world + rank]).integers(0, n, size=k)
