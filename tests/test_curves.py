"""The key curves of the training stages: one table (tasks/core/curves.py), the same charts in dvc.yaml for
`dvc plots show` (real DVC), as PNG images in each stage's MLflow run (real sqlite store), and the run's
HTML report; the Prefect summary links the report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.core import stages
from tasks.core.curves import KEY_CURVES, charts, draw_charts, read_curve, slug
from tests.helpers.project import make_project

REPO = Path(__file__).resolve().parents[1]


def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def training_stages() -> list[str]:
    present = dvc_yaml()["stages"]
    return [m.stage for m in stages.MODEL_STAGES if m.stage in present]


def write_curve(path: Path, stage: str, steps: int = 6, eval_every: int = 3) -> None:
    """A plot CSV with every key column of the stage; val/* only on evaluation steps (empty otherwise)."""
    columns = sorted({c for _, cols in charts(stage) for c in cols} | {"tokens_per_s"})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", *columns])
        writer.writeheader()
        for step in range(1, steps + 1):
            row: dict[str, object] = {"step": step}
            for i, c in enumerate(columns):
                on = not c.startswith("val/") or step % eval_every == 0
                row[c] = 1.0 / (step + i) if on else ""
            writer.writerow(row)


def test_dvc_yaml_declares_exactly_the_key_curves():
    spec = dvc_yaml()
    declared = {}
    for entry in spec["plots"]:
        ((name, props),) = entry.items()
        ((path, ys),) = props["y"].items()
        declared[name] = (props["x"], path, [ys] if isinstance(ys, str) else ys)
    expected = {
        f"{stage} {name}": ("step", f"data/plots/{stage}.csv", cols)
        for stage in training_stages()
        for name, cols in charts(stage)
    }
    assert declared == expected
    for stage in training_stages():  # each curve is an output of its stage, drawn only by the charts above
        outs = stages._paths(spec["stages"][stage].get("outs", []))
        assert f"data/plots/{stage}.csv" in outs, stage
        assert "plots" not in spec["stages"][stage], f"{stage}: a stage-level plot duplicates the charts"


def test_dvc_plots_show_renders_every_key_curve(tmp_path):
    project = make_project(tmp_path / "project")
    for stage in training_stages():
        write_curve(project / "data" / "plots" / f"{stage}.csv", stage)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        ["dvc", "plots", "show", "--json"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown["errors"]
    for stage in training_stages():
        for name, cols in charts(stage):
            (plot,) = shown["data"][f"{stage} {name}"]
            values = plot["content"]["data"]["values"]
            if len(cols) > 1:  # one series per column
                assert sorted({v["field"] for v in values}) == sorted(cols), (stage, name)
            else:
                assert f'"field": "{cols[0]}"' in json.dumps(plot["content"]), (stage, name)
                assert all(float(v[cols[0]]) > 0 for v in values), (stage, name)
            assert plot["content"]["encoding"]["x"]["field"] == "step"


def test_curves_read_skip_empty_cells_and_draw_one_png_per_chart_with_data(tmp_path):
    import matplotlib.image

    path = tmp_path / "dpo.csv"
    write_curve(path, "dpo", steps=6, eval_every=3)
    series = read_curve(path)
    assert [s for s, _ in series["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in series["val/loss"]] == [3, 6]  # empty cells are not zeros
    pngs = draw_charts("dpo", path, tmp_path / "png")
    assert [p.name for p in pngs] == [f"dpo_{slug(name)}.png" for name, _ in KEY_CURVES["dpo"]]
    height, width, _ = matplotlib.image.imread(pngs[0]).shape
    assert (width, height) == (600, 360)
    # a chart none of whose columns exists is left out; a stage outside the table gets loss and lr
    with open(tmp_path / "new.csv", "w") as fh:
        fh.write("step,loss\n1,2.0\n2,1.5\n")
    assert [p.name for p in draw_charts("distill", tmp_path / "new.csv", tmp_path / "png")] == [
        "distill_loss.png"
    ]


def test_a_stage_run_logs_its_curves_as_images(mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks.core import tracking

    path = tmp_path / "rlhf.csv"
    write_curve(path, "rlhf")
    with tracking.stage_run("rlhf") as tracker:
        logged = tracker.log_curves("rlhf", path)
        assert tracker.log_curves("rlhf", tmp_path / "missing.csv") == []
    names = [f"curves/rlhf_{slug(name)}.png" for name, _ in KEY_CURVES["rlhf"]]
    assert logged == names
    stored = [f.path for f in MlflowClient().list_artifacts(tracker.run_id, "curves")]
    assert stored == sorted(names)


def test_the_html_report_shows_stages_curves_evaluation_and_escaped_samples(tmp_path):
    from tasks.eval.report import html_report

    sample = {
        "prompt": "What is <b>2+2</b>?",
        "answer": "<script>x</script>",
        "expected": "4",
        "correct": False,
    }
    results = {
        "sft": {
            "metrics": {"mmlu_acc": 0.25, "ppl": 12.5, "winrate_vs_sft": 0.5},
            "tasks": {"samples": [sample]},
            "winrate": {"per_prompt": [{"row": 3, "response": "ok", "reward": 0.2, "reference_reward": 0.1}]},
        },
        "dpo": {"metrics": {"mmlu_acc": 0.5, "ppl": 11.0, "winrate_vs_sft": 0.75}},
    }
    write_curve(tmp_path / "dpo.csv", "dpo")
    pngs = draw_charts("dpo", tmp_path / "dpo.csv", tmp_path / "png")
    text = html_report(
        results,
        "MMLU 0-shot.",
        {"dpo": {"loss": 0.5, "val/loss": 0.6, "lr": 1e-4, "mfu": 0.1}},
        {"dpo": [(p.stem, p.read_bytes()) for p in pngs]},
    )
    assert "<h3>dpo</h3>" in text and "MMLU 0-shot." in text
    assert text.count("data:image/png;base64,") == len(pngs) + 1  # the curves + the evaluation chart
    assert "<td>val/loss</td>" in text and "<td>mfu</td>" not in text  # key metrics only
    assert "<script>x</script>" not in text and "&lt;script&gt;x&lt;/script&gt;" in text
    assert "&lt;b&gt;2+2&lt;/b&gt;" in text
    for cell in ("<td>sft</td>", "<td>dpo</td>", "mmlu_acc", "winrate_vs_sft"):
        assert cell in text


def test_the_comparison_table_marks_the_best_model_per_column_and_none_for_lengths():
    from tasks.eval.report import comparison_markdown

    results = {
        "sft": {"metrics": {"mmlu_acc": 0.25, "ppl": 12.5, "response_length": 16.0}},
        "dpo": {"metrics": {"mmlu_acc": 0.5, "ppl": 13.0, "response_length": 9.0}},
    }
    sft, dpo = comparison_markdown(results).splitlines()[2:]
    assert sft == "| sft | 0.2500 | **12.5000** | 16.0000 |"  # lower perplexity is better
    assert dpo == "| dpo | **0.5000** | 13.0000 | 9.0000 |"  # a length is neither better nor worse


def test_the_flow_summary_links_the_report(tmp_path):
    from flows.pipeline import summary_markdown

    report = tmp_path / "data" / "eval" / "report.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html></html>")
    text = summary_markdown(tmp_path, "tiny", {"evaluate": "ran"}, {"evaluate": 1.0}, "run1", "0")
    assert f"[{report}]({report.resolve().as_uri()})" in text
    not_run = summary_markdown(tmp_path, "tiny", {"evaluate": "failed"}, {"evaluate": 1.0}, "run1", "0")
    assert "report.html" not in not_run
