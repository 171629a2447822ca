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
from tasks.data.chat_tokenizer import ChatTokenizer, read_index

SPLITS = ("train", "val")
INDEX = "index.json"


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
