"""How evaluation results are reported: the flat summary, the names register gates on, the comparison
table (markdown) and chart (PNG).

A model's result["metrics"] is the single source: every view below is derived from it, so a metric added
there appears in the summary, table, chart and MLflow without further code.
"""

from __future__ import annotations

import io
import math
from typing import Any

# Metrics where lower is better (the table marks the best model per column).
LOWER_IS_BETTER = {"ppl", "bpb", "word_ppl"}


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
        if len(vals) > 1:
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
