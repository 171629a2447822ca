"""Token shards as downstream stages read them: data/tokens/{train,val}.bin + index.json.

Each .bin file is a flat little-endian array of token ids (uint16 when the vocabulary fits, else
uint32): every document is [bos] + ids + [eos], documents back to back. index.json records the dtype,
the counts and the fingerprint of the tokenizer that made them. Light on purpose (numpy only), so
training stages can import it without pulling in pyarrow or tokenizers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.core import paths
from tasks.core.stage import StageError
from tasks.data.chat_tokenizer import ChatTokenizer, read_index

SPLITS = ("train", "val")
INDEX = "index.json"
SCORE_CHUNK = 1 << 20  # indexes scored at a time when planning the split
_M64 = (1 << 64) - 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the shard size whenever every id fits (vocab <= 65535); explicit little-endian."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def shard_path(split: str, tokens_dir: Path = paths.TOKENS) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(tokens_dir) / f"{split}.bin"


def load_shard(split: str, tokens_dir: Path = paths.TOKENS) -> np.ndarray:
    """The split's token ids, memory-mapped read-only (an empty array for an empty split)."""
    return read_shard(shard_path(split, tokens_dir))


def read_shard(path: Path) -> np.ndarray:
    """A token shard as a read-only little-endian memmap, checked against the index.json beside it."""
    path = Path(path)
    index = read_index(path.parent / INDEX)
    dtype = np.dtype(index["dtype"]).newbyteorder("<")  # shards are little-endian on every machine
    if dtype not in (np.dtype("<u2"), np.dtype("<u4")):
        raise ValueError(f"{path.parent / INDEX}: token dtype must be uint16 or uint32, got {index['dtype']}")
    if not path.exists():
        raise FileNotFoundError(f"token shard {path} not found; run the encode stage first")
    size = path.stat().st_size
    expected = index.get(f"{path.stem}_tokens", size // dtype.itemsize)  # older indexes lack the counts
    if size % dtype.itemsize or size // dtype.itemsize != expected:
        raise ValueError(f"{path} has {size} bytes, but {INDEX} says {expected} {dtype.name} tokens")
    if size == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def check_tokens(tokenizer: ChatTokenizer, index_path: Path = paths.TOKENS / INDEX) -> dict:
    """The shard index, after checking the shards were made by this tokenizer (TokenizerMismatch if not)."""
    index = read_index(Path(index_path))
    tokenizer.check_fingerprint(index["tokenizer_fingerprint"], f"token shards {index_path}")
    return index


# ------------------------------------------------------------------ the train/val split of documents
# (encode writes the shards by it; evaluate finds the same held-out documents for a model with its own
# tokenizer, tasks/evaluate.py)


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
