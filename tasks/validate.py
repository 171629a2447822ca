"""Stage `validate`: Great Expectations suites over data/raw/, in bounded memory; Data Docs; data/validated/.

One suite per dataset. Properties that are not plain column checks (printable ratio, role order,
chosen != rejected, empty turns) are computed as helper columns in pandas first, so each rule is one
readable expectation whose failures point at rows. GX runs in an ephemeral context (nothing written
but the Data Docs site), with analytics and progress bars off.

Memory does not grow with the data: each dataset is read as parquet record batches of about
validate.batch_mb MB (uncompressed) and GX validates one batch at a time, as a pandas frame indexed by
row number in the file. (Arrow's reader also holds a row group's pages: ingest writes 2000-row groups.) Per-row expectations are summed over the batches (tasks/data/gx_batches.py);
the aggregate ones are computed over the whole file: the row count by GX on the total, uniqueness from a
128-bit digest per value (24 bytes kept per row, not the values). The combined result is what GX
reports for the whole file as one frame (same fields and numbers; tests/test_validate.py checks it),
stored as one validation result per suite, so Data Docs show one page per dataset as before.

Outputs: data/validated/*.parquet (byte copies of the raw files when every suite passes),
data/reports/validation/ (Data Docs HTML; written on failure too, to look at), and
data/reports/validation.json (per suite: success, expectations evaluated/failed, failure messages).
A failed expectation raises StageError naming the dataset, expectation, column and up to 3 rows;
data/validated/ is then left as it was.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # before GX is imported anywhere
logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its import logs at INFO

import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tasks.core import paths  # noqa: E402
from tasks.core.config import Params, ValidateConfig  # noqa: E402
from tasks.core.io import atomic_path, stream_parquet, write_json  # noqa: E402
from tasks.core.stage import StageError, stage_main  # noqa: E402
from tasks.data.gx_batches import (  # noqa: E402
    Duplicates,
    Tally,
    gx_context,
    map_result,
    return_free_memory,
    store_result,
)
from tasks.data.textclean import printable_ratio  # noqa: E402

log = logging.getLogger("tasks.validate")  # not __name__: under `python -m` that is "__main__"

REPORT_DIR = paths.REPORTS / "validation"
REPORT_JSON = paths.REPORTS / "validation.json"
# starts with an optional system message, then user/assistant pairs, ends with the assistant
ROLE_ORDER = r"^(?:system,)?user,assistant(?:,user,assistant)*$"
NON_BLANK = r"\S"
MAX_EXAMPLES = 3
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES}
UNIQUE = "ExpectColumnValuesToBeUnique"
# Computed over the whole file, not per batch (the rest are per-row and summed over batches)
AGGREGATE = ("ExpectTableRowCountToBeBetween", UNIQUE)
NO_EXCEPTION = {"raised_exception": False, "exception_traceback": None, "exception_message": None}

Spec = tuple[str, dict[str, Any]]  # (GX expectation class name, its arguments)


# ------------------------------------------------------------------------ helper columns (pure pandas)
def _roles(messages: Any) -> str | None:
    if messages is None:
        return None
    return ",".join(str(m.get("role")) if isinstance(m, dict) else "?" for m in messages)


def _empty_turns(messages: Any) -> int | None:
    if messages is None:
        return None
    return sum(
        1
        for m in messages
        if not isinstance(m, dict)
        or (
            m.get("role") in ("user", "assistant")
            and not (isinstance(m.get("content"), str) and m["content"].strip())
        )
    )


def add_helper_columns(dataset: str, df: pd.DataFrame) -> pd.DataFrame:
    """The raw columns plus the computed ones the suite expects on."""
    df = df.copy()
    if dataset == "pretrain" and "text" in df:
        df["printable_ratio"] = [printable_ratio(t) if isinstance(t, str) else None for t in df["text"]]
    elif dataset == "sft" and "messages" in df:
        df["roles"] = [_roles(m) for m in df["messages"]]
        # nullable ints: the dtype (and how a value prints) must not depend on whether a batch has a null
        df["empty_turns"] = pd.array([_empty_turns(m) for m in df["messages"]], dtype="Int64")
    elif dataset == "preference" and {"chosen", "rejected"} <= set(df.columns):
        df["chosen_differs"] = [
            None if c is None or r is None else bool(c != r)
            for c, r in zip(df["chosen"], df["rejected"], strict=True)
        ]
    return df


def suite_specs(dataset: str, cfg: ValidateConfig) -> list[Spec]:
    """The expectations of one dataset's suite, as data (no GX import needed to read them)."""
    rows: Spec = ("ExpectTableRowCountToBeBetween", {"min_value": cfg.min_rows})
    if dataset == "pretrain":
        return [
            rows,
            ("ExpectColumnValuesToNotBeNull", {"column": "text"}),
            ("ExpectColumnValuesToBeOfType", {"column": "text", "type_": "str"}),
            (
                "ExpectColumnValueLengthsToBeBetween",
                {"column": "text", "min_value": 1, "max_value": cfg.max_chars},
            ),
            ("ExpectColumnValuesToBeUnique", {"column": "text"}),
            (
                "ExpectColumnValuesToBeBetween",
                {"column": "printable_ratio", "min_value": cfg.min_printable_ratio, "max_value": 1.0},
            ),
        ]
    if dataset == "sft":
        return [
            rows,
            ("ExpectColumnValuesToNotBeNull", {"column": "messages"}),
            ("ExpectColumnValuesToMatchRegex", {"column": "roles", "regex": ROLE_ORDER}),
            ("ExpectColumnValuesToBeBetween", {"column": "empty_turns", "min_value": 0, "max_value": 0}),
        ]
    if dataset == "preference":
        specs = [rows]
        for col in ("prompt", "chosen", "rejected"):
            specs.append(("ExpectColumnValuesToNotBeNull", {"column": col}))
            specs.append(("ExpectColumnValuesToMatchRegex", {"column": col, "regex": NON_BLANK}))
        specs.append(("ExpectColumnValuesToBeInSet", {"column": "chosen_differs", "value_set": [True]}))
        return specs
    raise ValueError(f"no suite for dataset {dataset!r}")


# --------------------------------------------------------------------------------- failure messages
def _show(value: Any, limit: int = 120) -> str:
    if hasattr(value, "tolist"):
        value = value.tolist()
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# Which raw columns explain a helper column's value in an error message.
CONTEXT_COLUMNS = {
    "printable_ratio": ["text"],
    "roles": ["messages"],
    "empty_turns": ["messages"],
    "chosen_differs": ["chosen", "rejected"],
}


def describe_failure(
    dataset: str, df: pd.DataFrame, expectation: str, kwargs: dict, result: dict, exception: str = ""
) -> str:
    """One readable line per failed expectation; df holds (at least) the example rows, indexed by row
    number in the file, with helper columns."""
    column = kwargs.get("column")
    where = f"column {column!r}" if column else "the table"
    head = f"dataset {dataset}: {expectation} failed on {where}"
    if exception:
        return f"{head}: {exception}"
    if "unexpected_count" not in result:  # table-level: say what was observed vs expected
        bounds = {
            k: v for k, v in kwargs.items() if k in ("min_value", "max_value", "type_") and v is not None
        }
        return f"{head}: observed {result.get('observed_value')!r}, expected {bounds}"
    count, total = result.get("unexpected_count", 0), result.get("element_count", 0)
    rows = []
    for idx in (result.get("partial_unexpected_index_list") or [])[:MAX_EXAMPLES]:
        shown = [f"{column}={_show(df.at[idx, column])}"] if column in df else []
        shown += [f"{c}={_show(df.at[idx, c])}" for c in CONTEXT_COLUMNS.get(str(column), []) if c in df]
        if "source" in df:
            shown.append(f"source={df.at[idx, 'source']!r}")
        rows.append(f"row {idx}: " + ", ".join(shown))
    return f"{head} ({count} of {total} rows); " + "; ".join(rows)


# --------------------------------------------------------------------------------- reading batches
def open_raw(dataset: str) -> pq.ParquetFile:
    path = paths.raw(dataset)
    if not path.exists():
        raise StageError(f"dataset {dataset}: {path} not found; run the ingest stage first")
    try:
        return stream_parquet(path)
    except Exception as exc:
        raise StageError(f"dataset {dataset}: {path} is not a readable parquet file: {exc}") from exc


def batch_rows(pf: pq.ParquetFile, batch_mb: float) -> int:
    """Rows per batch so that one batch holds about batch_mb MB of uncompressed column data."""
    meta = pf.metadata
    nbytes = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    per_row = nbytes / meta.num_rows if meta.num_rows else 1.0
    return max(1, int(batch_mb * 1e6 / max(per_row, 1.0)))


def iter_frames(
    dataset: str, pf: pq.ParquetFile, rows: int, row_groups: list[int] | None = None, start: int = 0
) -> Iterator[pd.DataFrame]:
    """The file (or these row groups, the first starting at row `start`) as frames of up to `rows` rows,
    indexed by row number in the file, so GX names rows as the file numbers them. A file without rows
    gives one empty frame with its columns."""
    offset = start
    try:
        for batch in pf.iter_batches(batch_size=rows, row_groups=row_groups):
            frame = batch.to_pandas()
            frame.index = pd.RangeIndex(offset, offset + len(frame))
            offset += len(frame)
            yield frame
        if offset == start:
            yield pf.schema_arrow.empty_table().to_pandas()
    except Exception as exc:  # a read error mid-file: name the file, as a failed open does
        path = paths.raw(dataset)
        raise StageError(f"dataset {dataset}: {path} is not a readable parquet file: {exc}") from exc


def read_rows(dataset: str, pf: pq.ParquetFile, wanted: set[int], rows: int) -> pd.DataFrame:
    """The rows at these row numbers, with helper columns; only the row groups holding them are read."""
    parts, start, meta = [], 0, pf.metadata
    for group in range(meta.num_row_groups):
        n = meta.row_group(group).num_rows
        if any(start <= i < start + n for i in wanted):
            for frame in iter_frames(dataset, pf, rows, [group], start):
                keep = sorted(i for i in wanted if i in frame.index)
                if keep:
                    parts.append(add_helper_columns(dataset, frame.loc[keep]))
        start += n
    return pd.concat(parts) if parts else pd.DataFrame()


# ------------------------------------------------------------------------------------------- GX run
def _expectation(name: str, kwargs: dict[str, Any]) -> Any:
    import great_expectations as gx

    return getattr(gx.expectations, name)(**kwargs)


def _key(config: Any) -> str:
    """An expectation's identity within a suite: its type and arguments (GX adds batch_id to a result's
    arguments; ids differ between suites)."""
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    return json.dumps([config.type, kwargs], sort_keys=True, default=str)


def validate_dataset(
    ctx: Any, source: Any, dataset: str, pf: pq.ParquetFile, cfg: ValidateConfig
) -> tuple[Any, pd.DataFrame, int]:
    """One suite over one file, batch by batch. Returns the combined suite result (a GX
    ExpectationSuiteValidationResult), the example rows of its failures, and the file's row count."""
    import great_expectations as gx
    from great_expectations.core import ExpectationSuiteValidationResult, ExpectationValidationResult

    specs = suite_specs(dataset, cfg)
    suite = ctx.suites.add(gx.ExpectationSuite(name=dataset))  # all expectations: the docs show this suite
    for name, kwargs in specs:
        suite.add_expectation(_expectation(name, kwargs))
    # The first batch gets the whole suite: GX's order of its results (expectations it could not
    # evaluate, e.g. on a missing column, come first) is the order kept for the file. Later batches get
    # the per-row expectations only; the aggregate ones are computed over the file below.
    first_suite = gx.ExpectationSuite(name=dataset, expectations=[_expectation(*s) for s in specs])
    row_suite = gx.ExpectationSuite(
        name=dataset, expectations=[_expectation(n, k) for n, k in specs if n not in AGGREGATE]
    )
    definition = source.add_dataframe_asset(name=dataset).add_batch_definition_whole_dataframe("all")

    def check(frame: pd.DataFrame, what: Any) -> Any:
        return definition.get_batch(batch_parameters={"dataframe": frame}).validate(
            what, result_format=RESULT_FORMAT
        )

    index = {_key(e.configuration): i for i, e in enumerate(suite.expectations)}  # result -> spec
    tallies = [Tally(MAX_EXAMPLES) for _ in specs]
    uniques = {i: Duplicates(k["column"]) for i, (n, k) in enumerate(specs) if n == UNIQUE}
    rows = batch_rows(pf, cfg.batch_mb)
    total, batches, order = 0, 0, []
    first: Any = None  # the first batch's suite result
    gc.freeze()  # the imports' and GX's objects: the collections between batches skip them (CPU)
    try:
        for raw in iter_frames(dataset, pf, rows):
            frame = add_helper_columns(dataset, raw)
            out = check(frame, row_suite if first is not None else first_suite)
            if first is None:
                first, order = out, [index[_key(r.expectation_config)] for r in out.results]
            for res in out.results:
                tallies[index[_key(res.expectation_config)]].add(res)
            for dup in uniques.values():
                if dup.column in frame:
                    dup.add(frame)
            total, batches = total + len(frame), batches + 1
            del raw, out
            return_free_memory()  # else the allocators' high-water mark grows batch after batch
    finally:
        gc.unfreeze()

    outcome = [tally.combined() for tally in tallies]  # (success, result, exception_info) per spec
    duplicated: dict[int, Any] = {}
    for i, (name, kwargs) in enumerate(specs):
        if name == "ExpectTableRowCountToBeBetween":  # GX on a frame of `total` rows and no columns
            res = check(pd.DataFrame(index=pd.RangeIndex(total)), suite.expectations[i])
            outcome[i] = (bool(res.success), dict(res.result), dict(res.exception_info or {}))
        elif name == UNIQUE and kwargs["column"] in frame:  # else GX's own error, from the batches
            duplicated[i] = uniques[i].rows()
            outcome[i] = (not len(duplicated[i]), {}, dict(NO_EXCEPTION))
    for dup in uniques.values():
        dup.close()

    # the example rows of every failure, read again (only on failure) by row number
    wanted = {int(r) for d in duplicated.values() for r in d[:MAX_EXAMPLES]}
    for ok, result, _ in outcome:
        wanted |= set() if ok else set(result.get("partial_unexpected_index_list") or [])
    examples = read_rows(dataset, pf, wanted, rows) if wanted else frame.iloc[:0]
    for i, dup_rows in duplicated.items():
        column, shown = uniques[i].column, [int(r) for r in dup_rows[:MAX_EXAMPLES]]
        values = [examples.at[r, column] for r in shown]
        result = map_result(total, uniques[i].nonnull, len(dup_rows), values, shown, MAX_EXAMPLES)
        outcome[i] = (outcome[i][0], result, outcome[i][2])

    results = []
    for i in order:
        config = suite.expectations[i].configuration  # with the saved suite's id, and the batch as GX adds it
        config.kwargs["batch_id"] = first.batch_id
        results.append(
            ExpectationValidationResult(
                success=outcome[i][0],
                expectation_config=config,
                result=outcome[i][1],
                exception_info=outcome[i][2],
            )
        )
    passed = sum(1 for r in results if r.success)
    meta = dict(first.meta)
    meta["batch_markers"] = {  # per-batch fingerprints do not describe the file: say how it was read
        "ge_load_time": first.meta["batch_markers"].get("ge_load_time"),
        "batches": batches,
        "rows_per_batch": rows,
    }
    combined = ExpectationSuiteValidationResult(
        success=passed == len(results),
        results=results,
        suite_name=dataset,
        statistics={
            "evaluated_expectations": len(results),
            "successful_expectations": passed,
            "unsuccessful_expectations": len(results) - passed,
            "success_percent": passed / len(results) * 100 if results else None,
        },
        meta=meta,
        batch_id=first.batch_id,
    )
    return combined, examples, total


def run_suites(files: dict[str, pq.ParquetFile], cfg: ValidateConfig, docs_dir: Path) -> dict[str, dict]:
    """Validate each file with its suite, batch by batch; build Data Docs into docs_dir."""
    ctx = gx_context(docs_dir)
    source = ctx.data_sources.add_pandas("raw")
    report: dict[str, dict] = {}
    for dataset, pf in files.items():
        outcome, examples, total = validate_dataset(ctx, source, dataset, pf, cfg)
        store_result(ctx, dataset, outcome)
        failures = []
        for res in outcome.results:
            if res.success:
                continue
            conf = res.expectation_config
            info = res.exception_info or {}
            exception = info.get("exception_message") if info.get("raised_exception") else ""
            failures.append(
                describe_failure(
                    dataset, examples, conf.type, dict(conf.kwargs), res.result or {}, exception or ""
                )
            )
        report[dataset] = {
            "success": not failures,
            "rows": total,
            "expectations_evaluated": len(outcome.results),
            "expectations_failed": len(failures),
            "failures": failures,
        }
    ctx.build_data_docs()
    return report


def run(params: Params, tracker: Any = None) -> dict[str, Any]:
    cfg = params.validate
    start = time.time()
    files = {dataset: open_raw(dataset) for dataset in paths.DATASETS}  # all found before any work
    # Data Docs are written whether or not the suites pass: they are how a failure is inspected.
    with atomic_path(REPORT_DIR) as docs_tmp:
        report = run_suites(files, cfg, docs_tmp)
    write_json(REPORT_JSON, report)
    failures = [msg for dataset in report for msg in report[dataset]["failures"]]
    metrics: dict[str, float] = {}
    for dataset, r in report.items():
        metrics[f"success/{dataset}"] = int(r["success"])
        metrics[f"expectations_failed/{dataset}"] = r["expectations_failed"]
        metrics[f"rows/{dataset}"] = r["rows"]
    write_json(paths.METRICS / "validate.json", metrics)
    if tracker is not None:
        tracker.log_metrics({**metrics, "validate/gx_seconds": time.time() - start})
        tracker.log_artifact(REPORT_JSON, "validation")
        tracker.log_artifacts(REPORT_DIR, "validation/data_docs")
    if failures and cfg.fail_on_error:
        raise StageError(
            f"{len(failures)} expectation(s) failed; data/validated/ left unchanged; "
            f"see {REPORT_DIR}/index.html\n  " + "\n  ".join(failures)
        )
    for msg in failures:
        log.warning("validate.fail_on_error is false; passing despite: %s", msg)
    with atomic_path(paths.VALIDATED) as tmp:  # byte copies: validated data is exactly what was checked
        tmp.mkdir(parents=True)
        for dataset in paths.DATASETS:
            shutil.copyfile(paths.raw(dataset), tmp / paths.validated(dataset).name)
    log.info("validate: %d suites passed in %.1fs", len(report), time.time() - start)
    return report


if __name__ == "__main__":
    stage_main("validate", run)
