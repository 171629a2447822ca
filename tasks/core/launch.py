"""Entry point of a training stage: one process, or N under torchrun when train.world_size > 1.

`python -m tasks.pretrain` with `pretrain.train.world_size: N` re-executes itself as

    python -m torch.distributed.run --standalone --nproc_per_node N -m tasks.pretrain

(gloo on CPU, nccl on GPU: chosen by tasks.train.distributed.init_distributed). Under any launcher (torchrun,
the DeepSpeed launcher with a hostfile, SLURM + torchrun) RANK is already set, so nothing is re-executed
and world_size in params is not consulted: the launcher decides. Only rank 0 opens the MLflow run and
writes outputs; ranks > 0 run the same code with no tracker.

Multi-node (the DeepSpeed launcher, passwordless ssh to every host, the same checkout, venv and a shared
filesystem for data/ on each):

    # hostfile: one line per node, "<hostname> slots=<GPUs on it>"
    deepspeed --hostfile hostfile --master_addr node1 --module tasks.pretrain

This module stays light (no torch import): a bad config fails before torch, DeepSpeed or MLflow load.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from tasks.core.checks import check_train_config  # the one place for train config checks
from tasks.core.config import ConfigError, Params, TrainConfig, load_params
from tasks.core.stage import StageError, setup_logging, stage_main

log = logging.getLogger(__name__)


GROUP_OF_ONE = "PIPELINE_GROUP_OF_ONE"  # "<pid>:<port>": init_distributed made a group of one, no launcher
GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", GROUP_OF_ONE)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Is this process in a process group already: RANK set by a launcher, or by its own group of one?
    A process that trained in-process (tests, notebooks) passes its RANK and MASTER_PORT to the stage
    processes it starts; for them those name their parent's group, not one they belong to."""
    if "RANK" not in os.environ:
        return False
    pid, _, port = os.environ.get(GROUP_OF_ONE, "").partition(":")
    return pid == str(os.getpid()) or port != os.environ.get("MASTER_PORT")


def launcher_command(module: str, world_size: int) -> list[str]:
    """torchrun on this host: N processes, a free rendezvous port, RANK/WORLD_SIZE/... set for each."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world_size}",
        "-m",
        module,
    ]


def relaunch(module: str, world_size: int) -> None:
    """Replace this process by torchrun running `module` on world_size processes (does not return)."""
    cmd = launcher_command(module, world_size)
    env = {k: v for k, v in os.environ.items() if k not in GROUP_ENV}  # torchrun sets the group's own
    # N processes share the cores: give each its slice (torchrun would default to 1 thread each).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    # N processes on shared cores: OpenMP threads that spin at barriers would steal them from each other.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    log.info("world_size=%d: relaunching as %s", world_size, " ".join(cmd[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


def training_main(
    name: str,
    run: Callable[[Params, Any], dict[str, Any] | None],
    train_config: Callable[[Params], TrainConfig],
    check: Callable[[Params], None] | None = None,
) -> None:
    """`__main__` of a training stage: check params, relaunch under torchrun if needed, track in rank 0."""
    setup_logging()
    try:
        params = load_params()
        cfg = train_config(params)
        check_train_config(cfg, f"{name}.train")
        if check is not None:
            check(params)
    except (ConfigError, StageError) as exc:
        log.error("stage %s failed: %s", name, exc)
        sys.exit(1)
    if not launched() and cfg.world_size > 1:
        relaunch(f"tasks.{name}", cfg.world_size)
    if rank() == 0:
        stage_main(name, run)
        return
    # Ranks > 0: the same work with no MLflow run (rank 0 owns the records) and quieter logs.
    logging.getLogger().setLevel(logging.WARNING)
    try:
        run(params, None)
    except (ConfigError, StageError) as exc:
        log.error("stage %s failed on rank %d: %s", name, rank(), exc)
        sys.exit(1)
    except Exception as exc:
        log.error("stage %s failed on rank %d: %s: %s", name, rank(), type(exc).__name__, exc, exc_info=True)
        sys.exit(1)
