"""Stage `pretrain`: next-token prediction on the token shards, through the shared DeepSpeed loop.

Reads data/tokens/{train,val}.bin (+ index.json) and data/tokenizer/; writes data/checkpoints/base/
(safetensors + config.json), data/metrics/pretrain.json and the loss curve data/plots/pretrain.csv.
A killed run resumes from data/state/pretrain/ (same batches, same final weights).

`pretrain.train.world_size: N` runs N processes (torchrun, see tasks/core/launch.py). Micro-batch k of a step
on rank r is window set number k * N + r of that step, so N ranks with grad_accum G see exactly the
batches that one process with grad_accum N * G sees: the global batch does not depend on the layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.llama import Transformer
from tasks.core import paths
from tasks.core.config import ConfigError, Params
from tasks.core.launch import training_main
from tasks.core.skip import open_model_init, write_skipped
from tasks.core.stage import StageError
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.data.shards import check_tokens, load_shard
from tasks.train.loop import Batch, train_stage

log = logging.getLogger(__name__)


class LanguageModeling:
    """Random windows of the training shard; eval on fixed windows of the val shard."""

    def __init__(
        self,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        eval_batches: int,
    ) -> None:
        for name, arr in (("train", train_tokens), ("val", val_tokens)):
            if len(arr) < seq_len + 2:
                raise StageError(
                    f"{name} shard has {len(arr)} tokens, fewer than seq_len+2={seq_len + 2}: "
                    "ingest more text or lower pretrain.seq_len"
                )
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.seq_len, self.batch_size, self.seed, self.eval_batches = seq_len, batch_size, seed, eval_batches
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))

    def _windows(self, tokens: np.ndarray, rng: np.random.Generator) -> Batch:
        starts = rng.integers(0, len(tokens) - self.seq_len - 1, size=self.batch_size)
        chunk = np.stack([tokens[s : s + self.seq_len + 1].astype(np.int64) for s in starts])
        data = torch.from_numpy(chunk)
        return {"x": data[:, :-1], "y": data[:, 1:]}  # [B, T] each

    def batch(self, step: int, micro_step: int, model: nn.Module) -> Batch:
        global_micro = micro_step * self.world + self.rank  # the same union of batches on any layout
        return self._windows(self.train_tokens, np.random.default_rng([self.seed, step, global_micro]))

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return model(batch["x"], labels=batch["y"]), {}  # the head and the loss fused (models/fused_loss.py)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        losses = []
        for i in range(self.eval_batches):
            batch = self._windows(self.val_tokens, np.random.default_rng([self.seed, 1_000_003, i]))
            device = next(model.parameters()).device
            logits = model(batch["x"].to(device))
            losses.append(
                F.cross_entropy(logits.float().flatten(0, 1), batch["y"].to(device).flatten()).item()
            )
        val = float(np.mean(losses))
        return {"val/loss": val, "val/ppl": float(np.exp(val))}

    def tokens_in(self, batch: Batch) -> int:
        return int(batch["x"].numel())


def check_params(params: Params) -> None:
    """Fail before any work for settings this stage cannot run with."""
    if params.pretrain.seq_len <= 0:
        raise ConfigError(f"pretrain.seq_len must be positive, got {params.pretrain.seq_len}")
    if params.pretrain.seq_len > params.model.max_seq_len:
        raise ConfigError(
            f"pretrain.seq_len={params.pretrain.seq_len} exceeds model.max_seq_len={params.model.max_seq_len}: "
            "lower pretrain.seq_len or raise model.max_seq_len"
        )


def model_config(params: Params, tokenizer: ChatTokenizer) -> ModelConfig:
    """params.model with vocab_size fitted to the tokenizer (rounded up to a multiple of 64 for speed)."""
    vocab = -(-tokenizer.vocab_size // 64) * 64
    check_params(params)
    return dataclasses.replace(params.model, vocab_size=vocab)


def run(params: Params, tracker: Any) -> dict[str, float]:
    cfg = params.pretrain
    init = open_model_init(params)
    if init is not None:  # sft starts from the open model, not from a base (tasks/core/skip.py)
        write_skipped(
            "pretrain",
            init,
            [paths.checkpoint("base")],
            paths.METRICS / "pretrain.json",
            paths.PLOTS / "pretrain.csv",
        )
        return {}
    tokenizer = ChatTokenizer.load(paths.TOKENIZER_JSON)
    check_tokens(tokenizer)
    train_tokens, val_tokens = load_shard("train"), load_shard("val")
    config = model_config(params, tokenizer)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(config)
    log.info("model: %.2fM parameters, %s", model.num_params() / 1e6, config)
    if tracker is not None:
        tracker.log_params({"n_params": model.num_params(), **dataclasses.asdict(config)}, prefix="model.")
    objective = LanguageModeling(
        train_tokens,
        val_tokens,
        cfg.seq_len,
        cfg.train.micro_batch_size,
        cfg.train.seed,
        cfg.train.eval_batches,
    )
    return train_stage(
        "pretrain",
        model,
        objective,
        cfg.train,
        tracker=tracker,
        checkpoint_model=Transformer(config),
        config=config,
        tokenizer_fingerprint=tokenizer.fingerprint,
    )


if __name__ == "__main__":
    training_main("pretrain", run, lambda params: params.pretrain.train, check=check_params)
