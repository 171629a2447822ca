"""Great Expectations results over record batches, combined into the result GX gives for the whole data.

A per-row ("map") expectation's SUMMARY result is fixed by five things: the row count, the non-null
count, the unexpected count, and the first few unexpected values and their row numbers. Summed and
concatenated over batches in file order (each batch indexed by row number in the file) they give the
whole-file result, built here as GX's own formatter builds it (`map_result`). Results that are not
per-row (e.g. a column type read from the dtype) pass only if every batch passes.

Uniqueness is not per-row: `Duplicates` keeps a 128-bit BLAKE2b digest and the row number of every
non-null value, on disk (tasks/data/dedup.py), and finds, at the end, the rows whose value occurs more
than once in the whole file, which is GX's `duplicated(keep=False)` over the non-null values. Strings are
digested as UTF-8, any other value (a parquet column holds one type) by its repr.

`gx_context` and `store_result`: the ephemeral GX context, and keeping a combined result in it the way
a ValidationDefinition keeps its own, so Data Docs show it.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import hashlib
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.data.dedup import DigestRows


def map_result(
    elements: int, nonnull: int | None, unexpected: int, values: list, rows: list[int], limit: int
) -> dict[str, Any]:
    """A map expectation's SUMMARY result from its totals, field for field as GX's _format_map_output
    makes it. nonnull is None for expectations that GX reports without missing counts (not-null)."""
    values, rows = values[:limit], rows[:limit]
    total = nonmissing = missing = None
    if elements > 0:
        total = unexpected / elements * 100
        if nonnull is None:
            nonmissing = total
        else:
            missing = (elements - nonnull) / elements * 100
            nonmissing = unexpected / nonnull * 100 if nonnull > 0 else None
    out: dict[str, Any] = {
        "element_count": elements,
        "unexpected_count": unexpected,
        "unexpected_percent": nonmissing,
        "partial_unexpected_list": values,
    }
    if nonnull is not None:
        out["missing_count"] = elements - nonnull
        out["missing_percent"] = missing
        out["unexpected_percent_total"] = total
        out["unexpected_percent_nonmissing"] = nonmissing
    try:  # counts among the listed values (GX counts the same partial list), most common first
        common = sorted(Counter(values).most_common(limit), key=lambda vc: (-vc[1], vc[0]))
        out["partial_unexpected_counts"] = [{"value": v, "count": c} for v, c in common]
    except TypeError:  # unhashable or unorderable values: GX leaves the counts out too
        pass
    out["partial_unexpected_index_list"] = rows
    return out


class Tally:
    """One expectation's results over the batches (GX ExpectationValidationResult objects, in file order)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.first: Any = None  # the first batch's result
        self.failed: Any = None  # the first result that failed (or raised)
        self.raised: Any = None  # the first result whose expectation raised
        self.per_row = True  # every batch gave a map result
        self.elements, self.unexpected = 0, 0
        self.nonnull: int | None = 0
        self.values: list = []
        self.rows: list[int] = []

    def add(self, res: Any) -> None:
        if self.first is None:
            self.first = res
        if not res.success and self.failed is None:
            self.failed = res
        if (res.exception_info or {}).get("raised_exception") and self.raised is None:
            self.raised = res
        result = res.result or {}
        if "unexpected_count" not in result:
            self.per_row = False
            return
        self.elements += result["element_count"]
        self.unexpected += result["unexpected_count"]
        if "missing_count" not in result:
            self.nonnull = None
        elif self.nonnull is not None:
            self.nonnull += result["element_count"] - result["missing_count"]
        room = self.limit - len(self.rows)  # the first `limit` in file order: earlier batches first
        self.values += list(result.get("partial_unexpected_list") or [])[:room]
        self.rows += list(result.get("partial_unexpected_index_list") or [])[:room]

    def combined(self) -> tuple[bool, dict[str, Any], dict[str, Any]]:
        """(success, result, exception_info) for the whole file."""
        if self.raised is not None:  # the same exception in every batch (e.g. a missing column)
            return False, dict(self.raised.result or {}), dict(self.raised.exception_info)
        info = dict(self.first.exception_info or {})
        if not self.per_row:  # e.g. a column type from the dtype: the file passes if every batch does
            shown = self.failed if self.failed is not None else self.first
            return self.failed is None, dict(shown.result or {}), info
        result = map_result(self.elements, self.nonnull, self.unexpected, self.values, self.rows, self.limit)
        # no `mostly` in our suites: a map expectation passes when no row is unexpected
        return self.unexpected == 0 and self.failed is None, result, info


def digest(value: Any) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else repr(value).encode("utf-8")
    return hashlib.blake2b(data, digest_size=16).digest()


class Duplicates:
    """Rows whose (non-null) value of `column` occurs more than once in the whole file; the digests and row
    numbers wait on disk (tasks/data/dedup.py), so memory does not grow with the rows. Close when done."""

    def __init__(self, column: str) -> None:
        self.column = column
        self.elements, self.nonnull = 0, 0
        self._table = DigestRows()

    def add(self, frame: pd.DataFrame) -> None:
        col = frame[self.column]
        present = col.notna().to_numpy()
        self.elements += len(col)
        values = col[present]
        if not len(values):
            return
        self.nonnull += len(values)
        self._table.add([digest(v) for v in values], frame.index.to_numpy()[present].tolist())

    def rows(self) -> np.ndarray:
        """Sorted row numbers of every row whose value is duplicated somewhere in the file."""
        return np.asarray(self._table.duplicated_rows(), dtype=np.int64)

    def close(self) -> None:
        self._table.close()


def return_free_memory() -> None:
    """Hand freed memory back between batches: Python's cycles, glibc's heap (malloc_trim, Linux) and
    arrow's pool. Without it validate's peak RSS grew with the file (564 -> 648 MB from 250 MB to 1 GB of
    text, benchmarks/data.py), as pandas and GX leave fragments of each batch behind."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass
    pa.default_memory_pool().release_unused()


# ------------------------------------------------------------------------------------ GX context
def gx_context(docs_dir: Path) -> Any:
    """An ephemeral GX context (in-memory stores, analytics and progress bars off) whose Data Docs site
    is built in docs_dir."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
        data_docs_sites={
            "local": {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(docs_dir).resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def store_result(ctx: Any, suite_name: str, result: Any) -> None:
    """Keep a combined suite result as ValidationDefinition.run keeps one, so Data Docs render it."""
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    run_id = RunIdentifier(run_time=datetime.datetime.now(datetime.UTC))
    result.meta["run_id"] = run_id
    result.meta["validation_time"] = run_id.run_time
    result.meta["batch_parameters"] = {"dataframe": "<DATAFRAME>"}
    suite_id = ExpectationSuiteIdentifier(name=suite_name)
    key = ValidationResultIdentifier(
        batch_identifier=result.batch_id, expectation_suite_identifier=suite_id, run_id=run_id
    )
    ctx.validation_results_store.store_validation_results(
        suite_validation_result=result,
        suite_validation_result_identifier=key,
        expectation_suite_identifier=suite_id,
    )
