import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.config import ConfigError, Params, dump_params, list_profiles, load_params, resolve_params
from tasks.core.strict import build, parse_override

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


# ------------------------------------------------------------------------ bad input before any work
ALIAS_BOMB = "[" + ", ".join(["&a [x, x]"] + ["*a"] * 8) + "]"

# (--set values, the key the message must name). One row per class of bad value; each must stop
# `pipeline params` in the CLI, before params.yaml or anything under data/ is written.
BAD_SETS = [
    (["pretrain.train.lr=.nan"], "pretrain.train.lr"),
    (["sft.train.lr=-0.001"], "sft.train.lr"),
    (["dpo.train.min_lr=.inf"], "dpo.train.min_lr"),
    (["reward.train.max_steps=0"], "reward.train.max_steps"),
    (["pretrain.train.warmup_steps=-1"], "pretrain.train.warmup_steps"),
    (["pretrain.train.micro_batch_size=0"], "pretrain.train.micro_batch_size"),
    (["rlhf.rollout_batch_size=0"], "rlhf.rollout_batch_size"),
    (["sft.val_fraction=1.0"], "sft.val_fraction"),
    (["encode.val_fraction=0"], "encode.val_fraction"),
    (["dpo.loss_type=hinge"], "dpo.loss_type"),
    (["dpo.beta=0"], "dpo.beta"),
    (["pretrain.train.eval_batches=0"], "pretrain.train.eval_batches"),
    (["rlhf.max_new_tokens=0"], "rlhf.max_new_tokens"),
    (["evaluate.max_new_tokens=0"], "evaluate.max_new_tokens"),
    (["pretrain.train.checkpoint_every=-5"], "pretrain.train.checkpoint_every"),
    (["pretrain.train.eval_every=-1"], "pretrain.train.eval_every"),
    (["sft.train.resume_mismatch=maybe"], "sft.train.resume_mismatch"),
    (["model.d_model=66"], "d_model"),  # not divisible by n_head=4
    (["model.vocab_size=1000"], "model.vocab_size"),  # ignored: pretrain sizes it from the tokenizer
    (["sft.seq_len=512"], "sft.seq_len"),  # over model.max_seq_len=128: positions would not exist
    (["evaluate.ppl_window=4096"], "evaluate.ppl_window"),
    (["evaluate.fewshot_policy=sometimes"], "evaluate.fewshot_policy"),
    (["ingest.pretrain.kind=ftp"], "ingest.pretrain.kind"),
    # paths stay inside the root they belong to
    (["ingest.sft.kind=files", "ingest.sft.path=../outside.jsonl"], "ingest.sft.path"),
    (["ingest.pretrain.kind=files", "ingest.pretrain.path='*.txt'"], "ingest.pretrain.path"),
    (["ingest.pretrain.kind=files", "ingest.pretrain.path=data/**/*.txt"], "ingest.pretrain.path"),
    (["ingest.pretrain.watch=elsewhere"], "ingest.pretrain.watch"),  # derived from path, not set
    (["evaluate.mmlu_dir=../../mmlu"], "evaluate.mmlu_dir"),
    (["evaluate.subjects=[../../etc/passwd]"], "evaluate.subjects"),
    (["dpo.reference=../../outside"], "dpo.reference"),
    # names that reach the model registry
    (["register.model_prefix=" + "x" * 200], "register.model_prefix"),
    (["register.model_prefix=a/b"], "register.model_prefix"),
    # YAML in --set: no anchors or aliases, bounded size, bounded messages
    (["tokenizer.role_tokens=" + ALIAS_BOMB], "tokenizer.role_tokens"),
    (["evaluate.subjects=&x [astronomy]"], "evaluate.subjects"),  # an anchor, however harmless
    (["evaluate.subjects=" + "[" + "a," * 5000 + "a]"], "evaluate.subjects"),
    (["pretrain.train.lr=[" + "1," * 1500 + "1]"], "pretrain.train.lr"),
]


def data_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def project_dir(tmp_path, monkeypatch) -> Path:
    """A directory with previous outputs: a failed `pipeline params` must leave every byte of them.
    Beside it, a source file that exists: a path escaping the root is refused for where it points."""
    (tmp_path / "outside.jsonl").write_text('{"messages": []}\n')
    tmp_path = tmp_path / "project"
    for name, data in {
        "params.yaml": "previous: params\n",
        "data/raw/pretrain.parquet": "old raw\n",
        "data/checkpoints/base/config.json": "{}\n",
        "data/metrics/pretrain.json": "{}\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(data)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("sets, key", BAD_SETS, ids=[s[0][-1][:40] for s in BAD_SETS])
def test_bad_value_stops_pipeline_params_naming_the_key(project_dir, capsys, sets, key):
    from flows.cli import main

    before = data_tree(project_dir)
    argv = ["params", "--profile", "tiny"] + [arg for s in sets for arg in ("--set", s)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert key in err, err[:2000]
    assert len(err) < 600, f"error messages are bounded, got {len(err)} chars"
    assert data_tree(project_dir) == before


def test_profile_name_cannot_leave_the_profiles_dir(project_dir, capsys):
    from flows.cli import main

    outside = project_dir / "evil.yaml"
    outside.write_text("pretrain: {seq_len: 8}\n")
    before = data_tree(project_dir)
    rel = os.path.relpath(outside.with_suffix(""), REPO / "conf/profiles")
    assert main(["params", "--profile", rel]) == 2
    assert "profile" in capsys.readouterr().err
    assert data_tree(project_dir) == before


def test_hand_edited_params_yaml_is_checked_on_load(tmp_path, monkeypatch):
    """A stage loads params.yaml with the same checks, so a hand edit fails before the stage works."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    good = resolve_params("tiny", ["ingest.sft.kind=files", "ingest.sft.path=corpus/sft.jsonl"])
    assert good.ingest.sft.watch == "corpus/sft.jsonl"
    assert good.ingest.pretrain.watch and good.evaluate.mmlu_watch == "data/mmlu"
    path = tmp_path / "params.yaml"
    dump_params(good, path)
    text = path.read_text()
    for old, new, key in [
        ("beta: 0.1", "beta: 0.0", "dpo.beta"),
        ("path: corpus/sft.jsonl", "path: corpus/other", "ingest.sft.watch"),  # watch no longer fits
        ("mmlu_dir: data/mmlu", "mmlu_dir: ../mmlu", "evaluate.mmlu_dir"),
    ]:
        assert old in text
        path.write_text(text.replace(old, new, 1))
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_params(path)
    path.write_text(text)
    assert load_params(path) == good


def test_source_watch_is_the_path_dvc_hashes():
    cases = {
        ("files", "corpus/a.jsonl"): "corpus/a.jsonl",
        ("files", "corpus/dir"): "corpus/dir",
        ("files", "corpus/**/part-*.parquet"): "corpus",
        ("files", "/abs/data/*.txt"): "/abs/data",
        ("embedded", ""): "tasks/data/embedded.py",
    }
    for (kind, path), watch in cases.items():
        params = resolve_params("tiny", [f"ingest.pretrain.kind={kind}", f"ingest.pretrain.path={path}"])
        assert params.ingest.pretrain.watch == watch, (kind, path)
