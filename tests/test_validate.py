"""The validate stage: one GX suite per dataset kind, Data Docs, failures that name rows."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import ingest, validate
from tasks.core.config import ConfigError
from tasks.core.stage import StageError
from tasks.data.gx_batches import gx_context
from tests.helpers.datahelpers import (
    make_params,
    sha,
    tree_hashes,
)

ROLE_ORDER = re.compile(validate.ROLE_ORDER)


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
    before = tree_hashes(ws / "data/validated")  # the previous run's, kept when this one fails
    assert before
    with pytest.raises(
        StageError, match=r"expect_table_row_count_to_be_between failed on the table: observed 1"
    ):
        validate.run(make_params(validate={"min_rows": 10}), None)
    Path("data/raw/preference.parquet").unlink()
    with pytest.raises(StageError, match="run the ingest stage first"):
        validate.run(make_params(), None)
    assert tree_hashes(ws / "data/validated") == before


# ------------------------------------------------------------------------------------------ batches
N_ROWS = 40  # rows per crafted file; batch_mb=0.0003 gives batches of a few rows
BATCHED = {"min_rows": N_ROWS + 1, "max_chars": 80, "batch_mb": 0.0003}


def _ordinary(i: int) -> str:
    return f"Ordinary document number {i}, long enough to pass."


def _crafted(dataset: str) -> list[dict]:
    """N_ROWS rows with failures early, in the middle and in the last batches, nulls, and (pretrain)
    duplicates across batches: rows 3 and 33 equal; rows 5, 25 and 36 equal."""
    u, a = {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}
    rows: list[dict] = []
    for i in range(N_ROWS):
        if dataset == "pretrain":
            text: str | None = _ordinary(i)
            text = {33: _ordinary(3), 25: _ordinary(5), 36: _ordinary(5), 35: None}.get(i, text)
            text = {20: "", 12: "x" * 81, 38: "bad \x00\x01\x02\x03 bytes, late in the file"}.get(i, text)
            rows.append({"text": text, "source": f"s{i}"})
        elif dataset == "sft":
            messages = {2: [a, u], 37: [u, a, u], 30: [u, {"role": "assistant", "content": " "}], 15: None}
            rows.append({"messages": messages.get(i, [u, a]), "source": f"s{i}"})
        else:
            row: dict[str, str | None] = {
                "prompt": f"q{i}?",
                "chosen": "yes",
                "rejected": "no",
                "source": f"s{i}",
            }
            row.update({1: {"rejected": "yes"}, 39: {"rejected": "yes"}, 22: {"prompt": "  "}}.get(i, {}))
            row.update({10: {"rejected": None}}.get(i, {}))
            rows.append(row)
    return rows


CASES = {
    "pretrain": ("pretrain", lambda: _crafted("pretrain"), ingest.SCHEMAS["pretrain"]),
    "sft": ("sft", lambda: _crafted("sft"), ingest.SCHEMAS["sft"]),
    "preference": ("preference", lambda: _crafted("preference"), ingest.SCHEMAS["preference"]),
    "pretrain-empty": ("pretrain", lambda: [], ingest.SCHEMAS["pretrain"]),
    "pretrain-no-text-column": (
        "pretrain",
        lambda: [{"source": f"a source name as long as a short text {i}"} for i in range(N_ROWS)],
        pa.schema([("source", pa.string())]),
    ),
}


def _gx_on_whole_frame(dataset: str, frame, cfg, docs: Path):
    """What GX itself reports for the file read whole as one frame (the reference for the batches)."""
    import great_expectations as gx

    ctx = gx_context(docs)
    asset = ctx.data_sources.add_pandas("raw").add_dataframe_asset(name=dataset)
    definition = asset.add_batch_definition_whole_dataframe("all")
    suite = gx.ExpectationSuite(
        name=dataset, expectations=[validate._expectation(*s) for s in validate.suite_specs(dataset, cfg)]
    )
    batch = definition.get_batch(batch_parameters={"dataframe": validate.add_helper_columns(dataset, frame)})
    return batch.validate(suite, result_format=validate.RESULT_FORMAT)


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_results_equal_gx_on_the_whole_file(tmp_path, monkeypatch, case):
    dataset, make_rows, schema = CASES[case]
    monkeypatch.chdir(tmp_path)
    Path("data/raw").mkdir(parents=True)
    path = f"data/raw/{dataset}.parquet"
    pq.write_table(pa.Table.from_pylist(make_rows(), schema=schema), path, row_group_size=16)
    cfg = make_params(validate=BATCHED).validate
    whole = _gx_on_whole_frame(dataset, pq.read_table(path).to_pandas(), cfg, tmp_path / "whole")

    ctx = gx_context(tmp_path / "docs")
    batched, _, total = validate.validate_dataset(
        ctx, ctx.data_sources.add_pandas("raw"), dataset, pq.ParquetFile(path), cfg
    )
    rows = pq.ParquetFile(path).metadata.num_rows
    assert total == rows
    if rows:  # several batches, or the test proves nothing about combining them
        assert batched.meta["batch_markers"]["batches"] >= 4
    assert [r.expectation_config.type for r in batched.results] == [
        r.expectation_config.type for r in whole.results
    ]
    for ours, ref in zip(batched.results, whole.results, strict=True):
        name = ref.expectation_config.type
        assert ours.expectation_config.kwargs == ref.expectation_config.kwargs, name
        assert ours.success == ref.success, name
        assert ours.result == ref.result, (name, ours.result, ref.result)
        for key in ("raised_exception", "exception_message"):
            assert ours.exception_info.get(key) == ref.exception_info.get(key), (name, key)
    assert batched.statistics == whole.statistics and batched.success == whole.success
    if case != "pretrain-empty":
        assert not whole.success  # every crafted file fails somewhere: the comparison covers failures

    # the readable failures are the same whether the file is read in one batch or in many
    reports = {
        mb: validate.run_suites(
            {dataset: pq.ParquetFile(path)}, replace(cfg, batch_mb=mb), tmp_path / f"d{mb}"
        )
        for mb in (cfg.batch_mb, 1000.0)
    }
    assert reports[cfg.batch_mb] == reports[1000.0]


def test_late_failure_and_duplicates_across_batches_are_reported(ws):
    """A file of many batches: a bad row only in the last batch and duplicates whose two rows lie in the
    first and the last batch are both reported with their rows; data/validated/ keeps its bytes."""
    before = tree_hashes(ws / "data" / "validated")
    _write("data/raw/pretrain.parquet", _crafted("pretrain"), ingest.SCHEMAS["pretrain"])
    with pytest.raises(StageError) as err:
        validate.run(make_params(validate=BATCHED), None)
    message = str(err.value)
    expected = [
        f"expect_column_values_to_be_unique failed on column 'text' (5 of {N_ROWS} rows); "
        f"row 3: text={_ordinary(3)!r}, source='s3'; row 5: text={_ordinary(5)!r}, source='s5'; "
        f"row 25: text={_ordinary(5)!r}, source='s25'",
        f"expect_column_values_to_be_between failed on column 'printable_ratio' (2 of {N_ROWS} rows)",
        "row 38: printable_ratio=",
        "source='s38'",
        f"expect_column_values_to_not_be_null failed on column 'text' (1 of {N_ROWS} rows); row 35:",
        f"expect_table_row_count_to_be_between failed on the table: observed {N_ROWS}",
    ]
    for part in expected:
        assert part in message, (part, message)
    assert tree_hashes(ws / "data" / "validated") == before
    report = json.loads((ws / "data" / "reports" / "validation.json").read_text())
    assert report["pretrain"]["rows"] == N_ROWS and report["pretrain"]["success"] is False


def test_validate_memory_is_bounded_by_the_batch_not_the_file(ws):
    """Arrow's allocations (parquet reads, the pandas str columns) peak at about one batch or row group,
    whichever is larger: read whole, the 3 MB of text is allocated at once (measured: 10.9 MB), three
    times the bound below; in 0.1 MB batches of 64-row groups the peak is about half the bound."""
    text = "A perfectly ordinary line of text, long enough to pass the checks. " * 30
    rows = [{"text": f"{i} {text}", "source": "s"} for i in range(1500)]
    text_bytes = sum(len(r["text"]) for r in rows)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=ingest.SCHEMAS["pretrain"]),
        "data/raw/pretrain.parquet",
        row_group_size=64,
    )
    pool = pa.proxy_memory_pool(pa.default_memory_pool())  # its own peak, from zero
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        report = validate.run(make_params(validate={"batch_mb": 0.1}), None)
    finally:
        pa.set_memory_pool(previous)
    assert report["pretrain"]["success"] and report["pretrain"]["rows"] == len(rows)
    assert sha(ws / "data" / "validated" / "pretrain.parquet") == sha(
        ws / "data" / "raw" / "pretrain.parquet"
    )
    assert pool.max_memory() < text_bytes / 3, (pool.max_memory(), text_bytes)


def test_batch_mb_must_be_positive():
    with pytest.raises(ConfigError, match=r"validate.batch_mb must be > 0, got 0"):
        make_params(validate={"batch_mb": 0})
