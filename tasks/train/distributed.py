"""Processes and DeepSpeed: join the process group, the engine config, reduce metrics, gather weights.

Every rank runs the same code; ZeRO stage 0 on one process (nothing to partition). Gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
from torch import nn

from tasks.core.config import TrainConfig
from tasks.core.launch import GROUP_OF_ONE, check_train_config, launched
from tasks.core.stage import StageError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_threads_per_process() -> int | None:
    """Each of the N processes on this node takes its share of the cores (None: leave torch's default, for
    one process or when OMP_NUM_THREADS says). N is torchrun's LOCAL_WORLD_SIZE or the DeepSpeed launcher's
    LOCAL_SIZE: that launcher sets no LOCAL_WORLD_SIZE, and N processes that each take every core stall."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1")
    if local_world <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // local_world)


def init_distributed() -> None:
    """Join the process group the launcher set up (gloo on CPU, nccl on GPU); without a launcher, a group
    of one on loopback. On CPU each of N local processes takes its share of the cores."""
    import deepspeed

    if not launched():
        # A parent's group of one (its RANK and MASTER_PORT, inherited) is not ours: its store holds that
        # port, so a group of our own gets a free one.
        if "RANK" in os.environ or "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ[GROUP_OF_ONE] = f"{os.getpid()}:{os.environ['MASTER_PORT']}"
    threads = cpu_threads_per_process()
    if threads is not None and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        # DeepSpeed JIT-builds a shared-memory all-reduce kernel for CPU *inference* (AutoTP) on every
        # process start, and rebuilds it whenever the ninja on PATH changes. Training reduces through
        # gloo and never calls it, so mark it unavailable, as DeepSpeed does on platforms without it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def effective_zero_stage(cfg: TrainConfig) -> int:
    """ZeRO partitions state across processes; on one process there is nothing to partition and stages
    1-3 only add flat-buffer copies (slower, see benchmarks/pretrain.py), so one process runs stage 0:
    the same AdamW update and clipping, the same checkpoint contents."""
    return cfg.zero_stage if world_size() > 1 else 0


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    check_train_config(cfg)
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size(),
        "gradient_clipping": cfg.grad_clip,
        # torch_adam: torch.optim.AdamW, no FusedAdam JIT build on CPU; lr is scaled by our LambdaLR.
        # fused=True: torch's one-kernel AdamW (CPU and CUDA); its default on CPU is a Python loop over
        # parameters, 3-4x slower (benchmarks/loop_parts.py: 31 vs 10 ms a step). Same update, to rounding.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": [0.9, 0.95], "eps": 1e-8, "torch_adam": True, "fused": True},
        },
        "zero_optimization": {"stage": effective_zero_stage(cfg)},
        # On GPU DeepSpeed keeps bf16 weights; on CPU we keep fp32 weights and autocast to bf16.
        "bf16": {"enabled": bool(cfg.bf16 and torch.cuda.is_available())},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def agree_across_ranks(decision: dict[str, Any], what: str) -> dict[str, int]:
    """Check every rank took the same `decision` (read from its own disk) and return the layout:
    {"dist.world_size": processes, "dist.nodes": launcher groups (ranks with LOCAL_RANK 0)}.

    Each node reads data/ from its own file system; on nodes without a shared one, rank 0 would resume
    from a state that rank 1 never sees, and the ranks would train different steps until a collective
    hangs. A StageError names what each rank saw instead. Every rank must call this.
    """
    local = {"rank": int(os.environ.get("RANK", "0")), "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}
    if world_size() == 1:
        return {"dist.world_size": 1, "dist.nodes": 1}
    import torch.distributed as dist

    seen: list[Any] = [None] * world_size()
    dist.all_gather_object(seen, {**local, "host": socket.gethostname(), "decision": decision})
    if any(s["decision"] != seen[0]["decision"] for s in seen):
        views = "; ".join(f"rank {s['rank']} on {s['host']}: {s['decision']}" for s in seen)
        raise StageError(
            f"the ranks disagree about {what} ({views}): every node must see the same data/ "
            "(a shared file system, or the same files on each node before the run)"
        )
    return {"dist.world_size": world_size(), "dist.nodes": sum(s["local_rank"] == 0 for s in seen)}


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average per-rank metrics over all ranks, so the logged loss is the loss of the global batch."""
    if world_size() == 1:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist(), strict=True)}


def gather_full_weights(engine: Any) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the trained module (ZeRO-3 partitions gathered), keyed like its state_dict."""
    module: nn.Module = engine.module
    if engine.zero_optimization_stage() != 3:
        return {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    import deepspeed

    gathered: dict[int, torch.Tensor] = {}
    for param in module.parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            gathered[id(param)] = param.detach().float().clone()
    # state_dict names tied weights twice (embedding and head); both map to the one gathered tensor.
    return {
        k: gathered.get(id(v), v.detach().float().clone() if torch.is_tensor(v) else v)
        for k, v in module.state_dict(keep_vars=True).items()
    }
