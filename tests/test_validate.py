"""The validate stage: one GX suite per dataset kind, Data Docs, failures that name rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import ingest, validate
from tasks.core.stage import StageError
from tests.datahelpers import (
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
    with pytest.raises(
        StageError, match=r"expect_table_row_count_to_be_between failed on the table: observed 1"
    ):
        validate.run(make_params(validate={"min_rows": 10}), None)
    Path("data/raw/preference.parquet").unlink()
    with pytest.raises(StageError, match="run the ingest stage first"):
        validate.run(make_params(), None)
