"""An open model's line end to end: a Qwen3 folder made here with transformers (no hub) in init/, then
`pipeline run` (the Prefect flow over the whole graph) in a temp git + DVC project: tokenizer, encode and
pretrain only leave their markers (sft.init is a param of theirs), sft (LoRA) -> reward -> dpo (LoRA) ->
rlhf -> grpo train with the model's own tokenizer and chat template, evaluate scores each model with it,
register records where the line started (the folder and its sha256) on every version, read back from the
project's sqlite MLflow store; the registered sft serves with the model's chat template; `dvc status` is
clean afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models.adapters import folder_sha256
from tasks.data.hf_chat import HFChatTokenizer
from tests.helpers.hfmodels import hf_model, save_chat_tokenizer, save_hf
from tests.helpers.project import make_project
from tests.test_e2e import mlflow_client, project_env

pytestmark = pytest.mark.e2e

FOLDER = "init/qwen3"
STEPS = {"sft": 4, "reward": 4, "dpo": 4, "rlhf": 2, "grpo": 2}
OVERRIDES = [
    f"sft.init={FOLDER}",
    "sft.lora.enabled=true",
    "sft.lora.rank=4",
    "dpo.lora.enabled=true",
    "dpo.lora.rank=4",
    *[
        f"{s}.train.{k}={n}"
        for s, n in STEPS.items()
        for k in ("max_steps", "eval_every", "checkpoint_every")
    ],
    "evaluate.max_items_per_subject=2",
    "evaluate.task_problems=4",
    "evaluate.winrate_prompts=4",
    "grpo.val_problems=4",
]
SKIPPED = ("tokenizer", "encode", "pretrain")
TRAINED = ("sft", "reward", "dpo", "rlhf", "grpo")


@pytest.fixture(scope="module")
def line(tmp_path_factory, prefect_harness) -> Path:
    """`pipeline run` (the Prefect flow: every stage of dvc.yaml, each as `dvc repro --single-item`)."""
    from prefect.settings import PREFECT_API_URL

    root = make_project(tmp_path_factory.mktemp("open-model") / "project")
    save_chat_tokenizer(root / FOLDER, "chatml", vocab_size=300)
    save_hf(hf_model("qwen3", vocab_size=320), root / FOLDER)  # an embedding padded past the tokenizer
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    cmd = [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--retries", "0", *sets]
    env = dict(project_env(root), PREFECT_API_URL=str(PREFECT_API_URL.value()))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root


def test_open_model_line_runs_without_pretraining_and_registers_its_source(
    line: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = line / FOLDER
    tokenizer = HFChatTokenizer.load(folder)
    # tokenizer, encode and pretrain left markers, not work; DVC recorded them, so nothing is pending
    for stage, out in zip(SKIPPED, ("data/tokenizer", "data/tokens", "data/checkpoints/base"), strict=True):
        assert sorted(p.name for p in (line / out).iterdir()) == ["SKIPPED.json"], out
        assert json.loads((line / f"data/metrics/{stage}.json").read_text()) == {"skipped": 1}
        assert f"{stage} skipped: sft.init={FOLDER}" in (line / f".pipeline/logs/{stage}.log").read_text()
    assert not (line / "data/state/pretrain").exists()
    status = subprocess.run(
        ["dvc", "status", "--json"], cwd=line, env=project_env(line), capture_output=True, text=True
    )
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout + status.stderr
    lock = yaml.safe_load((line / "dvc.lock").read_text())["stages"]
    assert lock["pretrain"]["params"]["params.yaml"]["sft.init"] == FOLDER

    # every model of the line trained and was evaluated with the open model's tokenizer
    for stage in TRAINED:
        meta = json.loads((line / f"data/checkpoints/{stage}/config.json").read_text())
        assert meta["tokenizer_fingerprint"] == tokenizer.fingerprint, stage
    evaluated = sorted(p.stem for p in (line / "data/eval").glob("*.json") if p.stem != "summary")
    assert evaluated == sorted(["sft", "dpo", "rlhf", "grpo"])
    for name in evaluated:
        result = json.loads((line / f"data/eval/{name}.json").read_text())
        assert result["tokenizer_fingerprint"] == tokenizer.fingerprint
        assert result["protocol"]["mmlu"]["prepend_bos"] is False  # ChatML (Qwen) has no bos token
        assert "held-out documents" in result["protocol"]["perplexity"]["text"]
        assert result["metrics"]["ppl"] > 1 and result["metrics"]["bpb"] > 0
        assert "task_acc" in result["metrics"]

    # register: every model of the line, none for the base that was never trained, the source on each
    client = mlflow_client(line)
    registered = json.loads((line / "data/registry/registered.json").read_text())
    assert sorted(registered) == sorted(TRAINED)
    sha = folder_sha256(folder)
    for stage in TRAINED:
        version = client.get_model_version(f"pipeline-{stage}", "1")
        assert version.tags["init.source"] == FOLDER
        assert version.tags["init.folder"] == FOLDER
        assert version.tags["init.sha256"] == sha
        assert version.tags["init.model_type"] == "qwen3"
        assert version.tags["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert not client.search_model_versions("name='pipeline-base'")

    # the registered sft serves with the model's own chat template (through the integrity checks)
    from tasks.core import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{line / 'mlflow.db'}")
    model, _ = registry.load_registered("pipeline-sft/1")
    assert isinstance(model.tokenizer, HFChatTokenizer)
    assert model.tokenizer.fingerprint == tokenizer.fingerprint
    chat = [{"role": "user", "content": "What does json.dumps do?"}]
    expected = tokenizer.render_chat(chat, add_generation_prompt=True)[0]
    assert model._prompt(chat, 4) == expected
    assert tokenizer.decode(expected, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    answer = model.predict(None, [{"messages": chat}], {"max_new_tokens": 4})
    assert isinstance(answer[0], str)


def test_a_registered_model_starts_a_line(line: Path, tmp_path: Path) -> None:
    """sft.init: models:/pipeline-dpo@champion (the line above's dpo, itself from init/qwen3): verified,
    copied into init/registry/, fine-tuned with the tokenizer it carries; the lineage names the version
    and, as origin, where that model's line started. A reward model or an unknown name: refused."""
    import shutil

    from tasks import register
    from tasks.core import paths

    root = tmp_path / "project"
    shutil.copytree(line, root, symlinks=True)
    env = project_env(root)
    registry = f"sqlite:///{line / 'mlflow.db'}"  # the line's registry (its artifacts stay where they are)
    env["MLFLOW_TRACKING_URI"] = registry

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=900)

    def params(init: str) -> None:
        sets = [o for o in OVERRIDES if not o.startswith("sft.init=")] + [f"sft.init={init}"]
        proc = run(
            sys.executable,
            "-m",
            "flows.cli",
            "params",
            "--profile",
            "tiny",
            *[a for o in sets for a in ("--set", o)],
        )
        assert proc.returncode == 0, proc.stderr[-2000:]

    for init, message in (
        ("models:/pipeline-reward@champion", "is a scalar_head model, not a causal language model"),
        ("models:/pipeline-nope@champion", "no registered model named 'pipeline-nope'"),
    ):
        params(init)
        proc = run(sys.executable, "-m", "tasks.sft")
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stdout[-2000:]
        assert json.loads((root / "data/checkpoints/sft/config.json").read_text())["init"]["source"] == FOLDER

    params("models:/pipeline-dpo@champion")
    proc = run("dvc", "repro", "sft")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = mlflow_client(line)
    version = client.get_model_version_by_alias("pipeline-dpo", "champion")
    copied = root / "init/registry" / f"pipeline-dpo-v{version.version}"
    assert (copied / "model.safetensors").is_file()  # the merged model, as registered
    meta = json.loads((root / "data/checkpoints/sft/config.json").read_text())
    init = meta["init"]
    assert init["registered_model"] == "pipeline-dpo" and init["version"] == str(version.version)
    assert init["manifest_sha256"] == version.tags["manifest.sha256"]
    assert init["origin"]["source"] == FOLDER and init["sha256"] == folder_sha256(copied)
    assert meta["tokenizer_fingerprint"] == HFChatTokenizer.load(line / FOLDER).fingerprint
    assert meta["adapter"]["base"]["path"] == str(copied.relative_to(root))
    with __import__("contextlib").chdir(root):
        tags = register.init_tags("sft")
        from models.checkpoint import load_checkpoint

        load_checkpoint(paths.checkpoint("sft"))  # adapters merge onto the copied base
    assert tags["init.source"] == "models:/pipeline-dpo@champion"
    assert tags["init.registered_model"] == "pipeline-dpo" and tags["init.version"] == str(version.version)
    status = run("dvc", "status", "sft", "--json")
    assert json.loads(status.stdout or "{}") == {}, status.stdout
