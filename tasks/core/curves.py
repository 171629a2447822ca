"""The key curves of each training stage: which columns of data/plots/<stage>.csv make which chart, and
drawing them as PNG (matplotlib, no display).

One table (`KEY_CURVES`) names the charts; dvc.yaml's top-level `plots:` declares the same ones for
`dvc plots show` (tests/test_curves.py keeps the two equal), every training stage logs them as images to
its MLflow run (`Tracker.log_curves`), and evaluate's HTML report shows them. A stage missing from the
table gets its loss and learning rate.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

# stage -> [(chart name, [CSV columns])]; val/* columns hold values on evaluation steps only.
KEY_CURVES: dict[str, list[tuple[str, list[str]]]] = {
    "pretrain": [("loss", ["loss", "val/loss"]), ("learning rate", ["lr"])],
    "sft": [("loss", ["loss", "val/loss"]), ("learning rate", ["lr"])],
    "reward": [
        ("loss", ["loss"]),
        ("accuracy", ["accuracy", "val/accuracy"]),
        ("margin", ["margin", "val/margin"]),
        ("learning rate", ["lr"]),
    ],
    "dpo": [
        ("loss", ["loss", "val/loss"]),
        ("reward accuracy", ["rewards/accuracies", "val/rewards/accuracies"]),
        ("reward margins", ["rewards/margins", "val/rewards/margins"]),
        ("learning rate", ["lr"]),
    ],
    "rlhf": [
        ("reward", ["reward/mean", "val/reward_mean"]),
        ("kl", ["kl"]),
        ("loss", ["loss/policy", "loss/value"]),
        ("learning rate", ["lr"]),
    ],
    "grpo": [
        ("reward", ["reward", "val/accuracy"]),
        ("kl", ["kl"]),
        ("loss", ["loss"]),
        ("learning rate", ["lr"]),
    ],
}
DEFAULT_CURVES = [("loss", ["loss"]), ("learning rate", ["lr"])]


def charts(stage: str) -> list[tuple[str, list[str]]]:
    return KEY_CURVES.get(stage, DEFAULT_CURVES)


def read_curve(path: Path) -> dict[str, list[tuple[float, float]]]:
    """column -> [(step, value)] of a plot CSV, skipping empty and non-finite cells."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = float(row["step"])
            for key, raw in row.items():
                if key == "step" or raw in ("", None):
                    continue
                value = float(raw)
                if math.isfinite(value):
                    series.setdefault(key, []).append((step, value))
    return series


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def draw_charts(stage: str, csv_path: Path, out_dir: Path) -> list[Path]:
    """One PNG per key chart of the stage (out_dir/<stage>_<chart>.png), only charts with data; the
    paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_curve(csv_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, columns in charts(stage):
        present = [c for c in columns if series.get(c)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        for column in present:
            steps, values = zip(*series[column], strict=True)
            marker = "o" if len(steps) < 20 or column.startswith("val/") else None
            ax.plot(steps, values, label=column, marker=marker, markersize=3)
        ax.set_title(f"{stage}: {name}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{stage}_{slug(name)}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
