"""The stages an open model makes unnecessary: with `sft.init` set to an open model (a folder under init/,
hf:<org>/<name>@<revision> or a registered models:/<name>@<alias>), the pipeline's own tokenizer, token shards and base model are not used, so
`tokenizer`, `encode` and `pretrain` write a marker instead of their work.

They stay in the graph (dvc.yaml lists `sft.init` among their params): `dvc repro` and `pipeline run`
need no other targets, each of the three does no work (about 5 s in a tiny `pipeline run`, process start
and MLflow run included), DVC records them in dvc.lock and
`dvc status` stays clean. Setting `sft.init` back to `pipeline` changes that param, so DVC runs them again
for real.

What the marker stages leave: each out directory holds only SKIPPED.json (why, and the init), the metrics
file `{"skipped": 1}`, pretrain's curve CSV a header. evaluate and register find no base model in
data/checkpoints/base (no config.json) and leave it out; every other model carries its own tokenizer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tasks.core.config import Params
from tasks.core.io import atomic_path, atomic_write_text, write_json

log = logging.getLogger(__name__)

MARKER = "SKIPPED.json"


def open_model_init(params: Params) -> str | None:
    """The open model sft starts from, or None when the line starts from the pipeline's own base."""
    return None if params.sft.init == "pipeline" else params.sft.init


def write_skipped(stage: str, init: str, outs: list[Path], metrics: Path, plot: Path | None = None) -> dict:
    """Replace the stage's out directories by a marker, its metrics file by {"skipped": 1} and its curve
    CSV by a header; rank 0 only (the other ranks of a multi-rank launch write nothing)."""
    reason = {
        "stage": stage,
        "skipped": f"sft.init={init}: the line starts from an open model with its own tokenizer",
        "init": init,
    }
    if int(os.environ.get("RANK", "0")) != 0:
        return reason
    for out in outs:
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            write_json(tmp / MARKER, reason)
    if plot is not None:
        atomic_write_text(plot, "step\n")
    write_json(metrics, {"skipped": 1})
    log.info("%s skipped: %s", stage, reason["skipped"])
    return reason
