"""The shared training loop through its stages: really trains, resumes exactly after a kill -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.config import TrainConfig
from tasks.train.distributed import deepspeed_config
from tasks.train.loop import lr_multiplier
from tests.helpers.workspace import make_workspace

REPO = Path(__file__).resolve().parents[1]


def run_stage(cwd: Path, stage: str, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(
        os.environ, PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}", **env
    )
    return subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}"],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def weights_hash(path: Path) -> str:
    from models.checkpoint import load_checkpoint, state_dict_hash

    model, _ = load_checkpoint(path)
    return state_dict_hash(model)


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    assert lr_multiplier(55, cfg) == pytest.approx(0.55)


def test_zero_stage_outside_range_is_rejected():
    with pytest.raises(ValueError, match="zero_stage=4"):
        deepspeed_config(TrainConfig(zero_stage=4))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted tiny pretrain run (a real stage subprocess). The post-training stages are
    exercised in tests/test_posttrain.py and end to end in tests/test_e2e.py."""
    root = tmp_path_factory.mktemp("stages")
    make_workspace(root)
    proc = run_stage(root, "pretrain")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc.stdout


def curve(root: Path, stage: str) -> list[dict[str, float]]:
    import csv

    with open(root / f"data/plots/{stage}.csv") as fh:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]


def test_pretrain_loss_goes_down_and_outputs_are_recorded(trained):
    root, _ = trained
    rows = curve(root, "pretrain")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2, (rows[0]["loss"], rows[-1]["loss"])
    metrics = json.loads((root / "data/metrics/pretrain.json").read_text())
    assert metrics["val/loss"] < rows[0]["loss"]
    config = json.loads((root / "data/checkpoints/base/config.json").read_text())
    assert config["kind"] == "causal_lm" and len(config["tokenizer_fingerprint"]) == 64
    assert not (root / "data/state/pretrain").exists(), "resume state is removed once the output is saved"


def test_pretrain_resumes_after_kill_to_the_same_weights(trained, tmp_path):
    """kill -9 at step 15 (last checkpoint at 10), rerun: same final weights as the uninterrupted run."""
    root, _ = trained
    make_workspace(tmp_path)
    killed = run_stage(tmp_path, "pretrain", PIPELINE_KILL_AT_STEP="15")
    assert killed.returncode == -9
    assert not (tmp_path / "data/checkpoints/base").exists(), "a killed stage must not leave an output"
    assert (tmp_path / "data/state/pretrain/latest").exists()
    resumed = run_stage(tmp_path, "pretrain")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from data/state/pretrain at step 10" in resumed.stdout
    assert weights_hash(tmp_path / "data/checkpoints/base") == weights_hash(root / "data/checkpoints/base")
    steps = [row["step"] for row in curve(tmp_path, "pretrain")]
    assert steps == sorted(set(steps)), "the loss curve has each step once after a resume"


def test_wrong_tokenizer_is_refused(trained, tmp_path):
    root, _ = trained
    make_workspace(tmp_path)
    index = tmp_path / "data/tokens/index.json"
    index.write_text(json.dumps({"dtype": "uint16", "tokenizer_fingerprint": "0" * 64}))
    proc = run_stage(tmp_path, "pretrain")
    assert proc.returncode == 1
    assert "made with tokenizer 000000000000" in proc.stdout
    assert not (tmp_path / "data/checkpoints/base").exists()


def test_a_stage_started_after_in_process_training_makes_its_own_group():
    """A process that trained in-process (a group of one, its store listening on MASTER_PORT) starts a
    stage process with its environment, as tests and notebooks do: the child inherits RANK and MASTER_PORT
    but is not in a group (a 2-rank stage would relaunch under torchrun) and makes a group of its own on a
    free port (it used to fail binding the parent's port, and a 2-rank stage ran on one)."""
    import torch.distributed as dist

    from tasks.train.distributed import init_distributed

    init_distributed()
    assert dist.is_initialized() and os.environ["RANK"] == "0"
    code = (
        "import os, torch.distributed as d\n"
        "from tasks.core.launch import launched\n"
        "from tasks.train.distributed import init_distributed\n"
        "print('launched', launched())\n"  # a 2-rank stage relaunches under torchrun only if False
        "init_distributed()\n"
        "print('group', d.get_world_size(), os.environ['MASTER_PORT'])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "launched False" in proc.stdout
        and "group 1 " in proc.stdout
        and f" {os.environ['MASTER_PORT']}\n" not in proc.stdout
    ), proc.stdout
