"""Evaluate's outputs: data/eval and data/metrics/evaluate.json, written all or nothing.

`write_outputs` stages every file beside its target and swaps the directory in with one step
(tasks/core/io.py atomic_path), so a kill or a full disk leaves the previous evaluation whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.core import paths
from tasks.core.io import atomic_path, atomic_write_bytes, atomic_write_text, kill_at, write_json
from tasks.core.stage import StageError
from tasks.eval.report import comparison_markdown, comparison_png, write_html_report


def task_samples_markdown(results: dict[str, dict[str, Any]]) -> str:
    """A few held-out task answers per model: prompt, answer, expected, correct."""
    lines = ["| model | prompt | answer | expected | correct |", "|---|---|---|---|---|"]
    for name, res in results.items():
        for s in res.get("tasks", {}).get("samples", []):
            cells = [name, s["prompt"], repr(s["answer"]), s["expected"], "yes" if s["correct"] else "no"]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(
    results: dict[str, dict[str, Any]], summary: dict[str, float], header: str, samples: bool
) -> None:
    """data/eval (<model>.json, summary.json, comparison.md/png, report.html, task_samples.md) and
    data/metrics/evaluate.json (outside the data/eval out, for `dvc metrics show`), all or nothing.

    The directory is built in a staging directory beside it (data/.eval.tmp-<pid>) and swapped in at once,
    the metrics file is staged beside its own and renamed after the swap (tasks/core/io.py atomic_path).
    A kill or a failed write (a full disk) before the swap leaves every previous file as it was, and the
    next run clears the staging leftovers; a kill between the swap and the rename leaves the previous
    metrics file beside the new data/eval until the stage runs again (DVC reports it changed meanwhile).
    """
    metrics = paths.METRICS / "evaluate.json"
    staged: dict[Path, Path] = {}
    committing = False
    try:
        with atomic_path(metrics) as metrics_tmp, atomic_path(paths.EVAL) as tmp:
            staged = {tmp: paths.EVAL, metrics_tmp: metrics}
            tmp.mkdir()
            for name, res in results.items():
                write_json(tmp / f"{name}.json", res)
            write_json(tmp / "summary.json", summary)
            atomic_write_text(tmp / "comparison.md", comparison_markdown(results, header))
            atomic_write_bytes(tmp / "comparison.png", comparison_png(results))
            write_html_report(results, header, tmp / "report.html")  # the whole run on one page
            if samples:
                atomic_write_text(tmp / "task_samples.md", task_samples_markdown(results))
            write_json(metrics_tmp, summary)
            kill_at("evaluate-staged")
            committing = True
    except OSError as exc:
        where = Path(exc.filename) if exc.filename else paths.EVAL
        for tmp_path, target in staged.items():  # name the output, not its staging path
            if where == tmp_path or tmp_path in where.parents:
                where = target / where.relative_to(tmp_path)
        kept = (
            f"{metrics} may still hold the previous run's summary: run the stage again"
            if committing
            else f"{paths.EVAL} and {metrics} keep the previous run's files"
        )
        raise StageError(f"cannot write {where}: {exc.strerror or exc}; {kept}") from exc
