"""Stage `encode`: validated pretrain text -> data/tokens/{train,val}.bin + index.json.

Documents are streamed from parquet in record batches and encoded with the fast batch encoder; each
becomes [bos] + ids + [eos]. The train/val split is per document, from a stable hash of (seed, document
index), so it never depends on batch sizes or thread scheduling, and the same input gives the same
shard bytes. Shards are appended chunk by chunk, so memory stays bounded by one batch.

Readers: `load_shard(split)` (memory-mapped) and `check_tokens(tokenizer)` from tasks.shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from tasks import paths
from tasks.config import Params
from tasks.io import atomic_path, read_json, write_json
from tasks.shards import INDEX, SPLITS, check_tokens, load_shard, shard_path, token_dtype
from tasks.stage import StageError, stage_main
from tasks.tokens import ChatTokenizer

__all__ = ["run", "split_assignment", "encode_file", "load_shard", "check_tokens"]

log = logging.getLogger("tasks.encode")  # not __name__: under `python -m` that is "__main__"

BATCH_ROWS = 512


def hash_unit(seed: int, index: int) -> float:
    """A number in [0, 1) fixed by (seed, index): the same on every machine and Python version."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_assignment(n_docs: int, seed: int, val_fraction: float) -> np.ndarray:
    """Boolean array: True = the document goes to val. With >= 2 documents both splits are non-empty."""
    if not 0.0 <= val_fraction < 1.0:
        raise StageError(f"encode.val_fraction={val_fraction} must be in [0, 1)")
    scores = np.array([hash_unit(seed, i) for i in range(n_docs)], dtype=np.float64)
    is_val = scores < val_fraction
    if n_docs >= 2 and not is_val.any():
        is_val[int(np.argmin(scores))] = True  # evaluation needs held-out text even on tiny corpora
    if n_docs >= 2 and is_val.all():
        is_val[int(np.argmax(scores))] = False
    return is_val


def encode_file(
    source: Path, tok: ChatTokenizer, out_dir: Path, seed: int, val_fraction: float
) -> dict[str, Any]:
    """Encode `source` (parquet with a text column) into out_dir/{train,val}.bin; returns the counts."""
    pf = pq.ParquetFile(source)
    n_docs = pf.metadata.num_rows
    is_val = split_assignment(n_docs, seed, val_fraction)
    dtype = token_dtype(tok.vocab_size)
    bos, eos = tok.bos_id, tok.eos_id
    stats = {f"{s}_{k}": 0 for s in SPLITS for k in ("tokens", "docs", "bytes")}
    with contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(open(shard_path(s, out_dir), "wb")) for s in SPLITS}
        index = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["text"]):
            texts = batch.column(0).to_pylist()
            chunks: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
            for text, ids in zip(texts, tok.encode_batch(texts), strict=True):
                split = "val" if is_val[index] else "train"
                chunks[split].append(np.asarray([bos, *ids, eos], dtype=dtype))
                stats[f"{split}_tokens"] += len(ids) + 2
                stats[f"{split}_docs"] += 1
                stats[f"{split}_bytes"] += len(text.encode("utf-8"))
                index += 1
            for split, arrays in chunks.items():
                if arrays:
                    files[split].write(np.concatenate(arrays).tobytes())
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
