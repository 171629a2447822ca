"""The stage registry (tasks/core/stages.py) against dvc.yaml, and the graph the flow derives from dvc.yaml."""

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
    assert stages.models() == ["base", "sft", "reward", "dpo", "rlhf"]
    assert stages.language_models() == ["base", "sft", "dpo", "rlhf"]  # the reward model generates nothing
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
