"""The stage registry: the stages in pipeline order and the model each training stage writes.

dvc.yaml is the graph (deps, outs, params) and the only place Prefect reads it from (`stage_order`).
This table says what a stage *is* to the rest of the code: the checkpoint it writes and what kind of
model that is. evaluate, register, the flow's summary and the tests read it; tests/test_stages.py checks
it against dvc.yaml, so a stage added to one and not the other fails the tests, naming what is missing.
Adding a stage: docs/ARCHITECTURE.md, "Adding a stage".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class ModelStage:
    """A training stage and the model it writes to data/checkpoints/<model>/ (registered as pipeline-<model>)."""

    stage: str
    model: str
    kind: str  # "causal_lm" (generates text) or "reward" (a scalar head)
    chat: bool  # a chat policy: evaluate compares it with sft by win rate


STAGES: tuple[str, ...] = (
    "ingest",
    "validate",
    "tokenizer",
    "encode",
    "pretrain",
    "sft",
    "reward",
    "dpo",
    "rlhf",
    "grpo",
    "evaluate",
    "register",
)

MODEL_STAGES: tuple[ModelStage, ...] = (
    ModelStage("pretrain", "base", "causal_lm", chat=False),
    ModelStage("sft", "sft", "causal_lm", chat=True),
    ModelStage("reward", "reward", "reward", chat=False),
    ModelStage("dpo", "dpo", "causal_lm", chat=True),
    ModelStage("rlhf", "rlhf", "causal_lm", chat=True),
    ModelStage("grpo", "grpo", "causal_lm", chat=True),
)

CHAT_REFERENCE = "sft"  # the model every other chat policy is compared against


def models() -> list[str]:
    """Every model a run writes and registers, in pipeline order."""
    return [m.model for m in MODEL_STAGES]


def language_models() -> list[str]:
    """Models that generate text (evaluated on MMLU and perplexity), in pipeline order."""
    return [m.model for m in MODEL_STAGES if m.kind == "causal_lm"]


def chat_policies() -> list[str]:
    """Chat models, the reference first: evaluate gives each a win rate against the reference."""
    return [m.model for m in MODEL_STAGES if m.chat]


def model_stage(model: str) -> ModelStage:
    for entry in MODEL_STAGES:
        if entry.model == model:
            return entry
    raise KeyError(f"no stage writes a model named {model!r}; known: {', '.join(models())}")


def stage_model(stage: str) -> ModelStage:
    """The model a training stage writes (KeyError for a stage that trains none)."""
    for entry in MODEL_STAGES:
        if entry.stage == stage:
            return entry
    raise KeyError(
        f"stage {stage!r} writes no model; training stages: {', '.join(m.stage for m in MODEL_STAGES)}"
    )


# ------------------------------------------------------------------------------------ the DVC graph
def _paths(entries: list[Any]) -> list[str]:
    """dvc.yaml lists entries as plain paths or {path: options}."""
    out: list[Any] = []
    for entry in entries or []:
        out.extend(entry.keys() if isinstance(entry, dict) else [entry])
    return [str(p).rstrip("/") for p in out]


def dvc_stages(dvc_yaml: Path) -> dict[str, dict[str, Any]]:
    """The `stages:` mapping of a dvc.yaml, with a clear error when it has none."""
    loaded = yaml.safe_load(Path(dvc_yaml).read_text()) or {}
    stages = loaded.get("stages") if isinstance(loaded, dict) else None
    if not isinstance(stages, dict) or not stages:
        raise ValueError(f"{dvc_yaml}: no `stages:` mapping")
    return stages


def stage_graph(dvc_yaml: Path) -> dict[str, set[str]]:
    """stage -> the stages it depends on (a dep equal to, inside, or containing another stage's out)."""
    stages = dvc_stages(dvc_yaml)
    outs = {name: _paths(spec.get("outs", [])) for name, spec in stages.items()}
    graph: dict[str, set[str]] = {}
    for name, spec in stages.items():
        upstream = set()
        for dep in _paths(spec.get("deps", [])):
            for other, other_outs in outs.items():
                if other != name and any(
                    dep == o or dep.startswith(o + "/") or o.startswith(dep + "/") for o in other_outs
                ):
                    upstream.add(other)
        graph[name] = upstream
    return graph


def stage_order(dvc_yaml: Path) -> list[str]:
    """Topological order of the stages, ties broken by their order in dvc.yaml (stable)."""
    graph = stage_graph(dvc_yaml)
    order: list[str] = []
    pending = list(graph)
    while pending:
        ready = [s for s in pending if graph[s] <= set(order)]
        if not ready:
            raise ValueError(f"{dvc_yaml}: the stage graph has a cycle among {pending}")
        order.append(ready[0])
        pending.remove(ready[0])
    return order


def registry_mismatches(dvc_yaml: Path) -> list[str]:
    """What dvc.yaml and this registry disagree on (empty when they agree)."""
    stages = dvc_stages(dvc_yaml)
    problems = []
    if tuple(stages) != STAGES:
        problems.append(f"dvc.yaml stages {list(stages)} != registry STAGES {list(STAGES)}")
    for name, spec in stages.items():
        if spec.get("cmd") != f"python -m tasks.{name}":
            problems.append(f"stage {name}: cmd {spec.get('cmd')!r} is not `python -m tasks.{name}`")
    for entry in MODEL_STAGES:
        outs = _paths(stages.get(entry.stage, {}).get("outs", []))
        if f"data/checkpoints/{entry.model}" not in outs:
            problems.append(f"stage {entry.stage}: outs {outs} lack data/checkpoints/{entry.model}")
    return problems
