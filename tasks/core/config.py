"""Typed configuration: one dataclass per params.yaml section, loaded strictly.

`params.yaml` is the active, fully resolved configuration that DVC tracks key by key. It is made by
`resolve_params(profile, overrides)`: dataclass defaults, then the profile overlay
(`conf/profiles/<profile>.yaml`), then `--set key=value` overrides. Any key that is not a field is an
error that names it, at resolution time, before any stage runs.

`check_params` holds every value check of every stage (ranges, known names, paths that stay inside
their root, names that reach the registry); `resolve_params` and `load_params` run it, so a bad value
stops `pipeline run` in seconds and a hand-edited params.yaml stops the stage before it works. Two
fields are derived, never set by hand: `ingest.<dataset>.watch` and `evaluate.mmlu_watch`, the file or
directory DVC hashes as that source (dvc.yaml deps interpolate them), so an edited local source re-runs
the stages that read it.

This module stays light (no torch): the CLI resolves and checks the whole file before work starts.
Building a dataclass from a mapping, strictly, is tasks/core/strict.py.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.config import ModelConfig
from tasks.core.strict import ConfigError, build, deep_merge, parse_override, plain_yaml, show

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILES_DIR = REPO_ROOT / "conf" / "profiles"


# --------------------------------------------------------------------------------------------- data
@dataclass
class SourceConfig:
    """Where a dataset comes from. kind: embedded | files | hf."""

    kind: str = "embedded"
    path: str = ""  # files: a file, a directory or a glob (txt, jsonl, json, parquet)
    hf_id: str = ""  # hf: dataset id on the Hub, e.g. HuggingFaceFW/fineweb-edu
    hf_config: str = ""
    split: str = "train"
    text_field: str = "text"  # pretrain text / sft "messages" / preference "prompt"
    streaming: bool = True
    # derived from kind/path/hf_id by resolve_params, checked by load_params: what DVC hashes as this
    # source (dvc.yaml: `${ingest.<dataset>.watch}`); see source_watch
    watch: str = ""


@dataclass
class NearDupConfig:
    """Near-duplicate removal after exact dedup (tasks/data/neardup.py): MinHash LSH over word n-grams.
    Off by default: it about doubles ingest's CPU time (30 MB: 9.8 against 5.1 CPU seconds, measured by
    benchmarks/data.py --set ingest.near_dup.enabled=true) and its index grows with the kept rows."""

    enabled: bool = False
    threshold: float = 0.8  # estimated Jaccard similarity of the shingle sets at which a row is dropped
    num_perm: int = 128  # MinHash permutations: more = a closer estimate, slower
    ngram: int = 5  # words per shingle
    seed: int = 1  # MinHash permutations: same seed, same signatures, same rows dropped

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"ingest.near_dup.threshold must be in (0, 1], got {self.threshold}")
        if not 16 <= self.num_perm <= 1024:
            raise ValueError(f"ingest.near_dup.num_perm must be in [16, 1024], got {self.num_perm}")
        if self.ngram < 1:
            raise ValueError(f"ingest.near_dup.ngram must be >= 1, got {self.ngram}")


@dataclass
class IngestConfig:
    pretrain: SourceConfig = field(default_factory=SourceConfig)
    sft: SourceConfig = field(default_factory=lambda: SourceConfig(text_field="messages"))
    preference: SourceConfig = field(default_factory=lambda: SourceConfig(text_field="prompt"))
    max_documents: int = 20000  # cap per dataset (0 = no cap)
    max_bytes: int = 0  # cap on pretrain text bytes (0 = no cap)
    min_chars: int = 32
    max_chars: int = 20000
    min_printable_ratio: float = 0.95
    max_sft_examples: int = 2000
    max_preference_pairs: int = 2000
    seed: int = 1337
    # threads reading a pretrain source of several files or Hub shards at once (same rows, same order).
    # 1 by default: with 2 the stage's peak RSS grew with the corpus (646 -> 753 MB from 250 MB to 1 GB of
    # text; 584 -> 592 MB with 1) and no wall-time gain was measured on 2 cores (README, data at size).
    read_workers: int = 1
    near_dup: NearDupConfig = field(default_factory=NearDupConfig)

    def __post_init__(self) -> None:
        if self.read_workers < 1:
            raise ValueError(f"ingest.read_workers must be >= 1, got {self.read_workers}")


@dataclass
class ValidateConfig:
    min_rows: int = 10
    min_printable_ratio: float = 0.95
    max_chars: int = 20000
    fail_on_error: bool = True
    # uncompressed parquet MB that GX validates at a time: memory is bounded by this, not by the data
    batch_mb: float = 32.0

    def __post_init__(self) -> None:
        if not self.batch_mb > 0:
            raise ValueError(f"validate.batch_mb must be > 0, got {self.batch_mb}")


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2
    # BPE is trained on at most this many characters of the pretrain text (whole documents, in file order;
    # 0 = all of it): the trainer's memory grows with the distinct words it sees, so a cap keeps the stage's
    # peak RSS flat however large the corpus is. Merge statistics settle long before a few hundred MB.
    max_chars: int = 200_000_000
    bos_token: str = "<|bos|>"
    eos_token: str = "<|eos|>"
    pad_token: str = "<|pad|>"
    # [system, user, assistant, end of turn], exactly 4
    role_tokens: list[str] = field(
        default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    )


@dataclass
class EncodeConfig:
    val_fraction: float = 0.05
    seed: int = 1337


# ----------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """The shared training loop's knobs; every training stage has its own copy."""

    max_steps: int = 200
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    zero_stage: int = 1
    world_size: int = 1
    bf16: bool = True
    compile: bool = False
    seed: int = 1337
    log_every: int = 10
    # resume state saved by a run with other params or inputs: restart (discard it, log what differs)
    # or fail (stop, keep it); not part of the run's fingerprint
    resume_mismatch: str = "restart"


@dataclass
class PretrainConfig:
    seq_len: int = 256
    train: TrainConfig = field(default_factory=TrainConfig)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INIT_DIR = "init"  # open models to start from live here: sft's DVC dep (init/README.md)


@dataclass
class LoRAConfig:
    """LoRA adapters (peft) on a post-training stage: the base is frozen, only the adapters (and a reward or
    value head) learn; the checkpoint holds the adapters and the hash of its base (tasks/train/lora.py)."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    base_bf16: bool = False  # keep the frozen base in bf16 (half its memory); needs train.bf16

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, int | float) and 0 < self.alpha < float("inf")):
            raise ValueError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty: name the linear layers to adapt")
        for i, name in enumerate(self.target_modules):
            if name not in LORA_TARGETS:
                raise ValueError(
                    f"lora.target_modules[{i}]={name!r} matches no module of the model; "
                    f"the linear layers are {', '.join(LORA_TARGETS)}"
                )


def check_init(init: str, key: str) -> None:
    """`pipeline` (the pipeline's own model), a folder under init/ holding a Hugging Face model,
    `hf:<org>/<name>@<revision>` (downloaded into init/hub/ at a pinned revision), or a registered model
    `models:/<name>@<alias>` / `models:/<name>/<version>` (the project's MLflow registry, verified)."""
    if init == "pipeline":
        return
    if init.startswith("models:"):
        if not re.fullmatch(r"models:/[\w.-]+(@[\w.-]+|/\d+)", init):
            raise ValueError(
                f"{key}={init!r}: a registered model is models:/<name>@<alias> or models:/<name>/<version>"
            )
        return
    if init.startswith("hf:"):
        if not re.fullmatch(r"hf:[\w.-]+/[\w.-]+@[\w./-]+", init):
            raise ValueError(
                f"{key}={init!r}: a Hub model is hf:<org>/<name>@<revision>, with the revision (commit, tag "
                "or branch) pinned so that a run can be repeated"
            )
        return
    parts = Path(init).parts
    if Path(init).is_absolute() or len(parts) < 2 or parts[0] != INIT_DIR or ".." in parts:
        raise ValueError(
            f"{key}={init!r}: expected `pipeline`, hf:<org>/<name>@<revision>, models:/<name>@<alias>, or a "
            f"folder under {INIT_DIR}/ "
            f"(copy the model there: {INIT_DIR}/ is a DVC dep of the stage, so editing it re-runs the stage)"
        )


@dataclass
class SFTConfig:
    seq_len: int = 256
    val_fraction: float = 0.1
    packing: bool = False  # pack conversations into seq_len rows; doc_ids keep attention per conversation
    # the model to start from: pipeline | init/<folder> | hf:<org>/<name>@<revision> | models:/<name>@<alias>
    init: str = "pipeline"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, lr=3e-4, min_lr=3e-5))

    def __post_init__(self) -> None:
        check_init(self.init, "sft.init")


@dataclass
class RewardConfig:
    seq_len: int = 256
    val_fraction: float = 0.1
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, lr=1e-4, min_lr=1e-5))


@dataclass
class DPOConfig:
    seq_len: int = 256
    val_fraction: float = 0.1
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo
    label_smoothing: float = 0.0
    reference: str = "sft"  # checkpoint under data/checkpoints/ used as the frozen reference
    packing: bool = (
        False  # pack each batch's chosen/rejected sequences into seq_len rows (doc_ids) instead of padding
    )
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, lr=1e-5, min_lr=1e-6))


@dataclass
class RLHFConfig:
    max_new_tokens: int = 32
    val_fraction: float = 0.1  # of the prompts that fit: held out for val/reward_mean and evaluate
    split_seed: int = 1337  # which prompts are held out; not train.seed, so seeds are scored on the same ones
    rollout_batch_size: int = 8
    ppo_epochs: int = 2
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    value_loss_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: int = 10000  # adaptive controller horizon (Ziegler et al. 2019)
    reference: str = "sft"
    temperature: float = 1.0
    top_k: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=40, lr=1e-5, min_lr=1e-6))


@dataclass
class GRPOConfig:
    """GRPO on verifiable tasks (tasks/grpo.py). train.micro_batch_size counts completions: a multiple of
    num_generations, so every group of G completions of one prompt lies in one micro-batch. Values are
    checked in tasks/core/checks.py."""

    families: list[str] = field(default_factory=lambda: ["digits"])  # tasks/data/verifiable.py FAMILIES
    num_generations: int = 8  # G completions per prompt
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0  # 0 = the whole vocabulary
    epsilon: float = 0.2  # ratio clip range
    beta: float = 0.04  # k3 KL coefficient; 0 = no reference model
    scale_rewards: bool = True  # divide advantages by the group std (false: Dr. GRPO)
    loss_type: str = "grpo"  # grpo | dapo | dr_grpo
    num_iterations: int = 1  # optimizer steps per rollout (mu); > 1 makes the ratio and its clip matter
    rewards: list[str] = field(default_factory=lambda: ["correct"])  # tasks/train/rewards.py REWARDS
    reward_weights: list[float] = field(default_factory=list)  # empty = 1.0 each
    reference: str = "sft"
    val_problems: int = 64  # held-out problems greedily answered for val/accuracy
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=40, lr=1e-5, min_lr=1e-6))


@dataclass
class AlertConfig:
    dpo_min_accuracy: float = 0.55
    dpo_min_margin: float = 0.0
    ppo_max_kl: float = 10.0
    grpo_max_kl: float = 1.0  # mean per-token k3 KL of a rollout above this: the policy runs away
    grpo_collapse_steps: int = 5  # this many rollouts in a row with reward_std 0 in every group: no signal
    fail_on_alert: bool = False


# --------------------------------------------------------------------------------------- evaluation
@dataclass
class EvaluateConfig:
    mmlu_dir: str = "data/mmlu"  # original CSV layout (dev/ val/ test/); or hf:cais/mmlu
    mmlu_watch: str = ""  # derived: what DVC hashes as the MMLU source (see mmlu_watch)
    mmlu_split: str = "val"
    k_shot: int = 5
    fewshot_policy: str = (
        "truncate"  # prompt too long: truncate (left, as the harness) | reduce (fewer shots)
    )
    subjects: list[str] = field(default_factory=list)  # empty = every subject found
    max_items_per_subject: int = 0  # 0 = all
    ppl_window: int = 256
    ppl_stride: int = 128
    ppl_max_tokens: int = 50000
    winrate_prompts: int = 32
    max_new_tokens: int = 32
    task_problems: int = 200  # held-out verifiable problems answered greedily by every language model
    task_families: list[str] = field(default_factory=lambda: ["digits"])  # tasks/data/verifiable.py FAMILIES
    task_max_new_tokens: int = 8
    task_samples: int = 5  # answers per model shown in data/eval and MLflow


@dataclass
class RegisterConfig:
    model_prefix: str = "pipeline"
    champion_metric: str = "mmlu/acc"
    max_mmlu_drop: float = 0.02
    max_ppl_increase: float = 0.10


@dataclass
class Params:
    profile: str = "cpu"
    seed: int = 1337
    ingest: IngestConfig = field(default_factory=IngestConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def resolve_params(profile: str, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Defaults + conf/profiles/<profile>.yaml + overrides, strictly checked, derived fields filled in."""
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown profile {profile!r}: no {path}; available: {', '.join(list_profiles())}")
    overlay = yaml.safe_load(path.read_text()) or {}
    merged = deep_merge(dataclasses.asdict(Params()), overlay)
    merged["profile"] = profile
    given: dict[str, Any] = overlay
    for item in overrides:
        parsed = parse_override(item)
        merged, given = deep_merge(merged, parsed), deep_merge(given, parsed)
    from tasks.core import checks  # checks imports this module's dataclasses

    if not re.fullmatch(checks.NAME, profile):
        raise ConfigError(f"--profile {show(profile)}: a profile is a name in {PROFILES_DIR} ({checks.NAME})")
    for key in [*checks.derived(Params()), "model.vocab_size"]:
        section, *rest = key.split(".")
        node = given.get(section)
        for part in rest[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and rest[-1] in node:
            why = (
                "pretrain sets it from the trained tokenizer (rounded up to a multiple of 64): "
                "set tokenizer.vocab_size"
                if key == "model.vocab_size"
                else "it is derived from the source's path (what DVC hashes)"
            )
            raise ConfigError(f"{key} cannot be set ({show(node[rest[-1]])} given): {why}")
    try:
        params = checks.with_derived(build(Params, merged))
        checks.check_params(params)
        return params
    except ConfigError as exc:
        raise ConfigError(f"{exc} (profile {path.name} or --set)") from exc


def dump_params(params: Params, path: Path) -> None:
    from tasks.core.io import atomic_write_text

    header = (
        "# Active configuration, resolved by `pipeline run --profile P --set k=v`.\n"
        "# DVC tracks it key by key; edit it and `dvc repro` re-runs what depends on the change.\n"
    )
    data = dataclasses.asdict(params)
    data["model"] = params.model.to_dict()  # the open-model fields only when set (models/config.py)
    atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False))


def load_params(path: Path | None = None) -> Params:
    """params.yaml, strictly built and checked (check_params), derived fields included."""
    from tasks.core import checks

    path = path or Path("params.yaml")
    if not path.exists():
        raise ConfigError(f"{path} not found: run `pipeline run --profile cpu` (or tiny/gpu) to create it")
    try:
        data = plain_yaml(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping, got {type(data).__name__}")
        params = build(Params, data)
        checks.check_params(params)
        for key, value in checks.derived(params).items():
            if functools.reduce(getattr, key.split("."), params) != value:
                raise ConfigError(
                    f"{key}={show(functools.reduce(getattr, key.split('.'), params))} does not match its "
                    f"source ({show(value)} expected: DVC hashes this path to see source edits); "
                    "run `pipeline params` again or set it to that value"
                )
        return params
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
