"""Stage `encode`: validated pretrain text -> data/tokens/{train,val}.bin + index.json.

Documents are streamed from parquet in record batches and encoded about BATCH_BYTES at a time with the
fast batch encoder (Rust, all cores, GIL released, overlapping the Python side of the previous batch);
each becomes [bos] + ids + [eos], assembled and split with numpy, not per token in Python. The train/val split is per document, from a stable hash of (seed, document index) computed
with vectorised splitmix64, so it never depends on batch sizes or thread scheduling, and the same input
gives the same shard bytes. Memory is bounded by two batches: the split is computed per batch (a first pass
over the indexes alone, in chunks, only finds which document to force into an empty split), and shards
are appended batch by batch.

Readers: `load_shard(split)` (memory-mapped) and `check_tokens(tokenizer)` from tasks.shards.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from tasks.core import paths
from tasks.core.config import Params
from tasks.core.io import atomic_path, read_json, stream_parquet, write_json
from tasks.core.skip import open_model_init, write_skipped
from tasks.core.stage import StageError, stage_main
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.data.shards import (
    INDEX,
    SPLITS,
    SplitPlan,
    check_tokens,
    hash_unit,
    hash_units,
    load_shard,
    shard_path,
    split_assignment,
    token_dtype,
)

__all__ = [
    "run",
    "split_assignment",
    "SplitPlan",
    "hash_unit",
    "hash_units",
    "encode_file",
    "load_shard",
    "check_tokens",
]

log = logging.getLogger("tasks.encode")  # not __name__: under `python -m` that is "__main__"

BATCH_ROWS = 1024  # rows read from parquet at a time
BATCH_BYTES = 1 << 20  # text per encode call: the encoder holds ~100 bytes per token until it returns


def frame_batch(encodings: list[Any], bos: int, eos: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """[bos] + ids + [eos] for every encoding, back to back, and each framed document's length."""
    lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings)) + 2
    out = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out[starts] = bos
    out[ends - 1] = eos
    body = np.ones(len(out), dtype=bool)
    body[starts] = False
    body[ends - 1] = False
    out[body] = np.fromiter(
        itertools.chain.from_iterable(e.ids for e in encodings), dtype=dtype, count=int(body.sum())
    )
    return out, lengths


def encode_file(
    source: Path, tok: ChatTokenizer, out_dir: Path, seed: int, val_fraction: float
) -> dict[str, Any]:
    """Encode `source` (parquet with a text column) into out_dir/{train,val}.bin; returns the counts."""
    pf = stream_parquet(source)
    plan = SplitPlan(pf.metadata.num_rows, seed, val_fraction)
    dtype = token_dtype(tok.vocab_size)
    bos, eos = tok.bos_id, tok.eos_id
    stats = {f"{s}_{k}": 0 for s in SPLITS for k in ("tokens", "docs", "bytes")}

    def texts() -> Iterator[tuple[int, Any, np.ndarray]]:
        """(first row index, text column, UTF-8 bytes per row), about BATCH_BYTES of text at a time."""
        index = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["text"]):
            column = batch.column(0)
            if column.null_count:
                raise StageError(
                    f"dataset pretrain: {source} has a null text in rows {index}..{index + len(column) - 1}"
                )
            sizes = pc.binary_length(column).to_numpy(zero_copy_only=False)
            start, total = 0, 0
            for i, size in enumerate(sizes.tolist()):
                total += size
                if total >= BATCH_BYTES or i == len(sizes) - 1:
                    yield index + start, column.slice(start, i + 1 - start), sizes[start : i + 1]
                    start, total = i + 1, 0
            index += len(column)

    def write(index: int, nbytes: np.ndarray, encodings: list[Any]) -> None:
        tokens, lengths = frame_batch(encodings, bos, eos, dtype)
        is_val = plan.is_val(index, index + len(nbytes))
        token_is_val = np.repeat(is_val, lengths)
        for split, doc_mask, tok_mask in (("val", is_val, token_is_val), ("train", ~is_val, ~token_is_val)):
            part = tokens[tok_mask]
            files[split].write(part.tobytes())
            stats[f"{split}_tokens"] += len(part)
            stats[f"{split}_docs"] += int(doc_mask.sum())
            stats[f"{split}_bytes"] += int(nbytes[doc_mask].sum())

    # One batch is encoded (Rust, GIL released, all cores) while the previous one is framed and written
    # here: at most two batches in memory, and the Python-side work hides behind the encoder.
    with contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(open(shard_path(s, out_dir), "wb")) for s in SPLITS}
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode"))
        pending: tuple[int, np.ndarray, Future[list[Any]]] | None = None
        for index, column, nbytes in texts():
            future = pool.submit(
                tok.tokenizer.encode_batch_fast, column.to_pylist(), add_special_tokens=False
            )
            if pending is not None:
                write(pending[0], pending[1], pending[2].result())
            pending = (index, nbytes, future)
        if pending is not None:
            write(pending[0], pending[1], pending[2].result())
    return {
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "tokenizer_fingerprint": tok.fingerprint,
        **stats,
        "bytes_in": stats["train_bytes"] + stats["val_bytes"],
        "seed": seed,
        "val_fraction": val_fraction,
    }


def run(params: Params, tracker: Any = None) -> dict[str, Any]:
    cfg = params.encode
    init = open_model_init(params)
    if init is not None:  # no pipeline tokenizer to encode with (tasks/core/skip.py)
        return write_skipped("encode", init, [paths.TOKENS], paths.METRICS / "encode.json")
    source = paths.validated("pretrain")
    if not source.exists():
        raise StageError(f"{source} not found; run the ingest and validate stages first")
    tok = ChatTokenizer.load(paths.TOKENIZER_JSON)
    recorded = paths.TOKENIZER_DIR / "fingerprint.json"
    if recorded.exists() and read_json(recorded).get("sha256") != tok.fingerprint:
        raise StageError(f"{paths.TOKENIZER_JSON} does not match {recorded}; re-run the tokenizer stage")
    with atomic_path(paths.TOKENS) as tmp:
        tmp.mkdir(parents=True)
        index = encode_file(source, tok, tmp, cfg.seed, cfg.val_fraction)
        if index["train_docs"] + index["val_docs"] == 0:
            raise StageError(f"dataset pretrain: {source} has no documents to encode")
        write_json(tmp / INDEX, index)
    metrics = {f"tokens/{s}": index[f"{s}_tokens"] for s in SPLITS}
    metrics.update({f"docs/{s}": index[f"{s}_docs"] for s in SPLITS})
    metrics["bytes_in"] = index["bytes_in"]
    metrics["bytes_per_token"] = round(
        index["bytes_in"] / max(1, index["train_tokens"] + index["val_tokens"]), 4
    )
    write_json(paths.METRICS / "encode.json", metrics)
    log.info(
        "encode: %d train / %d val tokens (%s)", index["train_tokens"], index["val_tokens"], index["dtype"]
    )
    if tracker is not None:
        tracker.log_metrics(metrics)
        tracker.log_artifact(paths.TOKENS / INDEX, "tokens")
    return index


if __name__ == "__main__":
    stage_main("encode", run)
