"""Helpers shared by the data-stage tests: params, hashes and small source files made in the test dir."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tasks.core.config import Params
from tasks.core.strict import build

REPO = Path(__file__).resolve().parents[2]
SMALL_INGEST = {"max_documents": 60, "max_sft_examples": 20, "max_preference_pairs": 20}


def make_params(ingest_cfg: dict | None = None, **sections: dict) -> Params:
    return build(Params, {"ingest": {**SMALL_INGEST, **(ingest_cfg or {})}, **sections})


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def files_source(path: Path, **kw) -> dict:
    return {"kind": "files", "path": str(path), **kw}


QA = ("What does json.dumps do exactly, please?", "It serializes an object to a JSON string.")


def small_chat_sources(root: Path) -> dict:
    """Tiny SFT and preference files, so a subprocess does not pay for deriving the embedded ones."""
    q, a = QA
    sft = write_jsonl(
        root / "sft.jsonl",
        [
            {"messages": [{"role": "user", "content": f"{q} {i}"}, {"role": "assistant", "content": a}]}
            for i in range(12)
        ],
    )
    pref = write_jsonl(
        root / "pref.jsonl",
        [{"prompt": f"{q} {i}", "chosen": a, "rejected": f"No idea {i}."} for i in range(12)],
    )
    return {
        "sft": files_source(sft, text_field="messages"),
        "preference": files_source(pref, text_field="prompt"),
    }
