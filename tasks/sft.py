"""Stage `sft`: supervised fine-tuning of the base model on chat conversations.

Conversations are rendered with the tokenizer's chat template; the loss covers assistant tokens only
(assistant content and its closing <|end|>; system, user and role tokens are context, not targets).
Same loop as pretraining, another objective.

`sft.init` picks the starting model: the pipeline's base, or an open model (a Hugging Face folder under
init/ or hf:<org>/<name>@<revision>) trained with its own tokenizer and chat template, which the
checkpoint then carries for the later stages. `sft.lora` trains LoRA adapters instead of every weight.

Batches are right-padded by default (causal attention: a pad after a sequence cannot change it). With
`sft.packing` several conversations share a row, separated by `doc_ids` (block-diagonal attention,
positions restarting per conversation), so no compute is spent on pads and nothing leaks across them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.llama import Transformer
from tasks.core import paths
from tasks.core.config import Params
from tasks.core.launch import training_main
from tasks.core.stage import StageError
from tasks.data import chat_data
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.train.checkpoints import load_causal_lm
from tasks.train.loop import Batch, train_stage
from tasks.train.lora import add_adapters, base_of
from tasks.train.open_model import open_model, tokenizer_files


class SupervisedChat:
    def __init__(
        self,
        examples: list[chat_data.Example],
        pad_id: int,
        batch_size: int,
        seed: int,
        val_fraction: float,
        eval_batches: int,
        packing: bool = False,
        seq_len: int = 0,
    ) -> None:
        if len(examples) < 2:
            raise StageError(f"{paths.validated('sft')} has {len(examples)} conversations; need at least 2")
        train_idx, val_idx = chat_data.split(len(examples), val_fraction, seed)
        self.train = [examples[i] for i in train_idx]
        self.val = [examples[i] for i in val_idx]
        self.pad_id, self.batch_size, self.seed, self.eval_batches = pad_id, batch_size, seed, eval_batches
        self.rank = int(os.environ.get("RANK", "0"))
        self.packed: list[chat_data.Packed] | None = None
        if packing:
            # One fixed packing of a seeded shuffle of the training set; batches then sample its rows.
            order = np.random.default_rng([seed, 7]).permutation(len(self.train))
            width = seq_len or max(len(e.ids) for e in self.train) - 1
            self.packed = chat_data.pack([self.train[i] for i in order], width)

    def batch(self, step: int, micro_step: int, model: nn.Module) -> Batch:
        if self.packed is not None:
            idx = chat_data.sample(len(self.packed), self.batch_size, self.seed, step, micro_step)
            return chat_data.packed_batch([self.packed[i] for i in idx], self.pad_id)
        idx = chat_data.sample(len(self.train), self.batch_size, self.seed, step, micro_step)
        return chat_data.lm_batch([self.train[i] for i in idx], self.pad_id)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        # mean next-token loss over the answer tokens, the head fused with it (models/fused_loss.py)
        loss = model(
            batch["x"], doc_ids=batch.get("doc_ids"), labels=batch["y"], ignore_index=chat_data.IGNORE
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
        """Real (non-pad) input tokens: pads cost compute but teach nothing, so they do not count."""
        return int((batch["x"] != self.pad_id).sum())


def run(params: Params, tracker: Any) -> dict[str, float]:
    cfg = params.sft
    # sft.init: the pipeline's own base model, or an open model with its own tokenizer and chat template
    opened = open_model(cfg.init, "sft.init", cfg.seq_len)
    if opened is None:
        tokenizer: ChatTokenizer = ChatTokenizer.load(paths.TOKENIZER_JSON)
        model, _ = load_causal_lm("base", tokenizer.fingerprint)
        base, parent, init_lineage, files = (paths.checkpoint("base"), "checkpoint"), "base", None, None
    else:
        tokenizer, model = opened.tokenizer, opened.model
        base, parent = (opened.folder, opened.base_format), cfg.init
        init_lineage, files = {"init": opened.lineage}, tokenizer_files(opened.folder)
    adapters = None
    if cfg.lora.enabled:
        adapters = add_adapters(model, cfg.lora, cfg.train, base_of(*base), where="sft")
    seq_len = min(cfg.seq_len, model.config.max_seq_len)
    examples = chat_data.sft_examples(tokenizer, seq_len)
    objective = SupervisedChat(
        examples,
        tokenizer.pad_id,
        cfg.train.micro_batch_size,
        cfg.train.seed,
        cfg.val_fraction,
        cfg.train.eval_batches,
        packing=cfg.packing,
        seq_len=seq_len,
    )
    return train_stage(
        "sft",
        model,
        objective,
        cfg.train,
        tracker=tracker,
        checkpoint_model=Transformer(model.config),
        config=model.config,
        tokenizer_fingerprint=tokenizer.fingerprint,
        parent=parent,
        adapters=adapters,
        extra_lineage=init_lineage,
        files=files,
    )


if __name__ == "__main__":
    training_main("sft", run, lambda params: params.sft.train)
