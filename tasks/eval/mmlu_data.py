"""MMLU data: the items of a split and the few-shot dev examples, from the original CSV layout or a
`datasets` source, and the subject -> category table (mmlu_subjects.json).

Every item records where it came from ("file:line" or "hf:<path>/<subject>/<split>#row"), and malformed
or missing data raises MMLUDataError naming that place. A CSV file that is a symlink out of the MMLU
directory is refused, never read (the policy of ingest's source directories: tasks/core/checks.py
linked_outside).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.core.checks import linked_outside

LETTERS = ("A", "B", "C", "D")  # how the CSV files (and `datasets` string answers) name the right choice


def _subject_table() -> dict[str, str]:
    """subject -> category, from mmlu_subjects.json (the lm-evaluation-harness grouping)."""
    path = Path(__file__).with_name("mmlu_subjects.json")
    groups = json.loads(path.read_text(encoding="utf-8"))["categories"]
    table = {s: cat for cat, subjects in groups.items() for s in subjects}
    if len(table) != sum(len(v) for v in groups.values()):
        raise ValueError(f"{path}: a subject is listed under more than one category")
    return table


CATEGORIES: dict[str, str] = _subject_table()
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
def _refuse_links_out(root: str, files: list[Path]) -> None:
    """MMLUDataError naming a file that a symlink takes out of the MMLU directory `root`."""
    outside = linked_outside(root, files)
    if outside:
        raise MMLUDataError(
            f"{outside[0]} is a link out of the MMLU directory {root} (to {os.path.realpath(outside[0])}): "
            f"refusing to read it{f' ({len(outside)} such files)' if len(outside) > 1 else ''}; copy the "
            "file into the directory"
        )


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
    files = sorted(directory.glob(f"*_{split}.csv"))
    _refuse_links_out(where, files)
    subjects = [p.name[: -len(f"_{split}.csv")] for p in files]
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
    _refuse_links_out(where, [path])
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
