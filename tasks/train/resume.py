"""Resume state of a training stage: DeepSpeed's checkpoint of the newest step plus what it was saved with.

save_state writes it every `checkpoint_every` steps; check_resume_state refuses a state saved for another
model or process layout, or with damaged files, before any engine starts; load_state restores weights,
optimizer, scheduler, RNG and the step, reading files with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.core.config import TrainConfig
from tasks.core.io import atomic_write_text, write_json
from tasks.core.stage import StageError
from tasks.train.distributed import effective_zero_stage, world_size


def param_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------ resume state
# data/state/<stage>/ holds DeepSpeed's own (partition-aware) checkpoint of the newest tag, plus our
# state.json in the tag's folder: what it was trained with and the size of every file. `latest` is
# written last, atomically, so it only ever names a complete checkpoint.
STATE_META = "state.json"


class ResumeStateError(StageError):
    """The resume state cannot be used (another model, another layout, damaged files)."""


def save_state(
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


def check_resume_state(state_dir: Path, shapes: dict[str, list[int]], cfg: TrainConfig) -> str | None:
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


def weights_only_loads(engine: Any) -> None:
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


def load_state(engine: Any, state_dir: Path, tag: str) -> int:
    """Load the engine state (weights, optimizer, scheduler) and the RNG; the step to continue from."""
    fix = f"delete {state_dir} to start over"
    weights_only_loads(engine)
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
