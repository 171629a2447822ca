"""The one training loop. Pretrain, SFT, reward, DPO and PPO differ only by their `Objective`.

The loop owns everything else: the DeepSpeed engine (ZeRO stage from params), bf16 autocast on CPU
(DeepSpeed bf16 on GPU), gradient accumulation and clipping, warmup + cosine LR, periodic eval,
periodic resumable checkpoints, per-step metrics to MLflow and to a CSV that DVC plots.

Exact resume: every batch is a pure function of (seed, step, micro-step, rank), so restoring the
engine state (weights, optimizer, scheduler) and the step counter restores the data position too.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from models.llama import Transformer
from tasks.config import TrainConfig
from tasks.io import atomic_path, write_json

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class Objective(Protocol):
    """What a training stage plugs into the loop."""

    def batch(self, step: int, micro_step: int, model: nn.Module) -> Batch:
        """The micro-batch for (step, micro_step); deterministic so resume lands on the same data."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to minimise and metrics named as users compare them (e.g. rewards/margins)."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics, prefixed `val/`."""
        ...

    def tokens_in(self, batch: Batch) -> int:
        """How many tokens a micro-batch processes (for tokens/s)."""
        ...


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps (as a multiplier of lr)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Single process without a launcher: set the variables the launcher would (loopback only)."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage={cfg.zero_stage} is not a ZeRO stage (0, 1, 2 or 3)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world,
        "gradient_clipping": cfg.grad_clip,
        # torch_adam avoids a 40 s FusedAdam JIT build on CPU; lr is scaled by our LambdaLR.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": [0.9, 0.95], "eps": 1e-8, "torch_adam": True},
        },
        "zero_optimization": {"stage": cfg.zero_stage},
        # On GPU DeepSpeed keeps bf16 weights; on CPU we keep fp32 weights and autocast to bf16.
        "bf16": {"enabled": bool(cfg.bf16 and torch.cuda.is_available())},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class MetricLog:
    """Per-step metrics: to MLflow (through the tracker) and to a CSV that `dvc plots` reads."""

    def __init__(self, tracker: Any, csv_path: Path | None, prefix: str = "") -> None:
        self.tracker, self.csv_path, self.prefix = tracker, csv_path, prefix
        self.rows: list[dict[str, float]] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})
        if self.tracker is not None:
            self.tracker.log_metrics({f"{self.prefix}{k}": v for k, v in metrics.items()}, step=step)

    def write_csv(self, existing_rows: list[dict[str, float]] | None = None) -> None:
        if self.csv_path is None:
            return
        rows = (existing_rows or []) + self.rows
        keys = sorted({k for row in rows for k in row} - {"step"})
        with atomic_path(self.csv_path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["step", *keys])
            writer.writeheader()
            for row in rows:
                writer.writerow(row)


def _read_csv(path: Path | None) -> list[dict[str, float]]:
    if path is None or not path.exists():
        return []
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def train(
    model: nn.Module,
    objective: Objective,
    cfg: TrainConfig,
    *,
    state_dir: Path,
    tracker: Any = None,
    plot_csv: Path | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train `model` for cfg.max_steps optimizer steps; resume from state_dir if it holds a checkpoint.

    Returns the trained weights (full fp32 state dict, ZeRO-3 partitions gathered) and the last metrics.
    Under ZeRO-3 `model` itself is left partitioned: load the returned weights into a fresh instance.
    """
    import deepspeed

    if cfg.max_steps <= 0 or cfg.micro_batch_size <= 0 or cfg.grad_accum <= 0:
        raise ValueError(
            f"train.max_steps, micro_batch_size and grad_accum must be positive, got {cfg.max_steps}, "
            f"{cfg.micro_batch_size}, {cfg.grad_accum}"
        )
    torch.manual_seed(cfg.seed)
    init_distributed()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=model.configure_optimizer_groups(cfg.weight_decay),  # type: ignore[operator]
        config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg)),
    )
    rank = int(os.environ.get("RANK", "0"))
    state_dir = Path(state_dir)
    start_step = 0
    if (state_dir / "latest").exists():
        _, client = engine.load_checkpoint(str(state_dir))
        start_step = int(client["step"])
        torch.set_rng_state(client["torch_rng"])
        log.info("resumed from %s at step %d", state_dir, start_step)
    else:
        # A stale CSV from a killed run would duplicate steps; the curve restarts with the run.
        if plot_csv is not None and plot_csv.exists():
            plot_csv.unlink()
    metric_log = MetricLog(tracker if rank == 0 else None, plot_csv)
    previous_rows = [r for r in _read_csv(plot_csv) if r.get("step", 0) < start_step] if start_step else []

    use_autocast = cfg.bf16 and engine.device.type == "cpu"
    last: dict[str, float] = {}
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(start_step, cfg.max_steps):
        engine.train()
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = objective.batch(step, micro, engine.module)
            batch = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                loss, metrics = objective.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            window_tokens += objective.tokens_in(batch)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / cfg.grad_accum
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        grad_norm = engine.get_global_grad_norm()
        last = {**sums, "lr": scheduler.get_last_lr()[0]}
        if grad_norm is not None:
            last["grad_norm"] = float(grad_norm)
        if not math.isfinite(last["loss"]):
            raise FloatingPointError(f"loss became {last['loss']} at step {step}; lower lr or check the data")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            last["tokens_per_s"] = window_tokens * int(os.environ.get("WORLD_SIZE", "1")) / max(elapsed, 1e-9)
            window_tokens, window_start = 0, time.perf_counter()
            if cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                engine.eval()
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                    last.update(objective.evaluate(engine.module))
            metric_log.log(done, last)
            log.info("step %d/%d %s", done, cfg.max_steps, _fmt(last))
            if on_step is not None:
                on_step(done, last)
        if os.environ.get("PIPELINE_KILL_AT_STEP") == str(done):
            # Fault injection for the resume tests: die like `kill -9` would, with no cleanup at all.
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            _save_state(engine, state_dir, done)
            metric_log.write_csv(previous_rows)
    metric_log.write_csv(previous_rows)
    return _gather(engine), last


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _save_state(engine: Any, state_dir: Path, step: int) -> None:
    """DeepSpeed's own (partition-aware) checkpoint; only the newest one is kept."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tag = f"step{step:08d}"
    engine.save_checkpoint(
        str(state_dir), tag=tag, client_state={"step": step, "torch_rng": torch.get_rng_state()}
    )
    for old in state_dir.glob("step*"):
        if old.name != tag and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _gather(engine: Any) -> dict[str, torch.Tensor]:
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


def finish_training(
    stage: str,
    fresh_model: nn.Module,
    state: dict[str, torch.Tensor],
    config: Any,
    metrics: dict[str, float],
    *,
    meta: dict[str, Any],
    out_dir: Path,
) -> dict[str, float]:
    """Save the trained weights (rank 0) as the stage's checkpoint, its metrics JSON, and drop resume state."""
    from models.checkpoint import save_checkpoint
    from tasks import paths

    if int(os.environ.get("RANK", "0")) == 0:
        fresh_model.load_state_dict(state)
        rounded = {k: round(float(v), 6) for k, v in metrics.items()}
        save_checkpoint(out_dir, fresh_model, config, meta={**meta, "metrics": rounded})
        write_json(paths.METRICS / f"{stage}.json", rounded)
        shutil.rmtree(paths.STATE / stage, ignore_errors=True)
    return metrics


def load_stage_model(name: str, fingerprint: str, kind: str = "causal_lm") -> tuple[Any, dict[str, Any]]:
    """Load data/checkpoints/<name>/ and check it was trained with the tokenizer given by its fingerprint."""
    from models.checkpoint import load_checkpoint
    from tasks import paths
    from tasks.tokens import TokenizerMismatch

    model, meta = load_checkpoint(paths.checkpoint(name), kind=kind)
    if meta.get("tokenizer_fingerprint") != fingerprint:
        raise TokenizerMismatch(
            f"{paths.checkpoint(name)} was trained with tokenizer {str(meta.get('tokenizer_fingerprint'))[:12]}, "
            f"but data/tokenizer/tokenizer.json is {fingerprint[:12]}; re-run the stages after `tokenizer`"
        )
    return model, meta


def load_causal_lm(name: str, fingerprint: str) -> tuple[Transformer, dict[str, Any]]:
    model, meta = load_stage_model(name, fingerprint, kind="causal_lm")
    assert isinstance(model, Transformer)
    return model, meta
