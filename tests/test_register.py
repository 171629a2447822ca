"""The register stage's champion gate and its boundaries, on a real sqlite MLflow registry.

`gate` by itself: equal scores and a drop or rise exactly at its margin pass, just past it fail; a
candidate missing a gated score the champion has never wins; with no gated score on either side the
newer version wins and the decision says so. Through the registry (the session's sqlite store, a model
name per test): `promote` moves `candidate` always and `champion` only on a pass, recording the decision;
`register_one` without a dvc.lock tags the version `lineage.dvc_lock: missing`; the stage names a missing
checkpoint before it registers anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks import register
from tasks.core import paths, registry, stages, tracking
from tasks.core.config import RegisterConfig, dump_params, resolve_params
from tasks.core.stage import StageError
from tests.test_serving import tiny_checkpoint

# Margins and scores that are exact in binary floating point, so "exactly at the margin" is exact.
CFG = RegisterConfig(max_mmlu_drop=0.125, max_ppl_increase=0.125)
CHAMPION = {"mmlu/acc": 0.5, "ppl/val": 16.0}


@pytest.mark.parametrize(
    ("new", "passes"),
    [
        (dict(CHAMPION), True),  # equal scores: the newer version takes over
        ({"mmlu/acc": 0.375, "ppl/val": 16.0}, True),  # drop == max_mmlu_drop
        ({"mmlu/acc": 0.37, "ppl/val": 16.0}, False),  # drop 0.13 > 0.125
        ({"mmlu/acc": 0.5, "ppl/val": 18.0}, True),  # rise == max_ppl_increase
        ({"mmlu/acc": 0.5, "ppl/val": 18.01}, False),
        ({"mmlu/acc": 0.9, "ppl/val": 30.0}, False),  # a better MMLU does not buy a worse perplexity
        ({"mmlu/acc": 0.6, "ppl/val": 12.0}, True),
    ],
)
def test_gate_passes_within_both_margins_inclusive(new, passes):
    ok, reason = register.gate(new, CHAMPION, CFG)
    assert ok is passes, reason
    assert f"mmlu/acc {new['mmlu/acc']:.4f} vs 0.5000" in reason and f"ppl/val {new['ppl/val']:.3f}" in reason


def test_gate_never_lets_a_candidate_without_the_champions_scores_win():
    assert register.gate({}, None, CFG) == (True, "no champion yet")
    ok, reason = register.gate({}, CHAMPION, CFG)
    assert not ok and reason == "candidate has no mmlu/acc (champion 0.5000), ppl/val (champion 16.0000)"
    ok, reason = register.gate({"mmlu/acc": 0.9, "win_rate": 1.0}, CHAMPION, CFG)
    assert not ok and reason == "candidate has no ppl/val (champion 16.0000)"
    # Scores the champion never had cannot be compared, so they do not block.
    assert register.gate(CHAMPION, {}, CFG) == (True, "the champion has no gated metrics")
    assert register.gate({"mmlu/acc": 0.1}, {"mmlu/acc": 0.5}, CFG)[0] is False
    # Neither side gated (the reward model: evaluate does not score it): the newer wins, and says so.
    assert register.gate({}, {}, CFG) == (True, "no gated metrics on either version: the newer one wins")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny sft checkpoint with eval scores registered by `register_one` in a workspace without a
    dvc.lock; yields (workspace, params, version 1)."""
    root = tmp_path_factory.mktemp("register")
    ckpt = tiny_checkpoint(root)
    (root / "data/checkpoints").mkdir(parents=True)
    shutil.move(ckpt, root / "data/checkpoints/sft")
    params = resolve_params("tiny", ["register.model_prefix=register-tests"])
    dump_params(params, root / "params.yaml")
    (root / "data/eval").mkdir(parents=True)
    (root / "data/eval/sft.json").write_text(json.dumps({"scores": CHAMPION}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert not Path("dvc.lock").exists()
        with tracking.stage_run("register", params) as tracker:
            result = register.register_one("sft", params, tracker)
    version = tracking.client().get_model_version(result["name"], str(result["version"]))
    return root, params, version


def test_a_version_registered_without_dvc_lock_says_so(registered):
    _, _, version = registered
    assert str(version.version) == "1"
    assert version.tags["lineage.dvc_lock"] == "missing"
    assert not [k for k in version.tags if k.startswith("dvc.")]
    assert version.tags["champion.decision"] == "promoted: no champion yet"
    assert str(registry.version_by_alias(version.name, "champion").version) == "1"
    assert {k: float(version.tags[f"eval.{k}"]) for k in CHAMPION} == CHAMPION


def new_version(v1, name: str):
    """A further version of the registered model `name`, of the same logged model as v1."""
    client = tracking.client()
    model_id = v1.model_id or v1.source.rsplit("/", 1)[-1]  # source is models:/<logged model id>
    return str(client.create_model_version(name, v1.source, run_id=v1.run_id, model_id=model_id).version)


@pytest.mark.parametrize(
    ("label", "scores", "promoted"),
    [
        ("unevaluated", {}, False),
        ("mmlu-only", {"mmlu/acc": 0.9}, False),
        ("worse", {"mmlu/acc": 0.3, "ppl/val": 16.0}, False),
        ("equal", dict(CHAMPION), True),
        ("better", {"mmlu/acc": 0.6, "ppl/val": 15.0}, True),
    ],
)
def test_promote_moves_candidate_always_and_champion_only_through_the_gate(
    registered, label, scores, promoted
):
    _, _, v1 = registered
    name = f"register-tests-gate-{label}"  # a model of its own: no test sees another's aliases
    client = tracking.client()
    client.create_registered_model(name)
    first = new_version(v1, name)
    assert register.promote(name, first, dict(CHAMPION), CFG) == (True, "promoted: no champion yet")
    second = new_version(v1, name)

    ok, decision = register.promote(name, second, scores, CFG)
    assert ok is promoted
    assert decision.startswith(
        ("promoted: " if promoted else "kept previous champion: ") + f"vs champion v{first}"
    )
    assert str(registry.version_by_alias(name, "candidate").version) == second
    assert str(registry.version_by_alias(name, "champion").version) == (second if promoted else first)
    tags = client.get_model_version(name, second).tags
    assert tags["champion.decision"] == decision
    assert register.scores_from_tags(tags) == scores


def test_register_names_every_missing_checkpoint_before_registering_anything(
    registered, tmp_path, monkeypatch
):
    root, _, _ = registered
    prefix = "register-tests-missing"
    shutil.copytree(root / "data", tmp_path / "data")  # the sft checkpoint only
    params = resolve_params("tiny", [f"register.model_prefix={prefix}"])
    dump_params(params, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError) as info, tracking.stage_run("register", params) as tracker:
        register.run(params, tracker)
    for name in stages.models():
        assert (str(paths.checkpoint(name)) in str(info.value)) is (name != "sft"), name
    assert tracking.client().search_registered_models(f"name LIKE '{prefix}-%'") == []
    assert not (tmp_path / paths.REGISTRY).exists()
