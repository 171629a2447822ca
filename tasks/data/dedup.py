"""Exact dedup in bounded memory: digests live in an SQLite table on disk, not in a Python set.

Digests held in memory cost ~100 bytes a row in a set (24 in numpy arrays), so a stage's peak RSS grows with
the corpus: gigabytes at real sizes. Here memory is SQLite's page cache (CACHE_KB) plus one chunk's digests,
whatever the number of rows; the table lives in a temporary directory (next to the stage's output when
given), deleted on close.

- SeenDigests (ingest): `first_occurrences(digests)` answers, for a chunk in row order, which rows are the
  first of their digest (counting every earlier chunk and earlier rows of the same chunk) and records them
  all: the same answers a `set` gives when each row is checked and then added.
- DigestRows (validate's whole-file uniqueness check): every row whose digest occurs more than once.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

CACHE_KB = 32 << 10  # SQLite page cache: the bound on this structure's memory
QUERY_PARAMS = 500  # below SQLite's limit on host parameters per statement


class _DiskTable:
    """An SQLite file in a temporary directory (removed on close), tuned for a throwaway index."""

    def __init__(self, workdir: Path | None, schema: str) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix=".dedup-", dir=workdir)
        self._db = sqlite3.connect(Path(self._dir.name) / "index.sqlite", isolation_level=None)
        # Durability is not needed (the file dies with the stage), speed is: no journal, no fsync.
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{CACHE_KB}", "temp_store=FILE"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute(schema)

    def _insert(self, sql: str, rows: Iterable[tuple]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany(sql, rows)
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SeenDigests(_DiskTable):
    """A disk-backed set of digests (bytes). Use as a context manager: the file is removed on exit."""

    def __init__(self, workdir: Path | None = None) -> None:
        super().__init__(workdir, "CREATE TABLE seen (digest BLOB PRIMARY KEY) WITHOUT ROWID")
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
            query = f"SELECT digest FROM seen WHERE digest IN ({marks})"
            known.update(r[0] for r in self._db.execute(query, part))
        new = [d for d in unique if d not in known]
        self._insert("INSERT INTO seen VALUES (?)", ((d,) for d in new))
        self.count += len(new)
        return [first[d] == i and d not in known for i, d in enumerate(digests)]


class DigestRows(_DiskTable):
    """(digest, row number) pairs on disk; `duplicated_rows` finds every row whose digest occurs twice or
    more, the whole-file uniqueness check of validate, in bounded memory."""

    def __init__(self, workdir: Path | None = None) -> None:
        super().__init__(workdir, "CREATE TABLE seen (digest BLOB, row INTEGER)")

    def add(self, digests: Sequence[bytes], rows: Sequence[int]) -> None:
        self._insert("INSERT INTO seen VALUES (?, ?)", zip(digests, map(int, rows), strict=True))

    def duplicated_rows(self) -> list[int]:
        """Sorted row numbers of every row whose digest is shared with another row."""
        self._db.execute("CREATE INDEX by_digest ON seen (digest)")
        query = (
            "SELECT row FROM seen WHERE digest IN "
            "(SELECT digest FROM seen GROUP BY digest HAVING COUNT(*) > 1) ORDER BY row"
        )
        return [r[0] for r in self._db.execute(query)]
