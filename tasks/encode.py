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
import pyarrow.parquet as pq

from tasks.core import paths
from tasks.core.config import Params
from tasks.core.io import atomic_path, read_json, write_json
from tasks.core.stage import StageError, stage_main
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.data.shards import INDEX, SPLITS, check_tokens, load_shard, shard_path, token_dtype

__all__ = ["run", "split_assignment", "encode_file", "load_shard", "check_tokens"]

log = logging.getLogger("tasks.encode")  # not __name__: under `python -m` that is "__main__"

BATCH_ROWS = 1024  # rows read from parquet at a time
BATCH_BYTES = 1 << 20  # text per encode call: the encoder holds ~100 bytes per token until it returns
SCORE_CHUNK = 1 << 20  # indexes scored at a time when planning the split
_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic): a well-mixed, portable hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_units(seed: int, start: int, stop: int) -> np.ndarray:
    """Numbers in [0, 1) fixed by (seed, index) for index in [start, stop): the same on every machine."""
    key = _splitmix64(np.array([seed & _M64], dtype=np.uint64))
    x = _splitmix64(np.arange(start, stop, dtype=np.uint64) ^ key)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def hash_unit(seed: int, index: int) -> float:
    return float(hash_units(seed, index, index + 1)[0])


class SplitPlan:
    """Which documents go to val, computed per range of indexes, so memory does not grow with the corpus.

    A document is val when its hash unit is < val_fraction. With >= 2 documents both splits are
    non-empty: if no document is val, the lowest-scoring one is; if all are, the highest-scoring one
    is train (found by one pass over the indexes alone, SCORE_CHUNK at a time).
    """

    def __init__(self, n_docs: int, seed: int, val_fraction: float) -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise StageError(f"encode.val_fraction={val_fraction} must be in [0, 1)")
        self.n_docs, self.seed, self.val_fraction = n_docs, seed, val_fraction
        self.force_val: int | None = None
        self.force_train: int | None = None
        if n_docs < 2:
            return
        any_val, all_val = False, True
        lo, lo_at, hi, hi_at = 2.0, -1, -1.0, -1
        for start in range(0, n_docs, SCORE_CHUNK):
            scores = hash_units(seed, start, min(n_docs, start + SCORE_CHUNK))
            val = scores < val_fraction
            any_val, all_val = any_val or bool(val.any()), all_val and bool(val.all())
            i, j = int(np.argmin(scores)), int(np.argmax(scores))
            if scores[i] < lo:
                lo, lo_at = float(scores[i]), start + i
            if scores[j] > hi:
                hi, hi_at = float(scores[j]), start + j
        if not any_val:
            self.force_val = lo_at  # evaluation needs held-out text even on tiny corpora
        if all_val:
            self.force_train = hi_at

    def is_val(self, start: int, stop: int) -> np.ndarray:
        """Boolean array for documents [start, stop): True = val."""
        mask = hash_units(self.seed, start, stop) < self.val_fraction
        for index, value in ((self.force_val, True), (self.force_train, False)):
            if index is not None and start <= index < stop:
                mask[index - start] = value
        return mask


def split_assignment(n_docs: int, seed: int, val_fraction: float) -> np.ndarray:
    """Boolean array over all documents: True = the document goes to val (see SplitPlan)."""
    return SplitPlan(n_docs, seed, val_fraction).is_val(0, n_docs)


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
    pf = pq.ParquetFile(source)
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
