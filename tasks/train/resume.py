"""Resume state of a training stage: DeepSpeed's checkpoint of the newest step plus what it was saved with.

save_state writes it every `checkpoint_every` steps, with the run's fingerprint: everything that
determines the run (the stage's params section and model config, the sha256 of every data file it reads,
the tokenizer fingerprint, the number of processes). check_resume_state compares it before any engine
starts: a state saved by a run with other params or inputs is discarded, naming what differs (or, with
`train.resume_mismatch: fail`, refused and kept), so a resumed run never continues another run's
optimizer and schedule. It also refuses a state saved for another model or process layout, or with
damaged files. load_state restores weights, optimizer, scheduler, RNG and the step, reading files with
torch.load(weights_only=True).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.core.config import TrainConfig
from tasks.core.io import atomic_write_text, sha256_file, write_json
from tasks.core.stage import StageError
from tasks.train.distributed import effective_zero_stage, world_size

log = logging.getLogger(__name__)

Fingerprint = dict[str, Any]  # flat: "pretrain.train.lr" -> 0.001, "data/tokens/train.bin" -> sha256, ...
POLICY_KEYS = ("resume_mismatch",)  # what to do about a mismatch is not part of the run


def flatten(prefix: str, obj: Any) -> Fingerprint:
    """A (nested) dataclass or dict as flat dotted keys, for a fingerprint that names what differs."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: Fingerprint = {}
    for key, value in obj.items():
        if key not in POLICY_KEYS:
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), value))
    return out


def file_digests(roots: list[Path]) -> Fingerprint:
    """path -> sha256 of every file under each root (a file or a directory; "missing" if absent). One
    sequential read of the inputs at the start of a run, which training reads anyway."""
    out: Fingerprint = {}
    for root in roots:
        files = sorted(p for p in Path(root).rglob("*") if p.is_file()) if Path(root).is_dir() else [root]
        for path in files:
            out[Path(path).as_posix()] = sha256_file(path) if Path(path).exists() else "missing"
    return out


def fingerprint_diff(saved: Fingerprint, now: Fingerprint, limit: int = 5) -> str:
    """'key: old -> new; ...' for the first `limit` differing keys (values cut), and how many more."""

    def cut(value: Any) -> str:
        text = str(value)
        return text[:12] + ".." if len(text) > 16 else text

    keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k, "absent") != now.get(k, "absent")]
    shown = [f"{k}: {cut(saved.get(k, 'absent'))} -> {cut(now.get(k, 'absent'))}" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def fingerprint_digest(fp: Fingerprint) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()


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
    engine: Any,
    state_dir: Path,
    step: int,
    shapes: dict[str, list[int]],
    cfg: TrainConfig,
    model: nn.Module,
    fingerprint: Fingerprint,
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
            "fingerprint": fingerprint,
        }
        write_json(state_dir / tag / STATE_META, meta)
        atomic_write_text(state_dir / "latest", tag)
        for old in state_dir.glob("step*"):
            if old.name != tag and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def check_fingerprint(
    saved: Fingerprint | None, now: Fingerprint, cfg: TrainConfig, what: Path, section: str
) -> bool:
    """True when `what` (resume state, staged outputs) was made by this run; False when it was made by a
    run with other params or inputs and is to be discarded (logged); ResumeStateError under `fail`."""
    if saved == now:
        return True
    diff = fingerprint_diff(saved, now) if isinstance(saved, dict) else "no fingerprint saved"
    if cfg.resume_mismatch == "fail":
        raise ResumeStateError(
            f"resume state {what} was saved by a run with other params or inputs ({diff}); set "
            f"{section}.resume_mismatch=restart to discard it and start over, or restore what it was saved with"
        )
    log.warning(
        "discarding resume state %s: it was saved by a run with other params or inputs (%s); starting over "
        "(%s.resume_mismatch=fail stops instead)",
        what,
        diff,
        section,
    )
    return False


def check_resume_state(
    state_dir: Path,
    shapes: dict[str, list[int]],
    cfg: TrainConfig,
    fingerprint: Fingerprint,
    section: str = "train",
) -> tuple[str | None, bool]:
    """(the tag to resume from or None, whether the state is to be discarded), after checking the state was
    saved by this run (fingerprint), fits this model and run layout, and has all its files."""
    latest = state_dir / "latest"
    if not latest.exists():
        return None, False
    tag = latest.read_text().strip()
    where = state_dir / tag
    fix = f"delete {state_dir} to start over, or restore the params it was trained with"
    if not where.is_dir():
        raise ResumeStateError(f"resume state {latest} names {tag}, but {where} is missing; {fix}")
    meta_path = where / STATE_META
    if not meta_path.exists():  # a checkpoint from before state.json existed: DeepSpeed's checks only
        return tag, False
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ResumeStateError(f"resume state {meta_path} is unreadable ({exc}); {fix}") from exc
    if not check_fingerprint(meta.get("fingerprint"), fingerprint, cfg, where, section):
        return None, True
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
    return tag, False


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
