"""Stage `ingest`: read each dataset's source, clean it, write data/raw/{pretrain,sft,preference}.parquet.

Sources (IngestConfig.<dataset>.kind): `embedded` (tasks/data/embedded.py), `files` (txt: one document per
file; jsonl/json/parquet through `datasets.load_dataset`), `hf` (a Hub id or a local dataset dir through
the same `datasets.load_dataset` call). Rows are streamed and never materialised as a whole.

Per row, in order: field extraction (missing_field / wrong_type), identical chosen/rejected, length
(too_short / too_long), printable ratio (non_printable), exact dedup by sha256 of the normalised text
(duplicate; the digests live on disk, tasks/data/dedup.py, so memory does not grow with the rows),
near-duplicate removal when ingest.near_dup.enabled (near_duplicate: MinHash LSH against the rows kept so
far, tasks/data/neardup.py), then caps. Reading stops at the first row over a cap; that row counts as
dropped `cap`.
Problems with the source as a whole (no such path, no such field, a non-text column type, bad bytes, a
corrupt file, no rows, nothing left) raise StageError, and data/raw/ is swapped in only when all three
datasets succeeded, so a failed run leaves the previous outputs untouched.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core import paths
from tasks.core.config import IngestConfig, Params, SourceConfig
from tasks.core.io import atomic_path, write_json
from tasks.core.stage import StageError, stage_main
from tasks.data.dedup import SeenDigests
from tasks.data.neardup import NearDuplicates
from tasks.data.records import EXTRACTORS, SCHEMAS, preview
from tasks.data.sources import (
    Source,
    check_schema,
    check_sources,
    open_source,
    ordered_batches,
    string_column,
)
from tasks.data.textclean import text_digests

log = logging.getLogger("tasks.ingest")  # not __name__: under `python -m` that is "__main__"

ROW_GROUP = 2000  # fixed row-group size: same rows -> same parquet bytes; also the rows read at a time
BATCH_CHARS = 8 << 20  # text extracted from dict rows per chunk

# drop reasons, in the order the filters run (see the module docstring)
REASONS: tuple[str, ...] = (
    "missing_field",
    "wrong_type",
    "identical_pair",
    "too_short",
    "too_long",
    "non_printable",
)
REASONS += ("duplicate", "near_duplicate", "cap")


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
        """`row` may be a function giving it: only the first row per reason is shown."""
        self.dropped[reason] += 1
        if reason not in self.examples:
            self.examples[reason] = f"row {index}: {preview(row() if callable(row) else row)}"

    def summary(self, description: str) -> dict[str, Any]:
        counts = {k: getattr(self, k) for k in ("rows_in", "rows_kept", "bytes_kept", "capped")}
        return {"source": description, **counts, "dropped": dict(self.dropped)}


def dataset_cap(dataset: str, cfg: IngestConfig) -> int:
    own = {"sft": cfg.max_sft_examples, "preference": cfg.max_preference_pairs}.get(dataset, 0)
    caps = [c for c in (cfg.max_documents, own) if c > 0]
    return min(caps) if caps else 0


class RowGroupWriter:
    """ParquetWriter in row groups of exactly ROW_GROUP rows however they arrive (same rows -> same bytes).
    Writes run in a thread (pyarrow encodes and compresses without the GIL), overlapping the reading and
    filtering of the next rows; one write in flight bounds the memory."""

    def __init__(self, out: Path, schema: pa.Schema) -> None:
        self.writer = pq.ParquetWriter(out, schema, compression="zstd")
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-write")
        self.tables: list[pa.Table] = []
        self.pending: Future | None = None

    def add(self, table: pa.Table | None) -> None:
        """Queue rows; None writes what is left."""
        self.tables += [] if table is None else [table]
        whole = pa.concat_tables(self.tables) if self.tables else None
        if whole is None or (table is not None and whole.num_rows < ROW_GROUP):
            return
        full = whole.num_rows - (whole.num_rows % ROW_GROUP if table is not None else 0)
        self.tables = [whole.slice(full)]
        for start in range(0, full, ROW_GROUP):
            if self.pending is not None:
                self.pending.result()
            group = whole.slice(start, min(ROW_GROUP, full - start)).combine_chunks()
            self.pending = self.pool.submit(self.writer.write_table, group)

    def close(self, ok: bool) -> None:
        try:
            if ok:
                self.add(None)
            if self.pending is not None:
                self.pending.result()
        finally:
            self.pool.shutdown()
            self.writer.close()


# Rows are filtered in chunks: (filter texts: string array, null where a row already has a drop reason;
# those reasons; the row at a position, for the example shown when all rows are dropped; a function making
# the output table from the kept positions and the index of the chunk's first row)
Chunk = tuple[pa.Array, list[str | None], Callable[[int], Any], Callable[[list[int], int], pa.Table]]


def _table_row(table: pa.Table, i: int) -> dict:
    return table.slice(i, 1).to_pylist()[0]


def _arrow_chunks(source: Source, workers: int) -> Iterator[Chunk]:
    """Pretrain text from a `datasets` string column, read as arrow batches: no dict per row, no copy;
    a source of many shards is read by `workers` threads, in its own order (sources.ordered_batches)."""
    for n, table in enumerate(ordered_batches(source.dataset, workers, ROW_GROUP)):
        if n == 0:
            check_schema("pretrain", source, dict.fromkeys(table.column_names))
        arr = table.column(source.text_field).combine_chunks().cast(pa.string())

        def build(kept: list[int], base: int, arr: pa.Array = arr) -> pa.Table:
            names = pa.array([f"{source.description}#{base + i}" for i in kept], pa.string())
            text = arr if len(kept) == len(arr) else arr.take(pa.array(kept, pa.int64()))
            return pa.Table.from_arrays([text, names], schema=SCHEMAS["pretrain"])

        yield arr, [None] * len(arr), functools.partial(_table_row, table), build


def _prefetched(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """The next chunk is read (arrow's JSON parser, without the GIL) while this one is filtered."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-read") as pool:
        ahead = pool.submit(next, chunks, None)
        while (chunk := ahead.result()) is not None:
            ahead = pool.submit(next, chunks, None)
            yield chunk


def _row_chunks(dataset: str, source: Source, cfg: IngestConfig, size: Callable[[], int]) -> Iterator[Chunk]:
    """Rows as dicts (embedded, txt, conversations, pairs, mixed-type columns), extracted one by one, size()
    rows or BATCH_CHARS of text a chunk. Lengths are checked here: a too long row is never copied."""
    extract, rows, index = EXTRACTORS[dataset], iter(source.rows), 0
    while True:
        batch, records, texts, pre, chars = [], [], [], [], 0
        for row in itertools.islice(rows, size()):
            check_schema(dataset, source, row) if index == 0 else None
            index += 1
            record, reason, text = extract(row, source.text_field)
            if reason is None and len(text) < cfg.min_chars:
                reason = "too_short"
            elif reason is None and cfg.max_chars and len(text) > cfg.max_chars:
                reason = "too_long"  # before any pass over the text: a huge row costs nothing more
            batch.append(row)
            records.append(record)
            pre.append(reason)
            texts.append(None if reason else text)
            chars += len(text)
            if chars >= BATCH_CHARS:
                break
        if not batch:
            return

        def build(kept: list[int], base: int, batch: list = batch, records: list = records) -> pa.Table:
            for i in kept:  # embedded and txt rows name their origin; a dataset's own columns are not trusted
                own = None if source.from_datasets else batch[i].get("source")
                records[i]["source"] = str(own or f"{source.description}#{base + i}")
            return pa.Table.from_pylist([records[i] for i in kept], schema=SCHEMAS[dataset])

        yield pa.array(texts, pa.string()), pre, batch.__getitem__, build


_DIGEST_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingest-digest")


def _digests(arr: pa.Array, min_printable_ratio: float) -> list[bytes | None]:
    """text_digests in two halves on two threads: numpy and sha256 of rows over 2 KB run without the GIL."""
    half = len(arr) // 2
    if half < 256:
        return text_digests(arr, min_printable_ratio)
    parts = [_DIGEST_POOL.submit(text_digests, a, min_printable_ratio) for a in (arr[:half], arr[half:])]
    return parts[0].result() + parts[1].result()


def filter_reasons(arr: pa.Array, pre: list[str | None], cfg: IngestConfig) -> tuple[list, list]:
    """Per row: its drop reason (`pre`, else missing_field, too_short, too_long, non_printable, in that
    order) and, for rows with none, the dedup key text_hash; vectorised over the chunk."""
    chars = pc.utf8_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    null, short = arr.is_null().to_numpy(zero_copy_only=False).tolist(), (chars < cfg.min_chars).tolist()
    long = (chars > cfg.max_chars).tolist() if cfg.max_chars else [False] * len(arr)
    reasons = [
        r or ("missing_field" if n else "too_short" if s else "too_long" if g else None)
        for r, n, s, g in zip(pre, null, short, long, strict=True)
    ]
    todo = [i for i, reason in enumerate(reasons) if reason is None]  # too long rows are not copied
    digests: list[bytes | None] = [None] * len(arr)
    subset = arr if len(todo) == len(arr) else arr.take(pa.array(todo, pa.int64()))
    for i, digest in zip(todo, _digests(subset, cfg.min_printable_ratio), strict=True):
        reasons[i], digests[i] = (None, digest) if digest else ("non_printable", None)
    return reasons, digests


def ingest_dataset(dataset: str, source: Source, cfg: IngestConfig, out: Path) -> Counts:
    """Filter source rows into the parquet file `out`; returns the counts. Pure apart from `out`."""
    cap, max_bytes = dataset_cap(dataset, cfg), cfg.max_bytes if dataset == "pretrain" else 0
    counts, index = Counts(), 0
    near = NearDuplicates(cfg.near_dup) if cfg.near_dup.enabled else None
    if dataset == "pretrain" and source.dataset is not None and string_column(source):
        chunks = _prefetched(_arrow_chunks(source, cfg.read_workers))
    else:  # reading no further than the row that may hit the cap
        chunks = _row_chunks(
            dataset, source, cfg, lambda: min(cap - counts.rows_kept + 1 if cap else ROW_GROUP, ROW_GROUP)
        )
    writer, ok = RowGroupWriter(out, SCHEMAS[dataset]), False
    seen = SeenDigests(out.parent)  # the digests of the rows so far, on disk: memory does not grow with them
    try:
        for arr, pre, row, build in chunks:
            reasons, digests = filter_reasons(arr, pre, cfg)
            todo = [i for i, reason in enumerate(reasons) if reason is None]
            first = dict(zip(todo, seen.first_occurrences([digests[i] for i in todo]), strict=True))
            nbytes = pc.binary_length(arr).fill_null(0).to_numpy(zero_copy_only=False).tolist()
            kept: list[int] = []
            for i, reason in enumerate(reasons):
                counts.rows_in += 1
                if cap and counts.rows_kept >= cap:
                    reason = "cap"
                elif reason is None:
                    reason = None if first[i] else "duplicate"
                    if reason is None and near is not None and near.seen(arr[i].as_py()):
                        reason = "near_duplicate"
                    if reason is None and max_bytes and counts.bytes_kept + nbytes[i] > max_bytes:
                        reason = "cap"
                if reason is None:
                    kept.append(i)
                    counts.rows_kept, counts.bytes_kept = counts.rows_kept + 1, counts.bytes_kept + nbytes[i]
                    continue
                counts.drop(reason, index + i, lambda i=i, row=row: row(i))
                if reason == "cap":  # reading stops at the first row over a cap
                    counts.capped = True
                    break
            writer.add(build(kept, index)) if kept else None
            index += len(reasons)
            if counts.capped:
                break
        ok = True
    except StageError:
        raise
    except Exception as exc:  # a bad page, a decode error or a network error while streaming
        raise StageError(
            f"dataset {dataset}: reading {source.description} failed after row {index}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        seen.close()
        writer.close(ok)
    if counts.rows_in == 0:
        raise StageError(f"dataset {dataset}: {source.description} is empty (no rows)")
    if counts.rows_kept == 0:
        dropped = ", ".join(f"{k}={v}" for k, v in counts.dropped.items() if v)
        examples = "; ".join(f"{k}: {v}" for k, v in counts.examples.items())
        msg = f"all {counts.rows_in} rows from {source.description} were dropped ({dropped}); e.g. {examples}"
        raise StageError(f"dataset {dataset}: {msg}")
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
            source = open_source(dataset, src, cfg.seed, cfg.max_chars)
            counts = ingest_dataset(dataset, source, cfg, tmp / f"{dataset}.parquet")
            summary[dataset] = counts.summary(source.description)
            dropped = {k: v for k, v in counts.dropped.items() if v}
            log.info(
                "ingest %s: kept %d of %d rows from %s; dropped %s",
                dataset,
                counts.rows_kept,
                counts.rows_in,
                source.description,
                dropped,
            )  # noqa: E501
        write_json(tmp / "summary.json", summary)
    metrics = flat_metrics(summary)
    write_json(paths.METRICS / "ingest.json", metrics)
    if tracker is not None:
        tracker.log_metrics(metrics)
        tracker.log_artifact(paths.RAW / "summary.json", "ingest")
    return summary


if __name__ == "__main__":
    stage_main("ingest", run)
