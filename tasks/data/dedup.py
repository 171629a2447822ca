"""Exact dedup in bounded memory: the digests of the rows kept so far live in an SQLite table on disk.

An in-memory set of sha256 digests costs ~100 bytes a row, so ingest's peak RSS grew with the corpus
(+8% from 250 MB to 1 GB, more at real sizes). Here memory is SQLite's page cache (CACHE_KB) plus one
chunk's digests, whatever the number of rows; the table is a B-tree keyed by the digest, in a temporary
file next to the stage's output, deleted on close.

`first_occurrences(digests)` answers, for a chunk in row order, which rows are the first of their digest
(counting every earlier chunk and earlier rows of the same chunk) and records them all: the same answers
a `set` gives when each row is checked and then added.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

CACHE_KB = 32 << 10  # SQLite page cache: the bound on this structure's memory
QUERY_PARAMS = 500  # below SQLite's limit on host parameters per statement


class SeenDigests:
    """A disk-backed set of digests (bytes). Use as a context manager: the file is removed on exit."""

    def __init__(self, workdir: Path) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix=".dedup-", dir=workdir)
        self._db = sqlite3.connect(Path(self._dir.name) / "seen.sqlite", isolation_level=None)
        # Durability is not needed (the file dies with the stage), speed is: no journal, no fsync.
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{CACHE_KB}", "temp_store=FILE"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE seen (digest BLOB PRIMARY KEY) WITHOUT ROWID")
        self.count = 0

    def first_occurrences(self, digests: Sequence[bytes]) -> list[bool]:
        """For each digest in order: True if no earlier row (this call or a previous one) had it."""
        first: dict[bytes, int] = {}  # digest -> its first index in this chunk
        for i, d in enumerate(digests):
            first.setdefault(d, i)
        unique = list(first)
        known: set[bytes] = set()
        for s in range(0, len(unique), QUERY_PARAMS):
            part = unique[s : s + QUERY_PARAMS]
            marks = ",".join("?" * len(part))
            known.update(
                r[0] for r in self._db.execute(f"SELECT digest FROM seen WHERE digest IN ({marks})", part)
            )
        new = [d for d in unique if d not in known]
        self._db.execute("BEGIN")
        self._db.executemany("INSERT INTO seen VALUES (?)", ((d,) for d in new))
        self._db.execute("COMMIT")
        self.count += len(new)
        return [first[d] == i and d not in known for i, d in enumerate(digests)]

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()

    def __enter__(self) -> SeenDigests:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
