"""Stage `reward`: a Bradley-Terry reward model (SFT trunk + scalar head) on preference pairs.

The reward of a (prompt, response) is the head's value at the last real token. Held-out metrics:
accuracy (reward chosen > reward rejected), mean margin, reward mean and std, and, when the pairs say how
their rejected answer was made (the embedded data: other / truncated / shuffled), the accuracy per kind
(`val/accuracy/<kind>`), so that an overall figure never hides a kind of pair the model does not learn,
and beside it the name-overlap rule's accuracy on the same held-out pairs (`val/name_overlap/<kind>`,
chat_data.name_overlap: no model, the answer holding more of the question's name words wins), the bar a
model that matches answers to questions must clear on `other` pairs.

Pairs are split by object (chat_data.pair_groups): every pair about an object, and every pair whose
rejected answer is that object's paragraph, lies on one side, so a held-out `other` pair asks about an
object, and offers paragraphs, that no training pair showed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from models.heads import ScalarHeadModel, last_token_values
from models.llama import Transformer
from tasks.core import paths
from tasks.core.config import Params
from tasks.core.launch import training_main
from tasks.core.stage import StageError
from tasks.data import chat_data
from tasks.train.checkpoints import load_causal_lm
from tasks.train.loop import Batch, train_stage
from tasks.train.lora import add_adapters, base_of
from tasks.train.losses import bradley_terry_loss
from tasks.train.open_model import stage_tokenizer, tokenizer_files_of


def pair_rewards(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen [B] and rejected [B] halves of a pair batch."""
    values = model(batch["tokens"])  # [2B, T]
    rewards = last_token_values(values.float(), batch["lengths"])  # [2B]
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    chosen, rejected = chosen.detach(), rejected.detach()
    both = torch.cat([chosen, rejected])
    return {
        "accuracy": float((chosen > rejected).float().mean()),
        "margin": float((chosen - rejected).mean()),
        "reward_mean": float(both.mean()),
        "reward_std": float(both.std()) if both.numel() > 1 else 0.0,
    }


class PreferenceRanking:
    def __init__(
        self,
        pairs: list[chat_data.Pair],
        pad_id: int,
        batch_size: int,
        seed: int,
        val_fraction: float,
        eval_batches: int,
    ) -> None:
        if len(pairs) < 2:
            raise StageError(f"{paths.validated('preference')} has {len(pairs)} pairs; need at least 2")
        train_idx, val_idx = chat_data.split(len(pairs), val_fraction, seed, [p.group for p in pairs])
        self.train = [pairs[i] for i in train_idx]
        self.val = [pairs[i] for i in val_idx]
        self.pad_id, self.batch_size, self.seed, self.eval_batches = pad_id, batch_size, seed, eval_batches
        self.rank = int(os.environ.get("RANK", "0"))

    def batch(self, step: int, micro_step: int, model: nn.Module) -> Batch:
        idx = chat_data.sample(len(self.train), self.batch_size, self.seed, step, micro_step)
        return chat_data.pair_batch([self.train[i] for i in idx], self.pad_id)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = pair_rewards(model, batch)
        return bradley_terry_loss(chosen, rejected).mean(), reward_metrics(chosen, rejected)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        chosen, rejected = [], []
        for start in range(0, len(self.val), self.batch_size):
            batch = chat_data.pair_batch(self.val[start : start + self.batch_size], self.pad_id)
            c, r = pair_rewards(model, {k: v.to(device) for k, v in batch.items()})
            chosen.append(c)
            rejected.append(r)
        c, r = torch.cat(chosen), torch.cat(rejected)
        wins = (c > r).float().tolist()
        kinds = [p.kind for p in self.val]
        by_kind = chat_data.accuracy_by_kind(wins, kinds, "val/accuracy")
        baseline = chat_data.accuracy_by_kind([p.overlap for p in self.val], kinds, "val/name_overlap")
        return (
            {f"val/{k}": v for k, v in reward_metrics(c, r).items()}
            | {"val/pairs": float(len(c))}
            | by_kind
            | baseline
        )

    def tokens_in(self, batch: Batch) -> int:
        return int(batch["tokens"].numel())


def run(params: Params, tracker: Any) -> dict[str, float]:
    cfg = params.reward
    tokenizer = stage_tokenizer("sft")
    sft, _ = load_causal_lm("sft", tokenizer.fingerprint)
    torch.manual_seed(cfg.train.seed)
    model = ScalarHeadModel(sft)
    adapters = None
    if cfg.lora.enabled:  # LoRA on the trunk; the scalar head learns in full and is kept with the adapters
        base = base_of(paths.checkpoint("sft"), "checkpoint")
        head = ("value_head.weight", "value_head.bias")
        adapters = add_adapters(model, cfg.lora, cfg.train, base, where="reward", keep=head)
    pairs = chat_data.preference_pairs(tokenizer, min(cfg.seq_len, sft.config.max_seq_len))
    objective = PreferenceRanking(
        pairs,
        tokenizer.pad_id,
        cfg.train.micro_batch_size,
        cfg.train.seed,
        cfg.val_fraction,
        cfg.train.eval_batches,
    )
    return train_stage(
        "reward",
        model,
        objective,
        cfg.train,
        tracker=tracker,
        checkpoint_model=ScalarHeadModel(Transformer(sft.config)),
        config=sft.config,
        tokenizer_fingerprint=tokenizer.fingerprint,
        parent="sft",
        adapters=adapters,
        files=tokenizer_files_of(tokenizer),
    )


if __name__ == "__main__":
    training_main("reward", run, lambda params: params.reward.train)
