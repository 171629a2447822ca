"""Stage `ingest`: read each dataset's source, clean it, write data/raw/{pretrain,sft,preference}.parquet.

Sources (IngestConfig.<dataset>.kind): `embedded` (tasks/embedded.py), `files` (txt: one document per
file; jsonl/json/parquet through `datasets.load_dataset`), `hf` (a Hub id or a local dataset dir through
the same `datasets.load_dataset` call). Rows are streamed and never materialised as a whole.

Per row, in order: field extraction (missing_field / wrong_type), identical chosen/rejected, length
(too_short / too_long), printable ratio (non_printable), exact dedup by sha256 of the normalised text
(duplicate), then caps. Reading stops at the first row over a cap; that row counts as dropped `cap`.
Problems with the source as a whole (no such path, no such field, a non-text column type, bad bytes, a
corrupt file, no rows, nothing left) raise StageError, and data/raw/ is swapped in only when all three
datasets succeeded, so a failed run leaves the previous outputs untouched.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import logging
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks import paths
from tasks.config import IngestConfig, Params, SourceConfig
from tasks.io import atomic_path, write_json
from tasks.stage import StageError, stage_main

log = logging.getLogger("tasks.ingest")  # not __name__: under `python -m` that is "__main__"

REASONS = (
    "missing_field",
    "wrong_type",
    "identical_pair",
    "too_short",
    "too_long",
    "non_printable",
    "duplicate",
    "cap",
)
FILE_KINDS = {".txt": "txt", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # suffix -> reader
ROW_GROUP = 2000  # fixed row-group size: same rows -> same parquet bytes
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMAS = {
    "pretrain": pa.schema([("text", pa.string()), ("source", pa.string())]),
    "sft": pa.schema([("messages", MESSAGES_TYPE), ("source", pa.string())]),
    "preference": pa.schema(
        [("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()), ("source", pa.string())]
    ),
}
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT-style {"from", "value"} turns
HH_ASSISTANT = "\n\nAssistant:"
# ASCII characters that are neither printable nor newline/tab/CR; includes \x1c-\x1f, which str.split()
# treats as whitespace and bytes.split() does not
_ASCII_CONTROL = bytes([*range(0, 9), 11, 12, *range(14, 32), 127])
_UNSET = b"\0unset"


# ------------------------------------------------------------------------------------ pure helpers
def normalize(text: str) -> str:
    """NFKC, whitespace collapsed, lowercase: what 'the same text' means for dedup."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def plain_ascii(text: str) -> bytes | None:
    """The text's bytes when it is ASCII with no control characters besides newline, tab and CR (the
    common case, where the fast paths below apply), else None."""
    if not text.isascii():  # O(1) in CPython
        return None
    raw = text.encode("ascii")
    return raw if len(raw.translate(None, _ASCII_CONTROL)) == len(raw) else None


def text_hash(text: str, plain: bytes | None = _UNSET) -> bytes:
    """sha256 of normalize(text); for plain ASCII the same bytes, computed without per-word strings.

    `plain` is plain_ascii(text) when the caller already has it."""
    if plain is _UNSET:
        plain = plain_ascii(text)
    if plain is not None:  # NFKC is the identity on ASCII, and both splits agree without \x1c-\x1f
        return hashlib.sha256(b" ".join(plain.lower().split())).digest()
    return hashlib.sha256(normalize(text).encode("utf-8")).digest()


def printable_ratio(text: str, plain: bytes | None = _UNSET) -> float:
    """Share of characters that are printable or ordinary whitespace (newline, tab, CR)."""
    if not text:
        return 0.0
    if (plain_ascii(text) if plain is _UNSET else plain) is not None:
        return 1.0
    if text.replace("\n", "").replace("\t", "").replace("\r", "").isprintable():  # C speed, any width
        return 1.0
    counts = Counter(text)  # count per distinct character: ~50x faster than testing every character
    ok = sum(n for ch, n in counts.items() if ch.isprintable() or ch in "\n\t\r")
    return ok / len(text)


def _clip(value: Any, limit: int) -> Any:
    """Long strings cut before repr: a 50 MB row must not be copied whole just to show its start."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"...<{len(value)} chars>"
    if isinstance(value, dict):
        return {k: _clip(v, limit) for k, v in value.items()}
    return value


def _preview(value: Any, limit: int = 160) -> str:
    text = repr(_clip(value, limit))
    return text if len(text) <= limit else text[:limit] + "..."


Extracted = tuple[dict[str, Any] | None, str | None, str]  # record, drop reason, text for the filters


def pretrain_record(row: dict, text_field: str) -> Extracted:
    value = row.get(text_field)
    if value is None:
        return None, "missing_field", ""
    if not isinstance(value, str):
        return None, "wrong_type", ""
    return {"text": value}, None, value


def _messages(value: Any) -> list[dict[str, str]] | str:
    """A list of {role, content} (ShareGPT {from, value} accepted), or the drop reason."""
    if not isinstance(value, list):
        return "wrong_type"
    out = []
    for msg in value:
        if not isinstance(msg, dict):
            return "wrong_type"
        # `or`, not a .get default: mixed files unify structs, so absent keys are present as None
        role = msg.get("role") or msg.get("from")
        content = msg.get("content") if msg.get("content") is not None else msg.get("value")
        if role is None or content is None:
            return "missing_field"
        if not isinstance(role, str) or not isinstance(content, str):
            return "wrong_type"
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            return "wrong_type"
        out.append({"role": role, "content": content})
    return out if out else "missing_field"


def sft_record(row: dict, text_field: str) -> Extracted:
    value = row.get(text_field)
    if value is None:
        return None, "missing_field", ""
    messages = _messages(value)
    if isinstance(messages, str):
        return None, messages, ""
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        return None, "missing_field", ""
    return {"messages": messages}, None, "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def split_hh(transcript: str) -> tuple[str, str]:
    """HH-RLHF '\\n\\nHuman: q\\n\\nAssistant: a' -> (prompt, answer), split at the last assistant turn."""
    idx = transcript.rfind(HH_ASSISTANT)
    prompt, answer = transcript[:idx].strip(), transcript[idx + len(HH_ASSISTANT) :].strip()
    if prompt.startswith("Human:") and HH_ASSISTANT.strip() not in prompt:
        prompt = prompt[len("Human:") :].strip()  # single-turn: the question itself
    return prompt, answer


def _last_content(messages: list, role: str, last: bool) -> Any:
    picked = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == role]
    return (picked[-1] if last else picked[0]) if picked else None


def preference_record(row: dict, text_field: str) -> Extracted:
    prompt, chosen, rejected = row.get(text_field), row.get("chosen"), row.get("rejected")
    if chosen is None or rejected is None:
        return None, "missing_field", ""
    if isinstance(chosen, list) and isinstance(rejected, list):  # UltraFeedback-binarized message lists
        if not (isinstance(prompt, str) and prompt.strip()):
            prompt = _last_content(chosen, "user", last=False)
        chosen = _last_content(chosen, "assistant", last=True)
        rejected = _last_content(rejected, "assistant", last=True)
    elif prompt is None and isinstance(chosen, str) and HH_ASSISTANT in chosen and isinstance(rejected, str):
        prompt, chosen = split_hh(chosen)  # HH-RLHF full transcripts
        _, rejected = split_hh(rejected)
    values = (prompt, chosen, rejected)
    if any(v is None for v in values):
        return None, "missing_field", ""
    if not (isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str)):
        return None, "wrong_type", ""
    if not (prompt.strip() and chosen.strip() and rejected.strip()):
        return None, "missing_field", ""
    if normalize(chosen) == normalize(rejected):
        return None, "identical_pair", ""
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None, f"{prompt}\n{chosen}\n{rejected}"


EXTRACTORS: dict[str, Callable[[dict, str], Extracted]] = {
    "pretrain": pretrain_record,
    "sft": sft_record,
    "preference": preference_record,
}


# ----------------------------------------------------------------------------------------- sources
def resolve_files(dataset: str, path: str) -> list[Path]:
    """A file, a directory (all supported files below it) or a glob -> sorted files; StageError if none."""
    supported = sorted(FILE_KINDS)
    if not path:
        raise StageError(f"dataset {dataset}: source kind 'files' needs ingest.{dataset}.path")
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
    elif Path(path).is_dir():
        files = sorted(
            p
            for p in Path(path).rglob("*")
            if p.is_file() and p.suffix in supported and not p.name.startswith(".")
        )
    elif Path(path).is_file():
        files = [Path(path)]
    else:
        raise StageError(f"dataset {dataset}: source path {path!r} does not exist (ingest.{dataset}.path)")
    if not files:
        raise StageError(f"dataset {dataset}: source path {path!r} matches no {supported} file")
    kinds = {_file_kind(dataset, p) for p in files}
    if len(kinds) > 1:
        raise StageError(
            f"dataset {dataset}: {path!r} mixes file kinds {sorted(kinds)}; use one kind per source"
        )
    return files


def _file_kind(dataset: str, p: Path) -> str:
    if p.suffix not in FILE_KINDS:
        raise StageError(
            f"dataset {dataset}: file {p} has unsupported extension {p.suffix!r} ({sorted(FILE_KINDS)})"
        )
    return FILE_KINDS[p.suffix]


def check_utf8(dataset: str, p: Path, chunk: int = 1 << 20) -> None:
    """StageError naming the file, byte offset and line of the first invalid UTF-8 sequence."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1  # bytes and newlines before the current block
    with open(p, "rb") as fh:
        while True:
            block = fh.read(chunk)
            pending = decoder.getstate()[0]  # an incomplete sequence carried over from the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                line = lines + (pending + block)[: exc.start].count(b"\n")
                raise StageError(
                    f"dataset {dataset}: file {p} is not valid UTF-8 at byte {offset - len(pending) + exc.start} "
                    f"(line {line}): {exc.reason}; re-encode it as UTF-8"
                ) from exc
            if not block:
                return
            offset += len(block)
            lines += block.count(b"\n")


def _txt_rows(dataset: str, files: list[Path]) -> Iterator[dict]:
    for p in files:
        check_utf8(dataset, p)
        yield {"text": p.read_bytes().decode("utf-8"), "source": p.as_posix()}


def _parquet_rows(dataset: str, p: Path) -> int:
    try:
        return pq.ParquetFile(p).metadata.num_rows  # reads the footer: a truncated or foreign file fails here
    except Exception as exc:
        raise StageError(f"dataset {dataset}: file {p} is not a readable parquet file: {exc}") from exc


def load_hf_rows(
    name: str, config: str | None, split: str, streaming: bool, data_files: list[str] | None = None
) -> tuple[Iterator[dict], Any]:
    """The one `datasets.load_dataset` call used for Hub ids, local dataset dirs and json/parquet files."""
    import datasets  # heavy; only the stages that read sources pay for it

    datasets.disable_progress_bars()
    ds = datasets.load_dataset(name, config or None, data_files=data_files, split=split, streaming=streaming)
    return iter(ds), getattr(ds, "features", None)


@dataclass
class Source:
    rows: Iterator[dict]
    description: str
    text_field: str
    features: Any = None
    from_datasets: bool = False


def open_source(dataset: str, src: SourceConfig, seed: int) -> Source:
    from tasks import embedded

    if src.kind == "embedded":
        gens = {
            "pretrain": embedded.pretrain_documents,
            "sft": lambda: embedded.sft_conversations(seed),
            "preference": lambda: embedded.preference_pairs(seed),
        }
        native = {"pretrain": "text", "sft": "messages", "preference": "prompt"}[dataset]
        return Source(gens[dataset](), "embedded", native)
    if src.kind == "files":
        files = resolve_files(dataset, src.path)
        kind = _file_kind(dataset, files[0])
        desc = f"files {src.path} ({len(files)} {kind} file{'s' if len(files) > 1 else ''})"
        if kind == "txt":
            if dataset != "pretrain":
                raise StageError(
                    f"dataset {dataset}: txt files hold plain text; {dataset} needs jsonl or parquet"
                )
            return Source(_txt_rows(dataset, files), desc, "text")
        if kind == "json":
            for p in files:
                check_utf8(dataset, p)
        else:  # `datasets` fails on a parquet file with no rows ("BatchSize must be greater than 0")
            files = [p for p in files if _parquet_rows(dataset, p) > 0]
            if not files:
                raise StageError(f"dataset {dataset}: {desc} is empty (no rows)")
        try:
            rows, features = load_hf_rows(kind, None, "train", src.streaming, [str(p) for p in files])
        except StopIteration as exc:  # what `datasets` raises for a json file with no records
            raise StageError(f"dataset {dataset}: {desc} is empty (no rows)") from exc
        except Exception as exc:
            raise StageError(f"dataset {dataset}: cannot read {desc}: {type(exc).__name__}: {exc}") from exc
        return Source(rows, desc, src.text_field, features, True)
    if src.kind == "hf":
        if not src.hf_id:
            raise StageError(f"dataset {dataset}: source kind 'hf' needs ingest.{dataset}.hf_id")
        desc = f"hf {src.hf_id}" + (f"[{src.hf_config}]" if src.hf_config else "") + f" split {src.split}"
        try:
            rows, features = load_hf_rows(src.hf_id, src.hf_config, src.split, src.streaming)
        except Exception as exc:
            raise StageError(f"dataset {dataset}: cannot load {desc}: {type(exc).__name__}: {exc}") from exc
        return Source(rows, desc, src.text_field, features, True)
    raise StageError(f"dataset {dataset}: unknown source kind {src.kind!r} (embedded, files, hf)")


def check_sources(params: Params) -> None:
    """Fail fast (before any stage runs) on a files source that matches nothing or a bad source kind."""
    for dataset in paths.DATASETS:
        src: SourceConfig = getattr(params.ingest, dataset)
        if src.kind == "files":
            resolve_files(dataset, src.path)
        elif src.kind == "hf" and not src.hf_id:
            raise StageError(f"dataset {dataset}: source kind 'hf' needs ingest.{dataset}.hf_id")
        elif src.kind not in ("embedded", "files", "hf"):
            raise StageError(f"dataset {dataset}: unknown source kind {src.kind!r} (embedded, files, hf)")


def check_schema(dataset: str, source: Source, first_row: dict) -> None:
    """Schema-level problems are configuration errors, not rows to drop: fail with the field list."""
    if not source.from_datasets:
        return  # embedded and txt rows are built here and always carry their fields
    fields = list(source.features) if source.features is not None else sorted(first_row)
    for name in ["chosen", "rejected"] if dataset == "preference" else [source.text_field]:
        if name not in fields:
            raise StageError(
                f"dataset {dataset}: {source.description} has no field {name!r} "
                f"(ingest.{dataset}.text_field); available fields: {fields}"
            )
    feature = source.features[source.text_field] if dataset == "pretrain" and source.features else None
    # a Value of another dtype is a wrong column; Json() means mixed types, which are checked per row
    if (
        feature is not None
        and type(feature).__name__ == "Value"
        and feature.dtype not in ("string", "large_string")
    ):
        raise StageError(
            f"dataset {dataset}: field {source.text_field!r} in {source.description} has type "
            f"{feature}, expected a string column"
        )


# ---------------------------------------------------------------------------------------- ingesting
@dataclass
class Counts:
    rows_in: int = 0
    rows_kept: int = 0
    bytes_kept: int = 0
    capped: bool = False
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    examples: dict[str, str] = field(default_factory=dict)  # first dropped row per reason

    def drop(self, reason: str, index: int, row: Any) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, f"row {index}: {_preview(row)}")

    def summary(self, description: str) -> dict[str, Any]:
        return {
            "source": description,
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "bytes_kept": self.bytes_kept,
            "capped": self.capped,
            "dropped": dict(self.dropped),
        }


def dataset_cap(dataset: str, cfg: IngestConfig) -> int:
    caps = [
        cfg.max_documents,
        {"sft": cfg.max_sft_examples, "preference": cfg.max_preference_pairs}.get(dataset, 0),
    ]
    caps = [c for c in caps if c > 0]
    return min(caps) if caps else 0


def ingest_dataset(dataset: str, source: Source, cfg: IngestConfig, out: Path) -> Counts:
    """Filter source rows into the parquet file `out`; returns the counts. Pure apart from `out`."""
    extract = EXTRACTORS[dataset]
    cap = dataset_cap(dataset, cfg)
    max_bytes = cfg.max_bytes if dataset == "pretrain" else 0
    counts, seen, buffer = Counts(), set(), []
    schema = SCHEMAS[dataset]
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        index = -1
        try:
            for index, row in enumerate(source.rows):
                counts.rows_in += 1
                if index == 0:
                    check_schema(dataset, source, row)
                if cap and counts.rows_kept >= cap:
                    counts.drop("cap", index, row)
                    counts.capped = True
                    break
                record, reason, text = extract(row, source.text_field)
                plain = None
                if reason is None:
                    n = len(text)
                    if n < cfg.min_chars:
                        reason = "too_short"
                    elif cfg.max_chars and n > cfg.max_chars:
                        reason = "too_long"  # before any pass over the text: a huge row costs nothing more
                    elif printable_ratio(text, plain := plain_ascii(text)) < cfg.min_printable_ratio:
                        reason = "non_printable"
                if reason is None:
                    digest = text_hash(text, plain)
                    reason = "duplicate" if digest in seen else None
                    seen.add(digest)
                if reason is not None:
                    counts.drop(reason, index, row)
                    continue
                nbytes = len(plain) if plain is not None else len(text.encode("utf-8"))
                if max_bytes and counts.bytes_kept + nbytes > max_bytes:
                    counts.drop("cap", index, row)
                    counts.capped = True
                    break
                # embedded and txt rows name their origin; a dataset's own columns are not trusted for it
                own = None if source.from_datasets else row.get("source")
                assert record is not None  # no drop reason means a record was extracted
                record["source"] = str(own or f"{source.description}#{index}")
                buffer.append(record)
                counts.rows_kept += 1
                counts.bytes_kept += nbytes
                if len(buffer) == ROW_GROUP:
                    writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                    buffer = []
        except StageError:
            raise
        except Exception as exc:  # a bad page, a decode error or a network error while streaming
            raise StageError(
                f"dataset {dataset}: reading {source.description} failed at row {index + 1}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if buffer:
            writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
    if counts.rows_in == 0:
        raise StageError(f"dataset {dataset}: {source.description} is empty (no rows)")
    if counts.rows_kept == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in counts.dropped.items() if v)
        examples = "; ".join(f"{k}: {v}" for k, v in counts.examples.items())
        raise StageError(
            f"dataset {dataset}: all {counts.rows_in} rows from {source.description} were "
            f"dropped ({reasons}); e.g. {examples}"
        )
    return counts


def flat_metrics(summary: dict[str, dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for dataset, s in summary.items():
        out[f"rows/{dataset}"] = s["rows_kept"]
        out[f"rows_in/{dataset}"] = s["rows_in"]
        out[f"bytes/{dataset}"] = s["bytes_kept"]
        for reason, n in s["dropped"].items():
            out[f"dropped/{dataset}/{reason}"] = n
    return out


def run(params: Params, tracker: Any = None) -> dict[str, Any]:
    cfg = params.ingest
    check_sources(params)
    summary: dict[str, dict] = {}
    with atomic_path(paths.RAW) as tmp:  # all three datasets land together or not at all
        tmp.mkdir(parents=True)
        for dataset in paths.DATASETS:
            src: SourceConfig = getattr(cfg, dataset)
            source = open_source(dataset, src, cfg.seed)
            counts = ingest_dataset(dataset, source, cfg, tmp / f"{dataset}.parquet")
            summary[dataset] = counts.summary(source.description)
            log.info(
                "ingest %s: kept %d of %d rows from %s; dropped %s",
                dataset,
                counts.rows_kept,
                counts.rows_in,
                source.description,
                {k: v for k, v in counts.dropped.items() if v},
            )
        write_json(tmp / "summary.json", summary)
    metrics = flat_metrics(summary)
    write_json(paths.METRICS / "ingest.json", metrics)
    if tracker is not None:
        tracker.log_metrics(metrics)
        tracker.log_artifact(paths.RAW / "summary.json", "ingest")
    return summary


if __name__ == "__main__":
    stage_main("ingest", run)
