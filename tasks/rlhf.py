"""Stage `rlhf`: PPO on prompts, policy and value from the SFT model, reward from the reward model.

Every `ppo_epochs` optimizer steps the current policy samples a rollout batch; in between it is
optimised on that rollout (clipped surrogate + clipped value loss). Per-token rewards are the KL penalty
to the frozen SFT reference, plus the reward model's score on the last response token; advantages by GAE.
Responses are sampled at `temperature`, and every log-prob (old, new, reference) is of that distribution
(logits / temperature). The value head reads the policy's hidden states detached (PolicyWithCritic).
Every rollout is saved in the state dir with the KL coefficient after its update, so a resumed run
continues on exactly the rollout (and coefficient) it was using and ends with the same weights.

KL coefficient: fixed, or adaptive (Ziegler et al. 2019), which moves it so the rollout KL tracks
`target_kl`. Held-out reward: responses sampled with fixed seeds on held-out prompts, scored by the
reward model, for the starting policy (`val/reward_mean_initial`) and at each evaluation
(`val/reward_mean`). Health alert: any rollout KL above `alerts.ppo_max_kl` (checked at the last step,
before anything is written; `alerts.fail_on_alert` makes it fail the stage).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
from torch import nn

from models.heads import PolicyWithValue
from models.llama import Transformer
from tasks.core import paths
from tasks.core.config import Params, RLHFConfig
from tasks.core.launch import training_main
from tasks.core.stage import StageError
from tasks.data import chat_data
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.train.alerts import alerts_at_end
from tasks.train.checkpoints import check_same_architecture, load_causal_lm, load_stage_model
from tasks.train.loop import Batch, train_stage
from tasks.train.lora import AdaptersOff, add_adapters, base_of
from tasks.train.losses import gae, masked_mean, masked_whiten, ppo_losses, token_logps
from tasks.train.open_model import stage_tokenizer, tokenizer_files_of
from tasks.train.rollouts import (
    KLController,
    RewardFn,
    RolloutCache,
    Sampling,
    clipped,
    policy_autocast,
    sample_responses,
    sampling_logits,
    score_with_reward_model,
    shaped_rewards,
)

log = logging.getLogger(__name__)

EVAL_SEED = 999_983  # held-out responses are sampled with seeds no rollout uses (rollouts: seed = step)


class PolicyWithCritic(PolicyWithValue):
    """The policy and a value head on its hidden states, detached: the critic is a linear head on the
    policy's features and its loss does not move the language model. Through a shared trunk the value
    loss's gradient is of the policy loss's size (cpu profile, first rollout: 2.7 vs 4.1), so under
    grad_clip it would take part of every step away from what PPO asks. Same state dict as PolicyWithValue."""

    def forward(
        self, tokens: torch.Tensor, *, doc_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.transformer.hidden_states(tokens, doc_ids=doc_ids)  # [B, T, D]
        return self.transformer.lm_head(h), self.value_head(h.detach()).squeeze(-1)


class ProximalPolicy:
    """PPO on `prompts` (token ids, one per preference row): rollouts from the rows in `train_rows`,
    held-out reward on those in `val_rows` (chat_data.rlhf_split)."""

    def __init__(
        self,
        prompts: list[list[int]],
        train_rows: list[int],
        val_rows: list[int],
        reference: nn.Module,  # the frozen SFT model, or the policy with adapters off (rlhf.lora)
        reward_model: nn.Module,
        cfg: RLHFConfig,
        tokenizer: ChatTokenizer,
    ) -> None:
        if len(train_rows) < 1 or len(val_rows) < 1:
            raise StageError(
                f"rlhf needs prompts; {paths.validated('preference')} gave {len(train_rows) + len(val_rows)} "
                f"that leave rlhf.max_new_tokens={cfg.max_new_tokens} for a response"
            )
        self.train_idx, self.val_idx = train_rows, val_rows
        self.prompts, self.reference, self.cfg = prompts, reference, cfg
        self.reward_fn: RewardFn = functools.partial(score_with_reward_model, reward_model)
        self.sampling = Sampling(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k or None,
            stop=(tokenizer.end_id, tokenizer.eos_id),
            pad_id=tokenizer.pad_id,
        )
        self.kl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)
        self.rollout: Batch | None = None
        self.rollout_step = -1
        self.cache = RolloutCache(paths.STATE / "rlhf", int(os.environ.get("RANK", "0")))

    @property
    def kl_coef(self) -> float:
        return self.kl.value

    def autocast(self, device: torch.device) -> torch.autocast:
        """The precision the loop computes the loss in, so that at the first PPO epoch the new/old ratio is
        exactly 1 and the KL to an identical reference exactly 0."""
        return policy_autocast(self.cfg.train.bf16, device)

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of the sampling distribution (rlhf.temperature): old, new and reference log-probs alike."""
        return sampling_logits(logits, self.cfg.temperature)

    # ---------------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    def make_rollout(self, model: PolicyWithValue, step: int) -> Batch:
        """rollout_batch_size training prompts (drawn by step), a response to each sampled with seed = step,
        scored, with per-token rewards, old log-probs/values and GAE advantages; all [B, T-1] or [B]."""
        pick = chat_data.sample(
            len(self.train_idx), self.cfg.rollout_batch_size, self.cfg.train.seed, step, 0
        )
        prompts = [self.prompts[self.train_idx[i]] for i in pick]
        batch = sample_responses(model.transformer, prompts, self.sampling, seed=step)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens, mask = batch["tokens"], batch["mask"]
        self.reference.to(device)
        with self.autocast(device):
            logits, values = model(tokens[:, :-1])
            old_logps = token_logps(self.scaled(logits), tokens[:, 1:])  # [B, T-1]
            ref_logps = token_logps(self.scaled(self.reference(tokens[:, :-1])), tokens[:, 1:])
            scores = self.reward_fn(batch)  # [B]
        cut = clipped(batch, self.sampling.stop).float()  # [B] 1: cut at max_new_tokens, no stop token
        rewards, kl = shaped_rewards(old_logps, ref_logps, mask, scores, batch["lengths"], self.kl.value)
        values = values.float() * mask
        advantages, returns = gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
        advantages = masked_whiten(advantages, mask)
        out = {
            "tokens": tokens,
            "mask": mask,
            "old_logps": old_logps,
            "old_values": values,
            "advantages": advantages,
            "returns": returns,
            "scores": scores,
            "clipped": cut,
            "kl": kl.sum(-1),
        }
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}

    def batch(self, step: int, micro_step: int, model: nn.Module) -> Batch:
        start = step - step % self.cfg.ppo_epochs
        if self.rollout_step != start:
            if self.rollout is None:
                self._on_first_batch(step, start)
            if step != start:  # resumed in the middle of a rollout's epochs: the weights moved since
                self.rollout = self.cache.load(start)
                self.kl.value = float(self.rollout.pop("kl_coef_after"))
                log.info("resumed on the cached rollout of step %d (%s)", start, self.cache.path(start))
            else:
                self.rollout = self.make_rollout(model, start)  # type: ignore[arg-type]
                kl_after = self.kl.update(float(self.rollout["kl"].mean()), int(self.rollout["kl"].numel()))
                self.cache.save(start, self.rollout, {"kl_coef_after": kl_after})
            self.rollout_step = start
        assert self.rollout is not None
        return dict(self.rollout)

    def _on_first_batch(self, step: int, start: int) -> None:
        """A fresh run drops rollouts of an earlier attempt; a resumed one restores the KL coefficient."""
        if step == 0:
            self.cache.clear()
        elif start > 0:  # the coefficient after the previous rollout's update, used by this new one
            self.kl.value = float(self.cache.load(start - self.cfg.ppo_epochs)["kl_coef_after"])

    def kl_alerts(self, max_kl: float) -> list[str]:
        over = {s: kl for s, kl in self.cache.means("kl").items() if kl > max_kl}
        if not over:
            return []
        step, kl = max(over.items(), key=lambda item: item[1])
        return [
            f"PPO KL {kl:.3f} (rollout of step {step}) > alerts.ppo_max_kl {max_kl} "
            f"in {len(over)} rollout(s): the policy drifts from the SFT reference"
        ]

    # ---------------------------------------------------------------------------------- PPO loss
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, mask = batch["tokens"], batch["mask"]
        logits, values = model(tokens[:, :-1])
        logits = self.scaled(logits)
        new_logps = token_logps(logits, tokens[:, 1:])
        pg_loss, vf_loss, clipfrac = ppo_losses(
            new_logps,
            batch["old_logps"],
            batch["advantages"],
            values.float(),
            batch["old_values"],
            batch["returns"],
            mask,
            clip_range=self.cfg.clip_range,
            clip_range_value=self.cfg.clip_range_value,
        )
        with torch.no_grad():
            probs = torch.softmax(logits.float(), dim=-1)
            entropy = masked_mean(-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1), mask)
            approx_kl = masked_mean(0.5 * (new_logps - batch["old_logps"]) ** 2, mask)
        loss = pg_loss + self.cfg.value_loss_coef * vf_loss
        return loss, {
            "reward/mean": float(batch["scores"].mean()),
            "completions/clipped_ratio": float(batch["clipped"].mean()),
            "kl": float(batch["kl"].mean()),
            "kl_coef": self.kl.value,
            "entropy": float(entropy),
            "policy/clipfrac": float(clipfrac),
            "policy/approxkl": float(approx_kl),
            "loss/policy": float(pg_loss.detach()),
            "loss/value": float(vf_loss.detach()),
        }

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Reward-model score of responses to held-out prompts, sampled as rollouts are (same temperature)
        with fixed seeds: the expected reward PPO maximises, comparable from one evaluation to the next.
        (Greedy decoding would score one degenerate response per prompt of a small model, not the policy.)"""
        n = max(1, self.cfg.train.eval_batches * self.cfg.rollout_batch_size)
        prompts = [self.prompts[i] for i in self.val_idx[:n]]
        batch = sample_responses(model.transformer, prompts, self.sampling, seed=EVAL_SEED)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        scores = self.reward_fn(batch)
        return {
            "val/reward_mean": float(scores.mean()),
            "val/response_tokens": float(batch["mask"].sum(-1).float().mean()),
            "val/clipped_ratio": float(clipped(batch, self.sampling.stop).float().mean()),
        }

    def tokens_in(self, batch: Batch) -> int:
        return int(batch["tokens"].numel())


def load_prompts(
    tokenizer: ChatTokenizer, cfg: RLHFConfig, max_seq_len: int
) -> tuple[list[list[int]], list[int], list[int]]:
    """Every preference row's chat prompt (token ids), and the rows PPO samples from and holds out."""
    if max_seq_len - cfg.max_new_tokens < 8:
        raise StageError(
            f"rlhf.max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in {max_seq_len}"
        )
    _, prompts, groups = chat_data.preference_prompts(tokenizer)  # groups: by object, as reward and dpo
    train_rows, val_rows = chat_data.rlhf_split(cfg, [len(p) for p in prompts], max_seq_len, groups)
    return prompts, train_rows, val_rows


def run(params: Params, tracker: Any) -> dict[str, float]:
    cfg = params.rlhf
    reference_name = cfg.reference
    tokenizer = stage_tokenizer(reference_name)
    sft, _ = load_causal_lm(reference_name, tokenizer.fingerprint)
    reference: nn.Module
    if cfg.lora.enabled:  # the reference is the policy's own frozen base: adapters disabled, no copy
        reference = AdaptersOff(sft)
    else:
        reference, _ = load_causal_lm(reference_name, tokenizer.fingerprint)
        check_same_architecture(sft, reference, (reference_name, reference_name))
    reward_model, _ = load_stage_model("reward", tokenizer.fingerprint, kind="scalar_head")
    reward_config = reward_model.config
    if (
        reward_config.vocab_size != sft.config.vocab_size
        or reward_config.max_seq_len < sft.config.max_seq_len
    ):
        raise StageError(
            f"reward model {paths.checkpoint('reward')} (vocab {reward_config.vocab_size}, context "
            f"{reward_config.max_seq_len}) cannot score the policy's sequences (vocab {sft.config.vocab_size}, "
            f"context {sft.config.max_seq_len}); re-run the reward stage on this SFT model"
        )
    reference.requires_grad_(False)
    reward_model.requires_grad_(False)
    torch.manual_seed(cfg.train.seed)
    model = PolicyWithCritic(sft)
    adapters = None
    if cfg.lora.enabled:  # the value head learns in full but is dropped from the checkpoint, as without LoRA
        base = base_of(paths.checkpoint(reference_name), "checkpoint")
        head = ("value_head.weight", "value_head.bias")
        adapters = add_adapters(
            model, cfg.lora, cfg.train, base, where="rlhf", prefix="transformer.", keep=head
        )
    prompts, train_rows, val_rows = load_prompts(tokenizer, cfg, sft.config.max_seq_len)
    objective = ProximalPolicy(prompts, train_rows, val_rows, reference, reward_model, cfg, tokenizer)
    # The starting policy's held-out reward, measured as every later evaluation is: the baseline that
    # val/reward_mean is compared with (metrics: val/reward_mean_initial).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    with torch.no_grad(), objective.autocast(device):
        initial = objective.evaluate(model)["val/reward_mean"]
    log.info("before PPO: val/reward_mean=%.4g (the %s policy)", initial, reference_name)

    def value_head_dropped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Downstream stages need a causal LM: the value head is training scaffolding and is dropped.
        policy = PolicyWithValue(Transformer(sft.config))
        policy.load_state_dict(state)
        return policy.transformer.state_dict()

    return train_stage(
        "rlhf",
        model,
        objective,
        cfg.train,
        tracker=tracker,
        checkpoint_model=Transformer(sft.config),
        config=sft.config,
        tokenizer_fingerprint=tokenizer.fingerprint,
        parent=reference_name,
        on_step=alerts_at_end(
            cfg.train.max_steps, lambda _: objective.kl_alerts(params.alerts.ppo_max_kl), params, tracker
        ),
        extra_metrics={"val/reward_mean_initial": initial},
        weights_to_save=None if adapters is not None else value_head_dropped,
        adapters=adapters,
        files=tokenizer_files_of(tokenizer),
    )


if __name__ == "__main__":
    training_main("rlhf", run, lambda params: params.rlhf.train)
