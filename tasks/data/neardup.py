"""Near-duplicate rows for ingest: MinHash LSH (datasketch) over word n-gram shingles.

A row is a near duplicate when a row kept before it has an estimated Jaccard similarity >= threshold
over their sets of shingles (`ngram` consecutive lowercased words; a shorter text is one shingle). LSH
(bands chosen by datasketch for the threshold) only proposes candidates; each is checked against its
stored signature, so an LSH false positive never drops a row. Rows are seen in order and only kept rows
are indexed, so the first row of a group stays. Permutations come from `seed` and shingles are hashed with
xxh32: the same rows in the same order drop the same rows on every machine.

Memory grows with the kept rows (the LSH index plus one signature per row, num_perm uint32 each): unlike
the rest of ingest this cannot be bounded without forgetting rows, and is why the option is off by default.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.core.config import NearDupConfig


def shingles(text: str, ngram: int) -> list[bytes]:
    """The distinct `ngram`-word shingles of text (lowercased, split on whitespace), in first-seen order."""
    words = text.lower().split()
    grams = (" ".join(words[i : i + ngram]) for i in range(max(1, len(words) - ngram + 1)))
    return [g.encode("utf-8") for g in dict.fromkeys(grams)]


class NearDuplicates:
    """`seen(text)`: True when text is a near duplicate of a text kept before; else it is remembered."""

    def __init__(self, cfg: NearDupConfig) -> None:
        import xxhash
        from datasketch import MinHash, MinHashLSH

        self.cfg = cfg
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        # one MinHash built once and copied per row: building one draws the permutations again
        self.empty = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=xxhash.xxh32_intdigest)
        self.signatures: list[np.ndarray] = []  # of the kept rows, by LSH key

    def signature(self, text: str) -> Any:
        m = self.empty.copy()
        m.update_batch(shingles(text, self.cfg.ngram))
        return m

    def similar(self, a: np.ndarray, b: np.ndarray) -> bool:
        return float(np.count_nonzero(a == b)) / len(a) >= self.cfg.threshold

    def seen(self, text: str) -> bool:
        m = self.signature(text)
        if any(self.similar(m.hashvalues, self.signatures[key]) for key in self.lsh.query(m)):
            return True
        self.lsh.insert(len(self.signatures), m, check_duplication=False)
        self.signatures.append(m.hashvalues)
        return False
