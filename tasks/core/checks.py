"""Value checks of every stage's params, in one place, and the two derived source paths.

`check_params` raises ConfigError naming the key for values no stage can run with: non-finite or
non-positive rates and sizes, fractions outside (0, 1), unknown names (loss type, few-shot policy,
source kind), lengths that do not fit the model's context, negative intervals, paths from params that
leave their root or overlap what the stages write, and names that reach the model registry. It reads no
file; tasks/core/config.py runs it in `resolve_params` and `load_params`, so bad input stops
`pipeline run` in seconds and a hand-edited params.yaml stops a stage before it works.

Derived: `ingest.<dataset>.watch` and `evaluate.mmlu_watch` are what DVC hashes as each source (dvc.yaml
deps interpolate them from params.yaml), so editing a local source file re-runs ingest (or evaluate).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.core import paths
from tasks.core.config import ConfigError, Params, SourceConfig, TrainConfig
from tasks.core.strict import show

# ------------------------------------------------------------------------------ derived source paths
EMBEDDED_WATCH = "tasks/data/embedded.py"  # the embedded corpus is made by this module
HUB_WATCH = "tasks/data/sources.py"  # a Hub dataset: nothing local to hash (its id/config/split are params)
MMLU_HUB_WATCH = "tasks/eval/mmlu_data.py"
GLOB_CHARS = "*?["


def glob_dir(pattern: str) -> str:
    """The directory before a glob's first wildcard ('' if there is none): 'corpus/**/*.txt' -> 'corpus'."""
    fixed = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    return os.path.dirname(fixed).rstrip("/") or ("/" if fixed.startswith("/") else "")


def linked_outside(root: str | Path, files: list[Path]) -> list[Path]:
    """The files whose real path (every symlink resolved) is not inside root's: what listing a directory or
    a glob must not follow out of it (an ingest source directory, the MMLU directory). Resolves links; reads
    no file."""
    real_root = os.path.realpath(root)
    return [p for p in files if os.path.commonpath([real_root, os.path.realpath(p)]) != real_root]


def source_watch(src: SourceConfig) -> str:
    """The file or directory DVC hashes for a source: a file or directory path itself, the directory
    before a glob's first wildcard, a local `datasets` directory; for embedded and Hub sources a
    module already among ingest's deps (DVC needs an existing path in every dep)."""
    if src.kind == "files":
        return glob_dir(src.path) if any(ch in src.path for ch in GLOB_CHARS) else src.path
    if src.kind == "hf":
        return src.hf_id if src.hf_id and Path(src.hf_id).is_dir() else HUB_WATCH
    return EMBEDDED_WATCH


def mmlu_watch(mmlu_dir: str) -> str:
    return MMLU_HUB_WATCH if mmlu_dir.startswith("hf:") else mmlu_dir


def derived(params: Params) -> dict[str, str]:
    """key -> derived value, for every derived field."""
    out = {f"ingest.{d}.watch": source_watch(getattr(params.ingest, d)) for d in paths.DATASETS}
    return out | {"evaluate.mmlu_watch": mmlu_watch(params.evaluate.mmlu_dir)}


def with_derived(params: Params) -> Params:
    for d in paths.DATASETS:
        src = getattr(params.ingest, d)
        setattr(params.ingest, d, dataclasses.replace(src, watch=source_watch(src)))
    params.evaluate = dataclasses.replace(params.evaluate, mmlu_watch=mmlu_watch(params.evaluate.mmlu_dir))
    return params


# ------------------------------------------------------------------------------------ value checks
NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # profiles and registry names: no path separators, bounded
SOURCE_KINDS = ("embedded", "files", "hf")
ZERO_STAGES = (0, 1, 2, 3)
REFERENCE_MODELS = ("base", "sft")  # causal LMs written before the stages that take a `reference`
# names params may give for grpo/evaluate tasks and grpo rewards; tests/test_grpo.py checks that they are
# exactly tasks/data/verifiable.FAMILIES and tasks/train/rewards.REWARDS (this layer cannot import them)
TASK_FAMILIES: tuple[str, ...] = ("add_small", "sub_small", "add", "sub", "add3", "max", "min", "last")
TASK_FAMILIES += ("first", "digits", "copy")
REWARD_NAMES = ("correct", "format", "reward_model")
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")  # tasks/train/losses.grpo_loss
# directories stages write: a source must neither be inside one nor contain one
OUTPUT_DIRS = tuple(
    p.as_posix()
    for p in (paths.RAW, paths.VALIDATED, paths.REPORTS, paths.TOKENIZER_DIR, paths.TOKENS)
    + (paths.CHECKPOINTS, paths.STATE, paths.METRICS, paths.PLOTS, paths.EVAL, paths.REGISTRY)
)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _pos(v: Any) -> bool:
    return _finite(v) and v > 0


def _nonneg(v: Any) -> bool:
    return _finite(v) and v >= 0


def _one_of(*options: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), f"one of {', '.join(options)}"


POSITIVE: tuple[Callable[[Any], bool], str] = (_pos, "a positive number")
NON_NEGATIVE: tuple[Callable[[Any], bool], str] = (_nonneg, "a number >= 0 (0 = off)")
FRACTION: tuple[Callable[[Any], bool], str] = (lambda v: _finite(v) and 0 < v < 1, "a fraction in (0, 1)")
RATIO: tuple[Callable[[Any], bool], str] = (lambda v: _finite(v) and 0 <= v <= 1, "a ratio in [0, 1]")
AT_LEAST_1: tuple[Callable[[Any], bool], str] = (lambda v: _finite(v) and v >= 1, "at least 1")

# key -> (test, what it must be); every training stage's `train` section gets TRAIN_RULES as well
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": NON_NEGATIVE,
    **{f"ingest.{k}": NON_NEGATIVE for k in ("max_documents", "max_bytes", "min_chars", "max_chars")},
    **{f"ingest.{k}": NON_NEGATIVE for k in ("max_sft_examples", "max_preference_pairs", "seed")},
    "ingest.min_printable_ratio": RATIO,
    "validate.min_rows": AT_LEAST_1,
    "validate.min_printable_ratio": RATIO,
    "validate.max_chars": NON_NEGATIVE,
    "tokenizer.min_frequency": AT_LEAST_1,
    "tokenizer.max_chars": NON_NEGATIVE,
    "dpo.beta": POSITIVE,
    "dpo.loss_type": _one_of("sigmoid", "ipo"),
    "dpo.label_smoothing": (lambda v: _finite(v) and 0 <= v < 0.5, "in [0, 0.5)"),
    "rlhf.split_seed": NON_NEGATIVE,
    "rlhf.rollout_batch_size": AT_LEAST_1,
    "rlhf.ppo_epochs": AT_LEAST_1,
    "rlhf.clip_range": POSITIVE,
    "rlhf.clip_range_value": POSITIVE,
    "rlhf.value_loss_coef": NON_NEGATIVE,
    "rlhf.gamma": (lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]"),
    "rlhf.lam": RATIO,
    "rlhf.kl_coef": NON_NEGATIVE,
    "rlhf.target_kl": POSITIVE,
    "rlhf.kl_horizon": AT_LEAST_1,
    "rlhf.temperature": (_nonneg, "a number >= 0 (0 = greedy)"),
    "rlhf.top_k": NON_NEGATIVE,
    "alerts.dpo_min_accuracy": RATIO,
    "alerts.ppo_max_kl": POSITIVE,
    "alerts.dpo_min_margin": (_finite, "a finite number"),
    "alerts.grpo_max_kl": POSITIVE,
    "alerts.grpo_collapse_steps": NON_NEGATIVE,
    "grpo.num_generations": (lambda v: _finite(v) and v >= 2, "at least 2 (a group compares completions)"),
    "grpo.temperature": (_nonneg, "a number >= 0 (0 = greedy)"),
    "grpo.top_k": NON_NEGATIVE,
    "grpo.epsilon": (_pos, "a positive clip range"),
    "grpo.beta": (_nonneg, "a KL coefficient >= 0 (0 = no KL term, no reference)"),
    "grpo.loss_type": _one_of(*GRPO_LOSS_TYPES),
    "grpo.num_iterations": AT_LEAST_1,
    "grpo.val_problems": NON_NEGATIVE,
    "evaluate.task_problems": NON_NEGATIVE,
    "evaluate.task_max_new_tokens": AT_LEAST_1,
    "evaluate.task_samples": NON_NEGATIVE,
    "evaluate.mmlu_split": _one_of("dev", "val", "test"),
    "evaluate.k_shot": NON_NEGATIVE,
    "evaluate.fewshot_policy": _one_of("truncate", "reduce"),
    "evaluate.max_items_per_subject": NON_NEGATIVE,
    "evaluate.ppl_window": (lambda v: _finite(v) and v >= 2, "at least 2"),
    "evaluate.ppl_stride": AT_LEAST_1,
    "evaluate.ppl_max_tokens": AT_LEAST_1,
    "evaluate.winrate_prompts": NON_NEGATIVE,
    "register.model_prefix": (lambda v: re.fullmatch(NAME, v) is not None, f"a name ({NAME})"),
    "register.champion_metric": (lambda v: re.fullmatch(r"[\w./-]{1,64}", v) is not None, "a metric name"),
    "register.max_mmlu_drop": NON_NEGATIVE,
    "register.max_ppl_increase": NON_NEGATIVE,
}
# fields checked in every section that has them
SECTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "val_fraction": FRACTION,
    "seq_len": AT_LEAST_1,
    "max_new_tokens": AT_LEAST_1,
    "reference": _one_of(*REFERENCE_MODELS),  # a checkpoint under data/checkpoints/
}
TRAIN_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: AT_LEAST_1 for k in ("max_steps", "micro_batch_size", "grad_accum", "world_size", "log_every")},
    **{k: AT_LEAST_1 for k in ("eval_batches",)},
    "lr": POSITIVE,
    "min_lr": NON_NEGATIVE,
    **{k: NON_NEGATIVE for k in ("warmup_steps", "weight_decay", "eval_every", "checkpoint_every", "seed")},
    "grad_clip": (_nonneg, "a number >= 0 (0 = no clipping)"),
    "zero_stage": (lambda v: v in ZERO_STAGES, "a ZeRO stage (0, 1, 2 or 3)"),
    "resume_mismatch": _one_of("restart", "fail"),
}


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key}={show(value)}: expected {expected}")


def check_train_config(cfg: TrainConfig, where: str = "train") -> None:
    """ConfigError naming the key for values the training loop cannot run with."""
    for key, (ok, expected) in TRAIN_RULES.items():
        value = getattr(cfg, key)
        if not ok(value):
            if key == "zero_stage":  # the message the loop has always given
                raise ConfigError(f"{where}.zero_stage={value} is not a ZeRO stage (0, 1, 2 or 3)")
            raise _fail(f"{where}.{key}", value, expected)
    if cfg.min_lr > cfg.lr:
        raise ConfigError(
            f"{where}.min_lr={cfg.min_lr} exceeds {where}.lr={cfg.lr}: the schedule decays to it"
        )


def _check_path(key: str, path: str, value: str | None = None) -> None:
    """A path from params stays inside the project (no `..` out of it) unless it is absolute, i.e. given
    as such by the user, and never holds or sits inside what the stages write. `value`: the value of
    `key` as given, when `path` is derived from it (a glob's directory)."""
    given = show(value if value is not None else path)
    shown = f"{key}={given}" + (f" (DVC hashes {path!r})" if value is not None else "")
    norm = os.path.normpath(path)
    if not os.path.isabs(norm) and (norm == ".." or norm.startswith("../")):
        raise ConfigError(f"{shown} leaves the project root: give a path inside it, or an absolute path")
    rel = norm
    if os.path.isabs(norm):
        cwd, real = os.path.realpath(os.getcwd()), os.path.realpath(norm)
        rel = os.path.relpath(real, cwd) if real == cwd or real.startswith(cwd + os.sep) else ""
    for out in OUTPUT_DIRS if rel else ():
        if rel == "." or rel == out or rel.startswith(out + "/") or out.startswith(rel + "/"):
            raise ConfigError(f"{shown} overlaps {out}/, which a stage writes: keep sources elsewhere")


def check_params(p: Params) -> None:
    """Every value check of every stage, raising ConfigError naming the key; no file is read."""
    for key, (ok, expected) in RULES.items():
        value = functools.reduce(getattr, key.split("."), p)
        if not ok(value):
            raise _fail(key, value, expected)
    max_seq = p.model.max_seq_len
    # fields that mean the same in every section that has them (a stage added later is checked too)
    for section in (f.name for f in dataclasses.fields(p)):
        cfg = getattr(p, section)
        rules = {k: v for k, v in SECTION_RULES.items() if hasattr(cfg, k)}
        for key, (ok, expected) in rules.items():
            if not ok(getattr(cfg, key)):
                raise _fail(f"{section}.{key}", getattr(cfg, key), expected)
        if isinstance(getattr(cfg, "train", None), TrainConfig):
            check_train_config(cfg.train, f"{section}.train")
        for key in ("seq_len", "ppl_window"):
            if getattr(cfg, key, 0) > max_seq:
                raise ConfigError(
                    f"{section}.{key}={getattr(cfg, key)} exceeds model.max_seq_len={max_seq}: "
                    f"lower {section}.{key} or raise model.max_seq_len"
                )
        if getattr(cfg, "max_new_tokens", 0) >= max_seq:
            raise ConfigError(
                f"{section}.max_new_tokens must leave room for a prompt in model.max_seq_len={max_seq}"
            )
    if p.evaluate.ppl_stride > p.evaluate.ppl_window:
        raise ConfigError(
            f"evaluate.ppl_stride={p.evaluate.ppl_stride} exceeds evaluate.ppl_window={p.evaluate.ppl_window}"
        )
    if p.ingest.max_chars and p.ingest.min_chars > p.ingest.max_chars:
        raise ConfigError(
            f"ingest.min_chars={p.ingest.min_chars} exceeds ingest.max_chars={p.ingest.max_chars}"
        )
    if not re.fullmatch(NAME, p.profile):
        raise _fail("profile", p.profile, f"a profile name ({NAME})")
    for i, subject in enumerate(p.evaluate.subjects):
        if not re.fullmatch(r"\w{1,64}", subject):
            raise _fail(f"evaluate.subjects[{i}]", subject, "an MMLU subject name (letters, digits, _)")
    for dataset in paths.DATASETS:
        src: SourceConfig = getattr(p.ingest, dataset)
        where = f"ingest.{dataset}"
        if src.kind not in SOURCE_KINDS:
            raise _fail(f"{where}.kind", src.kind, f"one of {', '.join(SOURCE_KINDS)}")
        if src.kind == "files":
            if not src.path:
                raise ConfigError(f"{where}.path: source kind 'files' needs a file, directory or glob")
            if not source_watch(src):
                raise ConfigError(
                    f"{where}.path={show(src.path)}: a glob needs a directory before its first wildcard "
                    "(e.g. corpus/*.txt): DVC hashes that directory to see source edits"
                )
            _check_path(f"{where}.path", src.path)
            if source_watch(src) != src.path:
                _check_path(f"{where}.path", source_watch(src), src.path)
        if src.kind == "hf":
            if not src.hf_id:
                raise ConfigError(f"{where}.hf_id: source kind 'hf' needs a dataset id or a local directory")
            if ".." in Path(src.hf_id).parts:
                raise _fail(f"{where}.hf_id", src.hf_id, "a Hub id or a directory inside the project")
    if not p.evaluate.mmlu_dir.startswith("hf:"):
        _check_path("evaluate.mmlu_dir", p.evaluate.mmlu_dir)
    _check_grpo(p)


def _check_names(key: str, names: list[str], known: tuple[str, ...]) -> None:
    if not names:
        raise ConfigError(f"{key}: empty; give at least one of {', '.join(known)}")
    for i, name in enumerate(names):
        if name not in known:
            raise _fail(f"{key}[{i}]", name, f"one of {', '.join(known)}")


def _check_grpo(p: Params) -> None:
    g = p.grpo
    if g.train.micro_batch_size % g.num_generations:
        raise ConfigError(
            f"grpo.train.micro_batch_size={g.train.micro_batch_size} is not a multiple of "
            f"grpo.num_generations={g.num_generations}: a micro-batch holds whole groups"
        )
    _check_names("grpo.families", g.families, TASK_FAMILIES)
    _check_names("evaluate.task_families", p.evaluate.task_families, TASK_FAMILIES)
    _check_names("grpo.rewards", g.rewards, REWARD_NAMES)
    if g.reward_weights and len(g.reward_weights) != len(g.rewards):
        raise ConfigError(
            f"grpo.reward_weights has {len(g.reward_weights)} values for {len(g.rewards)} grpo.rewards "
            "(empty = 1.0 each)"
        )
    for i, w in enumerate(g.reward_weights):
        if not _finite(w):
            raise _fail(f"grpo.reward_weights[{i}]", w, "a finite number")
