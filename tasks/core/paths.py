"""Where each stage reads and writes, relative to the repository root (DVC runs stages there)."""

from pathlib import Path

DATA = Path("data")
RAW = DATA / "raw"
VALIDATED = DATA / "validated"
REPORTS = DATA / "reports"
TOKENIZER_DIR = DATA / "tokenizer"
TOKENIZER_JSON = TOKENIZER_DIR / "tokenizer.json"
TOKENS = DATA / "tokens"
CHECKPOINTS = DATA / "checkpoints"
STATE = DATA / "state"  # resume state of training stages (persisted, not cached by DVC)
METRICS = DATA / "metrics"  # one small JSON per stage, shown by `dvc metrics show`
PLOTS = DATA / "plots"  # per-step CSV curves, shown by `dvc plots show`
EVAL = DATA / "eval"
REGISTRY = DATA / "registry"

DATASETS = ("pretrain", "sft", "preference")


def checkpoint(name: str) -> Path:
    return CHECKPOINTS / name


def raw(dataset: str) -> Path:
    return RAW / f"{dataset}.parquet"


def validated(dataset: str) -> Path:
    return VALIDATED / f"{dataset}.parquet"
