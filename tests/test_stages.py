"""The stage registry (tasks/core/stages.py) against dvc.yaml, and the graph the flow derives from dvc.yaml."""

import ast
from pathlib import Path

import pytest
import yaml

from tasks.core import stages

REPO = Path(__file__).resolve().parents[1]


def write_dvc_yaml(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "dvc.yaml"
    path.write_text(yaml.safe_dump({"stages": spec}, sort_keys=False))
    return path


def test_registry_agrees_with_dvc_yaml():
    assert stages.registry_mismatches(REPO / "dvc.yaml") == []
    assert stages.stage_order(REPO / "dvc.yaml") == list(stages.STAGES)


def test_a_stage_in_dvc_yaml_only_is_named(tmp_path):
    """Adding a stage to dvc.yaml without the registry (the checklist's second step) fails, naming it."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    spec["distill"] = {"cmd": "python -m tasks.distill", "deps": ["data/checkpoints/sft"], "outs": ["data/x"]}
    problems = stages.registry_mismatches(write_dvc_yaml(tmp_path, spec))
    assert len(problems) == 1 and "distill" in problems[0]


def test_a_model_stage_must_write_its_checkpoint(tmp_path):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    spec["dpo"]["outs"] = [{"data/checkpoints/dpo_v2": {"persist": True}}]
    spec["sft"]["cmd"] = "python tasks/sft.py"
    problems = stages.registry_mismatches(write_dvc_yaml(tmp_path, spec))
    assert any("stage dpo" in p and "data/checkpoints/dpo" in p for p in problems)
    assert any("stage sft" in p and "cmd" in p for p in problems)


def test_model_lists_follow_the_registry():
    assert stages.models() == ["base", "sft", "reward", "dpo", "rlhf", "grpo"]
    # the reward model generates nothing
    assert stages.language_models() == ["base", "sft", "dpo", "rlhf", "grpo"]
    assert stages.chat_policies()[0] == stages.CHAT_REFERENCE == "sft"
    assert stages.model_stage("base").stage == "pretrain"
    assert stages.stage_model("pretrain").model == "base"
    with pytest.raises(KeyError, match="no stage writes a model named 'nope'"):
        stages.model_stage("nope")
    with pytest.raises(KeyError, match="stage 'evaluate' writes no model"):
        stages.stage_model("evaluate")


def test_graph_fan_out_and_fan_in(tmp_path):
    # a -> (b, c) -> d, declared out of order; a dep inside another stage's out dir counts as an edge.
    dvc_yaml = write_dvc_yaml(
        tmp_path,
        {
            "d": {"cmd": "d", "deps": ["out/b", "out/c/file.bin"], "outs": ["out/d"]},
            "c": {"cmd": "c", "deps": ["out/a"], "outs": [{"out/c": {"persist": True}}]},
            "b": {"cmd": "b", "deps": ["out/a/part"], "outs": ["out/b"]},
            "a": {"cmd": "a", "deps": ["src.txt"], "outs": ["out/a"]},
        },
    )
    assert stages.stage_graph(dvc_yaml) == {"d": {"b", "c"}, "c": {"a"}, "b": {"a"}, "a": set()}
    assert stages.stage_order(dvc_yaml) == ["a", "c", "b", "d"]  # ties keep the dvc.yaml order


def test_graph_cycle_is_named(tmp_path):
    dvc_yaml = write_dvc_yaml(
        tmp_path,
        {
            "a": {"cmd": "a", "deps": ["out/c"], "outs": ["out/a"]},
            "b": {"cmd": "b", "deps": ["out/a"], "outs": ["out/b"]},
            "c": {"cmd": "c", "deps": ["out/b"], "outs": ["out/c"]},
            "free": {"cmd": "f", "outs": ["out/f"]},
        },
    )
    with pytest.raises(ValueError, match=r"cycle among \['a', 'b', 'c'\]"):
        stages.stage_order(dvc_yaml)


def test_dvc_yaml_without_stages_is_refused(tmp_path):
    path = tmp_path / "dvc.yaml"
    path.write_text("vars: []\n")
    with pytest.raises(ValueError, match="no `stages:` mapping"):
        stages.stage_graph(path)


# Source files a stage imports that cannot change what it writes: the entry-point wrapper (error
# reporting), the process launcher, progress display and MLflow logging (register excepted: logging models
# is its result).
NOT_RESULT_CODE = {
    "tasks/core/stage.py",
    "tasks/core/launch.py",
    "tasks/core/progress.py",
    "tasks/core/tracking.py",
    "tasks/core/registry.py",  # a registered start (sft.init: models:/...) is verified by its hashes
}


def project_imports(path: Path) -> set[str]:
    """tasks/ and models/ source files imported by `path` (module or package-member imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.split(".")[0] in ("tasks", "models"):
                candidate = REPO / (name.replace(".", "/") + ".py")
                if candidate.is_file():
                    found.add(str(candidate.relative_to(REPO)))
    return found


def import_closure(entry: str, ignored: set[str]) -> set[str]:
    """Source files `entry` runs, following imports but not into the `ignored` files."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path not in seen and path not in ignored:
            seen.add(path)
            todo.extend(project_imports(REPO / path))
    return seen


@pytest.mark.parametrize("stage", stages.STAGES)
def test_code_deps_are_exactly_what_the_stage_imports(stage):
    """A source file a stage runs is a dep (else editing it leaves stale outputs), and nothing else is."""
    spec = stages.dvc_stages(REPO / "dvc.yaml")[stage]
    deps = {
        d
        for d in stages._paths(spec.get("deps", []))
        if d.startswith(("tasks/", "models/")) and d.endswith(".py")
    }
    registering = {"tasks/core/tracking.py", "tasks/core/registry.py"}
    ignored = NOT_RESULT_CODE - (registering if stage == "register" else set())
    needed = import_closure(f"tasks/{stage}.py", ignored)
    if stage == "register":
        needed.add("tasks/serve/pyfunc.py")  # logged as the models' code (a file path, not an import)
    assert not needed - deps, f"stage {stage}: dvc.yaml deps lack {sorted(needed - deps)}"
    assert not deps - needed, (
        f"stage {stage}: dvc.yaml deps name files it does not run: {sorted(deps - needed)}"
    )
