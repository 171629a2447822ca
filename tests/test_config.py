import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.config import (
    ConfigError,
    Params,
    build,
    list_profiles,
    load_params,
    parse_override,
    resolve_params,
)

REPO = Path(__file__).resolve().parents[1]


def test_every_profile_resolves():
    assert {"tiny", "cpu", "gpu"} <= set(list_profiles())
    for profile in list_profiles():
        params = resolve_params(profile)
        assert params.profile == profile


def test_committed_params_yaml_is_the_cpu_profile():
    assert load_params(REPO / "params.yaml") == resolve_params("cpu")


def test_override_sets_nested_value_with_yaml_type():
    params = resolve_params(
        "tiny", ["pretrain.train.max_steps=7", "dpo.beta=0.5", "evaluate.subjects=[anatomy]"]
    )
    assert params.pretrain.train.max_steps == 7
    assert params.dpo.beta == 0.5
    assert params.evaluate.subjects == ["anatomy"]
    assert parse_override("a.b=1") == {"a": {"b": 1}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("pretrain.train.bogus=1", "pretrain.train.bogus"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("pretrain.train.lr=fast", "pretrain.train.lr: expected float"),
        ("pretrain.train.bf16=maybe", "pretrain.train.bf16: expected true/false"),
        ("model.n_head=3", "n_head=3"),
        ("tokenizer.role_tokens=5", "tokenizer.role_tokens: expected a list"),
        ("novalue", "expected key=value"),
    ],
)
def test_bad_config_is_an_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        resolve_params("tiny", [override])


def test_unknown_profile_names_it():
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        resolve_params("huge")


def test_build_rejects_unknown_keys_in_params_file(tmp_path):
    data = dataclasses.asdict(Params())
    data["sft"]["train"]["epochs"] = 3
    with pytest.raises(ConfigError, match=r"sft\.train\.epochs"):
        build(Params, data)


def test_cli_fails_before_any_work(tmp_path):
    """Unknown keys, profiles and missing source paths stop `pipeline` before a stage runs."""
    cases = [
        (["--profile", "tiny", "--set", "pretrain.train.nope=1"], "pretrain.train.nope"),
        (["--profile", "galaxy"], "unknown profile 'galaxy'"),
        (
            [
                "--profile",
                "tiny",
                "--set",
                "ingest.pretrain.kind=files",
                "--set",
                f"ingest.pretrain.path={tmp_path}/missing/*.txt",
            ],
            "missing",
        ),
    ]
    for args, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "params", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert not (tmp_path / "params.yaml").exists()
