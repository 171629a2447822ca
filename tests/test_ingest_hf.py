"""Ingest from a Hugging Face dataset (`kind: hf`), laid out as on the Hub and made locally in the test.

The dataset directory declares two configs in its README.md (as Hub datasets do), one with a train and a
validation split, each split in two jsonl shards. `hf_config` and `split` choose exactly those rows,
streamed or not (`streaming: false` loads the whole split first); a missing `hf_id`, an unknown source
kind, config or split are named before any row is written; a shard that breaks mid-stream fails the
stage naming the source and the row it got to, and the previous outputs stay as they were.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks import ingest
from tasks.core.config import ConfigError, resolve_params
from tasks.core.stage import StageError
from tests.helpers.datahelpers import make_params, small_chat_sources, tree_hashes, write_jsonl

README = """---
configs:
- config_name: small
  data_files:
  - split: train
    path: small/train-*.jsonl
  - split: validation
    path: small/validation-*.jsonl
- config_name: large
  data_files:
  - split: train
    path: large/train-*.jsonl
- config_name: broken
  data_files:
  - split: train
    path: broken/train-*.jsonl
---
# a local dataset in the Hub's layout
"""
SIZES = {("small", "train"): 30, ("small", "validation"): 7, ("large", "train"): 45}


def texts(config: str, split: str, n: int) -> list[str]:
    return [f"{config} {split} document number {i}: the json module encodes and decodes." for i in range(n)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub") / "dataset"
    for (config, split), n in SIZES.items():
        rows = [{"text": t} for t in texts(config, split, n)]
        half = n // 2  # two shards per split
        write_jsonl(root / config / f"{split}-00000-of-00002.jsonl", rows[:half])
        write_jsonl(root / config / f"{split}-00001-of-00002.jsonl", rows[half:])
    good = [{"text": t} for t in texts("broken", "train", ingest.ROW_GROUP + 500)]  # over one read batch
    write_jsonl(root / "broken/train-00000-of-00002.jsonl", good)
    # the second shard breaks after its first row: a truncated download, say
    (root / "broken/train-00001-of-00002.jsonl").write_text(json.dumps(good[0]) + '\n{"text": "cut off\n')
    (root / "README.md").write_text(README)
    return root


def hf(hub: Path, **kw) -> dict:
    return {"kind": "hf", "hf_id": str(hub), **kw}


def params(pretrain: dict, root: Path, read_workers: int = 1):
    return make_params(
        {"pretrain": pretrain, **small_chat_sources(root), "max_documents": 0, "read_workers": read_workers}
    )


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize(("config", "split"), list(SIZES))
def test_hf_config_and_split_choose_exactly_their_rows(hub, tmp_path, monkeypatch, config, split, streaming):
    monkeypatch.chdir(tmp_path)
    source = hf(hub, hf_config=config, split=split, streaming=streaming)
    summary = ingest.run(params(source, tmp_path), None)["pretrain"]
    assert summary["source"] == f"hf {hub}[{config}] split {split}"
    expected = texts(config, split, SIZES[config, split])
    assert summary["rows_in"] == summary["rows_kept"] == len(expected)
    assert pq.read_table("data/raw/pretrain.parquet").column("text").to_pylist() == expected


@pytest.mark.parametrize(
    ("change", "config_error", "stage_error"),
    [
        (
            {"hf_id": ""},
            "ingest.pretrain.hf_id: source kind 'hf' needs",
            "source kind 'hf' needs ingest.pretrain.hf_id",
        ),
        ({"kind": "ftp"}, "ingest.pretrain.kind", "unknown source kind 'ftp' (embedded, files, hf)"),
        ({"hf_config": "medium"}, None, "cannot load hf {hub}[medium] split train"),
        ({"hf_config": "small", "split": "test"}, None, "cannot load hf {hub}[small] split test"),
    ],
)
def test_a_bad_hf_source_is_named_before_any_row_is_written(ws, hub, change, config_error, stage_error):
    """`pipeline params` refuses what it can see in params (exit 2, data/ untouched); the stage refuses the
    rest when it opens the source, before writing."""
    source = {**hf(hub, hf_config="small"), **change}
    if config_error:
        overrides = [f"ingest.pretrain.{k}={v}" for k, v in source.items()]
        with pytest.raises(ConfigError, match=re.escape(config_error)):
            resolve_params("tiny", overrides)
    before = tree_hashes(ws / "data")
    with pytest.raises(StageError, match=re.escape(stage_error.format(hub=hub))):
        ingest.run(params(source, ws), None)
    assert tree_hashes(ws / "data") == before


def test_a_shard_breaking_mid_stream_fails_naming_the_row_and_keeps_the_outputs(ws, hub):
    before = tree_hashes(ws / "data")
    with pytest.raises(StageError) as err:
        ingest.run(params(hf(hub, hf_config="broken"), ws, read_workers=2), None)
    message = str(err.value)
    assert message.startswith(f"dataset pretrain: reading hf {hub}[broken] split train failed after row "), (
        message
    )
    # the first shard (ingest.ROW_GROUP + 500 rows) was read and filtered before the break: with
    # ingest.read_workers > 1 each shard is read on its own, so no batch spans the two
    assert int(re.search(r"failed after row (\d+)", message).group(1)) == ingest.ROW_GROUP + 500
    assert tree_hashes(ws / "data") == before  # no partial parquet, no temp dir left
