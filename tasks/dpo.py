"""Stage `dpo`: Direct Preference Optimization of the SFT policy against the frozen SFT reference.

The reference log-probs of every pair are computed once before training (the reference never changes)
and cached in the stage's state dir, keyed by the reference weights, the tokenizer and the pairs, so a
resumed run does not recompute them. Metrics carry TRL's names: rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected; held-out ones are over every val pair
(in micro-batches), with the accuracy per kind of rejected answer when the pairs say it
(`val/rewards/accuracies/<kind>`, as in the reward stage).

Health alerts (also used by rlhf): checked on the last step's metrics, before the loop writes anything,
so with `alerts.fail_on_alert` a failing stage leaves no checkpoint and no metrics file behind.

With `dpo.packing` a batch's chosen and rejected sequences are packed into rows as wide as the longest of
them (doc_ids: attention and positions per sequence) instead of each padded to it: the same log-probs and
loss in fewer rows (about 1.5x pairs/s on the cpu profile, benchmarks/packing.py).

With `dpo.lora` the policy trains LoRA adapters and the reference is its own frozen base (adapters
disabled while the reference log-probs are computed): one model in memory, not two.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from models.llama import Transformer
from tasks.core import paths
from tasks.core.config import DPOConfig, Params
from tasks.core.io import atomic_write_bytes
from tasks.core.launch import training_main
from tasks.core.stage import StageError
from tasks.data import chat_data
from tasks.train.alerts import alerts_at_end, raise_or_tag
from tasks.train.checkpoints import load_causal_lm, load_policy_and_reference
from tasks.train.loop import Batch, train_stage
from tasks.train.lora import adapters_disabled, add_adapters, base_of
from tasks.train.losses import dpo_loss, sequence_logps, token_logps
from tasks.train.open_model import stage_tokenizer, tokenizer_files_of

log = logging.getLogger(__name__)


def pair_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of the responses: chosen [B], rejected [B]. Takes a `pair_batch` (padded rows) or
    a `packed_pair_batch` (packed rows with doc_ids; the target log-probs summed per sequence)."""
    if "seq" in batch:
        logits = model(batch["x"], doc_ids=batch["doc_ids"])  # [R, W, V]
        logp = token_logps(logits, batch["y"])  # [R, W]
        owner = batch["seq"]  # [R, W]: sequence j of the target, -1 off the responses
        keep = owner >= 0
        n = batch["lengths"].numel()  # 2B sequences
        logps = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, owner[keep], logp[keep])
    else:
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1])  # [2B, T-1, V]
        logps = sequence_logps(logits, tokens[:, 1:], batch["mask"])  # [2B]
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


def pairs_batch(pairs: list[chat_data.Pair], pad_id: int, pack_width: int) -> Batch:
    """The batch of these pairs: packed into rows of pack_width (+1) tokens when pack_width > 0, else padded
    to the longest sequence. The two give the same log-probs (up to float rounding)."""
    if pack_width > 0:
        return chat_data.packed_pair_batch(pairs, pad_id, pack_width)
    return chat_data.pair_batch(pairs, pad_id)


@torch.no_grad()
def reference_logps(
    reference: nn.Module, pairs: list[chat_data.Pair], pad_id: int, batch_size: int, pack_width: int = 0
) -> torch.Tensor:
    """[N, 2] reference log-probs (chosen, rejected) of every pair, in order (batches as `pairs_batch`)."""
    rows = []
    device = next(reference.parameters()).device
    for start in range(0, len(pairs), batch_size):
        batch = pairs_batch(pairs[start : start + batch_size], pad_id, pack_width)
        chosen, rejected = pair_logps(reference, {k: v.to(device) for k, v in batch.items()})
        rows.append(torch.stack([chosen, rejected], dim=1).float().cpu())
    return torch.cat(rows)


class DirectPreference:
    def __init__(
        self, pairs: list[chat_data.Pair], ref: torch.Tensor, cfg: DPOConfig, pad_id: int, pack_width: int = 0
    ) -> None:
        if len(pairs) < 2:
            raise StageError(f"{paths.validated('preference')} has {len(pairs)} pairs; need at least 2")
        if ref.shape != (len(pairs), 2):
            raise StageError(
                f"cached reference log-probs have shape {tuple(ref.shape)}, expected ({len(pairs)}, 2)"
            )
        groups = [p.group for p in pairs]  # split by object, as the reward stage splits
        self.train_idx, self.val_idx = chat_data.split(len(pairs), cfg.val_fraction, cfg.train.seed, groups)
        self.pairs, self.ref, self.cfg, self.pad_id = pairs, ref, cfg, pad_id
        self.pack_width = pack_width  # > 0: packed rows of this width (dpo.packing), else padded rows
        self.rank = int(os.environ.get("RANK", "0"))

    def _batch(self, idx: list[int]) -> Batch:
        batch = pairs_batch([self.pairs[i] for i in idx], self.pad_id, self.pack_width)
        batch["ref"] = self.ref[idx]  # [B, 2]
        return batch

    def batch(self, step: int, micro_step: int, model: nn.Module) -> Batch:
        pick = chat_data.sample(
            len(self.train_idx),
            self.cfg.train.micro_batch_size,
            self.cfg.train.seed,
            step,
            micro_step,
        )
        return self._batch([int(self.train_idx[i]) for i in pick])

    def _terms(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Per pair [B]: DPO loss, implicit rewards chosen and rejected, policy log-probs chosen and rejected."""
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
        return losses, r_chosen, r_rejected, chosen.detach(), rejected.detach()

    @staticmethod
    def _metrics(
        r_chosen: torch.Tensor, r_rejected: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor
    ) -> dict[str, float]:
        return {
            "rewards/chosen": float(r_chosen.mean()),
            "rewards/rejected": float(r_rejected.mean()),
            "rewards/margins": float((r_chosen - r_rejected).mean()),
            "rewards/accuracies": float((r_chosen > r_rejected).float().mean()),
            "logps/chosen": float(chosen.mean()),
            "logps/rejected": float(rejected.mean()),
        }

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        losses, *rest = self._terms(model, batch)
        return losses.mean(), self._metrics(*rest)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Every held-out pair, in micro-batches (one batch of them all would hold [2N, T, V] logits)."""
        device = next(model.parameters()).device
        idx = [int(i) for i in self.val_idx]
        size = self.cfg.train.micro_batch_size
        parts = []
        for start in range(0, len(idx), size):
            batch = {k: v.to(device) for k, v in self._batch(idx[start : start + size]).items()}
            parts.append(self._terms(model, batch))
        losses, r_chosen, r_rejected, chosen, rejected = (
            torch.cat(t).float() for t in zip(*parts, strict=True)
        )
        wins = (r_chosen > r_rejected).float().tolist()
        kinds = [self.pairs[i].kind for i in idx]
        return (
            {"val/loss": float(losses.mean())}
            | {f"val/{k}": v for k, v in self._metrics(r_chosen, r_rejected, chosen, rejected).items()}
            | chat_data.accuracy_by_kind(wins, kinds, "val/rewards/accuracies")
            | {"val/pairs": float(len(idx))}
        )

    def tokens_in(self, batch: Batch) -> int:
        """The tokens of the batch's sequences (prompt + response, chosen and rejected), pads excluded, in
        either layout: tokens_per_s and MFU count real work, not padding."""
        return int(batch["lengths"].sum())


def reference_key(
    reference_name: str, fingerprint: str, pairs: list[chat_data.Pair], pack_width: int = 0
) -> str:
    """What the cached reference log-probs depend on: the reference weights, the tokenizer, the pairs, and
    the batch layout (packed or padded rows round differently under bf16)."""
    from models.adapters import weights_sha256

    h = hashlib.sha256()
    h.update(weights_sha256(paths.checkpoint(reference_name)).encode())
    h.update(fingerprint.encode())
    for p in pairs:
        h.update(repr((p.prompt, p.chosen, p.rejected)).encode())
    if pack_width:
        h.update(f"packed:{pack_width}".encode())
    return h.hexdigest()


def cached_reference(
    reference: nn.Module, pairs: list[chat_data.Pair], pad_id: int, key: str, pack_width: int = 0
) -> torch.Tensor:
    """[N, 2] reference log-probs, from data/state/dpo/ when the key matches, else computed and cached."""
    cache = paths.STATE / "dpo" / "reference_logps.safetensors"
    if cache.exists():
        try:
            with safe_open(str(cache), framework="pt") as fh:
                if (fh.metadata() or {}).get("key") == key:
                    saved = fh.get_tensor("logps")
                    if saved.shape == (len(pairs), 2):
                        log.info("reference log-probs: reused the cache %s (%d pairs)", cache, len(pairs))
                        return saved
        except Exception as exc:  # a torn or foreign file: recompute
            log.warning("ignoring unreadable reference cache %s: %s", cache, exc)
    ref = reference_logps(reference, pairs, pad_id, batch_size=16, pack_width=pack_width)
    atomic_write_bytes(cache, save({"logps": ref.contiguous()}, metadata={"key": key}))
    log.info("reference log-probs: computed for %d pairs, cached in %s", len(pairs), cache)
    return ref


def dpo_alerts(metrics: dict[str, float], params: Params) -> list[str]:
    """Health checks on the final (held-out when evaluated) metrics: accuracy at chance, collapsed margin."""
    alerts = params.alerts
    found = []
    where = "held-out" if "val/rewards/accuracies" in metrics else "training"
    acc = metrics.get("val/rewards/accuracies", metrics.get("rewards/accuracies", 0.0))
    margin = metrics.get("val/rewards/margins", metrics.get("rewards/margins", 0.0))
    if acc < alerts.dpo_min_accuracy:
        found.append(
            f"DPO {where} rewards/accuracies {acc:.3f} < alerts.dpo_min_accuracy {alerts.dpo_min_accuracy} "
            "(at chance: the policy does not prefer the chosen responses)"
        )
    if margin <= alerts.dpo_min_margin:
        found.append(
            f"DPO {where} rewards/margins {margin:.4f} <= alerts.dpo_min_margin {alerts.dpo_min_margin} "
            "(margin collapse)"
        )
    return found


def check_alerts(metrics: dict[str, float], params: Params, tracker: Any) -> list[str]:
    return raise_or_tag(dpo_alerts(metrics, params), params, tracker)


def run(params: Params, tracker: Any) -> dict[str, float]:
    cfg = params.dpo
    reference_name = cfg.reference  # the frozen reference, and the starting policy
    tokenizer = stage_tokenizer(reference_name)
    adapters = None
    if cfg.lora.enabled:
        # LoRA: one model. The reference is the policy's frozen base, i.e. the policy with adapters disabled.
        policy, _ = load_causal_lm(reference_name, tokenizer.fingerprint)
        base = base_of(paths.checkpoint(reference_name), "checkpoint")
        adapters = add_adapters(policy, cfg.lora, cfg.train, base, where="dpo")
        reference: nn.Module = policy
    else:
        policy, reference, _ = load_policy_and_reference(
            reference_name, reference_name, tokenizer.fingerprint
        )
    seq_len = min(cfg.seq_len, policy.config.max_seq_len)
    pairs = chat_data.preference_pairs(tokenizer, seq_len)
    # dpo.packing: the pairs' sequences packed into rows of seq_len tokens (same log-probs, fewer pads)
    pack_width = seq_len if cfg.packing else 0
    # Same device and precision as the policy's forward in the loop (bf16 autocast on CPU), so that the
    # implicit rewards start at 0 instead of at the bf16-vs-fp32 rounding difference.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference_mode = adapters_disabled(policy) if adapters is not None else contextlib.nullcontext()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16 and device.type == "cpu")
    with reference_mode, autocast:
        ref = cached_reference(
            reference.to(device),
            pairs,
            tokenizer.pad_id,
            reference_key(reference_name, tokenizer.fingerprint, pairs, pack_width),
            pack_width,
        )
    del reference
    objective = DirectPreference(pairs, ref, cfg, tokenizer.pad_id, pack_width)
    return train_stage(
        "dpo",
        policy,
        objective,
        cfg.train,
        tracker=tracker,
        checkpoint_model=Transformer(policy.config),
        config=policy.config,
        tokenizer_fingerprint=tokenizer.fingerprint,
        parent=reference_name,
        on_step=alerts_at_end(cfg.train.max_steps, lambda m: dpo_alerts(m, params), params, tracker),
        adapters=adapters,
        files=tokenizer_files_of(tokenizer),
    )


if __name__ == "__main__":
    training_main("dpo", run, lambda params: params.dpo.train)
