"""Where ingest reads from: embedded data, local files (txt/json/jsonl/parquet), or a `datasets` source.

`check_sources` refuses a bad source before any reading (missing path, unknown kind, missing hf_id);
`open_source` gives a `Source` whose rows stream in arrow batches (`ordered_batches`: the shards of a
many-file source read by several threads, in the source's row order); `check_schema` refuses a text field
that is missing or not a string column.
"""

import glob
import logging
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tasks.core import paths
from tasks.core.checks import glob_dir, linked_outside
from tasks.core.config import Params, SourceConfig
from tasks.core.stage import StageError
from tasks.data.textclean import check_utf8

log = logging.getLogger("tasks.ingest")

FILE_KINDS = {".txt": "txt", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # suffix -> reader
MAX_TXT_BYTES = 1 << 30  # a .txt document read whole (no ingest.max_chars) is at most this large


def resolve_files(dataset: str, path: str) -> list[Path]:
    """A file, a directory (all supported files below it) or a glob -> sorted files; StageError if none.
    Listing a directory or a glob does not follow symlinks out of the directory (the glob's part before
    its first wildcard): such files are skipped and named in a warning."""
    supported = sorted(FILE_KINDS)
    if not path:
        raise StageError(f"dataset {dataset}: source kind 'files' needs ingest.{dataset}.path")
    if any(ch in path for ch in "*?["):
        root = glob_dir(path) or "."
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
    elif Path(path).is_dir():
        root = path
        found = Path(path).rglob("*")
        files = sorted(
            p for p in found if p.is_file() and p.suffix in supported and not p.name.startswith(".")
        )
    elif Path(path).is_file():
        root, files = "", [Path(path)]  # a file named in params is read wherever a link takes it
    else:
        raise StageError(f"dataset {dataset}: source path {path!r} does not exist (ingest.{dataset}.path)")
    if root:
        outside = linked_outside(root, files)
        if outside:
            log.warning(
                "dataset %s: skipping %d file(s) linked from outside %s, e.g. %s",
                dataset,
                len(outside),
                root,
                ", ".join(str(p) for p in outside[:3]),
            )
            files = [p for p in files if p not in outside]
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


def _txt_rows(dataset: str, files: list[Path], max_chars: int) -> Iterator[dict]:
    """One row per file. A file of more than 4 * max_chars bytes has more than max_chars characters
    (UTF-8 uses at most 4 bytes a character): only that many bytes are read, enough for the length
    filter to drop it as too_long. With no max_chars, a file over MAX_TXT_BYTES is an error."""
    for p in files:
        check_utf8(dataset, p)  # streamed in blocks: bad bytes anywhere fail the source, as before
        size = p.stat().st_size
        if max_chars and size > 4 * max_chars:
            with open(p, "rb") as fh:
                head = fh.read(4 * max_chars + 4)
            yield {"text": head.decode("utf-8", errors="ignore"), "source": p.as_posix()}
            continue
        if size > MAX_TXT_BYTES:
            raise StageError(
                f"dataset {dataset}: {p} has {size} bytes, more than the {MAX_TXT_BYTES} a document may "
                "have to be read whole; set ingest.max_chars to drop documents that long, or split it"
            )
        yield {"text": p.read_bytes().decode("utf-8"), "source": p.as_posix()}


def _parquet_rows(dataset: str, p: Path) -> int:
    try:
        return pq.ParquetFile(p).metadata.num_rows  # reads the footer: a truncated or foreign file fails here
    except Exception as exc:
        raise StageError(f"dataset {dataset}: file {p} is not a readable parquet file: {exc}") from exc


def load_hf_dataset(
    name: str, config: str | None, split: str, streaming: bool, files: list | None = None
) -> Any:
    """The one `datasets.load_dataset` call used for Hub ids, local dataset dirs and json/parquet files."""
    import datasets  # heavy; only the stages that read sources pay for it

    datasets.disable_progress_bars()
    return datasets.load_dataset(name, config or None, data_files=files, split=split, streaming=streaming)


@dataclass
class Source:
    rows: Iterator[dict]
    description: str
    text_field: str
    features: Any = None
    from_datasets: bool = False
    dataset: Any = None  # the `datasets` object rows come from (read as arrow batches where it can be)


def open_source(dataset: str, src: SourceConfig, seed: int, max_chars: int = 0) -> Source:
    from tasks.data import embedded

    if src.kind == "embedded":
        rows = {"sft": embedded.sft_conversations, "preference": embedded.preference_pairs}.get(dataset)
        native = {"pretrain": "text", "sft": "messages", "preference": "prompt"}[dataset]
        return Source(rows(seed) if rows else embedded.pretrain_documents(), "embedded", native)
    if src.kind == "files":
        files = resolve_files(dataset, src.path)
        kind = _file_kind(dataset, files[0])
        desc = f"files {src.path} ({len(files)} {kind} file{'s' if len(files) > 1 else ''})"
        if kind == "txt":
            if dataset != "pretrain":
                raise StageError(
                    f"dataset {dataset}: txt files hold plain text; {dataset} needs jsonl or parquet"
                )
            return Source(_txt_rows(dataset, files, max_chars), desc, "text")
        if kind == "json":
            for p in files:
                check_utf8(dataset, p)
        else:  # `datasets` fails on a parquet file with no rows ("BatchSize must be greater than 0")
            files = [p for p in files if _parquet_rows(dataset, p) > 0]
            if not files:
                raise StageError(f"dataset {dataset}: {desc} is empty (no rows)")
        try:
            ds = load_hf_dataset(kind, None, "train", src.streaming, [str(p) for p in files])
        except StopIteration as exc:  # what `datasets` raises for a json file with no records
            raise StageError(f"dataset {dataset}: {desc} is empty (no rows)") from exc
        except Exception as exc:
            raise StageError(f"dataset {dataset}: cannot read {desc}: {type(exc).__name__}: {exc}") from exc
        return Source(iter(ds), desc, src.text_field, getattr(ds, "features", None), True, ds)
    if src.kind == "hf":
        if not src.hf_id:
            raise StageError(f"dataset {dataset}: source kind 'hf' needs ingest.{dataset}.hf_id")
        desc = f"hf {src.hf_id}" + (f"[{src.hf_config}]" if src.hf_config else "") + f" split {src.split}"
        try:
            ds = load_hf_dataset(src.hf_id, src.hf_config, src.split, src.streaming)
        except Exception as exc:
            raise StageError(f"dataset {dataset}: cannot load {desc}: {type(exc).__name__}: {exc}") from exc
        return Source(iter(ds), desc, src.text_field, getattr(ds, "features", None), True, ds)
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


def string_column(source: Source) -> bool:
    feature = source.features.get(source.text_field) if source.features is not None else None
    return type(feature).__name__ == "Value" and getattr(feature, "dtype", "") in ("string", "large_string")


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
    if type(feature).__name__ == "Value" and not string_column(source):
        raise StageError(
            f"dataset {dataset}: field {source.text_field!r} in {source.description} has type "
            f"{feature}, expected a string column"
        )


_DONE = object()
AHEAD = 4  # tables a group reads ahead of the consumer


def ordered_batches(ds: Any, workers: int, batch_rows: int) -> Iterator[Any]:
    """Arrow tables of a `datasets` IterableDataset, rows in the order one reader gives them.

    A source of several shards (its files, or a Hub dataset's data files) is cut into up to 4 * workers
    groups of consecutive shards, read by `workers` threads, one group each (pyarrow's JSON and parquet
    readers run without the GIL); tables come out group by group in order, so the rows, and ingest's
    output bytes, are those of one reader. A group buffers at most AHEAD tables, so memory is bounded by
    workers * AHEAD tables whatever the source's size. Groups, not shards: `datasets` lists every file
    to cut out one shard, so a reader per shard of thousands would cost O(shards^2) (8 s for 900 files).
    Table boundaries may differ from one reader's (a table never spans two groups); ingest does not
    depend on them. An error in a group is raised here when its turn comes."""
    n = min(getattr(ds, "num_shards", 1), 4 * workers)
    if workers <= 1 or n <= 1:
        yield from ds.with_format("arrow").iter(batch_size=batch_rows)
        return
    stop = threading.Event()

    def read(index: int, out: queue.Queue) -> None:
        try:
            shard = ds.shard(num_shards=n, index=index, contiguous=True).with_format("arrow")
            for table in shard.iter(batch_size=batch_rows):
                while not stop.is_set():  # a full queue waits; a consumer that stopped early frees it
                    try:
                        out.put(table, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(_DONE)
        except BaseException as exc:  # re-raised by the consumer, in its turn
            out.put(exc)

    pool = ThreadPoolExecutor(max_workers=min(workers, n), thread_name_prefix="ingest-shard")
    queues: list[queue.Queue] = []

    def start(index: int) -> None:
        if index < n:
            queues.append(queue.Queue(maxsize=AHEAD))
            pool.submit(read, index, queues[-1])

    try:
        for index in range(min(workers, n)):
            start(index)
        for index in range(n):
            while (item := queues[index].get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
            queues[index] = queue.Queue()  # drop the finished group's queue
            start(index + min(workers, n))
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
