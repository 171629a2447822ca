"""Stage `tokenizer`: train a byte-level BPE on the validated pretrain text.

ByteLevel pre-tokenizer (no prefix space) and decoder, the full 256-byte initial alphabet (so no input
is ever out of vocabulary), special tokens first so that pad is id 0. Text is streamed from the parquet
file in record batches; training is deterministic, so the same text gives the same tokenizer.json bytes,
and the sha256 of those bytes is the fingerprint that token shards and checkpoints record.

Writes data/tokenizer/{tokenizer.json, tokenizer_config.json, fingerprint.json}; the directory is swapped
in whole, so `transformers.AutoTokenizer.from_pretrained("data/tokenizer")` always sees a matching set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tasks.core import paths
from tasks.core.config import Params, TokenizerConfig
from tasks.core.io import atomic_path, atomic_write_text, sha256_file, stream_parquet, write_json
from tasks.core.skip import open_model_init, write_skipped
from tasks.core.stage import StageError, stage_main
from tasks.data.chat_tokenizer import ChatTokenizer, SpecialTokens, write_tokenizer_config

log = logging.getLogger("tasks.tokenizer")  # not __name__: under `python -m` that is "__main__"

BATCH_ROWS = 1000


def special_tokens(cfg: TokenizerConfig) -> SpecialTokens:
    try:
        return SpecialTokens.from_params(cfg.bos_token, cfg.eos_token, cfg.pad_token, list(cfg.role_tokens))
    except ValueError as exc:
        raise StageError(str(exc)) from exc


def specials(cfg: TokenizerConfig) -> list[str]:
    """The special token strings in id order: pad (id 0), bos, eos, system, user, assistant, end."""
    return special_tokens(cfg).ordered()


def check_config(cfg: TokenizerConfig) -> None:
    n_special = len(specials(cfg))
    if not all(isinstance(t, str) and t.strip() for t in specials(cfg)):
        raise StageError(f"tokenizer special tokens must be non-empty strings, got {specials(cfg)}")
    if cfg.vocab_size <= 256 + n_special:
        raise StageError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small: a byte-level BPE needs 256 byte tokens + "
            f"{n_special} special tokens, so vocab_size must be > {256 + n_special} (e.g. 4096)"
        )
    if cfg.min_frequency < 1:
        raise StageError(f"tokenizer.min_frequency={cfg.min_frequency} must be >= 1")
    if len(set(specials(cfg))) != n_special:
        raise StageError(f"tokenizer special tokens must be distinct, got {specials(cfg)}")


@dataclass
class TextBudget:
    """What iter_text took: whole documents in file order until `max_chars` characters (0 = no cap)."""

    max_chars: int = 0
    docs: int = 0
    chars: int = 0

    @property
    def spent(self) -> bool:
        return 0 < self.max_chars <= self.chars


def iter_text(
    path: Path, column: str = "text", batch_rows: int = BATCH_ROWS, budget: TextBudget | None = None
) -> Iterator[list[str]]:
    """Batches of non-null strings from one parquet column, without loading the file. With a budget, stops
    after the document that reaches budget.max_chars (so the same file and cap give the same documents) and
    counts what it yielded."""
    budget = TextBudget() if budget is None else budget
    pf = stream_parquet(path)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
        texts = []
        for t in batch.column(0).to_pylist():
            if t and not budget.spent:
                texts.append(t)
                budget.docs, budget.chars = budget.docs + 1, budget.chars + len(t)
        if texts:
            yield texts
        if budget.spent:
            return


def train_tokenizer(
    batches: Iterator[list[str]], cfg: TokenizerConfig, length: int | None = None
) -> Tokenizer:
    check_config(cfg)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials(cfg),  # in this order: pad (id 0), bos, eos, role tokens
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(batches, trainer=trainer, length=length)
    if tok.token_to_id(cfg.pad_token) != 0:  # the model and collators pad with id 0
        raise StageError(f"pad token {cfg.pad_token!r} got id {tok.token_to_id(cfg.pad_token)}, expected 0")
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, specials: SpecialTokens | None = None) -> dict[str, Any]:
    """tokenizer.json + tokenizer_config.json + fingerprint.json into out_dir; returns the fingerprint.

    `specials` (default: read from the ids 0..6 that train_tokenizer gives them) are recorded in
    tokenizer_config.json, where ChatTokenizer.load finds them.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "tokenizer.json", tok.to_str(pretty=True))
    chat = ChatTokenizer.load(out_dir / "tokenizer.json")
    if specials is not None:
        chat.specials = specials
    write_tokenizer_config(out_dir, chat)
    ChatTokenizer.load(out_dir)  # what every later stage does: fails here, not there, if it cannot
    fingerprint = {
        "sha256": sha256_file(out_dir / "tokenizer.json"),
        "vocab_size": tok.get_vocab_size(),
        "special_tokens": chat.specials.as_dict(),
    }
    write_json(out_dir / "fingerprint.json", fingerprint)
    return fingerprint


def run(params: Params, tracker: Any = None) -> dict[str, Any]:
    cfg = params.tokenizer
    check_config(cfg)  # before reading any data
    init = open_model_init(params)
    if init is not None:  # the open model brings its own tokenizer (tasks/core/skip.py)
        return write_skipped("tokenizer", init, [paths.TOKENIZER_DIR], paths.METRICS / "tokenizer.json")
    source = paths.validated("pretrain")
    if not source.exists():
        raise StageError(f"{source} not found; run the ingest and validate stages first")
    rows = pq.ParquetFile(source).metadata.num_rows
    if rows == 0:
        raise StageError(f"dataset pretrain: {source} has no rows to train the tokenizer on")
    budget = TextBudget(cfg.max_chars)
    tok = train_tokenizer(iter_text(source, budget=budget), cfg, length=rows)
    with atomic_path(paths.TOKENIZER_DIR) as tmp:
        fingerprint = save_tokenizer(tok, tmp, special_tokens(cfg))
    metrics = {
        "tokenizer/vocab_size": fingerprint["vocab_size"],
        "tokenizer/train_docs": budget.docs,
        "tokenizer/train_chars": budget.chars,
        "tokenizer/corpus_docs": rows,
    }
    if budget.spent:
        log.info(
            "tokenizer: trained on the first %d of %d documents (max_chars %d)",
            budget.docs,
            rows,
            cfg.max_chars,
        )
    write_json(paths.METRICS / "tokenizer.json", metrics)
    log.info("tokenizer: vocab %d, fingerprint %s", fingerprint["vocab_size"], fingerprint["sha256"][:12])
    if tracker is not None:
        tracker.log_metrics(metrics)
        tracker.set_tags({"tokenizer.fingerprint": fingerprint["sha256"]})
        tracker.log_artifacts(paths.TOKENIZER_DIR, "tokenizer")
    return fingerprint


if __name__ == "__main__":
    stage_main("tokenizer", run)
