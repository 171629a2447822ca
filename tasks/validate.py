"""Stage `validate`: Great Expectations suites over data/raw/, Data Docs, and data/validated/.

One suite per dataset. Properties that are not plain column checks (printable ratio, role order,
chosen != rejected, empty turns) are computed as helper columns in pandas first, so each rule is one
readable expectation whose failures point at rows. GX runs in an ephemeral context (nothing written
but the Data Docs site), with analytics and progress bars off.

Outputs: data/validated/*.parquet (byte copies of the raw files when every suite passes),
data/reports/validation/ (Data Docs HTML; written on failure too, to look at), and
data/reports/validation.json (per suite: success, expectations evaluated/failed, failure messages).
A failed expectation raises StageError naming the dataset, expectation, column and up to 3 rows;
data/validated/ is then left as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # before GX is imported anywhere
logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its import logs at INFO

import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tasks.core import paths  # noqa: E402
from tasks.core.config import Params, ValidateConfig  # noqa: E402
from tasks.core.io import atomic_path, write_json  # noqa: E402
from tasks.core.stage import StageError, stage_main  # noqa: E402
from tasks.data.textclean import printable_ratio  # noqa: E402

log = logging.getLogger("tasks.validate")  # not __name__: under `python -m` that is "__main__"

REPORT_DIR = paths.REPORTS / "validation"
REPORT_JSON = paths.REPORTS / "validation.json"
# starts with an optional system message, then user/assistant pairs, ends with the assistant
ROLE_ORDER = r"^(?:system,)?user,assistant(?:,user,assistant)*$"
NON_BLANK = r"\S"
MAX_EXAMPLES = 3

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
        df["empty_turns"] = [_empty_turns(m) for m in df["messages"]]
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
    count, total = result.get("unexpected_count", 0), result.get("element_count", len(df))
    rows = []
    for idx in (result.get("partial_unexpected_index_list") or [])[:MAX_EXAMPLES]:
        shown = [f"{column}={_show(df.at[idx, column])}"] if column in df else []
        shown += [f"{c}={_show(df.at[idx, c])}" for c in CONTEXT_COLUMNS.get(str(column), []) if c in df]
        if "source" in df:
            shown.append(f"source={df.at[idx, 'source']!r}")
        rows.append(f"row {idx}: " + ", ".join(shown))
    return f"{head} ({count} of {total} rows); " + "; ".join(rows)


# ------------------------------------------------------------------------------------------- GX run
def _context(docs_dir: Path):
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


def run_suites(frames: dict[str, pd.DataFrame], cfg: ValidateConfig, docs_dir: Path) -> dict[str, dict]:
    """Validate each frame with its suite (one Checkpoint per dataset); build Data Docs into docs_dir."""
    import great_expectations as gx

    ctx = _context(docs_dir)
    source = ctx.data_sources.add_pandas("raw")
    report: dict[str, dict] = {}
    for dataset, frame in frames.items():
        df = add_helper_columns(dataset, frame)
        batch = source.add_dataframe_asset(name=dataset).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=dataset))
        for name, kwargs in suite_specs(dataset, cfg):
            suite.add_expectation(getattr(gx.expectations, name)(**kwargs))
        definition = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=dataset, data=batch, suite=suite)
        )
        checkpoint = ctx.checkpoints.add(
            gx.Checkpoint(
                name=f"validate-{dataset}",
                validation_definitions=[definition],
                actions=[],  # Data Docs are built once below, not once per checkpoint (~0.3 s each)
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES},
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": df})
        failures, evaluated = [], 0
        for validation in outcome.run_results.values():
            for res in validation.results:
                evaluated += 1
                if res.success:
                    continue
                conf = res.expectation_config
                info = res.exception_info or {}
                exception = info.get("exception_message") if info.get("raised_exception") else ""
                failures.append(
                    describe_failure(
                        dataset, df, conf.type, dict(conf.kwargs), res.result or {}, exception or ""
                    )
                )
        report[dataset] = {
            "success": not failures,
            "rows": len(df),
            "expectations_evaluated": evaluated,
            "expectations_failed": len(failures),
            "failures": failures,
        }
    ctx.build_data_docs()
    return report


def read_raw(dataset: str) -> pd.DataFrame:
    path = paths.raw(dataset)
    if not path.exists():
        raise StageError(f"dataset {dataset}: {path} not found; run the ingest stage first")
    try:
        return pq.read_table(path).to_pandas()
    except Exception as exc:
        raise StageError(f"dataset {dataset}: {path} is not a readable parquet file: {exc}") from exc


def run(params: Params, tracker: Any = None) -> dict[str, Any]:
    cfg = params.validate
    start = time.time()
    frames = {dataset: read_raw(dataset) for dataset in paths.DATASETS}
    # Data Docs are written whether or not the suites pass: they are how a failure is inspected.
    with atomic_path(REPORT_DIR) as docs_tmp:
        report = run_suites(frames, cfg, docs_tmp)
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
