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
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from tasks.core.checks import check_train_config
from tasks.core.config import TrainConfig
from tasks.core.io import atomic_path, kill_at, write_json
from tasks.core.progress import Progress
from tasks.train.distributed import (
    agree_across_ranks,
    deepspeed_config,
    effective_zero_stage,
    gather_full_weights,
    init_distributed,
    mean_over_ranks,
    world_size,
)
from tasks.train.mfu import peak_tflops
from tasks.train.resume import (
    Fingerprint,
    check_fingerprint,
    check_resume_state,
    file_digests,
    flatten,
    load_state,
    param_shapes,
    save_state,
)

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


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps (as a multiplier of lr)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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


def train(
    model: nn.Module,
    objective: Objective,
    cfg: TrainConfig,
    *,
    state_dir: Path,
    tracker: Any = None,
    plot_csv: Path | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    fingerprint: Fingerprint | None = None,
    section: str = "train",
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train `model` for cfg.max_steps optimizer steps; resume from state_dir if it holds a checkpoint
    saved by the same run: `fingerprint` (default: the train config) plus the number of processes.
    A state of another run is discarded, or refused under `<section>.resume_mismatch: fail`.

    Returns the trained weights (full fp32 state dict, ZeRO-3 partitions gathered) and the last metrics
    (averaged over ranks). Under ZeRO-3 `model` itself is left partitioned: load the returned weights into
    a fresh instance. Every rank must call this; only rank 0 logs to the tracker and writes the CSV.
    """
    import deepspeed

    # ---- check everything that can be checked before an engine starts
    check_train_config(cfg)
    state_dir = Path(state_dir)
    shapes = param_shapes(model)  # before ZeRO-3 partitions them
    run_fp = {
        **(fingerprint if fingerprint is not None else flatten("train", cfg)),
        "world_size": world_size(),
    }
    # bad state fails before any engine starts; another run's state is discarded once processes join
    resume_tag, discard = check_resume_state(state_dir, shapes, cfg, run_fp, section)
    # ---- processes, engine (optimizer, LR schedule as a multiplier of lr), and resume
    torch.manual_seed(cfg.seed)
    init_distributed()
    rank, world = int(os.environ.get("RANK", "0")), world_size()
    layout = agree_across_ranks(
        {"resume_from": resume_tag, "discard": discard}, f"the resume state {state_dir}"
    )
    if rank == 0 and tracker is not None:
        tracker.log_params(layout)  # the processes and nodes that trained: the launcher decides, not params
    if discard:
        if rank == 0:
            shutil.rmtree(state_dir, ignore_errors=True)
        torch.distributed.barrier()  # no rank starts saving into the folder before it is gone
    if effective_zero_stage(cfg) != cfg.zero_stage:
        log.info("zero_stage=%d on one process partitions nothing: running DeepSpeed stage 0", cfg.zero_stage)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=model.configure_optimizer_groups(cfg.weight_decay),  # type: ignore[operator]
        config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg)),
    )
    if world == 1:
        # One process has nothing to average, but DeepSpeed's stage-0 backward still flattens every gradient
        # into buckets, all-reduces them over a gloo group of one and copies them back (11-35 ms a step on
        # benchmarks/loop_parts.py's model).
        engine.enable_backward_allreduce = False
    if cfg.compile:
        engine.compile()
    start_step = 0
    if resume_tag is not None:
        start_step = load_state(engine, state_dir, resume_tag)
        log.info("resumed from %s at step %d", state_dir, start_step)
    # The curve so far lives in the resume state (a killed run must not leave a changed plot that DVC
    # tracks); data/plots/<stage>.csv is written once, when training ends.
    progress_csv = state_dir / "curve.csv" if rank == 0 and plot_csv is not None else None
    metric_log = MetricLog(tracker if rank == 0 else None, progress_csv)
    previous_rows = (  # rows are numbered by steps done: the saved step's row is part of the state
        [r for r in _read_csv(progress_csv) if r.get("step", 0) <= start_step] if start_step else []
    )

    # ---- the training loop: one iteration = one optimizer step over grad_accum micro-batches
    use_autocast = cfg.bf16 and engine.device.type == "cpu"
    flops_per_token: Callable[..., int] | None = getattr(model, "flops_per_token", None)
    peak = 0.0
    last: dict[str, float] = {}
    window_tokens, window_flops, window_time = 0.0, 0.0, 0.0
    # a bar with ETA on a terminal, periodic lines with ETA in logs (tasks/core/progress.py)
    progress = Progress(cfg.max_steps, section.split(".")[0], "step", initial=start_step, enabled=rank == 0)
    for step in range(start_step, cfg.max_steps):
        step_start = time.perf_counter()
        engine.train()
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            # forward and backward of one micro-batch; DeepSpeed steps the optimizer (and clips) on the last
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
        # metrics of the step, averaged over ranks; a non-finite loss stops the run here
        grad_norm = engine.get_global_grad_norm()
        window_time += time.perf_counter() - step_start  # training time only: no eval, no checkpoints
        last = {**mean_over_ranks(sums, engine.device), "lr": scheduler.get_last_lr()[0]}
        if grad_norm is not None:
            last["grad_norm"] = float(grad_norm)
        if not math.isfinite(last["loss"]):
            raise FloatingPointError(f"loss became {last['loss']} at step {step}; lower lr or check the data")
        done = step + 1
        progress.update(1, loss=last["loss"])
        # log (and evaluate) every log_every steps: throughput over training time only
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
        # resume state every checkpoint_every steps (the curve first, so it covers the checkpoint)
        if cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            metric_log.write_csv(previous_rows)  # before `latest` moves on: the curve covers the checkpoint
            save_state(engine, state_dir, done, shapes, cfg, model, run_fp)
    # ---- the whole curve to the plot CSV; the full weights gathered from every rank
    progress.close()
    metric_log.write_csv(previous_rows, plot_csv)
    if start_step:
        last["resumed_from_step"] = float(start_step)  # in the stage's metrics JSON, not in its checkpoint
    return gather_full_weights(engine), last


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


# What varies between runs that learned the same weights: timings, and where a killed run resumed.
RUN_METRICS = ("tokens_per_s", "mfu", "seconds", "flops", "resumed_from_step")


# Staged outputs of a finished run, in data/state/<stage>/final/, and the commit marker written after them.
FINAL, COMPLETE = "final", "COMPLETE"
STAGED = {"checkpoint": "checkpoint", "metrics": "metrics.json", "plot": "plot.csv"}  # output -> staged name


def stage_fingerprint(stage: str, config: Any, tokenizer_fingerprint: str) -> Fingerprint:
    """What determines a training stage's run: its params section (params.yaml, as DVC tracks it), the
    model config, the sha256 of every file of its data deps in dvc.yaml, the tokenizer fingerprint."""
    from tasks.core import stages
    from tasks.core.config import REPO_ROOT, load_params

    deps = stages.dvc_stages(REPO_ROOT / "dvc.yaml").get(stage, {}).get("deps", [])
    data = [Path(d if isinstance(d, str) else next(iter(d))) for d in deps]
    return {
        **flatten(stage, getattr(load_params(), stage)),
        **flatten("model", config.to_dict() if hasattr(config, "to_dict") else config),
        **file_digests([d for d in data if d.parts[:1] == ("data",)]),
        "tokenizer": tokenizer_fingerprint,
    }


def commit_outputs(final: Path, targets: dict[str, Path]) -> None:
    """Move the staged outputs into place: checkpoint, metrics, plot, in that order. An output already
    moved (by a commit a kill cut short) is skipped, so running this again finishes the commit."""
    for name in ("checkpoint", "metrics", "plot"):
        staged, target = final / STAGED[name], targets[name]
        if not staged.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if staged.is_dir() and target.exists():
            old = final / f"old-{name}"  # inside the state folder: removed with it, even after a kill
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(staged, target)
        if name == "checkpoint":
            kill_at("mid-commit")


def train_stage(
    stage: str,
    model: nn.Module,
    objective: Objective,
    cfg: TrainConfig,
    *,
    tracker: Any,
    checkpoint_model: nn.Module,
    config: Any,
    tokenizer_fingerprint: str,
    parent: str | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    extra_metrics: dict[str, float] | None = None,
    weights_to_save: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    adapters: Any = None,
    extra_lineage: dict[str, Any] | None = None,
    files: dict[str, Path] | None = None,
) -> dict[str, float]:
    """Train a stage's objective, then write its outputs: the ending every training stage shares.

    Resume state lives in data/state/<stage>/, the curve in data/plots/<stage>.csv, the metrics in
    data/metrics/<stage>.json, the weights (loaded into `checkpoint_model`, whose config is `config`) in
    data/checkpoints/<model>/ as the stage registry names it, with its lineage (tokenizer fingerprint,
    stage, parent model). `weights_to_save` maps the trained state dict to the checkpoint's (e.g. PPO drops
    its value head). With `adapters` (tasks/train/lora.py) the checkpoint holds the LoRA adapters and a
    pointer to their base instead (models/adapters.py). `extra_lineage` joins the lineage in config.json
    (e.g. the open model a stage started from), `files` are copied into the checkpoint (its tokenizer).
    Returns the last metrics.

    The three outputs change together. They are staged in data/state/<stage>/final/, then a COMPLETE
    marker (with the run's fingerprint) is written, then they are moved into place (checkpoint, metrics,
    plot; each move atomic) and the state folder is removed. A kill before the marker leaves every old
    output as it was and the run resumable; a kill after it (during the moves) can leave the new
    checkpoint beside the old metrics or plot until the stage runs again (DVC reports the stage changed
    meanwhile): that run finds the marker and finishes the moves without training. A marker of a run
    with other params or inputs is discarded, or refused under `<stage>.train.resume_mismatch: fail`.
    """
    from tasks.core import paths
    from tasks.core.stages import stage_model

    rank = int(os.environ.get("RANK", "0"))
    state_dir = paths.STATE / stage
    final = state_dir / FINAL
    targets = {
        "checkpoint": paths.checkpoint(stage_model(stage).model),
        "metrics": paths.METRICS / f"{stage}.json",
        "plot": paths.PLOTS / f"{stage}.csv",
    }
    fingerprint = stage_fingerprint(stage, config, tokenizer_fingerprint)
    finished, marker = False, {}
    if (final / COMPLETE).exists():
        from tasks.core.io import read_json

        marker = read_json(final / COMPLETE)
        run_fp = {**fingerprint, "world_size": world_size()}
        finished = check_fingerprint(marker.get("fingerprint"), run_fp, cfg, final, f"{stage}.train")
    if world_size() > 1:  # each node read its own disk: all finish the commit, or all train
        init_distributed()
        agree_across_ranks({"finished_run": finished}, f"the staged outputs {final}")
    if finished:
        init_distributed()
        torch.distributed.barrier()  # every rank has seen the marker before rank 0 moves it
        if rank == 0:
            log.info("completing the outputs of a finished run from %s", final)
            commit_outputs(final, targets)
            shutil.rmtree(state_dir, ignore_errors=True)
            if tracker is not None:
                tracker.log_metrics(marker["metrics"])
                tracker.log_curves(stage, targets["plot"])
        leave_together()
        return dict(marker["metrics"])
    state, metrics = train(
        model,
        objective,
        cfg,
        state_dir=state_dir,
        tracker=tracker,
        plot_csv=final / STAGED["plot"],
        on_step=on_step,
        fingerprint=fingerprint,
        section=f"{stage}.train",
    )
    metrics.update(extra_metrics or {})
    if weights_to_save is not None:
        state = weights_to_save(state)
    if rank == 0:
        from models.checkpoint import save_checkpoint

        if adapters is None:
            checkpoint_model.load_state_dict(state)
        rounded = {k: round(float(v), 6) for k, v in metrics.items()}
        # Timings vary run to run; the checkpoint keeps only what the weights determine, so that the same
        # inputs give a byte-identical checkpoint directory (dvc.lock hash).
        learned = {k: v for k, v in rounded.items() if not any(t in k for t in RUN_METRICS)}
        lineage = {"tokenizer_fingerprint": tokenizer_fingerprint, "stage": stage}
        if parent is not None:
            lineage["parent"] = parent
        meta = {**lineage, **(extra_lineage or {}), "metrics": learned}
        if adapters is not None:
            from models.adapters import save_adapter_checkpoint
            from models.checkpoint import model_kind

            kind = model_kind(checkpoint_model)
            tensors = adapters.tensors(state)
            out = final / STAGED["checkpoint"]
            save_adapter_checkpoint(out, tensors, config, kind, adapters.describe(), meta=meta, files=files)
        else:
            save_checkpoint(final / STAGED["checkpoint"], checkpoint_model, config, meta=meta, files=files)
        write_json(final / STAGED["metrics"], rounded)
        kill_at("before-commit")
        run_fp = {**fingerprint, "world_size": world_size()}
        write_json(final / COMPLETE, {"fingerprint": run_fp, "metrics": rounded})
        commit_outputs(final, targets)
        shutil.rmtree(state_dir, ignore_errors=True)
        if tracker is not None:  # the curves as images beside the per-step metrics (MLflow artifacts)
            tracker.log_curves(stage, targets["plot"])
    leave_together()
    return metrics


def leave_together() -> None:
    """Ranks of a launched run leave at once and close their process group: a rank that exited while rank 0
    still wrote the outputs tore its gloo connections down under it (seen in a full-suite run: the other node
    aborted with "terminate called without an active exception", exit code 250)."""
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
