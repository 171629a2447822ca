"""Multi-node training on one machine: two node ranks, each a launcher process of its own.

Each node runs one process (so both have LOCAL_RANK 0 and only the global RANK tells them apart) and they
meet at a rendezvous on 127.0.0.1 (gloo on CPU), as two machines would at node 0's address. The launchers
are the two that README's scale-out section names: torchrun with `--nnodes 2 --node_rank N` (static
rendezvous) and the DeepSpeed launcher with a hostfile, started on every node with `--no_ssh --node_rank N`
(what it would otherwise start on each host over pdsh). The run must equal one process with the same global
batch, and only global rank 0 may track or write outputs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.deploy import free_port
from tests.helpers.workspace import make_workspace
from tests.test_pretrain import (
    LOSS_TOL,
    REPO,
    SMALL,
    UPDATE_TOL,
    initial_weights,
    losses,
    one_rank,  # noqa: F401 (the fixture: 1 process, grad_accum=2, zero_stage=2)
    store,  # noqa: F401 (the fixture: one MLflow sqlite store for the module)
    weights,
)


def node_command(launcher: str, node_rank: int, port: int) -> list[str]:
    """The command node `node_rank` of 2 runs, one training process per node, rendezvous at 127.0.0.1."""
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "tasks.pretrain",
        ]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [
        sys.executable,
        deepspeed,
        "--hostfile=hostfile",
        "--no_ssh",
        f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "--no_local_rank",
        "--module",
        "tasks.pretrain",
    ]


def run_two_nodes(roots: list[Path], launcher: str, db: Path, experiment: str) -> list[tuple[int, str]]:
    """Start node rank n in roots[n] (the same directory for a shared file system); return each node's
    exit code and output once both end."""
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        MLFLOW_TRACKING_URI=f"sqlite:///{db}",
        PIPELINE_EXPERIMENT=experiment,
        OMP_NUM_THREADS="1",
    )
    procs = [
        subprocess.Popen(
            node_command(launcher, n, port),
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a hung rendezvous is killed with its workers
        )
        for n, root in enumerate(roots)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            outputs.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return outputs


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_equal_one_process_and_only_global_rank_0_writes(one_rank, tmp_path, store, launcher):  # noqa: F811
    make_workspace(
        tmp_path,
        [*SMALL, "pretrain.train.grad_accum=1", "pretrain.train.zero_stage=2"],
    )
    # Node names need not resolve: with --no_ssh each node only reads its own slots and the world's size.
    (tmp_path / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
    experiment = f"two-nodes-{launcher}"
    (rc0, node0), (rc1, node1) = run_two_nodes([tmp_path, tmp_path], launcher, store, experiment)
    assert rc0 == rc1 == 0, f"node 0 exited with {rc0}, node 1 with {rc1}:\n{node0[-3000:]}\n{node1[-3000:]}"

    # The same global batch (2 micro-batches per step, one per node) as one process with grad_accum=2.
    ref, got = losses(one_rank), losses(tmp_path)
    assert len(got) == len(ref) == 4
    assert got[0] == pytest.approx(ref[0], abs=1e-5), "step 1 sees the same batches: equal up to rounding"
    assert got == pytest.approx(ref, abs=LOSS_TOL), (got, ref)
    w_ref, w_got, w0 = weights(one_rank), weights(tmp_path), initial_weights(one_rank)
    d_ref = torch.cat([(w_ref[k] - w0[k]).flatten() for k in w0])
    d_got = torch.cat([(w_got[k] - w0[k]).flatten() for k in w0])
    relative = float((d_got - d_ref).norm() / d_ref.norm())
    print(f"{launcher}, 2 nodes: the updates differ by {relative:.2e} of the update")
    assert relative < UPDATE_TOL, relative

    # Both nodes have LOCAL_RANK 0; only global rank 0 (node 0) logs progress, tracks and writes outputs.
    assert node0.count("stage pretrain done") == 1 and "step 4/4" in node0, node0[-3000:]
    assert "stage pretrain done" not in node1 and "step 1/4" not in node1, node1[-3000:]
    assert not (tmp_path / "data/state/pretrain").exists(), "the resume state is removed once outputs are in"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"], "one MLflow run: node 1 has no tracker"
    # The record says how it trained: params' world_size (1) is not consulted under a launcher.
    assert runs[0].data.params["dist.world_size"] == "2" and runs[0].data.params["dist.nodes"] == "2"


def test_nodes_that_see_different_resume_states_stop_naming_what_each_saw(tmp_path, store):  # noqa: F811
    """Two nodes without a shared file system: node 0's data/ holds a resume state that node 1's lacks.
    Resuming on one node and starting over on the other would train different steps until a collective
    hangs; every rank stops instead, naming what each saw, before an engine starts."""
    roots = [tmp_path / "node0", tmp_path / "node1"]
    for root in roots:
        root.mkdir()
        make_workspace(root, [*SMALL, "pretrain.train.grad_accum=1", "pretrain.train.zero_stage=2"])
    state = roots[0] / "data/state/pretrain"
    (state / "step00000002").mkdir(parents=True)
    (state / "latest").write_text("step00000002")
    (rc0, node0), (rc1, node1) = run_two_nodes(roots, "torchrun", store, "two-nodes-disagree")
    assert rc0 != 0 and rc1 != 0, (node0[-3000:], node1[-3000:])
    for out in (node0, node1):
        assert "the ranks disagree about the resume state" in out, out[-3000:]
        assert "rank 0 on" in out and "'resume_from': 'step00000002'" in out, out[-3000:]
        assert "rank 1 on" in out and "'resume_from': None" in out, out[-3000:]
    assert not (roots[0] / "data/checkpoints/base").exists() and not (roots[1] / "data/checkpoints").exists()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"LOCAL_WORLD_SIZE": "4"}, 4),  # torchrun
        ({"LOCAL_SIZE": "4"}, 4),  # the DeepSpeed launcher sets only this
        ({"LOCAL_SIZE": "1"}, None),
        ({"LOCAL_SIZE": "4", "OMP_NUM_THREADS": "3"}, None),  # said explicitly: left alone
    ],
)
def test_processes_on_one_node_share_its_cores_under_either_launcher(monkeypatch, env, expected):
    from tasks.train.distributed import cpu_threads_per_process

    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert cpu_threads_per_process() == (None if expected is None else 16 // expected)
