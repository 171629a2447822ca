"""Stage `dpo`: Direct Preference Optimization of the SFT policy against the frozen SFT reference.

The reference log-probs of every pair are computed once before training (the reference never changes)
and cached in the stage's state dir, so a resumed run does not recompute them. Metrics carry TRL's names:
rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.llama import Transformer
from tasks import chat_data, paths
from tasks.config import DPOConfig, Params
from tasks.losses import dpo_loss, sequence_logps
from tasks.stage import StageError, stage_main
from tasks.tokens import ChatTokenizer
from tasks.training import Batch, finish_training, load_causal_lm, train

log = logging.getLogger(__name__)


def pair_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of the responses: chosen [B], rejected [B]."""
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])  # [2B, T-1, V]
    logps = sequence_logps(logits, tokens[:, 1:], batch["mask"])  # [2B]
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


@torch.no_grad()
def reference_logps(
    reference: nn.Module, pairs: list[chat_data.Pair], pad_id: int, batch_size: int
) -> torch.Tensor:
    """[N, 2] reference log-probs (chosen, rejected) of every pair, in order."""
    rows = []
    for start in range(0, len(pairs), batch_size):
        chosen, rejected = pair_logps(
            reference, chat_data.pair_batch(pairs[start : start + batch_size], pad_id)
        )
        rows.append(torch.stack([chosen, rejected], dim=1))
    return torch.cat(rows)


class DirectPreference:
    def __init__(self, pairs: list[chat_data.Pair], ref: torch.Tensor, cfg: DPOConfig, pad_id: int) -> None:
        if len(pairs) < 2:
            raise StageError(f"{paths.validated('preference')} has {len(pairs)} pairs; need at least 2")
        if ref.shape != (len(pairs), 2):
            raise StageError(
                f"cached reference log-probs have shape {tuple(ref.shape)}, expected ({len(pairs)}, 2)"
            )
        self.train_idx, self.val_idx = chat_data.split(len(pairs), cfg.val_fraction, cfg.train.seed)
        self.pairs, self.ref, self.cfg, self.pad_id = pairs, ref, cfg, pad_id
        self.rank = int(os.environ.get("RANK", "0"))

    def _batch(self, idx: list[int]) -> Batch:
        batch = chat_data.pair_batch([self.pairs[i] for i in idx], self.pad_id)
        batch["ref"] = self.ref[idx]  # [B, 2]
        return batch

    def batch(self, step: int, micro_step: int, model: nn.Module) -> Batch:
        pick = chat_data.sample(
            len(self.train_idx),
            self.cfg.train.micro_batch_size,
            self.cfg.train.seed + self.rank,
            step,
            micro_step,
        )
        return self._batch([int(self.train_idx[i]) for i in pick])

    def _loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = pair_logps(model, batch)
        losses, r_chosen, r_rejected = dpo_loss(
            chosen,
            rejected,
            batch["ref"][:, 0],
            batch["ref"][:, 1],
            beta=self.cfg.beta,
            loss_type=self.cfg.loss_type,
            label_smoothing=self.cfg.label_smoothing,
        )
        return losses.mean(), {
            "rewards/chosen": float(r_chosen.mean()),
            "rewards/rejected": float(r_rejected.mean()),
            "rewards/margins": float((r_chosen - r_rejected).mean()),
            "rewards/accuracies": float((r_chosen > r_rejected).float().mean()),
            "logps/chosen": float(chosen.detach().mean()),
            "logps/rejected": float(rejected.detach().mean()),
        }

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return self._loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        idx = [int(i) for i in self.val_idx]
        batch = {k: v.to(device) for k, v in self._batch(idx).items()}
        loss, metrics = self._loss(model, batch)
        return {"val/loss": float(loss)} | {f"val/{k}": v for k, v in metrics.items()}

    def tokens_in(self, batch: Batch) -> int:
        return int(batch["tokens"].numel())


def cached_reference(
    reference: nn.Module, pairs: list[chat_data.Pair], pad_id: int, fingerprint: str
) -> torch.Tensor:
    cache = paths.STATE / "dpo" / "reference_logps.safetensors"
    if cache.exists():
        saved = load_file(str(cache))
        if saved["logps"].shape == (len(pairs), 2) and cache.with_suffix(".key").read_text() == fingerprint:
            return saved["logps"]
    ref = reference_logps(reference, pairs, pad_id, batch_size=16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"logps": ref.contiguous()}, str(cache))
    cache.with_suffix(".key").write_text(fingerprint)
    return ref


def check_alerts(metrics: dict[str, float], params: Params, tracker: Any) -> list[str]:
    """Health checks on the final held-out metrics: accuracy at chance, collapsed margin."""
    alerts = params.alerts
    found = []
    acc = metrics.get("val/rewards/accuracies", metrics.get("rewards/accuracies", 0.0))
    margin = metrics.get("val/rewards/margins", metrics.get("rewards/margins", 0.0))
    if acc < alerts.dpo_min_accuracy:
        found.append(
            f"DPO held-out rewards/accuracies {acc:.3f} < alerts.dpo_min_accuracy {alerts.dpo_min_accuracy}"
        )
    if margin <= alerts.dpo_min_margin:
        found.append(
            f"DPO held-out rewards/margins {margin:.4f} <= alerts.dpo_min_margin {alerts.dpo_min_margin}"
        )
    return raise_or_tag(found, params, tracker)


def raise_or_tag(found: list[str], params: Params, tracker: Any) -> list[str]:
    for message in found:
        log.warning("ALERT: %s", message)
    if tracker is not None:
        tracker.set_tags({"health.alerts": " | ".join(found) or "none"})
    if found and params.alerts.fail_on_alert:
        raise StageError("health alert (alerts.fail_on_alert=true): " + "; ".join(found))
    return found


def run(params: Params, tracker: Any) -> dict[str, float]:
    cfg = params.dpo
    tokenizer = ChatTokenizer.load(paths.TOKENIZER_JSON)
    policy, meta = load_causal_lm("sft", tokenizer.fingerprint)
    reference, _ = load_causal_lm("sft", tokenizer.fingerprint)
    reference.requires_grad_(False)
    pairs = chat_data.preference_pairs(tokenizer, min(cfg.seq_len, policy.config.max_seq_len))
    key = f"{tokenizer.fingerprint}:{meta.get('metrics')}:{len(pairs)}:{cfg.seq_len}"
    ref = cached_reference(reference, pairs, tokenizer.pad_id, key)
    del reference
    objective = DirectPreference(pairs, ref, cfg, tokenizer.pad_id)
    state, metrics = train(
        policy,
        objective,
        cfg.train,
        state_dir=paths.STATE / "dpo",
        tracker=tracker,
        plot_csv=paths.PLOTS / "dpo.csv",
    )
    check_alerts(metrics, params, tracker)
    return finish_training(
        "dpo",
        Transformer(policy.config),
        state,
        policy.config,
        metrics,
        meta={"tokenizer_fingerprint": tokenizer.fingerprint, "stage": "dpo", "parent": "sft"},
        out_dir=paths.checkpoint("dpo"),
    )


if __name__ == "__main__":
    stage_main("dpo", run)
