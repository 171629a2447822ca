"""How evaluation results are reported: the flat summary, the names register gates on, the comparison
table (markdown) and chart (PNG), and the run's HTML report (data/eval/report.html: training stages with
their key curves, the evaluation, sample answers).

A model's result["metrics"] is the single source: every view below is derived from it, so a metric added
there appears in the summary, table, chart and MLflow without further code.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

# Metrics where lower is better (the table marks the best model per column).
LOWER_IS_BETTER = {"ppl", "bpb", "word_ppl"}
# Metrics that describe rather than rank (the mean answer length): no model is marked best.
UNRANKED = {"response_length"}


def register_scores(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics under the names the register stage gates on ("mmlu/acc", "ppl/val", ...)."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("mmlu_acc"):
            out["mmlu/acc" + key[len("mmlu_acc") :]] = value
        elif key in LOWER_IS_BETTER:
            out[f"{key}/val"] = value
        else:
            out[key] = value
    return out


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"<model>/<metric>": value} over every model's metrics (data/eval/summary.json)."""
    return {f"{name}/{key}": value for name, res in results.items() for key, value in res["metrics"].items()}


def comparison_markdown(results: dict[str, dict[str, Any]], header: str = "") -> str:
    """One row per model, one column per metric; the best model of each column in bold."""
    keys = list(dict.fromkeys(k for res in results.values() for k in res["metrics"]))
    best = {}
    for k in keys:
        vals = {
            n: r["metrics"][k] for n, r in results.items() if isinstance(r["metrics"].get(k), float | int)
        }
        vals = {n: v for n, v in vals.items() if not math.isnan(v)}
        if len(vals) > 1 and k not in UNRANKED:
            best[k] = (min if k in LOWER_IS_BETTER else max)(vals, key=lambda n: vals[n])
    lines = [header] if header else []
    lines += ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, res in results.items():
        cells = []
        for k in keys:
            v = res["metrics"].get(k)
            text = "-" if v is None else f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
            cells.append(f"**{text}**" if best.get(k) == name else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_png(results: dict[str, dict[str, Any]]) -> bytes:
    """Bar charts, one panel per metric family (MMLU accuracy, bits per byte, win rate, any other)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI / in DVC runs
    import matplotlib.pyplot as plt

    names = list(results)
    panels: list[tuple[str, str, float | None]] = [
        ("mmlu_acc", "MMLU accuracy", 0.25),
        ("bpb", "bits per byte (val)", None),
    ]
    if any("winrate_vs_sft" in r["metrics"] for r in results.values()):
        panels.append(("winrate_vs_sft", "reward-model win rate vs sft", 0.5))
    extra = [
        k
        for k in dict.fromkeys(k for r in results.values() for k in r["metrics"])
        if not k.startswith(("mmlu_acc", "ppl", "bpb", "word_ppl", "winrate_vs_sft"))
    ]
    panels += [(k, k, None) for k in extra]  # any further metric gets its own panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (key, title, chance) in zip(axes[0], panels, strict=True):
        values = [results[n]["metrics"].get(key, float("nan")) for n in names]
        bars = ax.bar(names, values, color="#4C72B0")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance})")
            ax.legend(fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------- the run's HTML report
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}img{max-width:100%}
.charts img{width:48%;margin:0 1% 1em 0}pre{white-space:pre-wrap;margin:0}"""


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return html.escape(str(value))
    return (
        f"{value:.4g}"
        if abs(value) >= 1e4 or (value and abs(value) < 1e-3)
        else f"{value:.4f}".rstrip("0").rstrip(".")
    )


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if i >= numeric_from else ''}>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def html_report(
    results: dict[str, dict[str, Any]],
    header: str,
    stage_metrics: dict[str, dict[str, Any]],
    curves: dict[str, list[tuple[str, bytes]]],
    samples_per_model: int = 3,
) -> str:
    """One self-contained page (inline CSS and images) of the whole run: each training stage's final
    metrics and key curves, the evaluation table and chart, and sample answers of every model."""
    from tasks.core.curves import charts

    parts = [
        f"<!doctype html><meta charset=utf-8><title>llm-pipeline run report</title><style>{STYLE}</style>"
    ]
    parts.append("<h1>llm-pipeline run report</h1>")
    parts.append("<h2>Training stages</h2>")
    for stage, metrics in stage_metrics.items():
        shown = [c for _, cols in charts(stage) for c in cols if c in metrics]
        shown += [k for k in ("tokens_per_s", "resumed_from_step") if k in metrics]
        parts.append(f"<h3>{html.escape(stage)}</h3>")
        parts.append(_table(["metric", "final value"], [[html.escape(k), _num(metrics[k])] for k in shown]))
        if curves.get(stage):
            parts.append(
                '<div class="charts">' + "".join(_img(png, name) for name, png in curves[stage]) + "</div>"
            )
    parts.append("<h2>Evaluation</h2>")
    parts.append(f"<p>{html.escape(header.strip())}</p>")
    keys = list(dict.fromkeys(k for res in results.values() for k in res["metrics"]))
    rows = [[html.escape(n)] + [_num(r["metrics"].get(k, "-")) for k in keys] for n, r in results.items()]
    parts.append(_table(["model", *keys], rows))
    parts.append(_img(comparison_png(results), "evaluation by model"))
    parts.append("<h2>Sample answers</h2>")
    task_rows, win_rows = [], []
    for name, res in results.items():
        for s in res.get("tasks", {}).get("samples", [])[:samples_per_model]:
            cells = [s["prompt"], str(s["answer"]), str(s["expected"]), "yes" if s["correct"] else "no"]
            task_rows.append([html.escape(name)] + [f"<pre>{html.escape(c)}</pre>" for c in cells])
        for p in res.get("winrate", {}).get("per_prompt", [])[:samples_per_model]:
            cells = [str(p["row"]), f"<pre>{html.escape(str(p['response']))}</pre>", _num(p["reward"])]
            win_rows.append([html.escape(name), *cells, _num(p["reference_reward"])])
    if task_rows:
        parts.append("<h3>Held-out tasks</h3>")
        parts.append(_table(["model", "prompt", "answer", "expected", "correct"], task_rows, numeric_from=9))
    if win_rows:
        parts.append("<h3>Win-rate prompts (held-out preference rows): response and reward-model score</h3>")
        parts.append(_table(["model", "row", "response", "reward", "sft reward"], win_rows, numeric_from=3))
    if not task_rows and not win_rows:
        parts.append("<p>No sample answers in this evaluation.</p>")
    return "\n".join(parts) + "\n"


def write_html_report(results: dict[str, dict[str, Any]], header: str, out: Path) -> Path:
    """data/eval/report.html: the report above over data/metrics/<stage>.json and data/plots/<stage>.csv of
    every training stage whose curve exists (in pipeline order: tasks/core/curves.py KEY_CURVES)."""
    import tempfile

    from tasks.core import paths
    from tasks.core.curves import KEY_CURVES, draw_charts
    from tasks.core.io import atomic_write_text

    found = sorted(p.stem for p in paths.PLOTS.glob("*.csv"))
    order = [s for s in KEY_CURVES if s in found] + [s for s in found if s not in KEY_CURVES]
    stage_metrics: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[tuple[str, bytes]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in order:
            metrics_file = paths.METRICS / f"{stage}.json"
            stage_metrics[stage] = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
            pngs = draw_charts(stage, paths.PLOTS / f"{stage}.csv", Path(tmp))
            curves[stage] = [(png.stem, png.read_bytes()) for png in pngs]
    atomic_write_text(out, html_report(results, header, stage_metrics, curves))
    return out
