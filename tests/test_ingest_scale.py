"""Ingest at scale: near-duplicate removal (MinHash LSH) and sources of many shards read in parallel."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import ingest
from tasks.core.config import NearDupConfig, resolve_params
from tasks.data import sources
from tests.helpers.datahelpers import (
    files_source,
    make_params,
    small_chat_sources,
    tree_hashes,
    write_jsonl,
)

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "theta",
    "kappa",
    "lambda",
    "sigma",
    "omega",
    "river",
    "stone",
    "cloud",
    "field",
]


def essay(rng: random.Random, n: int = 120) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(n))


def edit_words(text: str, every: int, word: str = "CHANGED") -> str:
    """Every `every`-th word replaced: 1 in 60 keeps most 5-word shingles, 1 in 4 keeps almost none."""
    return " ".join(word if i % every == 0 else w for i, w in enumerate(text.split()))


def near_dup_rows() -> tuple[list[dict], list[str]]:
    """Ten distinct essays, then an exact duplicate, three planted near duplicates of two of them and a
    near miss of a third; the rows that must stay, in order."""
    rng = random.Random(0)
    essays = [essay(rng) for _ in range(10)]
    planted = [
        edit_words(essays[2], 60),  # 2 words of 120 changed: Jaccard of 5-gram sets about 0.85
        essays[5].upper(),  # the same normalised text: an exact duplicate, counted as such
        "Preface. " + essays[5] + " The end.",  # a header and a footer: a few shingles more
        edit_words(essays[2], 60, "OTHER"),  # also near the dropped near duplicate: matched to essay 2
    ]
    near_miss = edit_words(essays[7], 4)  # a quarter of the words changed: shares few shingles
    rows = [{"text": t} for t in essays + planted + [near_miss]]
    return rows, essays + [near_miss]


def test_near_duplicates_are_dropped_and_counted_and_a_near_miss_stays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows, stays = near_dup_rows()
    src = files_source(write_jsonl(tmp_path / "in" / "docs.jsonl", rows))
    chat = small_chat_sources(tmp_path)  # the embedded ones take a while to derive
    cfg = {"pretrain": src, **chat, "max_chars": 0, "near_dup": {"enabled": True, "threshold": 0.7}}
    summary = ingest.run(make_params(cfg), None)
    assert summary["pretrain"]["dropped"]["near_duplicate"] == 3
    assert summary["pretrain"]["dropped"]["duplicate"] == 1  # exact dedup runs first
    assert pq.read_table("data/raw/pretrain.parquet").column("text").to_pylist() == stays
    metrics = json.loads(Path("data/metrics/ingest.json").read_text())
    assert metrics["dropped/pretrain/near_duplicate"] == 3
    first = Path("data/raw/pretrain.parquet").read_bytes()
    ingest.run(make_params(cfg), None)  # fixed permutations: the same rows dropped, the same bytes
    assert Path("data/raw/pretrain.parquet").read_bytes() == first

    # off (the default): every row stays, and the count is there as 0
    summary = ingest.run(make_params({"pretrain": src, **chat, "max_chars": 0}), None)
    assert summary["pretrain"]["rows_kept"] == len(rows) - 1  # the exact duplicate only
    assert summary["pretrain"]["dropped"]["near_duplicate"] == 0


@pytest.mark.parametrize("key, value", [("threshold", 0), ("threshold", 1.5), ("num_perm", 8), ("ngram", 0)])
def test_bad_near_dup_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"ingest.near_dup.{key}"):
        resolve_params("tiny", [f"ingest.near_dup.{key}={value}"])
    assert NearDupConfig().enabled is False


# ------------------------------------------------------------------------- many shards, read in parallel
def write_shards(root: Path, n: int, kind: str) -> Path:
    """n shards of 0-60 rows each, some rows repeated across shards (dedup then depends on the order)."""
    rng = random.Random(n)
    root.mkdir(parents=True)
    for i in range(n):
        rows = [{"text": f"shard {i} row {j}: {essay(rng, 12)}"} for j in range(rng.randrange(1, 60))]
        rows += [{"text": f"shared row {rng.randrange(8)}: the same text in several shards"}]
        if kind == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), root / f"part-{i:05d}.parquet", row_group_size=7)
        else:
            write_jsonl(root / f"part-{i:05d}.jsonl", rows)
    return root


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hf"])
def test_shards_read_in_parallel_give_the_bytes_of_one_reader(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    shards = write_shards(tmp_path / "in", 120, "parquet" if kind == "parquet" else "jsonl")
    src = {"kind": "hf", "hf_id": str(shards)} if kind == "hf" else files_source(shards)
    cfg = {"pretrain": src, **small_chat_sources(tmp_path), "max_chars": 0, "max_documents": 0}
    outputs = []
    for workers in (1, 4):
        summary = ingest.run(make_params({**cfg, "read_workers": workers}), None)
        outputs.append((summary, tree_hashes(tmp_path / "data" / "raw")))
    assert outputs[0] == outputs[1]
    assert summary["pretrain"]["dropped"]["duplicate"] >= 100  # the shared rows: order decides which stays


def test_ordered_batches_keeps_order_and_stops_its_threads(tmp_path):
    ds = sources.load_hf_dataset(
        "json",
        None,
        "train",
        True,
        sorted(map(str, write_shards(tmp_path / "in", 30, "jsonl").glob("*.jsonl"))),
    )
    assert ds.num_shards == 30
    one = pa.concat_tables(sources.ordered_batches(ds, 1, 16)).column("text").to_pylist()
    seen = set()
    four = []
    for table in sources.ordered_batches(ds, 4, 16):
        seen |= {t.name for t in threading.enumerate() if t.name.startswith("ingest-shard")}
        four += table.column("text").to_pylist()
    assert four == one and len(seen) > 1  # several readers ran, the rows came in one reader's order
    early = sources.ordered_batches(ds, 4, 16)
    next(early)
    early.close()  # a consumer that stops (a cap) ends the readers that wait on a full queue
    assert not [t for t in threading.enumerate() if t.name.startswith("ingest-shard")]


def test_disk_backed_dedup_answers_as_a_set_and_leaves_no_file(tmp_path):
    """Duplicates within a chunk, across chunks and across the QUERY_PARAMS batching of one chunk: every
    answer equals checking an in-memory set, then adding to it; the SQLite file is gone after close."""
    from tasks.data.dedup import QUERY_PARAMS, SeenDigests

    rng = random.Random(7)
    pool = [rng.randbytes(32) for _ in range(2 * QUERY_PARAMS)]
    chunks = [[rng.choice(pool) for _ in range(n)] for n in (5, 1, QUERY_PARAMS * 3, 0, 700)]
    reference: set[bytes] = set()
    with SeenDigests(tmp_path) as seen:
        for chunk in chunks:
            expected = []
            for d in chunk:
                expected.append(d not in reference)
                reference.add(d)
            assert seen.first_occurrences(chunk) == expected
        assert seen.count == len(reference) < sum(map(len, chunks))
        assert len(list(tmp_path.iterdir())) == 1
    assert list(tmp_path.iterdir()) == []


def test_disk_backed_digest_rows_finds_every_row_of_a_repeated_digest(tmp_path):
    from tasks.data.dedup import DigestRows

    rng = random.Random(3)
    pool = [rng.randbytes(16) for _ in range(300)]
    batches = [[rng.choice(pool) for _ in range(n)] for n in (200, 1, 0, 250)]
    with DigestRows(tmp_path) as table:
        row = 0
        for batch in batches:
            table.add(batch, range(row, row + len(batch)))
            row += len(batch)
        flat = [d for batch in batches for d in batch]
        expected = [i for i, d in enumerate(flat) if flat.count(d) > 1]
        assert table.duplicated_rows() == expected and 0 < len(expected) < len(flat)
    assert list(tmp_path.iterdir()) == []
