"""Text checks and dedup keys for ingest: UTF-8 validation with the position of a bad byte, the printable
ratio, and the normalised-text hash (NFKC, whitespace collapsed, lowercase), computed for whole arrow
batches at once (text_digests) with the same bytes as the per-text reference (text_hash)."""

from __future__ import annotations

import codecs
import hashlib
import re
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.core.stage import StageError

# ASCII characters that are neither printable nor newline/tab/CR; includes \x1c-\x1f, which str.split()
# treats as whitespace and bytes.split() does not
_ASCII_CONTROL = bytes([*range(0, 9), 11, 12, *range(14, 32), 127])
# byte -> its byte in the normalised form of a plain-ASCII text: A-Z lowered, tab/newline/CR -> space, and
# 0 for any other control or non-ASCII byte: such rows are normalised as str
_NORM = bytes(
    0 if b in _ASCII_CONTROL or b > 127 else 32 if b in (9, 10, 13) else b + 32 if 65 <= b <= 90 else b
    for b in range(256)
)
_TO_SPACE = bytes.maketrans(b"\t\n\r", b"   ")
# what str.split() splits on besides space, tab, newline and CR (U+3000 is the last whitespace character)
_OTHER_SPACE = re.compile(
    "[" + "".join(c for c in map(chr, range(0x3001)) if c.isspace() and c not in " \t\n\r") + "]"
)


def normalize(text: str) -> str:
    """NFKC, whitespace collapsed, lowercase: what 'the same text' means for dedup."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def text_hash(text: str) -> bytes:
    """The dedup key: sha256 of normalize(text). text_digests computes the same for whole batches."""
    return hashlib.sha256(normalize(text).encode("utf-8")).digest()


def _collapsed_digests(data: bytes, offsets: list[int]) -> list[bytes]:
    """sha256 per row of `data` (rows between offsets, whitespace already mapped to spaces) of the bytes of
    " ".join(row.split()), for all rows at once: each run of spaces is cut to its first byte (for a run
    that spans two rows, in the first row), then the one space a row may start or end with is cut."""
    a = np.frombuffer(data, np.uint8)
    solid, keep = a != 32, np.empty(len(a), dtype=bool)
    keep[:1] = True
    np.logical_or(solid[1:], solid[:-1], out=keep[1:])
    view, out, e, first = a[keep].data, [], 0, offsets[0]
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        s, e = e, e + int(np.count_nonzero(keep[start - first : end - first]))
        lo = s + 1 if e > s and view[s] == 32 else s
        out.append(hashlib.sha256(view[lo : e - 1 if e > lo and view[e - 1] == 32 else e]).digest())
    return out


def text_digests(arr: pa.Array, min_printable_ratio: float) -> list[bytes | None]:
    """text_hash of each row of a string array without nulls; None where printable_ratio is under the
    minimum. Plain-ASCII rows are normalised as bytes for the whole batch at once (NFKC is the identity on
    them, both splits agree); the others as str (NFKC, lower()), then the same way unless they hold
    whitespace other than space, tab, newline, CR (then text_hash itself)."""
    if not len(arr) or min_printable_ratio > 1.0:  # no text has a ratio over 1
        return [None] * len(arr)
    wide = pa.types.is_large_string(arr.type)
    offsets = np.frombuffer(
        arr.buffers()[1], np.int64 if wide else np.int32, len(arr) + 1, arr.offset * (8 if wide else 4)
    )
    first, last = int(offsets[0]), int(offsets[-1])
    data = memoryview(arr.buffers()[2] or b"")[first:last].tobytes().translate(_NORM)
    out: list[bytes | None] = list(_collapsed_digests(data, offsets.tolist()))
    zero = np.flatnonzero(np.frombuffer(data, np.uint8) == 0) + first
    other = {
        *(np.searchsorted(offsets, zero, side="right") - 1).tolist(),
        *np.flatnonzero(offsets[1:] == offsets[:-1]).tolist(),
    }
    redo, parts = [], []
    for i in sorted(other):  # non-ASCII, control characters or empty
        text = arr[i].as_py()
        # a text printable but for \t\n\r has ratio 1 and, after NFKC and lower(), no other whitespace
        clean = bool(text) and text.replace("\n", "").replace("\t", "").replace("\r", "").isprintable()
        if not clean and printable_ratio(text) < min_printable_ratio:
            out[i] = None
        elif not clean and _OTHER_SPACE.search(unicodedata.normalize("NFKC", text).lower()):
            out[i] = text_hash(text)
        else:  # lower() and split() commute: no character changes case to or from whitespace
            redo.append(i)
            parts.append(unicodedata.normalize("NFKC", text).lower().encode("utf-8").translate(_TO_SPACE))
    ends = np.cumsum([0] + [len(p) for p in parts]).tolist()
    for i, digest in zip(redo, _collapsed_digests(b"".join(parts), ends) if redo else [], strict=True):
        out[i] = digest
    return out


def printable_ratio(text: str) -> float:
    """Share of characters that are printable or ordinary whitespace (newline, tab, CR)."""
    if not text:
        return 0.0
    if text.isascii() and len(text.encode("ascii").translate(None, _ASCII_CONTROL)) == len(text):
        return 1.0
    if text.replace("\n", "").replace("\t", "").replace("\r", "").isprintable():  # C speed, any width
        return 1.0
    counts = Counter(text)  # count per distinct character, not one test per character
    ok = sum(n for ch, n in counts.items() if ch.isprintable() or ch in "\n\t\r")
    return ok / len(text)


def check_utf8(dataset: str, p: Path, chunk: int = 8 << 20) -> None:
    """StageError naming the file, byte offset and line of the first invalid UTF-8 sequence. Blocks are
    validated by arrow (SIMD, into one reused buffer); only a failing file is decoded again to find where."""
    buf, carry = bytearray(chunk + 4), 0
    with open(p, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(memoryview(buf)[carry : carry + chunk])
            end, k = carry + n, carry + n - 1
            while n and k > max(0, end - 4) and buf[k] & 0xC0 == 0x80:
                k -= 1
            cut = k if n and buf[k] >= 0xC0 else end  # a sequence cut at the block end waits for the next
            offsets = pa.py_buffer(np.array([0, cut], np.int32))
            try:
                pa.Array.from_buffers(pa.utf8(), 1, [None, offsets, pa.py_buffer(buf)]).validate(full=True)
            except pa.ArrowInvalid:
                return _find_bad_utf8(dataset, p)
            if not n:
                return
            buf[: end - cut], carry = buf[cut:end], end - cut


def _find_bad_utf8(dataset: str, p: Path, chunk: int = 1 << 20) -> None:
    decoder, offset, lines = codecs.getincrementaldecoder("utf-8")(), 0, 1  # bytes, lines before the block
    with open(p, "rb") as fh:
        while True:
            block, pending = (
                fh.read(chunk),
                decoder.getstate()[0],
            )  # pending: a sequence cut at the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                at, line = (
                    offset - len(pending) + exc.start,
                    lines + (pending + block)[: exc.start].count(b"\n"),
                )
                raise StageError(
                    f"dataset {dataset}: file {p} is not valid UTF-8 at byte {at} (line {line}): {exc.reason}; "
                    "re-encode it as UTF-8"
                ) from exc
            if not block:
                return
            offset, lines = offset + len(block), lines + block.count(b"\n")
