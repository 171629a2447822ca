"""The one training loop. Pretrain, SFT, reward, DPO and PPO differ only by their `Objective`.

The loop owns everything else: the DeepSpeed engine (ZeRO stage from params), bf16 autocast on CPU
(DeepSpeed bf16 on GPU), gradient accumulation and clipping, warmup + cosine LR, periodic eval,
periodic resumable checkpoints, per-step metrics to MLflow and to a CSV that DVC plots (loss averaged
over ranks, tokens/s and MFU over training time only).

Multi-process: every rank calls train(); DeepSpeed averages gradients, only rank 0 logs and writes.
tasks/core/launch.py starts the ranks (torchrun) when train.world_size > 1.

Exact resume: every batch is a pure function of (seed, step, micro-step, rank), so restoring the
engine state (weights, optimizer, scheduler) and the step counter restores the data position too.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import pickle
import re
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
from tasks.core.config import TrainConfig
from tasks.core.io import atomic_path, atomic_write_text, write_json
from tasks.core.launch import check_train_config
from tasks.core.stage import StageError

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


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    """Join the process group the launcher set up (gloo on CPU, nccl on GPU); without a launcher, a group
    of one on loopback. On CPU each of N local processes takes its share of the cores."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not torch.cuda.is_available() and local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        # DeepSpeed JIT-builds a shared-memory all-reduce kernel for CPU *inference* (AutoTP) on every
        # process start: 20-90 s with ninja on 2 cores, rebuilt whenever the ninja on PATH changes
        # (venv vs system ninja hash their logs differently). Training reduces through gloo and never
        # calls it, so mark it unavailable, which is what DeepSpeed does on platforms without it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def effective_zero_stage(cfg: TrainConfig) -> int:
    """ZeRO partitions state across processes; on one process there is nothing to partition, and stages
    1-3 only add flat-buffer copies (+12-20% CPU time per step measured on the benchmark model), so one
    process runs stage 0: the same AdamW update and clipping, the same checkpoint contents."""
    return cfg.zero_stage if world_size() > 1 else 0


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    check_train_config(cfg)
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size(),
        "gradient_clipping": cfg.grad_clip,
        # torch_adam avoids a 40 s FusedAdam JIT build on CPU; lr is scaled by our LambdaLR.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": [0.9, 0.95], "eps": 1e-8, "torch_adam": True},
        },
        "zero_optimization": {"stage": effective_zero_stage(cfg)},
        # On GPU DeepSpeed keeps bf16 weights; on CPU we keep fp32 weights and autocast to bf16.
        "bf16": {"enabled": bool(cfg.bf16 and torch.cuda.is_available())},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


# ------------------------------------------------------------------------------------------ MFU
_PEAK_TFLOPS: dict[str, float] = {}


def peak_tflops(device: torch.device, bf16: bool = True) -> float:
    """Dense matmul peak of one process in TFLOP/s: PIPELINE_PEAK_TFLOPS if set, else measured once
    (a square bf16 matmul, fp32 when bf16 is off: ~0.3 s on CPU, ~0.1 s on GPU)."""
    if os.environ.get("PIPELINE_PEAK_TFLOPS"):
        return float(os.environ["PIPELINE_PEAK_TFLOPS"])
    key = f"{device.type}:{bf16}"
    if key not in _PEAK_TFLOPS:
        _PEAK_TFLOPS[key] = measure_matmul_tflops(device, torch.bfloat16 if bf16 else torch.float32)
    return _PEAK_TFLOPS[key]


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 0, reps: int = 0) -> float:
    """Best-of-reps TFLOP/s of an n x n @ n x n matmul (n=2048 on CPU, 8192 on GPU by default)."""
    on_gpu = device.type == "cuda"
    n = n or (8192 if on_gpu else 2048)
    reps = reps or (10 if on_gpu else 4)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if on_gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


class MetricLog:
    """Per-step metrics: to MLflow (through the tracker) and to a CSV that `dvc plots` reads."""

    def __init__(self, tracker: Any, csv_path: Path | None, prefix: str = "") -> None:
        self.tracker, self.csv_path, self.prefix = tracker, csv_path, prefix
        self.rows: list[dict[str, float]] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})
        if self.tracker is not None:
            self.tracker.log_metrics({f"{self.prefix}{k}": v for k, v in metrics.items()}, step=step)

    def write_csv(
        self, existing_rows: list[dict[str, float]] | None = None, path: Path | None = None
    ) -> None:
        """Write the curve so far (after `existing_rows`) to `path`, by default the log's own CSV."""
        path = path or self.csv_path
        if path is None or self.csv_path is None:
            return
        rows = (existing_rows or []) + self.rows
        keys = sorted({k for row in rows for k in row} - {"step"})
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["step", *keys])
            writer.writeheader()
            for row in rows:
                writer.writerow(row)


def _read_csv(path: Path | None) -> list[dict[str, float]]:
    if path is None or not path.exists():
        return []
    with open(path) as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average per-rank metrics over all ranks, so the logged loss is the loss of the global batch."""
    if world_size() == 1:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist(), strict=True)}


def _param_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters()}


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

    Returns the trained weights (full fp32 state dict, ZeRO-3 partitions gathered) and the last metrics
    (averaged over ranks). Under ZeRO-3 `model` itself is left partitioned: load the returned weights into
    a fresh instance. Every rank must call this; only rank 0 logs to the tracker and writes the CSV.
    """
    import deepspeed

    check_train_config(cfg)
    state_dir = Path(state_dir)
    shapes = _param_shapes(model)  # before ZeRO-3 partitions them
    resume_tag = _check_resume_state(state_dir, shapes, cfg)  # bad state fails before any engine starts
    torch.manual_seed(cfg.seed)
    init_distributed()
    rank, world = int(os.environ.get("RANK", "0")), world_size()
    if effective_zero_stage(cfg) != cfg.zero_stage:
        log.info("zero_stage=%d on one process partitions nothing: running DeepSpeed stage 0", cfg.zero_stage)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=model.configure_optimizer_groups(cfg.weight_decay),  # type: ignore[operator]
        config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg)),
    )
    if cfg.compile:
        engine.compile()
    start_step = 0
    if resume_tag is not None:
        start_step = _load_state(engine, state_dir, resume_tag)
        log.info("resumed from %s at step %d", state_dir, start_step)
    # The curve so far lives in the resume state (a killed run must not leave a changed plot that DVC
    # tracks); data/plots/<stage>.csv is written once, when training ends.
    progress_csv = state_dir / "curve.csv" if rank == 0 and plot_csv is not None else None
    metric_log = MetricLog(tracker if rank == 0 else None, progress_csv)
    previous_rows = (
        [r for r in _read_csv(progress_csv) if r.get("step", 0) < start_step] if start_step else []
    )

    use_autocast = cfg.bf16 and engine.device.type == "cpu"
    flops_per_token: Callable[..., int] | None = getattr(model, "flops_per_token", None)
    peak = 0.0
    last: dict[str, float] = {}
    window_tokens, window_flops, window_time = 0.0, 0.0, 0.0
    for step in range(start_step, cfg.max_steps):
        step_start = time.perf_counter()
        engine.train()
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = objective.batch(step, micro, engine.module)
            batch = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                loss, metrics = objective.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            n_tokens = objective.tokens_in(batch)
            window_tokens += n_tokens
            if flops_per_token is not None:
                x = batch.get("x")
                seq = int(x.shape[-1]) if torch.is_tensor(x) and x.dim() == 2 else None
                window_flops += n_tokens * flops_per_token(seq)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / cfg.grad_accum
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        grad_norm = engine.get_global_grad_norm()
        window_time += time.perf_counter() - step_start  # training time only: no eval, no checkpoints
        last = {**_mean_over_ranks(sums, engine.device), "lr": scheduler.get_last_lr()[0]}
        if grad_norm is not None:
            last["grad_norm"] = float(grad_norm)
        if not math.isfinite(last["loss"]):
            raise FloatingPointError(f"loss became {last['loss']} at step {step}; lower lr or check the data")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            # Every rank processes the same number of tokens per step, so global = rank's * world.
            last["tokens_per_s"] = window_tokens * world / max(window_time, 1e-9)
            if window_flops > 0:
                peak = peak or peak_tflops(engine.device, cfg.bf16)
                last["mfu"] = window_flops / max(window_time, 1e-9) / (peak * 1e12)
            window_tokens, window_flops, window_time = 0.0, 0.0, 0.0
            if cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                engine.eval()
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                    last.update(objective.evaluate(engine.module))
            metric_log.log(done, last)
            if rank == 0:
                log.info("step %d/%d %s", done, cfg.max_steps, _fmt(last))
            if on_step is not None:
                on_step(done, last)
        if os.environ.get("PIPELINE_KILL_AT_STEP") == str(done):
            # Fault injection for the resume tests: die like `kill -9` would, with no cleanup at all.
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            metric_log.write_csv(previous_rows)  # before `latest` moves on: the curve covers the checkpoint
            _save_state(engine, state_dir, done, shapes, cfg, model)
    metric_log.write_csv(previous_rows, plot_csv)
    if start_step:
        last["resumed_from_step"] = float(start_step)  # in the stage's metrics JSON, not in its checkpoint
    return _gather(engine), last


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


# ------------------------------------------------------------------------------------ resume state
# data/state/<stage>/ holds DeepSpeed's own (partition-aware) checkpoint of the newest tag, plus our
# state.json in the tag's folder: what it was trained with and the size of every file. `latest` is
# written last, atomically, so it only ever names a complete checkpoint.
STATE_META = "state.json"


class ResumeStateError(StageError):
    """The resume state cannot be used (another model, another layout, damaged files)."""


def _save_state(
    engine: Any, state_dir: Path, step: int, shapes: dict[str, list[int]], cfg: TrainConfig, model: nn.Module
) -> None:
    import torch.distributed as dist

    state_dir.mkdir(parents=True, exist_ok=True)
    tag = f"step{step:08d}"
    engine.save_checkpoint(
        str(state_dir),
        tag=tag,
        client_state={"step": step, "torch_rng": torch.get_rng_state()},
        save_latest=False,
    )
    dist.barrier()  # every rank's partition is on disk
    if int(os.environ.get("RANK", "0")) == 0:
        files = {
            str(p.relative_to(state_dir / tag)): p.stat().st_size
            for p in sorted((state_dir / tag).rglob("*"))
            if p.is_file() and p.name != STATE_META
        }
        config: Any = getattr(model, "config", None)
        meta = {
            "step": step,
            "world_size": world_size(),
            "zero_stage": effective_zero_stage(cfg),
            "micro_batch_size": cfg.micro_batch_size,
            "grad_accum": cfg.grad_accum,
            "model_config": config.to_dict() if hasattr(config, "to_dict") else None,
            "param_shapes": shapes,
            "files": files,
        }
        write_json(state_dir / tag / STATE_META, meta)
        atomic_write_text(state_dir / "latest", tag)
        for old in state_dir.glob("step*"):
            if old.name != tag and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _check_resume_state(state_dir: Path, shapes: dict[str, list[int]], cfg: TrainConfig) -> str | None:
    """The tag to resume from (None: start fresh), after checking it fits this model and run layout."""
    latest = state_dir / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    where = state_dir / tag
    fix = f"delete {state_dir} to start over, or restore the params it was trained with"
    if not where.is_dir():
        raise ResumeStateError(f"resume state {latest} names {tag}, but {where} is missing; {fix}")
    meta_path = where / STATE_META
    if not meta_path.exists():  # a checkpoint from before state.json existed: DeepSpeed's checks only
        return tag
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ResumeStateError(f"resume state {meta_path} is unreadable ({exc}); {fix}") from exc
    old_shapes = meta.get("param_shapes", {})
    if old_shapes != shapes:
        diffs = [
            f"{k}: {old_shapes.get(k)} saved vs {shapes.get(k)} now"
            for k in sorted(set(old_shapes) | set(shapes))
            if old_shapes.get(k) != shapes.get(k)
        ]
        raise ResumeStateError(
            f"resume state {where} was saved for a different model ({len(diffs)} parameters differ, e.g. "
            f"{'; '.join(diffs[:3])}; saved model config {meta.get('model_config')}); {fix}"
        )
    world = world_size()
    stage = effective_zero_stage(cfg)
    if meta.get("zero_stage") != stage or (stage > 0 and meta.get("world_size") != world):
        raise ResumeStateError(
            f"resume state {where} was saved with zero_stage={meta.get('zero_stage')} on "
            f"{meta.get('world_size')} processes, this run is zero_stage={stage} on {world} "
            f"(ZeRO partitions optimizer state per process); {fix}"
        )
    for name, size in meta.get("files", {}).items():
        path = where / name
        actual = path.stat().st_size if path.exists() else None
        if actual != size:
            raise ResumeStateError(
                f"resume state {where} is damaged: {name} has "
                f"{'no file' if actual is None else f'{actual} bytes'}, expected {size} bytes; {fix}"
            )
    return tag


def _weights_only_loads(engine: Any) -> None:
    """Make DeepSpeed read its checkpoint files with torch.load(weights_only=True).

    DeepSpeed's own loader uses weights_only=False, which runs whatever code a pickle names; a resume
    state is a file on disk like any other. weights_only admits tensors and plain containers, plus the
    few DeepSpeed types its ZeRO optimizer states hold (listed here, after loading real ZeRO-0/2/3 states).
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f"names {found.group(1)}, not a tensor type" if found else "is not a weights-only file"
            raise ResumeStateError(
                f"resume state file {path} {what}: refused without loading it (unpickling can run code)"
            ) from None

    engine.checkpoint_engine.load = load


def _load_state(engine: Any, state_dir: Path, tag: str) -> int:
    """Load the engine state (weights, optimizer, scheduler) and the RNG; the step to continue from."""
    fix = f"delete {state_dir} to start over"
    _weights_only_loads(engine)
    try:
        load_path, client = engine.load_checkpoint(str(state_dir), tag=tag)
    except ResumeStateError as exc:
        raise ResumeStateError(f"{exc}; {fix}") from None
    except Exception as exc:  # truncated or corrupt files surface as torch.load / zip errors
        raise ResumeStateError(
            f"could not load resume state {state_dir / tag}: {type(exc).__name__}: {exc}; {fix}"
        ) from exc
    if load_path is None or not client or "step" not in client:
        raise ResumeStateError(
            f"resume state {state_dir / tag} is incomplete (DeepSpeed found no state); {fix}"
        )
    torch.set_rng_state(client["torch_rng"])
    return int(client["step"])


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


# What varies between runs that learned the same weights: timings, and where a killed run resumed.
RUN_METRICS = ("tokens_per_s", "mfu", "seconds", "flops", "resumed_from_step")


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
    from tasks.core import paths

    if int(os.environ.get("RANK", "0")) == 0:
        fresh_model.load_state_dict(state)
        rounded = {k: round(float(v), 6) for k, v in metrics.items()}
        # Timings vary run to run; the checkpoint keeps only what the weights determine, so that the same
        # inputs give a byte-identical checkpoint directory (dvc.lock hash).
        learned = {k: v for k, v in rounded.items() if not any(t in k for t in RUN_METRICS)}
        save_checkpoint(out_dir, fresh_model, config, meta={**meta, "metrics": learned})
        write_json(paths.METRICS / f"{stage}.json", rounded)
        shutil.rmtree(paths.STATE / stage, ignore_errors=True)
    return metrics


def load_stage_model(name: str, fingerprint: str, kind: str = "causal_lm") -> tuple[Any, dict[str, Any]]:
    """Load data/checkpoints/<name>/ and check it was trained with the tokenizer given by its fingerprint."""
    from models.checkpoint import load_checkpoint
    from tasks.core import paths
    from tasks.data.chat_tokenizer import TokenizerMismatch

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
