"""The tokenizer and encode stages: BPE from params, chat template, shards, fingerprints, determinism."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks import encode, ingest, tokenizer
from tasks.core.checks import check_params
from tasks.core.config import Params
from tasks.core.stage import StageError
from tasks.core.strict import ConfigError, build
from tasks.data import shards
from tasks.data.chat_tokenizer import ChatTokenizer, TokenizerMismatch
from tasks.data.shards import check_tokens, load_shard, token_dtype
from tests.helpers.datahelpers import (
    REPO,
    make_params,
    sha,
    small_chat_sources,
    tree_hashes,
)


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


def test_tokenizer_max_chars_trains_on_the_first_whole_documents_only(ws):
    docs = [t for t in pq.read_table("data/validated/pretrain.parquet").column("text").to_pylist() if t]
    cap = sum(len(t) for t in docs[:5]) - 1  # reached inside the 5th document: it is still taken whole
    budget = tokenizer.TextBudget(cap)
    taken = [
        t
        for batch in tokenizer.iter_text(ws / "data/validated/pretrain.parquet", batch_rows=2, budget=budget)
        for t in batch
    ]
    assert taken == docs[:5] and (budget.docs, budget.chars) == (5, cap + 1) and budget.spent

    metrics = json.loads(
        (ws / "data/metrics/tokenizer.json").read_text()
    )  # the fixture's run: no cap reached
    assert metrics["tokenizer/train_docs"] == metrics["tokenizer/corpus_docs"] == len(docs)
    tokenizer.run(make_params(tokenizer={"vocab_size": 300, "max_chars": cap}), None)
    metrics = json.loads((ws / "data/metrics/tokenizer.json").read_text())
    assert (metrics["tokenizer/train_docs"], metrics["tokenizer/train_chars"]) == (5, cap + 1)
    # the same tokenizer as training on exactly those five documents
    alone = tokenizer.train_tokenizer(iter([docs[:5]]), make_params(tokenizer={"vocab_size": 300}).tokenizer)
    assert (
        json.loads((ws / "data/tokenizer/tokenizer.json").read_text())["model"]
        == json.loads(alone.to_str())["model"]
    )
    with pytest.raises(ConfigError, match=r"tokenizer.max_chars"):
        check_params(make_params(tokenizer={"max_chars": -1}))


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
    monkeypatch.setattr(shards, "SCORE_CHUNK", 5)  # the split plan lives in tasks/data/shards.py
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
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="role tool is not one of"):
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


DETERMINISM = """
import json, shutil, sys
from pathlib import Path
from tasks import encode, ingest, tokenizer
from tasks.core.checks import check_params
from tasks.core.config import Params
from tasks.core.strict import ConfigError, build
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
