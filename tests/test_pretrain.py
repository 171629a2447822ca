"""Pretraining through the stage: multi-process ZeRO equals grad accumulation, overfitting, bad input.

Every run is a real `python -m tasks.pretrain` subprocess (torchrun for world_size=2, gloo on CPU) with
real DeepSpeed engines. OMP_NUM_THREADS=1: on a shared 2-core machine, OpenMP spin barriers of a
2-thread process stall whenever another process holds a core (a tiny step goes from 0.03 s to 4 s).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers.workspace import make_workspace

REPO = Path(__file__).resolve().parents[1]

# 4 steps of the tiny model; log every step so the whole loss curve is compared.
SMALL = [
    "pretrain.train.max_steps=4",
    "pretrain.train.micro_batch_size=4",
    "pretrain.train.warmup_steps=1",
    "pretrain.train.log_every=1",
    "pretrain.train.eval_every=0",
    "pretrain.train.checkpoint_every=2",
    "pretrain.train.bf16=true",
]


def run_pretrain(cwd: Path, db: Path, timeout: int = 180, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        MLFLOW_TRACKING_URI=f"sqlite:///{db}",
        OMP_NUM_THREADS="1",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "tasks.pretrain"],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def losses(root: Path) -> list[float]:
    with open(root / "data/plots/pretrain.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def weights(root: Path) -> dict[str, torch.Tensor]:
    from models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(root / "data/checkpoints/base")
    return {k: v.float() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow sqlite store for the module (creating its tables costs seconds per fresh store)."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, store) -> Path:
    """Reference: 1 process, grad_accum=2 (global batch = 2 micro-batches per step). zero_stage=2 is asked
    for; on one process the loop runs DeepSpeed stage 0 (nothing to partition), so this is the plain
    accumulation that ZeRO-2/3 on 2 ranks must reproduce."""
    root = tmp_path_factory.mktemp("one_rank")
    make_workspace(root, [*SMALL, "pretrain.train.grad_accum=2", "pretrain.train.zero_stage=2"])
    proc = run_pretrain(root, store)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def initial_weights(root: Path) -> dict[str, torch.Tensor]:
    """The weights pretrain starts from in the workspace at root, built as tasks/pretrain.py builds them."""
    from models.llama import Transformer
    from tasks.core.config import load_params
    from tasks.data.chat_tokenizer import ChatTokenizer
    from tasks.pretrain import model_config

    params = load_params(root / "params.yaml")
    config = model_config(params, ChatTokenizer.load(root / "data/tokenizer/tokenizer.json"))
    torch.manual_seed(params.pretrain.train.seed)
    return {k: v.float() for k, v in Transformer(config).state_dict().items()}


def lr_sum(root: Path) -> float:
    with open(root / "data/plots/pretrain.csv") as fh:
        return sum(float(row["lr"]) for row in csv.DictReader(fh))


# Tolerance: both layouts see the same 2 micro-batches per step (micro-batch k on rank r is window set
# k * world + r) and apply the same mean gradient, so step 1 is equal to float rounding. The sums differ
# in order (accumulation buffer vs gloo all-reduce, ZeRO's flat partitions), ~1e-7 relative in fp32; under
# bf16 autocast such a difference can flip the rounding of a weight copied to bf16 (2^-8 relative), so
# later losses move by ~1e-4. 2e-3 on a loss of ~6 is 0.03 %: far below a one-step change (~0.05), so a
# wrong batch split or a missing/duplicated gradient (a 2x effective lr) fails it.
LOSS_TOL = 2e-3
# Weights are compared by what training changed: the update of each run from the same initial weights.
# The relative difference of the updates (L2 over all weights) must stay under UPDATE_TOL of the update:
# measured 6e-8 (ZeRO-2) and 1.4e-3 (ZeRO-3, bf16 rounding flips); a 2x effective lr is 100 %, a dropped
# micro-batch tens of %.
UPDATE_TOL = 1e-2


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_equal_one_rank_with_grad_accumulation(one_rank, tmp_path, store, zero_stage):
    make_workspace(
        tmp_path,
        [
            *SMALL,
            "pretrain.train.world_size=2",
            "pretrain.train.grad_accum=1",
            f"pretrain.train.zero_stage={zero_stage}",
        ],
    )
    experiment = f"zero{zero_stage}-two-ranks"
    proc = run_pretrain(tmp_path, store, PIPELINE_EXPERIMENT=experiment)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "relaunching as -m torch.distributed.run --standalone --nproc_per_node=2" in proc.stdout
    ref, got = losses(one_rank), losses(tmp_path)
    assert len(got) == len(ref) == 4
    assert got[0] == pytest.approx(ref[0], abs=1e-5), "step 1 sees the same batches: equal up to rounding"
    assert got == pytest.approx(ref, abs=LOSS_TOL), (got, ref)
    assert ref[-1] < ref[0] - 0.05, "the run must actually train for the comparison to mean anything"
    w_ref, w_got, w0 = weights(one_rank), weights(tmp_path), initial_weights(one_rank)
    assert w_ref.keys() == w_got.keys() == w0.keys()
    d_ref = torch.cat([(w_ref[k] - w0[k]).flatten() for k in w0])
    d_got = torch.cat([(w_got[k] - w0[k]).flatten() for k in w0])
    # Adam moves a weight by about lr per step at most: w0 really is where both runs started.
    assert 0 < float(d_ref.abs().max()) < 3 * lr_sum(one_rank), (float(d_ref.abs().max()), lr_sum(one_rank))
    relative = float((d_got - d_ref).norm() / d_ref.norm())
    print(f"zero{zero_stage}: the updates differ by {relative:.2e} of the update")
    assert relative < UPDATE_TOL, relative
    # Only rank 0 tracks: one "done" line and one finished MLflow run (with MFU) in this experiment.
    assert proc.stdout.count("stage pretrain done") == 1
    assert not (tmp_path / "data/state/pretrain").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.params["pretrain.train.world_size"] == "2"
    assert runs[0].data.params["dist.world_size"] == "2" and runs[0].data.params["dist.nodes"] == "1"
    assert 0 < runs[0].data.metrics["mfu"] < 1


OVERFIT = textwrap.dedent(
    """
    import json, sys, torch, torch.nn.functional as F
    from models.config import ModelConfig
    from models.llama import Transformer
    from tasks.core.config import TrainConfig
    from tasks.train.loop import train

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32))
    fixed = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(1))

    class OneBatch:
        def batch(self, step, micro_step, model):
            return {"x": fixed[:, :-1], "y": fixed[:, 1:]}
        def loss(self, model, batch):
            logits = model(batch["x"])
            return F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten()), {}
        def evaluate(self, model):
            return {}
        def tokens_in(self, batch):
            return batch["x"].numel()

    curve = []
    cfg = TrainConfig(max_steps=80, micro_batch_size=4, lr=3e-3, min_lr=3e-3, warmup_steps=0, weight_decay=0.0,
                      eval_every=0, checkpoint_every=0, log_every=1, zero_stage=1, bf16=True)
    train(model, OneBatch(), cfg, state_dir=sys.argv[1], on_step=lambda s, m: curve.append(m["loss"]))
    print(json.dumps(curve))
    """
)


def test_tiny_model_overfits_one_batch_through_the_deepspeed_loop(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", OVERFIT, str(tmp_path / "state")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    curve = json.loads(proc.stdout.strip().splitlines()[-1])
    assert curve[0] > 3.0, curve  # starts near ln(64) = 4.2
    assert len(curve) == 80 and curve[-1] < 0.05, curve[
        ::10
    ]  # 128 memorisable tokens: near zero through bf16 autocast + ZeRO-1


# ------------------------------------------------------------------------------------------ bad input
def make_outputs(root: Path) -> dict[Path, bytes]:
    """Previous outputs that a failed run must leave byte for byte."""
    files = {
        root / "data/checkpoints/base/config.json": b'{"previous": true}\n',
        root / "data/metrics/pretrain.json": b'{"loss": 1.0}\n',
        root / "data/plots/pretrain.csv": b"step,loss\n1,1.0\n",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def assert_untouched(files: dict[Path, bytes]) -> None:
    for path, data in files.items():
        assert path.read_bytes() == data, f"{path} was overwritten by a failed run"


def edit_params(root: Path, key: str, value: object) -> None:
    """Set one key of params.yaml by hand, as a user editing the file would (no `pipeline params`)."""
    import yaml

    data = yaml.safe_load((root / "params.yaml").read_text())
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("pretrain.train.zero_stage", 5, "pretrain.train.zero_stage=5 is not a ZeRO stage (0, 1, 2 or 3)"),
        ("pretrain.seq_len", 256, "pretrain.seq_len=256 exceeds model.max_seq_len=128"),
    ],
)
def test_bad_train_config_fails_before_any_work(tmp_path, store, key, value, message):
    """`pipeline params` refuses these (tests/test_config.py); a hand-edited params.yaml stops the stage."""
    make_workspace(tmp_path)
    edit_params(tmp_path, key, value)
    files = make_outputs(tmp_path)
    proc = run_pretrain(tmp_path, store)
    assert proc.returncode == 1
    assert message in proc.stdout, proc.stdout[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr, "bad input is a message, not a crash"
    assert_untouched(files)


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory, store) -> Path:
    """data/state/pretrain/ of a 1-rank run killed at step 2 (its checkpoint is the one of step 1)."""
    root = tmp_path_factory.mktemp("killed")
    make_workspace(root, [*SMALL, "pretrain.train.checkpoint_every=1"])
    proc = run_pretrain(root, store, PIPELINE_KILL_AT_STEP="2")
    assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = root / "data/state/pretrain"
    assert (state / "latest").read_text() == "step00000001"
    return state


def with_state(root: Path, state: Path, overrides: list[str]) -> Path:
    make_workspace(root, [*SMALL, "pretrain.train.checkpoint_every=1", *overrides])
    shutil.copytree(state, root / "data/state/pretrain")
    return root / "data/state/pretrain"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, store) -> dict[str, Path]:
    """Uninterrupted runs of the resume tests' params (checkpoint_every=1), with lr as in SMALL and 2x."""
    roots = {}
    for name, extra in (("lr", []), ("lr2", ["pretrain.train.lr=0.002"])):
        roots[name] = tmp_path_factory.mktemp(f"reference-{name}")
        make_workspace(roots[name], [*SMALL, "pretrain.train.checkpoint_every=1", *extra])
        proc = run_pretrain(roots[name], store)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return roots


def checkpoint_bytes(root: Path) -> dict[str, bytes]:
    base = root / "data/checkpoints/base"
    return {p.name: p.read_bytes() for p in sorted(base.iterdir())}


def learned_metrics(root: Path) -> dict[str, float]:
    from tasks.train.loop import RUN_METRICS

    metrics = json.loads((root / "data/metrics/pretrain.json").read_text())
    return {k: v for k, v in metrics.items() if not any(t in k for t in RUN_METRICS)}


def test_resume_state_of_other_params_is_discarded_and_the_run_starts_fresh(
    tmp_path, store, saved_state, reference
):
    """lr changed after a kill: the saved optimizer and schedule belong to the old lr, so the state is
    discarded (what differs is logged) and the run equals an uninterrupted run with the new lr."""
    with_state(tmp_path, saved_state, ["pretrain.train.lr=0.002"])
    proc = run_pretrain(tmp_path, store)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        "discarding resume state data/state/pretrain/step00000001: it was saved by a run with other "
        "params or inputs (pretrain.train.lr: 0.001 -> 0.002)" in proc.stdout
    ), proc.stdout[-3000:]
    assert "resumed from" not in proc.stdout
    assert checkpoint_bytes(tmp_path) == checkpoint_bytes(reference["lr2"])
    assert losses(tmp_path) == losses(reference["lr2"])


def test_resume_state_of_other_data_is_discarded(tmp_path, store, saved_state):
    with_state(tmp_path, saved_state, [])
    shard = tmp_path / "data/tokens/train.bin"
    data = bytearray(shard.read_bytes())
    data[200:204] = data[300:304] if data[300:304] != data[200:204] else data[400:404]
    shard.write_bytes(bytes(data))  # same length, other tokens: what a changed corpus gives
    proc = run_pretrain(tmp_path, store)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "discarding resume state data/state/pretrain/step00000001" in proc.stdout
    assert "data/tokens/train.bin: " in proc.stdout and "resumed from" not in proc.stdout


def test_resume_mismatch_fail_names_what_differs_and_keeps_the_state(tmp_path, store, saved_state):
    state = with_state(tmp_path, saved_state, ["model.d_model=32", "pretrain.train.resume_mismatch=fail"])
    files = make_outputs(tmp_path)
    proc = run_pretrain(tmp_path, store)
    assert proc.returncode == 1
    assert (
        "resume state data/state/pretrain/step00000001 was saved by a run with other params or inputs "
        "(model.d_model: 64 -> 32" in proc.stdout
    ), proc.stdout[-3000:]
    assert "pretrain.train.resume_mismatch=restart" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert_untouched(files)
    assert (state / "latest").exists(), "under `fail` the state is the user's to delete, not ours"


@pytest.mark.parametrize("point", ["before-commit", "mid-commit"])
def test_a_kill_between_output_writes_leaves_old_outputs_or_the_next_run_completes(
    tmp_path, store, reference, point
):
    """The checkpoint, metrics JSON and plot CSV change together. Killed after all three are staged but
    before the commit marker: every old output is intact and the rerun resumes. Killed during the commit
    (checkpoint moved in): the rerun finishes the commit without training. Either way the outputs end
    up equal to an uninterrupted run's."""
    make_workspace(tmp_path, [*SMALL, "pretrain.train.checkpoint_every=1"])
    files = make_outputs(tmp_path)
    proc = run_pretrain(tmp_path, store, PIPELINE_KILL_AT=point)
    assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]
    if point == "before-commit":
        assert_untouched(files)
    else:  # the documented state inside the commit: the checkpoint moved in, metrics and plot not yet
        assert (tmp_path / "data/checkpoints/base/model.safetensors").exists()
        assert_untouched({p: d for p, d in files.items() if "checkpoints" not in str(p)})
    rerun = run_pretrain(tmp_path, store)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    if point == "before-commit":
        assert "resumed from data/state/pretrain at step 3" in rerun.stdout
    else:
        assert "completing the outputs of a finished run" in rerun.stdout, rerun.stdout[-3000:]
        assert "step 1/4" not in rerun.stdout and "resumed from" not in rerun.stdout, "no training"
    assert checkpoint_bytes(tmp_path) == checkpoint_bytes(reference["lr"])
    assert losses(tmp_path) == losses(reference["lr"])
    assert learned_metrics(tmp_path) == learned_metrics(reference["lr"])
    assert not (tmp_path / "data/state/pretrain").exists()


def test_truncated_resume_state_is_refused(tmp_path, store, saved_state):
    state = with_state(tmp_path, saved_state, [])
    victim = state / "step00000001/mp_rank_00_model_states.pt"
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])
    files = make_outputs(tmp_path)
    proc = run_pretrain(tmp_path, store)
    assert proc.returncode == 1
    assert (
        f"resume state data/state/pretrain/step00000001 is damaged: mp_rank_00_model_states.pt has "
        f"{size // 2} bytes, expected {size} bytes" in proc.stdout
    ), proc.stdout[-2000:]
    assert_untouched(files)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_benchmark_runs_on_cuda():
    """The speed benchmark's GPU path: same script, CUDA device, DeepSpeed bf16 weights."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/pretrain.py", "--quick"],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"].startswith("cuda")
    assert result["ours"]["tokens_per_s"] > 0 and 0 < result["ours"]["mfu"] < 1
