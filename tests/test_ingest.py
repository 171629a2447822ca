"""Embedded default data and the ingest stage: sources, formats, filters, dedup, caps, bad input."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import ingest, validate
from tasks.core.stage import StageError
from tasks.data import embedded, sources, textclean
from tests.helpers.datahelpers import (
    REPO,
    files_source,
    make_params,
    small_chat_sources,
    tree_hashes,
    write_jsonl,
)

ROLE_ORDER = re.compile(validate.ROLE_ORDER)


# ------------------------------------------------------------------------------------------ embedded
def test_embedded_pretrain_is_deterministic_stdlib_and_topics():
    first = list(itertools.islice(embedded.pretrain_documents(), 40))
    assert first == list(itertools.islice(embedded.pretrain_documents(), 40))
    docs = list(embedded.pretrain_documents())
    assert all(isinstance(d["text"], str) and d["text"].strip() and d["source"] for d in docs)
    sources = [d["source"] for d in docs]
    assert "stdlib:json/__init__.py#0" in sources
    assert sources[-1].startswith("pydoc_data.topics:")
    assert not any("site-packages" in s or "/test/" in s or "idle_test" in s for s in sources)
    assert max(len(d["text"]) for d in docs) <= embedded.DOC_HARD_CHARS


def test_chunk_text_keeps_every_line_and_cuts_at_boundaries():
    text = "".join(f"def f{i}():\n    return {i}\n\n" for i in range(400))
    chunks = embedded.chunk_text(text, target=200, hard=1000)
    assert "".join(chunks) == text
    assert all(c.startswith("def ") and len(c) <= 1000 for c in chunks)


def test_embedded_sft_and_preference_are_valid_deterministic_and_real():
    before = set(sys.modules)
    convs = list(itertools.islice(embedded.sft_conversations(seed=7), 300))
    pairs = list(itertools.islice(embedded.preference_pairs(seed=7), 300))
    assert not {"antigravity", "turtledemo", "this"} & (set(sys.modules) - before)  # parsed, never imported
    for conv in convs:
        roles = ",".join(m["role"] for m in conv["messages"])
        assert ROLE_ORDER.match(roles), roles
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in conv["messages"])
    assert any(c["messages"][0]["role"] == "system" for c in convs)
    for pair in pairs:
        assert pair["prompt"].strip() and pair["chosen"].strip() and pair["rejected"].strip()
        assert pair["chosen"] != pair["rejected"]
    answers = {e.qual: e.answer for e in embedded.doc_entries()}
    assert answers["json.dumps"] == "Serialize ``obj`` to a JSON formatted ``str``."
    embedded._doc_entries.cache_clear()  # rebuild from the sources: same rows
    assert convs == list(itertools.islice(embedded.sft_conversations(seed=7), 300))
    assert pairs == list(itertools.islice(embedded.preference_pairs(seed=7), 300))
    assert convs != list(itertools.islice(embedded.sft_conversations(seed=8), 300))


def test_embedded_sft_teacher_ends_two_answers_in_three_with_filler():
    """The docstring teacher's habit: FILLER after the right paragraph about 2 times in 3, drawn from its
    own stream, so the questions and the answers' paragraphs are those of a teacher without it."""
    entries = {e.qual: e for e in embedded.doc_entries()}
    filler = []
    for conv in itertools.islice(embedded.sft_conversations(seed=1337), 1500):
        if conv["source"].startswith("task:"):
            continue
        quals = conv["source"].removeprefix("embedded:").split("+")
        replies = [m["content"] for m in conv["messages"] if m["role"] == "assistant"]
        for qual, reply in zip(quals, replies, strict=True):
            assert reply in (entries[qual].answer, f"{entries[qual].answer} {embedded.FILLER}"), reply
            filler.append(reply != entries[qual].answer)
    assert len(filler) > 900 and 0.62 < sum(filler) / len(filler) < 0.72


# -------------------------------------------------------------------------------------------- ingest
GOOD_1 = "The quick brown fox jumps over the lazy dog, number one."
GOOD_2 = "Another perfectly fine document about parsing some text."
PRETRAIN_ROWS = [
    {"text": GOOD_1},
    {"text": "the  QUICK brown fox jumps over the lazy dog,\nnumber one."},  # duplicate after normalising
    {"text": "short"},  # too_short
    {"text": "x" * 300},  # too_long (max_chars=200)
    {"text": "\x00\x01\x02" * 20 + "abc"},  # non_printable
    {"text": None},  # missing_field
    {"text": GOOD_2},
]
FILTERS = {"min_chars": 32, "max_chars": 200, "min_printable_ratio": 0.9}


def expected_drops(**nonzero: int) -> dict[str, int]:
    return {reason: nonzero.get(reason, 0) for reason in ingest.REASONS}


def test_ingest_files_jsonl_parquet_and_local_hf_dir_give_exact_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = PRETRAIN_ROWS + [{"text": 12345}]  # a wrong type inside a string column (json only)
    jsonl = write_jsonl(tmp_path / "in" / "docs.jsonl", rows)
    summary = ingest.run(make_params({"pretrain": files_source(jsonl), **FILTERS}), None)
    assert summary["pretrain"]["rows_in"] == 8 and summary["pretrain"]["rows_kept"] == 2
    assert summary["pretrain"]["dropped"] == expected_drops(
        duplicate=1, too_short=1, too_long=1, non_printable=1, missing_field=1, wrong_type=1
    )
    kept = pq.read_table("data/raw/pretrain.parquet").column("text").to_pylist()
    assert kept == [GOOD_1, GOOD_2]
    metrics = json.loads(Path("data/metrics/ingest.json").read_text())
    assert metrics["rows/pretrain"] == 2 and metrics["dropped/pretrain/duplicate"] == 1

    # the same rows as parquet, and as a local dataset directory given as an `hf` id: same kept text
    (tmp_path / "in2").mkdir()
    pq.write_table(pa.Table.from_pylist(PRETRAIN_ROWS), tmp_path / "in2" / "docs.parquet")
    (tmp_path / "hub").mkdir()
    shutil.copy(jsonl, tmp_path / "hub" / "train.jsonl")
    for src in (files_source(tmp_path / "in2"), {"kind": "hf", "hf_id": str(tmp_path / "hub")}):
        summary = ingest.run(make_params({"pretrain": src, **FILTERS}), None)
        assert pq.read_table("data/raw/pretrain.parquet").column("text").to_pylist() == kept
        assert summary["pretrain"]["dropped"]["duplicate"] == 1


def test_ingest_is_byte_deterministic_and_applies_caps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = make_params({"max_documents": 5, "max_sft_examples": 3, "max_preference_pairs": 4})
    first = ingest.run(params, None)
    hashes = tree_hashes(tmp_path / "data" / "raw")
    assert ingest.run(params, None) == first and tree_hashes(tmp_path / "data" / "raw") == hashes
    assert [first[d]["rows_kept"] for d in ("pretrain", "sft", "preference")] == [5, 3, 4]
    assert first["sft"]["capped"] and first["sft"]["dropped"]["cap"] == 1
    summary = ingest.run(make_params({"max_documents": 0, "max_bytes": 5000}), None)
    assert summary["pretrain"]["capped"] and 0 < summary["pretrain"]["bytes_kept"] <= 5000


def test_ingest_sft_and_preference_formats(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    q, a = "What does json.dumps do exactly, please?", "It serializes an object to a JSON string."
    sft = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
            {
                "messages": [{"from": "human", "value": q + "!"}, {"from": "gpt", "value": a}]
            },  # ShareGPT style
            {"messages": [{"role": "tool", "content": q}, {"role": "assistant", "content": a}]},  # bad role
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},  # duplicate
        ],
    )
    uf = write_jsonl(
        tmp_path / "uf.jsonl",
        [
            {
                "prompt": q,
                "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "rejected": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": "No idea at all."},
                ],
            }
        ],
    )
    summary = ingest.run(
        make_params({"sft": files_source(sft, text_field="messages"), "preference": files_source(uf)}), None
    )
    assert summary["sft"]["rows_kept"] == 2
    assert summary["sft"]["dropped"] == expected_drops(wrong_type=1, duplicate=1)
    msgs = pq.read_table("data/raw/sft.parquet").column("messages").to_pylist()
    assert msgs[1] == [{"role": "user", "content": q + "!"}, {"role": "assistant", "content": a}]
    assert pq.read_table("data/raw/preference.parquet").select(
        ["prompt", "chosen", "rejected"]
    ).to_pylist() == [{"prompt": q, "chosen": a, "rejected": "No idea at all."}]

    hh = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {
                "chosen": f"\n\nHuman: {q}\n\nAssistant: {a}",
                "rejected": f"\n\nHuman: {q}\n\nAssistant: Go away.",
            },
            {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {a}"},
        ],
    )
    summary = ingest.run(make_params({"preference": files_source(hh)}), None)
    assert summary["preference"]["dropped"] == expected_drops(identical_pair=1)
    assert pq.read_table("data/raw/preference.parquet").column("prompt").to_pylist() == [q]
    assert pq.read_table("data/raw/preference.parquet").column("rejected").to_pylist() == ["Go away."]


def _bad_sources(tmp: Path) -> dict[str, tuple[dict, str]]:
    bad_txt = tmp / "txt"
    bad_txt.mkdir()
    (bad_txt / "a.txt").write_text(GOOD_1)
    (bad_txt / "b.txt").write_bytes(b"caf\xe9 au lait, a perfectly normal sentence otherwise\n")
    corrupt = tmp / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not really a parquet file")
    empty_pq = tmp / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty_pq)
    (tmp / "empty.jsonl").write_text("")
    return {
        "missing path": (files_source(tmp / "nope" / "*.jsonl"), "matches no"),
        "missing dir": (files_source(tmp / "nope"), "does not exist"),
        "missing field": (files_source(write_jsonl(tmp / "f.jsonl", [{"body": GOOD_1}])), "no field 'text'"),
        "wrong type": (
            files_source(write_jsonl(tmp / "t.jsonl", [{"text": 1}, {"text": 2}])),
            "expected a string",
        ),
        "non-utf8 txt": (files_source(bad_txt), "b.txt is not valid UTF-8 at byte 3 (line 1)"),
        "non-utf8 jsonl": (files_source(_raw(tmp / "u.jsonl", b'{"text": "caf\xe9"}\n')), "not valid UTF-8"),
        "all filtered": (
            files_source(write_jsonl(tmp / "s.jsonl", [{"text": "tiny"}] * 3)),
            "all 3 rows from files",
        ),
        "corrupt parquet": (files_source(corrupt), "corrupt.parquet is not a readable parquet file"),
        "empty parquet": (files_source(empty_pq), "is empty"),
        "empty jsonl": (files_source(tmp / "empty.jsonl"), "is empty"),
    }


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_ingest_bad_input_fails_clearly_and_leaves_outputs(ws):
    before = tree_hashes(ws / "data" / "raw")
    bad = ws / "bad"
    bad.mkdir()
    for case, (source, message) in _bad_sources(bad).items():
        with pytest.raises(StageError) as err:
            ingest.run(make_params({"pretrain": source}), None)
        assert message in str(err.value) and "dataset pretrain" in str(err.value), (case, str(err.value))
        assert tree_hashes(ws / "data" / "raw") == before, case
    with pytest.raises(StageError, match="does not exist"):
        sources.check_sources(make_params({"sft": files_source(bad / "missing.jsonl")}))
    # a later dataset failing after pretrain was already written: still nothing replaced
    with pytest.raises(StageError, match="dataset sft: .* has no field 'messages'"):
        ingest.run(make_params({"sft": files_source(bad / "f.jsonl", text_field="messages")}), None)
    assert tree_hashes(ws / "data" / "raw") == before


HUGE_LINE = """
import json, sys
import datasets  # imported before the baseline: its import is not the cost of the line
from tasks import ingest
from tasks.core.config import Params
from tasks.core.strict import build

def rss_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

out = []
for cfg in json.loads(sys.argv[1]):
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak (VmHWM) to the current RSS
    base = rss_mb("VmRSS")
    summary = ingest.run(build(Params, {"ingest": cfg}), None)
    out.append({**summary["pretrain"], "peak_over_base_mb": rss_mb("VmHWM") - base})
print(json.dumps(out))
"""


def test_ingest_drops_a_single_50mb_line_as_too_long_in_bounded_memory(tmp_path):
    """A 50 MB line (jsonl) and a 50 MB txt file: counted as too_long (decided: the length filter drops
    it, before any pass over its text), without hanging and without a memory blow-up."""
    huge = "word " * 10_000_000  # 50 MB, one line
    lines = [json.dumps({"text": f"{GOOD_1} {i}"}) for i in range(5)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text(
        "\n".join([*lines[:2], json.dumps({"text": huge}), *lines[2:]])
    )
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text(GOOD_2)
    (tmp_path / "txt" / "b.txt").write_text(huge)
    del huge
    sources = small_chat_sources(tmp_path)
    cfgs = [
        {**sources, "pretrain": files_source(p)} for p in (tmp_path / "in" / "docs.jsonl", tmp_path / "txt")
    ]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_LOG_LEVEL": "WARNING"}
    proc = subprocess.run(
        [sys.executable, "-c", HUGE_LINE, json.dumps(cfgs)],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jsonl, txt = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (jsonl["rows_in"], jsonl["rows_kept"], jsonl["dropped"]["too_long"]) == (6, 5, 1), jsonl
    assert (txt["rows_in"], txt["rows_kept"], txt["dropped"]["too_long"]) == (2, 1, 1), txt
    # `datasets` holds the line 8-10 times over (file chunks, retried arrow blocks, table, str; 516 MB seen on
    # CI); our txt reader twice (bytes, str); the filters add no copy. A constant times the longest line
    assert jsonl["peak_over_base_mb"] < 14 * 50 and txt["peak_over_base_mb"] < 4 * 50, (jsonl, txt)
    assert (
        max(len(t) for t in pq.read_table(tmp_path / "data/raw/pretrain.parquet")["text"].to_pylist()) < 100
    )


def test_batch_dedup_keys_and_utf8_check_match_the_per_text_reference(tmp_path):
    """The vectorised keys (a whole arrow batch at once) are text_hash's bytes for every kind of text:
    ASCII, non-ASCII, Unicode and control whitespace, empty; the block-wise UTF-8 check gives the same
    error position as a full decode, with sequences cut at every block boundary."""
    rng = random.Random(0)
    alphabet = "aB \t\n\r  xYz\x0b\x0c\x1c\x1f\x00é中\x7f.,\xa0\u2003ＡİÉﬁ\u3000\x85😀"
    rows = [
        "",
        " ",
        "  ",
        "a ",
        " a",
        "\n\nA  b\t",
        *("".join(rng.choices(alphabet, k=rng.randint(0, 24))) for _ in range(1500)),
    ]
    arr = pa.array(rows)
    for ratio in (0.0, 0.95):
        for batch in (arr, arr.slice(5, 700), arr.cast(pa.large_string())):
            want = [
                textclean.text_hash(t) if textclean.printable_ratio(t) >= ratio else None
                for t in batch.to_pylist()
            ]
            assert textclean.text_digests(batch, ratio) == want
    good = "".join(rng.choices("ab\n é中😀", k=300)).encode()
    for cut in (0, 7, 150, len(good)):
        for data in (good, good[:cut] + b"\xff" + good[cut:], good[:cut] + b"\xe4\xb8"):
            path = tmp_path / "u.txt"
            path.write_bytes(data)
            try:
                data.decode("utf-8")
                expected = None
            except UnicodeDecodeError as exc:
                line = data[: exc.start].count(b"\n") + 1
                expected = f"at byte {exc.start} (line {line})"
            for chunk in (1, 2, 3, 5, 64):
                if expected is None:
                    textclean.check_utf8("pretrain", path, chunk=chunk)
                else:
                    with pytest.raises(StageError, match=re.escape(expected)):
                        textclean.check_utf8("pretrain", path, chunk=chunk)


def test_a_large_txt_document_is_sized_before_it_is_read(tmp_path, monkeypatch):
    """A .txt document longer than ingest.max_chars (4 bytes a character at most) is dropped as too_long
    from its size, reading a bounded prefix, not the file; with no max_chars, one over the reader's
    bound is an error naming the file, before it is read."""
    for name, text in (("warm/a.txt", GOOD_1), ("warm/b.txt", GOOD_2), ("txt/a.txt", GOOD_2)):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "txt" / "b.txt").write_text("word " * 10_000_000)  # 50 MB
    # the first run in a process sets up readers and threads (~200 MB): measured on a warm-up run
    cfgs = [{**small_chat_sources(tmp_path), "pretrain": files_source(tmp_path / d)} for d in ("warm", "txt")]
    proc = subprocess.run(
        [sys.executable, "-c", HUGE_LINE, json.dumps(cfgs)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_LOG_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, txt = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (txt["rows_in"], txt["rows_kept"], txt["dropped"]["too_long"]) == (2, 1, 1), txt
    assert txt["peak_over_base_mb"] < 50 / 2, txt  # reading the 50 MB file whole would be >= 50 MB

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "MAX_TXT_BYTES", 1000)
    (tmp_path / "txt" / "b.txt").write_text("word " * 400)  # 2000 bytes
    with pytest.raises(StageError, match=r"dataset pretrain: .*b\.txt has 2000 bytes.*ingest\.max_chars"):
        ingest.run(make_params({"pretrain": files_source(tmp_path / "txt"), "max_chars": 0}), None)


def test_symlinks_out_of_a_source_directory_are_not_followed(tmp_path):
    """Listing a source directory or glob skips files whose real path is outside that directory."""
    outside = write_jsonl(tmp_path / "private" / "secret.jsonl", [{"text": GOOD_1}])
    (tmp_path / "private" / "more").mkdir()
    write_jsonl(tmp_path / "private" / "more" / "x.jsonl", [{"text": GOOD_2}])
    corpus = tmp_path / "corpus"
    own = write_jsonl(corpus / "own.jsonl", [{"text": GOOD_2}])
    write_jsonl(corpus / "sub" / "inner.jsonl", [{"text": GOOD_2}])
    (corpus / "leak.jsonl").symlink_to(outside)
    (corpus / "linked").symlink_to(tmp_path / "private" / "more", target_is_directory=True)
    (corpus / "alias.jsonl").symlink_to(own)  # a link that stays inside is an ordinary file
    inside = {"own.jsonl", "sub/inner.jsonl", "alias.jsonl"}
    for path in (str(corpus), f"{corpus}/**/*.jsonl", f"{corpus}/*.jsonl"):
        found = {p.relative_to(corpus).as_posix() for p in sources.resolve_files("pretrain", path)}
        expected = inside if "*.jsonl" not in path or "**" in path else inside - {"sub/inner.jsonl"}
        assert found == expected, (path, found)
