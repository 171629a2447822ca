"""Stage `sft`: supervised fine-tuning of the base model on chat conversations.

Conversations are rendered with the tokenizer's chat template; the loss covers assistant tokens only
(user and system tokens are context, not targets). Same loop as pretraining, another objective.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.llama import Transformer
from tasks import chat_data, paths
from tasks.config import Params
from tasks.stage import StageError, stage_main
from tasks.tokens import ChatTokenizer
from tasks.training import Batch, finish_training, load_causal_lm, train


class SupervisedChat:
    def __init__(
        self,
        examples: list[chat_data.Example],
        pad_id: int,
        batch_size: int,
        seed: int,
        val_fraction: float,
        eval_batches: int,
    ) -> None:
        if len(examples) < 2:
            raise StageError(f"{paths.validated('sft')} has {len(examples)} conversations; need at least 2")
        train_idx, val_idx = chat_data.split(len(examples), val_fraction, seed)
        self.train = [examples[i] for i in train_idx]
        self.val = [examples[i] for i in val_idx]
        self.pad_id, self.batch_size, self.seed, self.eval_batches = pad_id, batch_size, seed, eval_batches
        self.rank = int(os.environ.get("RANK", "0"))

    def batch(self, step: int, micro_step: int, model: nn.Module) -> Batch:
        idx = chat_data.sample(len(self.train), self.batch_size, self.seed + self.rank, step, micro_step)
        return chat_data.lm_batch([self.train[i] for i in idx], self.pad_id)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["x"])  # [B, T, V]
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), batch["y"].flatten(), ignore_index=chat_data.IGNORE
        )
        return loss, {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, min(len(self.val), self.eval_batches * self.batch_size), self.batch_size):
            batch = chat_data.lm_batch(self.val[start : start + self.batch_size], self.pad_id)
            logits = model(batch["x"].to(device))
            y = batch["y"].to(device)
            total += F.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), ignore_index=chat_data.IGNORE, reduction="sum"
            ).item()
            count += int((y != chat_data.IGNORE).sum())
        val = total / max(count, 1)
        return {"val/loss": val, "val/ppl": float(np.exp(val))}

    def tokens_in(self, batch: Batch) -> int:
        return int(batch["x"].numel())


def run(params: Params, tracker: Any) -> dict[str, float]:
    cfg = params.sft
    tokenizer = ChatTokenizer.load(paths.TOKENIZER_JSON)
    model, _ = load_causal_lm("base", tokenizer.fingerprint)
    seq_len = min(cfg.seq_len, model.config.max_seq_len)
    examples = chat_data.sft_examples(tokenizer, seq_len)
    objective = SupervisedChat(
        examples,
        tokenizer.pad_id,
        cfg.train.micro_batch_size,
        cfg.train.seed,
        cfg.val_fraction,
        cfg.train.eval_batches,
    )
    state, metrics = train(
        model,
        objective,
        cfg.train,
        state_dir=paths.STATE / "sft",
        tracker=tracker,
        plot_csv=paths.PLOTS / "sft.csv",
    )
    return finish_training(
        "sft",
        Transformer(model.config),
        state,
        model.config,
        metrics,
        meta={"tokenizer_fingerprint": tokenizer.fingerprint, "stage": "sft", "parent": "base"},
        out_dir=paths.checkpoint("sft"),
    )


if __name__ == "__main__":
    stage_main("sft", run)
