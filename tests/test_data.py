"""Data stages: embedded data, ingest, validate (GX), tokenizer, encode. Fast: small fixtures in tmp_path."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import embedded, encode, ingest, tokenizer, validate
from tasks.config import Params, build
from tasks.shards import check_tokens, load_shard, token_dtype
from tasks.stage import StageError
from tasks.tokens import ChatTokenizer, TokenizerMismatch

REPO = Path(__file__).resolve().parents[1]
ROLE_ORDER = re.compile(validate.ROLE_ORDER)
SMALL_INGEST = {"max_documents": 60, "max_sft_examples": 20, "max_preference_pairs": 20}


def make_params(ingest_cfg: dict | None = None, **sections: dict) -> Params:
    return build(Params, {"ingest": {**SMALL_INGEST, **(ingest_cfg or {})}, **sections})


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def files_source(path: Path, **kw) -> dict:
    return {"kind": "files", "path": str(path), **kw}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """One full small run (embedded data -> ingest -> validate -> tokenizer -> encode), copied per test."""
    root = tmp_path_factory.mktemp("workspace")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    try:
        params = make_params(tokenizer={"vocab_size": 512})
        ingest.run(params, None)
        validate.run(params, None)
        tokenizer.run(params, None)
        encode.run(params, None)
    finally:
        mp.undo()
    return root


@pytest.fixture
def ws(workspace, tmp_path, monkeypatch) -> Path:
    shutil.copytree(workspace / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


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
        ingest.check_sources(make_params({"sft": files_source(bad / "missing.jsonl")}))
    # a later dataset failing after pretrain was already written: still nothing replaced
    with pytest.raises(StageError, match="dataset sft: .* has no field 'messages'"):
        ingest.run(make_params({"sft": files_source(bad / "f.jsonl", text_field="messages")}), None)
    assert tree_hashes(ws / "data" / "raw") == before


# ------------------------------------------------------------------------------------------ validate
def test_validate_passes_copies_bytes_and_writes_docs(ws):
    for dataset in ("pretrain", "sft", "preference"):
        assert sha(ws / "data" / "validated" / f"{dataset}.parquet") == sha(
            ws / "data" / "raw" / f"{dataset}.parquet"
        )
    report = json.loads((ws / "data" / "reports" / "validation.json").read_text())
    assert {d: r["success"] for d, r in report.items()} == {"pretrain": True, "sft": True, "preference": True}
    assert report["preference"]["expectations_evaluated"] == 8
    assert (ws / "data" / "reports" / "validation" / "index.html").exists()


def _write(path: str, rows: list[dict], schema: pa.Schema | None = None) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


@pytest.mark.parametrize("dataset", ["pretrain", "sft", "preference"])
def test_validate_failure_names_expectation_column_rows_and_keeps_validated(ws, dataset):
    before = tree_hashes(ws / "data" / "validated")
    good = "A perfectly ordinary line of text, long enough to pass."
    if dataset == "pretrain":
        rows = [
            {"text": good, "source": "a"},
            {"text": good, "source": "b"},
            {"text": "bad \x00\x01\x02\x03 bytes", "source": "c"},
        ]
        expected = [
            "expect_column_values_to_be_unique failed on column 'text' (2 of 3 rows)",
            "source='b'",
            "column 'printable_ratio'",
            "row 2:",
        ]
    elif dataset == "sft":
        u, a = {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}
        rows = [
            {"messages": [u, a], "source": "ok"},
            {"messages": [a, u], "source": "swapped"},
            {"messages": [u, a, u], "source": "ends-with-user"},
        ]
        expected = [
            "expect_column_values_to_match_regex failed on column 'roles' (2 of 3 rows)",
            "row 1: roles='assistant,user'",
            "row 2: roles='user,assistant,user'",
        ]
    else:
        rows = [
            {"prompt": "q?", "chosen": "yes", "rejected": "no", "source": "ok"},
            {"prompt": "q?", "chosen": "same", "rejected": "same", "source": "tie"},
        ]
        expected = [
            "expect_column_values_to_be_in_set failed on column 'chosen_differs' (1 of 2 rows)",
            "row 1: chosen_differs=False, chosen='same', rejected='same', source='tie'",
        ]
    _write(f"data/raw/{dataset}.parquet", rows, ingest.SCHEMAS[dataset])
    with pytest.raises(StageError) as err:
        validate.run(make_params(validate={"min_rows": 2}), None)
    message = str(err.value)
    assert f"dataset {dataset}:" in message and "data/validated/ left unchanged" in message
    for part in expected:
        assert part in message, (part, message)
    assert tree_hashes(ws / "data" / "validated") == before
    report = json.loads((ws / "data" / "reports" / "validation.json").read_text())
    assert report[dataset]["success"] is False and report[dataset]["expectations_failed"] >= 1


def test_validate_row_count_and_missing_raw(ws):
    _write(
        "data/raw/sft.parquet",
        [
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "source": "x",
            }
        ],
        ingest.SCHEMAS["sft"],
    )
    with pytest.raises(
        StageError, match=r"expect_table_row_count_to_be_between failed on the table: observed 1"
    ):
        validate.run(make_params(validate={"min_rows": 10}), None)
    Path("data/raw/preference.parquet").unlink()
    with pytest.raises(StageError, match="run the ingest stage first"):
        validate.run(make_params(), None)


# ----------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_is_deterministic_hf_loadable_and_matches_chat_template(ws):
    first = sha(ws / "data" / "tokenizer" / "tokenizer.json")
    fingerprint = tokenizer.run(make_params(tokenizer={"vocab_size": 512}), None)
    assert sha(ws / "data" / "tokenizer" / "tokenizer.json") == first == fingerprint["sha256"]
    assert json.loads((ws / "data" / "tokenizer" / "fingerprint.json").read_text())["vocab_size"] == 512

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    chat = ChatTokenizer.load(ws / "data" / "tokenizer")
    assert chat.pad_id == 0 and chat.vocab_size == 512
    fast = PreTrainedTokenizerFast(tokenizer_file=str(ws / "data" / "tokenizer" / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(ws / "data" / "tokenizer"))
    text = "def dumps(obj):\n    return 'Ünïcödé ✓ 中文'  # tabs\tand spaces  "
    assert (
        fast.encode(text, add_special_tokens=False)
        == chat.encode(text)
        == auto.encode(text, add_special_tokens=False)
    )
    assert auto.decode(chat.encode(text)) == text and auto.pad_token_id == 0
    conversations = [
        [
            {"role": "user", "content": "What does `json.dumps` do?"},
            {"role": "assistant", "content": " It serializes."},
        ],
        [
            {"role": "system", "content": "Be brief.\n"},
            {"role": "user", "content": "Hi  there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Again? ✓"},
            {"role": "assistant", "content": "Yes."},
        ],
    ]
    for messages in conversations:
        for gen in (False, True):
            ids = auto.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=gen, return_dict=False
            )
            assert list(ids) == chat.render_chat(messages, add_generation_prompt=gen)[0]


def test_tokenizer_vocab_too_small_fails_before_writing(ws):
    before = tree_hashes(ws / "data" / "tokenizer")
    with pytest.raises(StageError, match=r"vocab_size=263 is too small.*must be > 263"):
        tokenizer.run(make_params(tokenizer={"vocab_size": 263}), None)
    assert tree_hashes(ws / "data" / "tokenizer") == before


# -------------------------------------------------------------------------------------------- encode
def test_encode_is_deterministic_uint16_and_checks_fingerprint(ws):
    first = tree_hashes(ws / "data" / "tokens")
    index = encode.run(make_params(), None)
    assert tree_hashes(ws / "data" / "tokens") == first
    assert index["dtype"] == "uint16" and index["train_docs"] > 0 and index["val_docs"] > 0
    chat = ChatTokenizer.load(ws / "data" / "tokenizer")
    assert check_tokens(chat, ws / "data" / "tokens" / "index.json")["vocab_size"] == 512
    train, val = load_shard("train"), load_shard("val")
    assert (
        train.dtype == np.dtype("<u2")
        and len(train) == index["train_tokens"]
        and len(val) == index["val_tokens"]
    )
    assert train[0] == chat.bos_id and val[-1] == chat.eos_id
    assert (train == chat.bos_id).sum() == index["train_docs"]
    docs = pq.read_table("data/validated/pretrain.parquet").column("text").to_pylist()
    first_train = int(np.argmin(encode.split_assignment(len(docs), 1337, 0.05)))
    first_eos = int(np.argmax(train == chat.eos_id))
    assert chat.decode(train[1:first_eos].tolist()) == docs[first_train]

    other_dir = ws / "other"
    tokenizer.save_tokenizer(
        tokenizer.train_tokenizer(iter([docs[:10]]), make_params(tokenizer={"vocab_size": 300}).tokenizer),
        other_dir,
    )
    with pytest.raises(TokenizerMismatch, match="token shards"):
        check_tokens(ChatTokenizer.load(other_dir), ws / "data" / "tokens" / "index.json")


def test_split_assignment_and_dtype():
    assert encode.split_assignment(2, 0, 0.0).tolist().count(True) == 1
    assert encode.split_assignment(1, 0, 0.5).sum() <= 1
    many = encode.split_assignment(4000, 3, 0.25)
    assert 0.2 < many.mean() < 0.3 and (many == encode.split_assignment(4000, 3, 0.25)).all()
    assert token_dtype(65535) == np.dtype("<u2") and token_dtype(65536) == np.dtype("<u4")


def test_encode_shards_do_not_depend_on_batch_sizes_and_split_is_chunked(ws, monkeypatch):
    first = tree_hashes(ws / "data" / "tokens")
    monkeypatch.setattr(encode, "BATCH_ROWS", 7)
    monkeypatch.setattr(encode, "BATCH_BYTES", 3000)  # many encode calls, several per record batch
    monkeypatch.setattr(encode, "SCORE_CHUNK", 5)
    encode.run(make_params(), None)
    assert tree_hashes(ws / "data" / "tokens") == first
    plan = encode.SplitPlan(23, 3, 0.3)
    chunks = np.concatenate([plan.is_val(a, min(23, a + 4)) for a in range(0, 23, 4)])
    assert (chunks == encode.split_assignment(23, 3, 0.3)).all()
    assert encode.split_assignment(50, 1, 0.0).sum() == 1  # forced val, found across chunks
    assert not encode.split_assignment(50, 1, 0.999999).all()
    with pytest.raises(StageError, match="val_fraction=1.0"):
        encode.SplitPlan(10, 0, 1.0)


def test_encode_refuses_a_tokenizer_that_does_not_match_its_fingerprint(ws):
    before = tree_hashes(ws / "data" / "tokens")
    record = ws / "data" / "tokenizer" / "fingerprint.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "0" * 64}))
    with pytest.raises(StageError, match="does not match .*fingerprint.json; re-run the tokenizer stage"):
        encode.run(make_params(), None)
    assert tree_hashes(ws / "data" / "tokens") == before


CUSTOM_SPECIALS = {
    "vocab_size": 400,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "role_tokens": ["[SYS]", "[USR]", "[BOT]", "[EOT]"],
}


def test_tokenizer_special_tokens_come_from_params_and_match_transformers(ws):
    from transformers import AutoTokenizer

    fingerprint = tokenizer.run(make_params(tokenizer=CUSTOM_SPECIALS), None)
    assert fingerprint["special_tokens"] == {
        "pad": "<pad>",
        "bos": "<s>",
        "eos": "</s>",
        "system": "[SYS]",
        "user": "[USR]",
        "assistant": "[BOT]",
        "end": "[EOT]",
    }
    for where in (ws / "data" / "tokenizer", ws / "data" / "tokenizer" / "tokenizer.json"):
        chat = ChatTokenizer.load(where)
        assert (chat.pad_id, chat.bos_id, chat.eos_id, chat.end_id) == (0, 1, 2, 6)
        assert chat.tokenizer.id_to_token(chat.bos_id) == "<s>"
    bare = ws / "bare" / "tokenizer.json"  # a registered model's artifact: tokenizer.json alone
    bare.parent.mkdir()
    shutil.copy(ws / "data" / "tokenizer" / "tokenizer.json", bare)
    assert ChatTokenizer.load(bare).specials == chat.specials

    auto = AutoTokenizer.from_pretrained(str(ws / "data" / "tokenizer"))
    assert (auto.bos_token, auto.eos_token, auto.pad_token, auto.pad_token_id) == ("<s>", "</s>", "<pad>", 0)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does <|user|> mean here?"},  # a default token is plain text now
        {"role": "assistant", "content": "Nothing special."},
    ]
    for gen in (False, True):
        ids, mask = chat.render_chat(messages, add_generation_prompt=gen)
        assert list(auto.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False)) == ids
    rendered = chat.decode(ids, skip_special_tokens=False)
    assert rendered.startswith("<s>[SYS]Be brief.[EOT][USR]What does <|user|>") and rendered.endswith("[BOT]")
    assert chat.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "Nothing special."
    with pytest.raises(Exception, match="role tool is not one of"):
        auto.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)

    # encode uses the recorded bos/eos, not the defaults
    index = encode.run(make_params(), None)
    train = load_shard("train")
    assert train[0] == chat.bos_id and (train == chat.eos_id).sum() == index["train_docs"]


def test_tokenizer_bad_special_tokens_fail_before_writing(ws):
    before = tree_hashes(ws / "data" / "tokenizer")
    with pytest.raises(StageError, match=r"role_tokens must list 4 tokens"):
        tokenizer.run(make_params(tokenizer={"role_tokens": ["<|user|>", "<|assistant|>"]}), None)
    with pytest.raises(StageError, match=r"special tokens must be distinct"):
        tokenizer.run(make_params(tokenizer={"bos_token": "<|eos|>"}), None)
    assert tree_hashes(ws / "data" / "tokenizer") == before


# ------------------------------------------------------------------------------ subprocess-level checks
QA = ("What does json.dumps do exactly, please?", "It serializes an object to a JSON string.")


def small_chat_sources(root: Path) -> dict:
    """Tiny SFT and preference files, so a subprocess does not pay for deriving the embedded ones."""
    q, a = QA
    sft = write_jsonl(
        root / "sft.jsonl",
        [
            {"messages": [{"role": "user", "content": f"{q} {i}"}, {"role": "assistant", "content": a}]}
            for i in range(12)
        ],
    )
    pref = write_jsonl(
        root / "pref.jsonl",
        [{"prompt": f"{q} {i}", "chosen": a, "rejected": f"No idea {i}."} for i in range(12)],
    )
    return {
        "sft": files_source(sft, text_field="messages"),
        "preference": files_source(pref, text_field="prompt"),
    }


HUGE_LINE = """
import json, sys
import datasets  # imported before the baseline: its import is not the cost of the line
from tasks import ingest
from tasks.config import Params, build

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
    # `datasets` holds the line ~8 times over (file chunks, retried arrow blocks, table, str); our txt reader
    # twice (bytes, str); the filters add no copy. A constant times the longest line, not the file
    assert jsonl["peak_over_base_mb"] < 10 * 50 and txt["peak_over_base_mb"] < 4 * 50, (jsonl, txt)
    assert (
        max(len(t) for t in pq.read_table(tmp_path / "data/raw/pretrain.parquet")["text"].to_pylist()) < 100
    )


DETERMINISM = """
import json, shutil, sys
from pathlib import Path
from tasks import encode, ingest, tokenizer
from tasks.config import Params, build
params = build(Params, json.loads(sys.argv[1]))
ingest.run(params, None)
shutil.copytree("data/raw", "data/validated")  # validate copies these bytes (tested above); GX skipped here
tokenizer.run(params, None)
encode.run(params, None)
"""


def test_two_runs_in_separate_processes_give_identical_bytes(tmp_path, monkeypatch):
    """Same input -> identical parquet, tokenizer and shard hashes: one run here, one in a fresh process
    with another hash seed and a single encoder thread."""
    sources = small_chat_sources(tmp_path)
    cfg = {"ingest": {**sources, "max_documents": 100}, "tokenizer": {"vocab_size": 500}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PIPELINE_LOG_LEVEL": "WARNING",
        "PYTHONHASHSEED": "12345",
        "RAYON_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", DETERMINISM, json.dumps(cfg)],
        cwd=tmp_path / "a",
        env=full_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    monkeypatch.chdir(tmp_path / "b")
    params = build(Params, cfg)
    ingest.run(params, None)
    shutil.copytree("data/raw", "data/validated")
    tokenizer.run(params, None)
    encode.run(params, None)
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    hashes = [
        {d: tree_hashes(tmp_path / n / "data" / d) for d in ("raw", "tokenizer", "tokens")} for n in "ab"
    ]
    assert hashes[0] == hashes[1]
    assert set(hashes[0]["raw"]) == {"pretrain.parquet", "sft.parquet", "preference.parquet", "summary.json"}
    assert {"tokenizer.json", "tokenizer_config.json", "fingerprint.json"} <= set(hashes[0]["tokenizer"])
    assert {"train.bin", "val.bin", "index.json"} <= set(hashes[0]["tokens"])
